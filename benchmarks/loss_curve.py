"""Loss curves of a synthetic-data training run made of phases (each a `jointregseg train` log CSV).

    python benchmarks/loss_curve.py --log "phase 1=configs/brain-synth.phase1.training-log.csv" \
        --log "phase 2=configs/brain-synth.training-log.csv" --out configs/brain-synth.loss-curve.png

Steps a resumed run logged twice keep their last entry; phases follow each other on one step axis;
each curve is a 50-step running mean.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from JointRegSegLib.training import training_log  # noqa: E402
from JointRegSegLib.training.training_log import running_mean  # noqa: E402

PANELS = (("dice", "registration: label Dice loss (generation labels)"),
          ("segmentation", "segmentation: Dice + CE"),
          ("image", "registration: LNCC (same-contrast pairs)"),
          ("flow", "registration: end-point error, mm (supervised flow)"))


def read_log(path: str) -> list[tuple[int, dict]]:
    return [(step, terms) for step, _, _, terms in training_log.read_log(Path(path))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", action="append", required=True, metavar="NAME=CSV")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, len(PANELS), figsize=(5.2 * len(PANELS), 4.2))
    offset = 0
    for index, item in enumerate(args.log):
        name, path = item.split("=", 1)
        entries = read_log(path)
        for axis, (term, title) in zip(axes, PANELS):
            points = [(offset + i, terms[term]) for i, (_, terms) in enumerate(entries) if term in terms]
            if len(points) > 1:
                steps, values = np.array(points).T
                smooth = running_mean(values)
                axis.plot(steps[len(steps) - len(smooth):], smooth, label=name, color=f"C{index}")
            axis.set_title(title, fontsize=9)
            axis.set_xlabel("step")
        offset += len(entries)
    for axis in axes:
        if axis.lines:
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out, dpi=100)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
