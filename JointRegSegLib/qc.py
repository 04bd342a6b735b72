"""Quality-control numbers a user checks before trusting a registration."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .geometry import jacobian_determinant


def jacobian_stats(displacement_mm: np.ndarray, grid: sitk.Image, mask: np.ndarray | None = None) -> dict:
    """Folding (% voxels with det J <= 0) and the spread of det J, over `mask` if given."""
    det = jacobian_determinant(displacement_mm, grid)
    return determinant_stats(det, mask), det


def determinant_stats(det: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """Folding % and det J spread from a Jacobian determinant map (over `mask` if given and not empty)."""
    values = det[mask] if mask is not None else det.ravel()
    if values.size == 0:
        values = det.ravel()
    p1, p50, p99 = np.percentile(values, [1, 50, 99])
    step = 1 << 22
    log_sum = log_sq = 0.0
    for start in range(0, values.size, step):  # in chunks: no float64 copy of a large map
        logs = np.log(np.clip(values[start: start + step], 1e-6, None), dtype=np.float64)
        log_sum, log_sq = log_sum + float(logs.sum()), log_sq + float(np.square(logs).sum())
    mean_log = log_sum / values.size
    return {
        "folding_percent": float(100.0 * np.count_nonzero(values <= 0) / values.size),
        "jacobian_min": float(values.min()), "jacobian_p1": float(p1), "jacobian_median": float(p50),
        "jacobian_p99": float(p99), "jacobian_max": float(values.max()),
        "jacobian_std_log": float(np.sqrt(max(log_sq / values.size - mean_log ** 2, 0.0))),
    }


def label_volumes_ml(labels: np.ndarray, spacing, label_table: list[dict]) -> dict:
    voxel_ml = float(np.prod(spacing)) / 1000.0
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=max(e["value"] for e in label_table) + 1)
    return {e["name"]: round(float(counts[e["value"]]) * voxel_ml, 4) for e in label_table if e["value"] != 0}


def dice_per_label(a: np.ndarray, b: np.ndarray, label_table: list[dict]) -> dict:
    scores = {}
    for entry in label_table:
        if entry["value"] == 0:
            continue
        x, y = a == entry["value"], b == entry["value"]
        denom = x.sum() + y.sum()
        scores[entry["name"]] = float(2.0 * np.logical_and(x, y).sum() / denom) if denom else float("nan")
    return scores
