"""The one scoring core: what every evaluation measures of one registered pair, whoever registered it (a
network on its working grid in training's validation and the held-out synthetic check, or a method over
labelled files in physical space for `jointregseg evaluate` and the benchmarks).

Label maps are integer arrays on the fixed grid; a structure is a non-zero entry of the label table.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from ..inference.qc import dice_per_label, jacobian_stats


def nanmean(values) -> float:
    """Mean ignoring NaN (a structure absent from both label maps, a metric not measured); NaN when all are."""
    values = list(values)
    if all(math.isnan(v) for v in values):
        return float("nan")
    return float(np.nanmean(values))


def mean_dice(a: np.ndarray, b: np.ndarray, label_table: list) -> float:
    """Dice of two label maps, averaged over the structures present in either."""
    return nanmean(dice_per_label(a, b, label_table).values())


def hd95_per_label(a: np.ndarray, b: np.ndarray, spacing_zyx, label_table) -> dict:
    """95th-percentile symmetric Hausdorff distance (mm) per structure (MONAI's metric)."""
    import torch
    from monai.metrics import compute_hausdorff_distance
    out = {}
    for entry in label_table:
        if entry["value"] == 0:
            continue
        x, y = a == entry["value"], b == entry["value"]
        if not x.any() or not y.any():
            out[entry["name"]] = float("nan")
            continue
        # crop to the structures' joint bounding box (+2 voxels): same distances, far less work
        box = np.argwhere(x | y)
        low, high = np.maximum(box.min(0) - 2, 0), box.max(0) + 3
        crop = tuple(slice(lo, hi) for lo, hi in zip(low, high))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # MONAI's own deprecated internal argument
            value = compute_hausdorff_distance(torch.from_numpy(x[crop])[None, None],
                                               torch.from_numpy(y[crop])[None, None], percentile=95,
                                               spacing=list(spacing_zyx))
        out[entry["name"]] = float(value.item())
    return out


def end_point_error_mm(errors_mm, region) -> float:
    """Mean end-point error (mm) over `region`, from each voxel's distance to where the true field sends it
    (only where a true field is known: synthetic pairs)."""
    return float(errors_mm[region].mean())


@dataclass
class PairScores:
    dice: dict                  # per structure: the warped moving labels vs the fixed labels (NaN: in neither)
    hd95_mm: dict               # per structure (NaN: in neither, or not measured)
    deformation: dict           # folding_percent and det J spread of the displacement ({} when not given)
    segmentation_dice: float    # mean Dice of the predicted fixed segmentation (NaN when not given)

    @property
    def registration_dice(self) -> float:
        return nanmean(self.dice.values())

    @property
    def hd95_mean_mm(self) -> float:
        return nanmean(self.hd95_mm.values())


def score_pair(warped_labels: np.ndarray, fixed_labels: np.ndarray, label_table: list, *,
               predicted: np.ndarray | None = None, displacement_mm: np.ndarray | None = None, grid=None,
               hd95_spacing_zyx=None) -> PairScores:
    """Scores of one registered pair: Dice per structure of the warped moving labels against the fixed labels;
    HD95 per structure when `hd95_spacing_zyx` is given; folding % and det J statistics of `displacement_mm`
    ((z, y, x, 3) LPS mm on `grid`, the fixed grid) when given; the segmentation Dice of `predicted` (the
    predicted fixed segmentation) when given."""
    dice = dice_per_label(warped_labels, fixed_labels, label_table)
    hd95 = (hd95_per_label(warped_labels, fixed_labels, hd95_spacing_zyx, label_table)
            if hd95_spacing_zyx is not None else {name: float("nan") for name in dice})
    deformation = jacobian_stats(displacement_mm, grid)[0] if displacement_mm is not None else {}
    segmentation = mean_dice(predicted, fixed_labels, label_table) if predicted is not None else float("nan")
    return PairScores(dice, hd95, deformation, segmentation)
