"""Intensity normalisation declared in a model card (MR percentiles or a CT window)."""
from __future__ import annotations

import numpy as np
import torch

from .errors import CheckpointError


def normalize(tensor: torch.Tensor, spec: dict) -> torch.Tensor:
    """Map intensities to about [0, 1] the way the model saw them in training."""
    kind = spec.get("kind")
    if kind == "percentile":
        values = tensor.detach().flatten().cpu().numpy()
        foreground = values[values > values.min()]
        sample = foreground if foreground.size > 100 else values
        lower, upper = np.percentile(sample, [spec.get("lower", 1.0), spec.get("upper", 99.0)])
    elif kind == "window":
        lower = spec["center"] - spec["width"] / 2
        upper = spec["center"] + spec["width"] / 2
    elif kind == "minmax":
        lower, upper = float(tensor.min()), float(tensor.max())
    else:
        raise CheckpointError(f"model card: unknown intensity normalisation {kind!r} "
                              "(expected 'percentile', 'window' or 'minmax')")
    scale = max(float(upper) - float(lower), 1e-6)
    return ((tensor - float(lower)) / scale).clamp(0.0, 1.0)
