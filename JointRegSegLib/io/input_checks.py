"""Sanity checks on a run's two input images, in plain words: a label map given as an image, or the same
image given twice. They warn; they do not refuse (a user may mean it, e.g. a test of the identity).

`input_warnings` is pure (no I/O besides comparing the two paths) and quick on any volume: the label-map
test looks at a fixed sample of voxels and their neighbours, not at every voxel.

What tells a label map from an image (measured on 24 label maps: AAL, AAL3, AICHA, Desikan-Killiany,
Destrieux, Neuromorphometrics, Harvard-Oxford, JHU, Brodmann, Talairach, MarsAtlas, HCPex, INIA19
NeuroMaps; and on T1 images stored as integers: Colin27 at 1 and 2 mm, smoothed, brain-extracted, the ITK
subject): every voxel is a whole number, and inside the volume (voxels other than the most common value,
the background) a voxel equals its neighbour 81-98 % of the time in a label map, 3-25 % in an image, even
a smoothed uint8 one. The count of distinct values does not tell them apart (a uint8 T1 holds 80-250
values, an atlas 33-725), so it is only reported.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

# a label map's uniform patches: neighbouring foreground voxels equal at least this often (label maps
# measured 0.81-0.98, images 0.03-0.25)
UNIFORM_FRACTION = 0.6
SAMPLE_VOXELS = 100_000          # voxels looked at (all of them in smaller volumes)
_MIN_PAIRS = 200                 # foreground neighbour pairs needed for a verdict
_CHUNK = 8 * 1024 * 1024


def input_warnings(moving: sitk.Image, fixed: sitk.Image, moving_path=None, fixed_path=None) -> list[str]:
    """Plain-words warnings about the inputs of a registration (an empty list when nothing looks wrong):
    either image looks like a label map (segmentation) rather than an intensity image, or moving and fixed
    are the same file or the same image (identical voxels and geometry)."""
    warnings = []
    for role, image, path in (("moving", moving, moving_path), ("fixed", fixed, fixed_path)):
        found = label_map_evidence(image)
        if found is not None:
            where = f" ({Path(path).name})" if path else ""
            warnings.append(
                f"the {role} image{where} looks like a label map (a segmentation), not a scan: all its voxels "
                f"are whole numbers ({found['distinct']} distinct values{' in a sample' if found['sampled'] else ''}) "
                f"in uniform patches ({100 * found['uniform']:.0f}% of neighbouring voxels are equal; scans "
                "have under 30%). Registration and segmentation need the intensity image (e.g. the T1 MRI); "
                "a label map can only guide the refinement (--guide-moving-labels / --guide-fixed-labels; "
                "guide segmentations in Slicer).")
    same = _same_file(moving_path, fixed_path)
    if same:
        warnings.append(f"moving and fixed are the same file ({same}): there is nothing to register; the "
                        "transform will be about the identity and the segmentations the same. Give two "
                        "different images.")
    elif same_image(moving, fixed):
        warnings.append("moving and fixed are the same image (identical voxels and position in space): there "
                        "is nothing to register; the transform will be about the identity. Give two "
                        "different images.")
    return warnings


def label_map_evidence(image: sitk.Image) -> dict | None:
    """{"distinct", "uniform", "sampled"} when `image` looks like a label map, else None. `distinct`: the
    distinct values seen (in the sample when `sampled`); `uniform`: how often neighbouring foreground
    voxels are equal. Only scalar 3D images are judged (others are refused later anyway)."""
    if not isinstance(image, sitk.Image) or image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        return None
    values = sitk.GetArrayViewFromImage(image)
    if min(values.shape) < 2:
        return None
    integer_type = np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_
    nz, ny, nx = values.shape
    flat = values.reshape(-1)
    inner = (nz - 1) * (ny - 1) * (nx - 1)      # voxels with a neighbour after them along every axis
    if inner <= SAMPLE_VOXELS:
        picked = np.arange(inner)
        sampled = False
    else:
        picked = np.sort(np.random.default_rng(0).choice(inner, SAMPLE_VOXELS, replace=False))
        sampled = True
    z, rest = np.divmod(picked, (ny - 1) * (nx - 1))
    y, x = np.divmod(rest, nx - 1)
    index = (z * ny + y) * nx + x
    here = flat[index]
    if not integer_type and not _whole(here):
        return None
    distinct, counts = np.unique(here, return_counts=True)
    background = distinct[np.argmax(counts)]
    equal = pairs = 0
    foreground = here != background
    for step in (1, nx, nx * ny):
        there = flat[index + step]
        inside = foreground & (there != background)
        pairs += int(np.count_nonzero(inside))
        equal += int(np.count_nonzero(here[inside] == there[inside]))
    if pairs < _MIN_PAIRS or equal < UNIFORM_FRACTION * pairs:
        return None
    if not integer_type and not _whole_volume(values):
        return None
    return {"distinct": int(distinct.size), "uniform": equal / pairs, "sampled": sampled}


def same_image(a: sitk.Image, b: sitk.Image) -> bool:
    """The same voxels on the same grid (size, spacing, origin, direction), whatever the pixel types."""
    if not (isinstance(a, sitk.Image) and isinstance(b, sitk.Image)):
        return False
    if a.GetSize() != b.GetSize() or a.GetNumberOfComponentsPerPixel() != b.GetNumberOfComponentsPerPixel():
        return False
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):
        if not np.allclose(getattr(a, get)(), getattr(b, get)(), rtol=0, atol=1e-6):
            return False
    x, y = sitk.GetArrayViewFromImage(a).reshape(-1), sitk.GetArrayViewFromImage(b).reshape(-1)
    stride = max(1, x.size // 10_000)
    if not np.array_equal(x[::stride], y[::stride]):       # almost always settles it at once
        return False
    return all(np.array_equal(x[i: i + _CHUNK], y[i: i + _CHUNK]) for i in range(0, x.size, _CHUNK))


def _whole(values: np.ndarray) -> bool:
    finite = np.isfinite(values)
    return bool(finite.all()) and bool(np.all(values == np.round(values)))


def _whole_volume(values: np.ndarray) -> bool:
    flat = values.reshape(-1)
    return all(_whole(flat[i: i + _CHUNK]) for i in range(0, flat.size, _CHUNK))


def _same_file(a, b) -> str | None:
    """The file's name when paths `a` and `b` name the same file or folder (links included), else None."""
    if not a or not b:
        return None
    try:
        same = os.path.samefile(a, b)
    except OSError:
        same = Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return Path(a).name if same else None
