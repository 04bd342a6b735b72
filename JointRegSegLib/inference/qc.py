"""Quality-control numbers a user checks before trusting a registration."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..core.geometry import jacobian_determinant


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


def volume_flags(fixed_volumes: dict, moving_volumes: dict, fixed: sitk.Image, moving: sitk.Image,
                 label_table: list[dict], min_voxels_per_axis: int = 16, max_ratio: float = 2.5) -> list[str]:
    """Warnings for structure volumes a reader should not trust, generic over the label table.

    - an input too small (fewer than `min_voxels_per_axis` voxels along an axis) to hold the structures;
    - a structure bigger than all the anatomy (voxels above the background) of its image;
    - a structure whose fixed and moving volumes differ by more than `max_ratio` (registration between
      two subjects rarely changes a structure's size that much: one of the segmentations is wrong);
    - a structure outside a range the label table gives (`volume_ml: [low, high]` in its entry).
    """
    flags = []
    for role, image in (("fixed", fixed), ("moving", moving)):
        size = image.GetSize()
        if min(size) < min_voxels_per_axis:
            flags.append(f"the {role} image is only {'x'.join(map(str, size))} voxels: too small for structure "
                         "volumes to mean anything")
    for role, image, volumes in (("fixed", fixed, fixed_volumes), ("moving", moving, moving_volumes)):
        values = sitk.GetArrayViewFromImage(image)
        anatomy_ml = float(np.count_nonzero(values > values.min())) * float(np.prod(image.GetSpacing())) / 1000.0
        for name, volume in volumes.items():
            if volume > anatomy_ml:
                flags.append(f"{name}: {volume:.1f} ml in the {role} image is more than all its anatomy "
                             f"({anatomy_ml:.1f} ml)")
    for entry in label_table:
        name = entry["name"]
        if entry["value"] == 0 or name not in fixed_volumes:
            continue
        fixed_ml, moving_ml = fixed_volumes[name], moving_volumes.get(name, 0.0)
        limits = entry.get("volume_ml")
        if isinstance(limits, (list, tuple)) and len(limits) == 2:
            for role, volume in (("fixed", fixed_ml), ("moving", moving_ml)):
                if not float(limits[0]) <= volume <= float(limits[1]):
                    flags.append(f"{name}: {volume:.2f} ml in the {role} image is outside the expected "
                                 f"{limits[0]}-{limits[1]} ml")
        larger, smaller = max(fixed_ml, moving_ml), min(fixed_ml, moving_ml)
        if larger > 0 and (smaller == 0 or larger / smaller > max_ratio):
            ratio = "absent in one image" if smaller == 0 else f"x{larger / smaller:.1f}"
            flags.append(f"{name}: {fixed_ml:.2f} ml in the fixed image vs {moving_ml:.2f} ml in the moving "
                         f"image ({ratio}); check its segmentation")
    return flags
