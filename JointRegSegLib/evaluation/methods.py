"""Registration methods under evaluation, one interface: `run(moving, fixed) -> Outcome` with the
total displacement on the fixed grid (LPS mm, fixed -> moving), an optional predicted fixed
segmentation, the seconds spent registering and the peak resident memory.

JointRegSeg and the identity/affine baselines run in this process (memory sampled while they run);
a peer tool (ANTs, elastix, ...) runs as a child process through `ExternalMethod`, which is how tools
that cannot share one Python process (antspyx and itk-elastix) are compared side by side.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..core.errors import JointRegSegError


@dataclass
class Outcome:
    displacement: sitk.Image                 # vector image on the fixed grid, mm, LPS
    seconds: float
    peak_memory_mb: float
    fixed_segmentation: sitk.Image | None = None


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, AttributeError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled every 10 ms)."""

    def __enter__(self):
        self.peak_mb, self._stop = _rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            self.peak_mb = max(self.peak_mb, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _rss_mb())
        return False


def zero_displacement(fixed: sitk.Image) -> sitk.Image:
    field = sitk.Image(fixed.GetSize(), sitk.sitkVectorFloat64, 3)
    field.CopyInformation(fixed)
    return field


class Identity:
    name = "identity"

    def run(self, moving, fixed) -> Outcome:
        return Outcome(zero_displacement(fixed), 0.0, _rss_mb())


class AffineOnly:
    """The affine pre-alignment JointRegSeg itself uses (SimpleITK, Mattes MI), alone."""
    name = "affine"

    def run(self, moving, fixed) -> Outcome:
        from ..inference.affine import affine_prealign
        with PeakMemory() as memory:
            started = time.perf_counter()
            affine = affine_prealign(moving, fixed)
            field = sitk.TransformToDisplacementField(affine, sitk.sitkVectorFloat64, fixed.GetSize(),
                                                      fixed.GetOrigin(), fixed.GetSpacing(), fixed.GetDirection())
            seconds = time.perf_counter() - started
        return Outcome(field, seconds, memory.peak_mb)


class JointRegSegMethod:
    def __init__(self, model_path, refine_iterations: int = 0, device: str = "auto", name: str | None = None,
                 segment: bool = True, **options):
        """`options` go to register_and_segment (e.g. affine_method, segmentation_mode); `segment=False`
        leaves the segmentation unscored (a model whose label table differs from the pairs' labels)."""
        from ..models.checkpoint import load_model
        self.model = load_model(model_path)
        self.segment, self.options = segment, options
        self.device, self.refine_iterations = device, int(refine_iterations)
        self.name = name or (self.model.card.get("name", Path(model_path).stem)
                             + (f"+refine{self.refine_iterations}" if self.refine_iterations else ""))

    def run(self, moving, fixed) -> Outcome:
        from ..inference.pipeline import register_and_segment
        with PeakMemory() as memory:
            result = register_and_segment(moving, fixed, self.model, device=self.device,
                                          refine_iterations=self.refine_iterations, **self.options)
        return Outcome(result.displacement, float(result.qc["timing_s"]["total"]), memory.peak_mb,
                       result.fixed_segmentation if self.segment else None)


class ExternalMethod:
    """A peer tool run as `COMMAND MOVING FIXED OUT_DIR`; it writes OUT_DIR/displacement.nii.gz
    (fixed grid, LPS mm, fixed -> moving, like an ITK displacement field) and OUT_DIR/stats.json
    with "seconds" (registration only) and "peak_memory_mb"."""

    def __init__(self, name: str, command: str | list, timeout_s: float = 3600):
        self.name = name
        self.command = shlex.split(command) if isinstance(command, str) else list(command)
        self.timeout_s = timeout_s

    def run(self, moving, fixed) -> Outcome:
        with tempfile.TemporaryDirectory(prefix=f"jrs-{self.name}-") as work:
            work = Path(work)
            sitk.WriteImage(moving, str(work / "moving.nii.gz"))
            sitk.WriteImage(fixed, str(work / "fixed.nii.gz"))
            done = subprocess.run(self.command + [str(work / "moving.nii.gz"), str(work / "fixed.nii.gz"),
                                                  str(work / "out")], capture_output=True, text=True, encoding="utf-8", errors="replace",
                                  timeout=self.timeout_s, cwd=work)   # some tools write into the cwd
            if done.returncode != 0:
                raise JointRegSegError(f"{self.name} failed (exit {done.returncode}): {done.stderr[-2000:]}")
            stats = json.loads((work / "out" / "stats.json").read_text(encoding="utf-8"))
            field = sitk.ReadImage(str(work / "out" / "displacement.nii.gz"), sitk.sitkVectorFloat64)
        if field.GetSize() != fixed.GetSize():
            raise JointRegSegError(f"{self.name}: displacement field size {field.GetSize()} is not the fixed grid "
                                   f"{fixed.GetSize()}")
        return Outcome(field, float(stats["seconds"]), float(stats["peak_memory_mb"]))


def warp_labels(labels: sitk.Image, displacement: sitk.Image) -> sitk.Image:
    """Moving labels resampled onto the fixed grid through the field (nearest neighbour)."""
    transform = sitk.DisplacementFieldTransform(sitk.Cast(displacement, sitk.sitkVectorFloat64))
    return sitk.Resample(labels, displacement, transform, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())


def displacement_array(displacement: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(displacement).astype(np.float64)
