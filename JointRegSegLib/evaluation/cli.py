"""`jointregseg evaluate` sub-command."""
from __future__ import annotations

from pathlib import Path


def _cmd_evaluate(args) -> int:
    from ..models.card import read_card
    from ..core.threads import configure_command_threads
    from ..core.errors import JointRegSegError
    from ..core.progress import stderr_progress
    from .evaluate import environment_lines, evaluate, read_pairs, write_evaluation
    from .methods import AffineOnly, ExternalMethod, Identity, JointRegSegMethod
    configure_command_threads(args.threads)   # `run`'s thread decision (--threads, else the free cores)
    pairs = read_pairs(args.pairs)
    models = list(args.model) if isinstance(args.model, (list, tuple)) else [args.model] if args.model else []
    if not models:   # no --model: the embedded default model, as `run`
        from ..models.installed import default_model_path
        models = [default_model_path()]
    methods = [{"identity": Identity, "affine": AffineOnly}[b]() for b in args.baseline]
    for model in models:
        for refine in sorted(set(args.refine or [0])):
            methods.append(JointRegSegMethod(model, refine, args.device))
    for spec in args.external or []:
        name, sep, command = spec.partition("=")
        if not sep or not command:
            raise JointRegSegError(f"--external needs NAME=COMMAND, got {spec!r}")
        methods.append(ExternalMethod(name, command))
    if not methods:
        raise JointRegSegError("nothing to evaluate: give --model, --baseline or --external")
    if args.labels:
        import json
        label_table = json.loads(Path(args.labels).read_text(encoding="utf-8"))
    elif models:
        label_table = read_card(models[0])["labels"]
    else:
        from ..data.sources import LABEL_TABLE as label_table
    rows = evaluate(pairs, methods, label_table, progress=stderr_progress)
    header = f"# Evaluation: {len(pairs)} pairs from {args.pairs}\n\n{environment_lines()}\n"
    written = write_evaluation(rows, label_table, args.out, reference=args.reference, header=header)
    print(Path(written["summary"]).read_text(encoding="utf-8"))
    for key in ("csv", "summary"):
        print(f"{key}: {written[key]}")
    return 0


def register(sub) -> None:
    ev = sub.add_parser("evaluate", help="registration/segmentation accuracy, smoothness, time and memory on "
                                         "labelled pairs")
    ev.add_argument("--pairs", required=True, help="CSV with columns moving, fixed, moving_labels, fixed_labels")
    ev.add_argument("--model", action="append",
                    help="checkpoint to evaluate (repeatable; default: the embedded brain model)")
    ev.add_argument("--refine", type=int, action="append", metavar="N",
                    help="test-time refinement iterations (repeatable: each model is run with each)")
    ev.add_argument("--baseline", action="append", default=[], choices=["identity", "affine"])
    ev.add_argument("--external", action="append", metavar="NAME=COMMAND",
                    help="a peer tool run as COMMAND MOVING FIXED OUT_DIR (see evaluation/methods.py)")
    ev.add_argument("--reference", default=None, help="method whose time the speed-ups are relative to")
    ev.add_argument("--labels", default=None, help="label table JSON (default: the first model's)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--threads", type=int, default=None, metavar="N",
                    help="intra-op threads (default: $JOINTREGSEG_THREADS, else the free cores, as `run`)")
    ev.add_argument("--out", required=True, help="output folder")
    ev.set_defaults(func=_cmd_evaluate)
