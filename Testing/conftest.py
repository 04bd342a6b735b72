"""Shared fixtures: a tiny untrained model, synthetic phantoms with chosen geometry, known transforms."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from JointRegSegLib import new_model, save_model
from JointRegSegLib.core.geometry import make_grid

TINY_CARD = {
    "name": "tiny-test-model",
    "description": "untrained, for tests only",
    "architecture": {"name": "unet-pair",
                     "registration": {"channels": [8, 16, 16], "strides": [2, 2]},
                     "segmentation": {"channels": [8, 16, 16], "strides": [2, 2]},
                     "integration_steps": 7, "velocity_downsample": 2},
    "labels": [{"value": 0, "name": "background", "color": [0, 0, 0]},
               {"value": 1, "name": "core", "color": [0.9, 0.2, 0.1]},
               {"value": 2, "name": "shell", "color": [0.1, 0.6, 0.9]}],
    "modality": "synthetic",
    "intensity": {"kind": "percentile", "lower": 1, "upper": 99},
    "working_grid": {"size": [48, 48, 48], "spacing": [2.5, 2.5, 2.5]},
    "refinement": {"similarity": "lncc", "smoothness": 1.0, "learning_rate": 0.05},
}


def rotation(axis_angle_deg):
    """Rotation matrix from Euler angles (degrees) about x, y, z."""
    ax, ay, az = np.deg2rad(axis_angle_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


GEOMETRIES = {
    # name: (direction, spacing, size)
    "axis-aligned": (np.eye(3), (2.0, 2.0, 2.0), (56, 56, 56)),
    "lps-oblique": (rotation((12, -8, 20)), (1.8, 2.1, 2.4), (60, 54, 50)),
    "flipped": (np.diag([-1.0, 1.0, -1.0]) @ rotation((0, 0, 90)), (2.0, 2.0, 2.0), (56, 56, 56)),
    "anisotropic": (np.eye(3), (1.5, 1.5, 4.0), (72, 72, 28)),
}


def phantom_array(points_mm: np.ndarray, seed: int = 3) -> np.ndarray:
    """A head-like analytic phantom evaluated at physical points (..., 3), centred at 0.

    An ellipsoid with a brighter core, an outer shell and smooth blobs for texture, so local
    similarity has something to lock on everywhere inside.
    """
    rng = np.random.default_rng(seed)
    x, y, z = points_mm[..., 0], points_mm[..., 1], points_mm[..., 2]
    radius = np.sqrt((x / 42) ** 2 + (y / 48) ** 2 + (z / 38) ** 2)
    image = 40.0 * (radius < 1.0) + 60.0 * (radius < 0.55)
    for _ in range(70):
        center = rng.uniform(-38, 38, 3)
        width = rng.uniform(3.5, 8)
        dist2 = ((points_mm - center) ** 2).sum(-1)
        image += rng.uniform(-30, 30) * np.exp(-dist2 / (2 * width ** 2)) * (radius < 1.0)
    return image.astype(np.float32)


def phantom_labels(points_mm: np.ndarray) -> np.ndarray:
    x, y, z = points_mm[..., 0], points_mm[..., 1], points_mm[..., 2]
    radius = np.sqrt((x / 42) ** 2 + (y / 48) ** 2 + (z / 38) ** 2)
    return np.where(radius < 0.55, 1, np.where(radius < 1.0, 2, 0)).astype(np.uint8)


def grid_for(name: str, center=(0.0, 0.0, 0.0)) -> sitk.Image:
    direction, spacing, size = GEOMETRIES[name]
    return make_grid(size, spacing, direction, np.asarray(center, dtype=float))


def sample_on(grid: sitk.Image, fn, transform=None) -> sitk.Image:
    """Image on `grid` whose voxel at x holds fn(transform(x)) (analytic, no resampling blur)."""
    from JointRegSegLib.core.geometry import physical_points
    points = physical_points(grid)
    if transform is not None:
        points = transform(points)
    image = sitk.GetImageFromArray(fn(points))
    image.CopyInformation(grid)
    return image


def smooth_field(points: np.ndarray, amplitude_mm=3.0) -> np.ndarray:
    """A smooth displacement (mm) of at most `amplitude_mm`, two Gaussian bumps pushing in different directions."""
    bumps = [((12.0, -8.0, 5.0), (1.0, 0.6, -0.4)), ((-15.0, 10.0, -6.0), (-0.5, 0.8, 0.7))]
    out = np.zeros_like(points)
    for center, direction in bumps:
        weight = np.exp(-((points - np.array(center)) ** 2).sum(-1) / (2 * 14.0 ** 2))
        direction = np.array(direction) / np.linalg.norm(direction)
        out += amplitude_mm * weight[..., None] * direction
    return out


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    np.random.seed(0)
    torch.set_num_threads(2)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)


@pytest.fixture
def tiny_model():
    return new_model(TINY_CARD, seed=0)


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_model):
    return save_model(tiny_model, tmp_path / "tiny.safetensors")


@pytest.fixture
def phantom_pair():
    """(moving, fixed) with the same analytic phantom, fixed shifted by a small translation."""
    moving = sample_on(grid_for("axis-aligned"), phantom_array)
    fixed = sample_on(grid_for("axis-aligned"), phantom_array, lambda p: p + np.array([2.0, -1.0, 1.5]))
    return moving, fixed


SAMPLE_BRAIN = __import__("pathlib").Path(__file__).resolve().parent.parent / "Resources" / "SampleData" / "itk_brain_t1.nii.gz"

BRAIN_CARD = {**TINY_CARD, "name": "tiny-brain-test-model",
              "working_grid": {"size": [64, 64, 48], "spacing": [3.0, 3.0, 3.0]},
              "refinement": {"similarity": "lncc", "smoothness": 2.0, "learning_rate": 0.05}}


@pytest.fixture(scope="session")
def sample_brain():
    return sitk.ReadImage(str(SAMPLE_BRAIN), sitk.sitkFloat32)


def warp_by(image: sitk.Image, fixed_grid: sitk.Image, mapping) -> tuple[sitk.Image, np.ndarray]:
    """Resample `image` onto `fixed_grid` through `mapping` (fixed mm -> moving mm); also return mapping(points)."""
    from JointRegSegLib.core.geometry import displacement_image, physical_points
    points = physical_points(fixed_grid)
    truth = mapping(points)
    transform = sitk.DisplacementFieldTransform(displacement_image(truth - points, fixed_grid))
    return sitk.Resample(image, fixed_grid, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32), truth
