"""Reading, validating and atomically writing volumes. Everything is SimpleITK (LPS)."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputImageError

# Refuse volumes whose float32 copies alone would exceed this many voxels (about 3 GB per copy).
MAX_VOXELS = 768 * 1024 * 1024


def read_image(path: str | os.PathLike, role: str = "image") -> sitk.Image:
    """Read any file SimpleITK reads, or a folder holding one DICOM series."""
    path = Path(path)
    if not path.exists():
        raise InputImageError(f"{role}: file not found: {path}")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise InputImageError(f"{role}: folder {path} holds no DICOM series")
            if len(series) > 1:
                raise InputImageError(
                    f"{role}: folder {path} holds {len(series)} DICOM series; pass a folder with one series")
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown reason"
        raise InputImageError(f"{role}: cannot read {path}: {first}") from None
    return image


def validate_volume(image: sitk.Image, role: str) -> sitk.Image:
    """Check that `image` is a usable scalar 3D volume; return it as float32 with its geometry."""
    if not isinstance(image, sitk.Image):
        raise InputImageError(f"{role}: expected a SimpleITK image, got {type(image).__name__}")
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
        dim = 3
    if dim != 3:
        raise InputImageError(f"{role}: expected a 3D volume, got a {dim}D image of size {image.GetSize()}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputImageError(
            f"{role}: expected a scalar volume, got {image.GetNumberOfComponentsPerPixel()} components per voxel "
            "(a vector, RGB or time-series image)")
    size = image.GetSize()
    if min(size) < 2:
        raise InputImageError(f"{role}: volume of size {size} is a single slice; a 3D volume is needed")
    if int(np.prod(size)) > MAX_VOXELS:
        raise InputImageError(f"{role}: volume of size {size} is too large for memory "
                              f"(limit {MAX_VOXELS} voxels); crop or downsample it first")
    spacing = np.array(image.GetSpacing())
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputImageError(f"{role}: invalid voxel spacing {tuple(spacing)}")
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if abs(abs(np.linalg.det(direction)) - 1) > 1e-3:
        raise InputImageError(f"{role}: direction matrix is not orthonormal: {direction.tolist()}")
    image = sitk.Cast(image, sitk.sitkFloat32)
    values = sitk.GetArrayViewFromImage(image)
    if not np.all(np.isfinite(values)):
        bad = int(np.count_nonzero(~np.isfinite(values)))
        raise InputImageError(f"{role}: volume contains {bad} NaN or infinite voxels")
    if float(values.max()) == float(values.min()):
        raise InputImageError(f"{role}: volume is empty (every voxel equals {float(values.min())})")
    return image


def label_image_like(labels: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(labels.astype(np.uint8))
    image.CopyInformation(reference)
    return image


@contextlib.contextmanager
def staged_output_dir(out_dir: str | os.PathLike):
    """Yield a staging folder; on success move every file into `out_dir`, on failure delete it all.

    Each file lands with os.replace, so no reader ever sees a half-written output.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield staging
        out_dir.mkdir(exist_ok=True)
        for item in sorted(staging.iterdir()):
            os.replace(item, out_dir / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
