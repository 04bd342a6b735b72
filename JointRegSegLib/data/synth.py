"""Synthetic subjects: a random affine and smooth diffeomorphic deformation of a real anatomy, plus
appearance changes (gamma, bias field, noise), sampled directly onto a working grid."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.networks.blocks import DVF2DDF

from ..core.geometry import displacement_image, physical_points, voxel_ddf_to_mm


def random_deformation(grid: sitk.Image, rng: np.random.Generator, rotation_deg=6.0, scale=0.06,
                       shift_mm=5.0, smooth_mm=4.0, control_spacing_mm=40.0) -> np.ndarray:
    """Displacement (z, y, x, 3) mm on `grid` of x -> affine(x + d(x)), d diffeomorphic and smooth."""
    size_zyx = grid.GetSize()[::-1]
    spacing = np.array(grid.GetSpacing())
    coarse = [max(2, int(round(n * s / control_spacing_mm))) for n, s in zip(size_zyx, spacing[::-1])]
    velocity = torch.from_numpy(rng.normal(size=(1, 3, *coarse)).astype(np.float32))
    half = [n // 2 for n in size_zyx]
    velocity = F.interpolate(velocity, size=half, mode="trilinear", align_corners=True)
    # smooth_mm is the velocity's std in mm; convert per axis to half-grid voxels (zyx channel order)
    velocity = velocity * torch.tensor(smooth_mm / (2 * spacing[::-1].copy()), dtype=torch.float32).view(1, 3, 1, 1, 1)
    with torch.no_grad():
        ddf = DVF2DDF(num_steps=7)(velocity)
        ddf = F.interpolate(ddf, size=list(size_zyx), mode="trilinear", align_corners=False) * 2
    local_mm = voxel_ddf_to_mm(ddf[0].numpy(), grid)

    angles = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg, 3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rot = (np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
           @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]))
    matrix = rot @ np.diag(1 + rng.uniform(-scale, scale, 3))
    points = physical_points(grid)
    center = points.reshape(-1, 3).mean(0)
    moved = (points + local_mm - center) @ matrix.T + center + rng.uniform(-shift_mm, shift_mm, 3)
    return moved - points


def appearance(array: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Gamma, smooth multiplicative bias field and Rician-like noise inside the brain; background stays 0."""
    brain = array > 0
    if not brain.any():
        return array
    low, high = np.percentile(array[brain], [1, 99.5])
    out = np.clip((array - low) / max(high - low, 1e-6), 0, 1.2)
    out = out ** np.exp(rng.uniform(-0.35, 0.35) * strength)
    coarse = torch.from_numpy(rng.normal(size=(1, 1, 4, 4, 4)).astype(np.float32))
    bias = F.interpolate(coarse, size=array.shape, mode="trilinear", align_corners=True)[0, 0].numpy()
    out = out * np.exp(0.15 * strength * bias)
    sigma = rng.uniform(0.005, 0.03) * strength
    out = np.sqrt((out + rng.normal(0, sigma, out.shape)) ** 2 + rng.normal(0, sigma, out.shape) ** 2)
    return np.where(brain, out, 0).astype(np.float32)


def synthesize(image: sitk.Image, labels: sitk.Image | None, grid: sitk.Image, rng: np.random.Generator,
               deform: bool = True, strength: float = 1.0):
    """(image, labels or None) of one synthetic subject on `grid`."""
    transform = None
    if deform:
        field = random_deformation(grid, rng, smooth_mm=4.0 * strength)
        transform = sitk.DisplacementFieldTransform(displacement_image(field, grid))
    warped = sitk.Resample(image, grid, transform or sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    array = appearance(sitk.GetArrayFromImage(warped), rng, strength) if strength > 0 else \
        sitk.GetArrayFromImage(warped)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(grid)
    out_labels = None
    if labels is not None:
        out_labels = sitk.Resample(labels, grid, transform or sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                   sitk.sitkUInt8)
    return out, out_labels
