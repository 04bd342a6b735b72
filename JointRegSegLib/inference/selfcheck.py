"""Every run checks itself: a joint model segments both images, so a registration can be judged without
ground truth. The fixed image's own segmentation (network only, before any fusion) and the moving image's,
carried onto the fixed image by the registration, must agree; where they do not, the registration (or a
segmentation) failed. The per-structure agreement (Dice on the working grid) and its mean go into qc.json;
the mean against the card's `self_check.threshold` (or `DEFAULT_THRESHOLD`) gives `registration_status`
"ok" or "check". The threshold is chosen from measured good and failed runs
(benchmarks/selfcheck_threshold.py, benchmarks/SELFCHECK.md).
"""
from __future__ import annotations

import numpy as np
import torch

DEFAULT_THRESHOLD = 0.5
MIN_VOXELS = 8           # a structure smaller than this in both images (working grid) is not scored


def threshold_of(card: dict) -> float:
    return float(card.get("self_check", {}).get("threshold", DEFAULT_THRESHOLD))


def agreement(fixed_probabilities: torch.Tensor, carried_probabilities: torch.Tensor, label_table: list) -> dict:
    """Per-structure Dice between the argmax of two probability maps (1, C, z, y, x) on one grid."""
    a = fixed_probabilities[0].max(0).indices.cpu().numpy()
    b = carried_probabilities[0].max(0).indices.cpu().numpy()
    channels = fixed_probabilities.shape[1]
    counts_a = np.bincount(a.ravel(), minlength=channels)
    counts_b = np.bincount(b.ravel(), minlength=channels)
    both = np.bincount(a.ravel()[a.ravel() == b.ravel()], minlength=channels)
    scores = {}
    for entry in label_table:
        value = int(entry["value"])
        if value == 0 or value >= channels or max(counts_a[value], counts_b[value]) < MIN_VOXELS:
            continue
        scores[entry["name"]] = round(float(2 * both[value] / (counts_a[value] + counts_b[value])), 4)
    return scores


def summary(scores: dict) -> float | None:
    return round(float(np.mean(list(scores.values()))), 4) if scores else None


def status(mean: float | None, threshold: float) -> str:
    """"ok" when the structures agree on average at least `threshold`; "check" otherwise (or when no
    structure was found in either image: nothing to agree on is not a success)."""
    return "ok" if mean is not None and mean >= threshold else "check"
