"""`jointregseg data build` sub-command."""
from __future__ import annotations


def _cmd_build(args) -> int:
    from ..core.progress import stderr_progress
    from ..core.threads import configure_command_threads
    # `run`'s thread decision (--threads, else the free cores), measured while the builder's modules import
    configure_command_threads(args.threads, modules=(f"{__package__}.build_heldout" if args.held_out
                                                     else f"{__package__}.build",))
    if args.held_out:
        from .build_heldout import build_heldout_dataset
        out = build_heldout_dataset(args.out, seed=args.seed, n_train=args.train, n_val=args.val,
                                    n_labelled=args.labelled, spacing=args.spacing, progress=stderr_progress)
    else:
        from .build import build_dataset
        out = build_dataset(args.out, seed=args.seed, n_train=args.train, n_val=args.val, n_labelled=args.labelled,
                            progress=stderr_progress)
    print(f"dataset written to {out}")
    return 0


def register(sub) -> None:
    data = sub.add_parser("data", help="build the offline few-shot training set")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    build = data_sub.add_parser("build", help="templates + synthetic subjects -> a dataset folder")
    build.add_argument("--out", required=True)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--train", type=int, default=36, help="synthetic training subjects")
    build.add_argument("--val", type=int, default=8, help="synthetic validation subjects (labelled)")
    build.add_argument("--labelled", type=int, default=2, help="training images whose labels may be used")
    build.add_argument("--held-out", choices=["colin27"], default=None,
                       help="synthesise training subjects from every offline source except this anatomy and "
                            "validate on it (the generalisation protocol of benchmarks/methods_study.py)")
    build.add_argument("--spacing", type=float, default=2.5, help="working-grid spacing in mm (with --held-out)")
    build.add_argument("--threads", type=int, default=None, metavar="N",
                       help="intra-op threads (default: $JOINTREGSEG_THREADS, else the free cores, as `run`)")
    build.set_defaults(func=_cmd_build)
