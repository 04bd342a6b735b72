"""Give a trained model the card entries its config names (`training.strategies.synth.CARD_KEYS`) and write it.

    python configs/finish_model.py --config configs/brain-head-synth.json --model TRAINED.safetensors \
                                   --out Resources/Models/brain-head-synth.safetensors [--metrics METRICS.json]

For a run that was started before its config named them (the weights are untouched: the checksum covers
the weights and is recomputed for the new card). `--metrics` adds held-out figures (benchmarks/rawscans.py).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from JointRegSegLib.models.checkpoint import load_model, save_model  # noqa: E402
from JointRegSegLib.training.strategies.synth import CARD_KEYS  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--metrics", default=None)
    parser.add_argument("--parent", default=None, help="the model it was trained from: its training and data "
                        "records go into the card's `parent` (the parts of the network it kept were trained so)")
    args = parser.parse_args(argv)
    config = json.loads(Path(args.config).read_text(encoding="utf-8"))
    model = load_model(args.model)
    for key in CARD_KEYS:
        if key in config:
            model.card[key] = copy.deepcopy(config[key])
    for key in ("name", "description", "modality"):
        if key in config:
            model.card[key] = config[key]
    if args.parent:
        parent = load_model(args.parent).card
        model.card["parent"] = {**model.card.get("parent", {}), "name": parent.get("name"),
                                "weights_sha256": parent.get("weights_sha256"), "training": parent.get("training"),
                                "data": parent.get("data"), "metrics": parent.get("metrics")}
    if "held_out" in config:
        model.card.setdefault("data", {})["held_out"] = config["held_out"]
    if args.metrics:
        model.card["metrics"] = json.loads(Path(args.metrics).read_text(encoding="utf-8"))
    save_model(model, args.out)
    print(f"written {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
