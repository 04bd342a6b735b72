"""Label maps at an image's full resolution from class probabilities on the model's working grid.

The label of a full-resolution voxel is the argmax of the probabilities linearly interpolated at its
point (what resampling the probability map with ITK's linear interpolator and taking the argmax gives).
Two exact short cuts make this cheap:

- only the box where a structure can win is computed (elsewhere background wins: a voxel whose
  background probability exceeds 1/2 keeps it above 1/2 under linear interpolation);
- inside that box, a point whose 8 surrounding grid voxels all have the same argmax takes that label
  without interpolating: with p_c >= p_o at every corner, any convex combination keeps p_c >= p_o. Only
  the points in cells where the corners disagree (the structures' borders, ~10-20 % of the box) are
  interpolated, all classes at once (torch's grid_sample with ITK's edge rules).

Where the map from full-resolution voxels to grid voxels is not affine (a displacement field), the whole
box is resampled by SimpleITK slab by slab instead.
"""
from __future__ import annotations

import warnings

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..core.geometry import resample_in_slabs

# points handled per step of the affine path: small enough that the run's two label maps, computed side by
# side, stay in cache and memory (1 mm head pair: 1 << 20 took 1.7 GB peak, 1 << 18 1.4 GB and no longer)
_POINTS_PER_STEP = 1 << 18


def labels_on(probabilities: torch.Tensor, grid: sitk.Image, reference: sitk.Image, transform=None) -> np.ndarray:
    """Argmax of class probabilities (1, C, z, y, x on the working `grid`), linearly resampled onto
    `reference` (through `transform`: reference point -> grid point); outside the grid: background.
    A (z, y, x) uint8 array of class indices."""
    probs = probabilities[0].permute(1, 2, 3, 0).contiguous().cpu().numpy().astype(np.float32)
    probs[..., 0] += 1e-6  # outside the working grid every class resamples to 0: let background win there
    box = structure_box(probs[..., 0] <= 0.5, grid, reference, transform)
    labels = np.zeros(reference.GetSize()[::-1], np.uint8)
    if box is None:
        return labels
    lo, hi = box
    index_map = affine_index_map(reference, grid, transform)
    if index_map is not None:
        labels[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] = _labels_in_box_affine(probs, lo, hi, *index_map)
        return labels
    sub_reference = sitk.Image([int(h - l) for l, h in zip(lo, hi)], sitk.sitkUInt8)
    sub_reference.SetSpacing(reference.GetSpacing())
    sub_reference.SetDirection(reference.GetDirection())
    sub_reference.SetOrigin(reference.TransformIndexToPhysicalPoint([int(v) for v in lo]))
    prob_image = sitk.GetImageFromArray(probs, isVector=True)
    prob_image.CopyInformation(grid)

    def argmax(on_ref):
        # torch's argmax runs on all cores and reads ITK's buffer in place (numpy's takes 3x as long at 1 mm)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the view is read-only; nothing writes to it
            view = torch.from_numpy(sitk.GetArrayViewFromImage(on_ref))
        return view.argmax(dim=-1).to(torch.uint8).numpy()
    # slab by slab: the class probabilities on a large reference grid would take 4 bytes x classes per voxel
    labels[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] = resample_in_slabs(
        prob_image, sub_reference, transform, argmax, np.uint8, pixel_type=sitk.sitkVectorFloat32)
    return labels


def structure_box(mask: np.ndarray, grid: sitk.Image, reference: sitk.Image, transform):
    """Index box [lo, hi) (x, y, z) of `reference` whose points `transform` maps into the working-grid voxels
    of `mask` (z, y, x) dilated by one voxel; None when the mask is empty. The whole reference when the
    transform cannot be inverted."""
    if not mask.any():
        return None
    size = np.array(reference.GetSize())
    try:
        to_reference = sitk.Transform() if transform is None else transform.GetInverse()
    except RuntimeError:
        return np.zeros(3, int), size
    where = np.nonzero(mask)
    first = np.array([w.min() for w in where])[::-1] - 1.0     # (x, y, z), one voxel of dilation
    last = np.array([w.max() for w in where])[::-1] + 1.0
    corners = [[float((first, last)[bit >> axis & 1][axis]) for axis in range(3)] for bit in range(8)]
    points = [to_reference.TransformPoint(grid.TransformContinuousIndexToPhysicalPoint(c)) for c in corners]
    indices = np.array([reference.TransformPhysicalPointToContinuousIndex(p) for p in points])
    lo = np.clip(np.floor(indices.min(0)) - 1, 0, size).astype(int)
    hi = np.clip(np.ceil(indices.max(0)) + 2, 0, size).astype(int)
    if np.any(hi <= lo):
        return None
    return lo, hi


def affine_index_map(reference: sitk.Image, grid: sitk.Image, transform) -> tuple | None:
    """(M, b) with grid continuous index = M @ reference index + b (both x, y, z), when `transform` (None:
    identity) is linear (ITK's IsLinear: affine, rigid, similarity, scale, translation, or composites of
    them); None otherwise. Fitted on four reference indices and checked on four more."""
    transform = sitk.Transform() if transform is None else transform
    if not transform.IsLinear():
        return None

    def grid_index(index):
        point = reference.TransformContinuousIndexToPhysicalPoint([float(v) for v in index])
        return np.array(grid.TransformPhysicalPointToContinuousIndex(transform.TransformPoint(point)))

    size = np.array(reference.GetSize(), float)
    origin = grid_index(np.zeros(3))
    matrix = np.stack([grid_index(np.eye(3)[axis]) - origin for axis in range(3)], axis=1)
    for probe in (size - 1, (size - 1) * [1, 0, 1], (size - 1) * [0, 1, 1], (size - 1) * [0.5, 0.25, 0.75]):
        if not np.allclose(matrix @ probe + origin, grid_index(probe), atol=1e-6 * max(1.0, float(size.max()))):
            return None
    return matrix, origin


def _labels_in_box_affine(probs: np.ndarray, lo, hi, matrix: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Labels of the reference index box [lo, hi) (x, y, z) whose grid continuous indices are matrix @ i +
    offset; `probs` (z, y, x, C) on the grid. Coordinates in float64 torch tensors (all cores), a slab of
    z planes at a time."""
    grid_size = probs.shape[:3]                                        # z, y, x
    probs_t = torch.from_numpy(probs)
    grid_labels = probs_t.argmax(-1).to(torch.uint8)                  # (z, y, x)
    corners = grid_labels[None, None].float()
    # a cell (voxel i and its +1 neighbours on each axis) whose 8 corners share one argmax
    agree = (F.max_pool3d(corners, 2, 1) == -F.max_pool3d(-corners, 2, 1))[0, 0]
    cell_labels = torch.where(agree, grid_labels[:-1, :-1, :-1], torch.full_like(grid_labels[:-1, :-1, :-1], 255))
    channels_first = probs_t.permute(3, 0, 1, 2)[None]                 # (1, C, z, y, x) view for grid_sample
    extent = [int(h - l) for l, h in zip(lo, hi)]                      # x, y, z
    out = torch.zeros(extent[::-1], dtype=torch.uint8)
    step = torch.tensor(matrix.T, dtype=torch.float64)                 # row a: the grid step of reference axis a
    base = torch.tensor(matrix @ np.asarray(lo, float) + offset, dtype=torch.float64)
    x = torch.arange(extent[0], dtype=torch.float64)[None, :, None] * step[0]
    y = torch.arange(extent[1], dtype=torch.float64)[:, None, None] * step[1]
    # continuous (x, y, z) grid index -> cell; the order of the grid's axes in the arrays is z, y, x
    sizes = torch.tensor(grid_size[::-1], dtype=torch.float64)          # x, y, z
    cells_last, buffer_end = sizes - 2, sizes - 0.5
    strides = torch.tensor([1, grid_size[2] - 1, (grid_size[2] - 1) * (grid_size[1] - 1)], dtype=torch.int64)
    planes = max(1, _POINTS_PER_STEP // max(1, extent[0] * extent[1]))
    for z0 in range(0, extent[2], planes):
        z = torch.arange(z0, min(extent[2], z0 + planes), dtype=torch.float64)[:, None, None, None] * step[2]
        continuous = (base + z + y + x).reshape(-1, 3)                 # (points, 3) as x, y, z
        cell = continuous.floor()
        in_cells = ((cell >= 0) & (cell <= cells_last)).all(1)
        flat_cell = (cell.clamp(min=0).minimum(cells_last).to(torch.int64) * strides).sum(1)
        labels = torch.where(in_cells, cell_labels.reshape(-1)[flat_cell], torch.full_like(flat_cell, 255,
                                                                                            dtype=torch.uint8))
        # the rest inside ITK's buffer ([-0.5, n - 0.5) on every axis: edge voxels repeat): interpolate all
        # classes; outside it every class is 0 and background (index 0) wins
        unsettled = labels == 255
        inside = unsettled & ((continuous >= -0.5) & (continuous < buffer_end)).all(1)
        labels[unsettled & ~inside] = 0
        if inside.any():
            normalised = 2.0 * continuous[inside] / (buffer_end - 0.5).clamp(min=1) - 1.0
            sampled = F.grid_sample(channels_first, normalised.to(torch.float32).view(1, 1, 1, -1, 3),
                                    mode="bilinear", padding_mode="border", align_corners=True)[0, :, 0, 0]
            labels[inside] = sampled.argmax(0).to(torch.uint8)
        out[z0:z0 + len(z)] = labels.view(len(z), extent[1], extent[0])
    return out.numpy()
