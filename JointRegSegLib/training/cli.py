"""`jointregseg train` sub-command."""
from __future__ import annotations

import json
from pathlib import Path

STRATEGIES = ("deepatlas", "deeprs", "unsupervised")  # training.strategies.STRATEGIES, without importing torch


def _cmd_train(args) -> int:
    from ..progress import stderr_progress
    from .train import train
    config = json.loads(Path(args.config).read_text())
    config["strategy"] = args.strategy or config.get("strategy", "deepatlas")
    out = train(config, args.data, args.out, init=args.init, device=args.device, progress=stderr_progress)
    print(f"model written to {out}")
    return 0


def register(sub) -> None:
    train = sub.add_parser("train", help="few-shot joint training of registration + segmentation")
    train.add_argument("--strategy", choices=STRATEGIES, default=None)
    train.add_argument("--config", required=True, help="JSON training config (see configs/)")
    train.add_argument("--data", required=True, help="dataset folder from `jointregseg data build`")
    train.add_argument("--out", required=True, help="output checkpoint (.safetensors)")
    train.add_argument("--init", default=None, help="fine-tune from this checkpoint")
    train.add_argument("--device", default="auto")
    train.set_defaults(func=_cmd_train)
