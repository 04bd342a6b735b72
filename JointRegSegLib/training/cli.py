"""`jointregseg train` sub-command."""
from __future__ import annotations

import json
import sys
from pathlib import Path

# training.strategies.STRATEGIES and networks.ARCHITECTURES, named here without importing torch
STRATEGIES = ("deepatlas", "deeprs", "brbs", "pcreg-rt", "uresnet", "unsupervised", "synth", "affine")
ARCHITECTURES = {"unet-pair": {"name": "unet-pair", "registration": {"channels": [16, 32, 32, 32], "strides": [2, 2, 2]},
                               "segmentation": {"channels": [16, 32, 32, 64], "strides": [2, 2, 2]},
                               "integration_steps": 7, "velocity_downsample": 2},
                 "uresnet": {"name": "uresnet", "channels": [8, 16], "integration_steps": 7, "velocity_downsample": 2}}
ARCH_ALIASES = {"ureset": "uresnet", "u-resnet": "uresnet"}


def _architecture(config: dict, arch: str | None) -> dict:
    """`--arch` replaces the config's architecture unless the config already names that one."""
    if arch is None:
        return config.get("architecture") or ARCHITECTURES["unet-pair"]
    arch = ARCH_ALIASES.get(arch, arch)
    current = config.get("architecture") or {}
    return current if current.get("name") == arch else ARCHITECTURES[arch]


def _cmd_train(args) -> int:
    from ..core.progress import stderr_progress
    from ..core.threads import configure_command_threads
    configure_command_threads(args.threads)   # `run`'s thread decision (--threads, else the free cores)
    from .train import train
    config = json.loads(Path(args.config).read_text(encoding="utf-8"))
    config["architecture"] = _architecture(config, args.arch)
    default_strategy = "uresnet" if config["architecture"]["name"] == "uresnet" else "deepatlas"
    config["strategy"] = args.strategy or config.get("strategy", default_strategy)
    out = train(config, args.data, args.out, init=args.init, device=args.device, progress=stderr_progress)
    print(f"model written to {out}")
    return 0


def _cmd_finetune(args) -> int:
    from ..core.progress import stderr_progress
    from ..core.threads import configure_command_threads
    configure_command_threads(args.threads)
    from .finetune import finetune
    config = json.loads(Path(args.config).read_text(encoding="utf-8")) if args.config else {}
    if args.steps:
        config["steps"] = {"reg_pretrain": 0, "seg_pretrain": args.steps // 2, "joint": args.steps - args.steps // 2}
    outcome = finetune(args.init, args.labelled, args.out, unlabelled_dir=args.unlabelled, holdout=args.holdout,
                       config=config, device=args.device, progress=stderr_progress)
    before, after = outcome["before"], outcome["after"]
    where = f"held-out {outcome['held_out']}" if outcome["held_out"] else "the training cases"
    print(f"segmentation Dice on {where}: {before['segmentation_dice_mean']:.3f} -> {after['segmentation_dice_mean']:.3f}; "
          f"registration Dice {before['registration_dice_mean']:.3f} -> {after['registration_dice_mean']:.3f}")
    if not outcome["improved"]:
        print(f"the fine-tuned model is WORSE than {args.init}; keep using that one", file=sys.stderr)
    print(f"model written to {args.out}")
    return 0


def register(sub) -> None:
    train = sub.add_parser("train", help="train a model: a seed method, synthesis or the learned affine (one loop)")
    train.add_argument("--strategy", choices=STRATEGIES, default=None,
                       help="training method (default: the config's, else deepatlas; uresnet for --arch uresnet)")
    train.add_argument("--arch", choices=[*ARCHITECTURES, *ARCH_ALIASES], default=None,
                       help="network architecture (default: the config's); uresnet = U-ReSNet, under 40k parameters")
    train.add_argument("--config", required=True, help="JSON training config (see configs/)")
    train.add_argument("--data", required=True, help="data set folder from `jointregseg data import` (your own "
                       "scans) or `jointregseg data build` (the offline atlases); for --strategy synth or affine "
                       "also a folder where the offline label-map sources are cached (built on first use)")
    train.add_argument("--out", required=True, help="output checkpoint (.safetensors)")
    train.add_argument("--init", default=None, help="fine-tune from this checkpoint")
    train.add_argument("--device", default="auto")
    train.add_argument("--threads", type=int, default=None, metavar="N",
                       help="intra-op threads (default: $JOINTREGSEG_THREADS, else the free cores, as `run`)")
    train.set_defaults(func=_cmd_train)
    tune = sub.add_parser("finetune", help="few-shot fine-tuning from corrected segmentations")
    tune.add_argument("--init", required=True, help="checkpoint to start from (never modified)")
    tune.add_argument("--labelled", required=True, help="folder of NAME.nrrd + NAME_labels.nrrd corrected cases")
    tune.add_argument("--unlabelled", default=None, help="folder of further images without labels")
    tune.add_argument("--out", required=True, help="new checkpoint (.safetensors)")
    tune.add_argument("--holdout", type=int, default=None,
                      help="labelled cases kept out to measure before/after (default 1 if there are 2 or more)")
    tune.add_argument("--steps", type=int, default=None, help="training steps (default 300)")
    tune.add_argument("--config", default=None, help="JSON overriding the fine-tuning settings")
    tune.add_argument("--device", default="auto")
    tune.add_argument("--threads", type=int, default=None, metavar="N",
                      help="intra-op threads (default: $JOINTREGSEG_THREADS, else the free cores, as `run`)")
    tune.set_defaults(func=_cmd_finetune)
