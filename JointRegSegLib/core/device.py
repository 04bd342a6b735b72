"""Device choice: CUDA when present, else CPU; CUDA out-of-memory falls back to CPU."""
from __future__ import annotations

import warnings

import torch

from .errors import JointRegSegError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise JointRegSegError(f"device {device!r} requested but CUDA is not available here; use 'auto' or 'cpu'")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise JointRegSegError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'")
    return torch.device(name)


def run_with_cpu_fallback(work, device: torch.device):
    """Run `work(device)`; on CUDA out-of-memory warn and run it again on the CPU."""
    try:
        return work(device), device
    except torch.OutOfMemoryError:
        if device.type != "cuda":
            raise
        torch.cuda.empty_cache()
        warnings.warn("CUDA ran out of memory; running on the CPU instead (slower)", RuntimeWarning, stacklevel=2)
        cpu = torch.device("cpu")
        return work(cpu), cpu
