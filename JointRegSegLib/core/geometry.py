"""Physical-space bookkeeping: working grids, resampling, voxel <-> mm displacement fields.

Convention (as SimpleITK, LPS): a displacement field u on the fixed grid maps a fixed physical
point x to its match in the moving image, x + u(x). Torch tensors are (B, C, z, y, x) with
displacement channels in voxel units along (z, y, x), as MONAI's Warp expects.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch


def direction_matrix(image: sitk.Image) -> np.ndarray:
    return np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)


def index_to_physical_matrix(image: sitk.Image) -> np.ndarray:
    """3x3 matrix M with physical = origin + M @ (i, j, k)."""
    return direction_matrix(image) * np.array(image.GetSpacing(), dtype=np.float64)


def physical_center(image: sitk.Image) -> np.ndarray:
    half = (np.array(image.GetSize(), dtype=np.float64) - 1) / 2
    return np.array(image.GetOrigin()) + index_to_physical_matrix(image) @ half


def make_grid(size: Sequence[int], spacing: Sequence[float], direction: np.ndarray,
              center: np.ndarray) -> sitk.Image:
    """An empty float32 image of `size` (x, y, z) whose voxel grid is centred on `center`."""
    grid = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    grid.SetSpacing([float(s) for s in spacing])
    grid.SetDirection([float(v) for v in np.asarray(direction, dtype=np.float64).ravel()])
    half = (np.array(size, dtype=np.float64) - 1) / 2
    origin = np.asarray(center, dtype=np.float64) - index_to_physical_matrix(grid) @ half
    grid.SetOrigin([float(v) for v in origin])
    return grid


def center_of_mass(image: sitk.Image) -> np.ndarray:
    """Intensity-weighted centre of the voxels above the lowest value (the anatomy, not the field of view).

    Accumulated slab by slab, so a large volume needs no float64 copy of itself.
    """
    array = sitk.GetArrayViewFromImage(image)
    low = float(array.min())
    nz, ny, nx = array.shape
    step = max(1, (8 * 1024 * 1024) // max(ny * nx, 1))
    sums = [np.zeros(nz), np.zeros(ny), np.zeros(nx)]
    for z0 in range(0, nz, step):
        weights = np.clip(array[z0: z0 + step].astype(np.float64) - low, 0, None)
        sums[0][z0: z0 + step] = weights.sum(axis=(1, 2))
        sums[1] += weights.sum(axis=(0, 2))
        sums[2] += weights.sum(axis=(0, 1))
    total = sums[0].sum()
    if total <= 0:
        return physical_center(image)
    index_zyx = [np.dot(s, np.arange(len(s))) / total for s in sums]
    return np.array(image.GetOrigin()) + index_to_physical_matrix(image) @ np.array(index_zyx[::-1])


def working_grid(fixed: sitk.Image, card: dict) -> sitk.Image:
    """The model's working grid (spacing, size, orientation from its card) centred on the fixed anatomy.

    `working_grid.center` = "mass" (default: intensity centre of mass, robust to off-centre fields of
    view) or "field-of-view".
    """
    grid_card = card["working_grid"]
    center = physical_center(fixed) if grid_card.get("center") == "field-of-view" else center_of_mass(fixed)
    return make_grid(grid_card["size"], grid_card["spacing"],
                     np.array(grid_card.get("direction", np.eye(3).ravel())).reshape(3, 3), center)


def resample(image: sitk.Image, reference: sitk.Image, transform: sitk.Transform | None = None,
             interpolator=sitk.sitkLinear, default: float = 0.0, pixel_type=None) -> sitk.Image:
    pixel_type = image.GetPixelID() if pixel_type is None else pixel_type
    return sitk.Resample(image, reference, transform or sitk.Transform(), interpolator, default, pixel_type)


def to_tensor(image: sitk.Image, device: torch.device | str = "cpu") -> torch.Tensor:
    """(1, 1, z, y, x) float32 tensor of a scalar image, or (1, C, z, y, x) of a vector image."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    tensor = torch.from_numpy(array)
    tensor = tensor.permute(3, 0, 1, 2) if tensor.ndim == 4 else tensor[None]
    return tensor[None].to(device)


def voxel_ddf_to_mm(ddf_voxels: np.ndarray, grid: sitk.Image) -> np.ndarray:
    """(3, z, y, x) voxel displacement along (z, y, x) -> (z, y, x, 3) physical LPS displacement in mm."""
    xyz = np.stack([ddf_voxels[2], ddf_voxels[1], ddf_voxels[0]], axis=-1).astype(np.float64)
    return xyz @ index_to_physical_matrix(grid).T


def displacement_image(displacement_mm: np.ndarray, grid: sitk.Image) -> sitk.Image:
    """A float64 vector image (what sitk.DisplacementFieldTransform takes) on `grid`."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(displacement_mm, dtype=np.float64), isVector=True)
    image.CopyInformation(grid)
    return image


def physical_points(grid: sitk.Image) -> np.ndarray:
    """(z, y, x, 3) physical coordinates of every voxel of `grid` (float64)."""
    size = grid.GetSize()
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in size[::-1]), indexing="ij")
    index = np.stack([i, j, k], axis=-1)
    return index @ index_to_physical_matrix(grid).T + np.array(grid.GetOrigin())


def border_taper(shape_zyx, width_voxels: int = 4) -> np.ndarray:
    """Weights (z, y, x) rising from 0 at the grid edge to 1 `width_voxels` inside (raised cosine).

    Outside the working grid only the affine applies; without a taper the deformable part would stop
    abruptly at the grid edge, a jump that folds the transform there.
    """
    weights = np.ones(shape_zyx, dtype=np.float64)
    for axis, n in enumerate(shape_zyx):
        distance = np.minimum(np.arange(n), np.arange(n)[::-1]).astype(np.float64)
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.clip(distance / max(width_voxels, 1), 0, 1))
        shape = [1, 1, 1]
        shape[axis] = n
        weights = weights * ramp.reshape(shape)
    return weights


def compose_to_fixed_grid(working_displacement: sitk.Image | None, affine: sitk.AffineTransform | None,
                          fixed: sitk.Image) -> np.ndarray:
    """Total displacement (z, y, x, 3) mm on the fixed grid of x -> affine(x + d_working(x)).

    Outside the working grid the deformable part is zero, so the transform there is the affine alone.
    ITK's multi-threaded TransformToDisplacementField evaluates the composite (a DisplacementFieldTransform
    maps points outside its field unchanged, as required).
    """
    transforms = []
    if affine is not None:
        transforms.append(sitk.AffineTransform(affine))
    if working_displacement is not None:
        # the transform takes the image over, so give it a copy
        field = sitk.Cast(working_displacement, sitk.sitkVectorFloat64)
        transforms.append(sitk.DisplacementFieldTransform(field))
    if not transforms:
        return np.zeros(fixed.GetSize()[::-1] + (3,), dtype=np.float64)
    # CompositeTransform applies its last transform first: affine(displacement(x))
    composite = sitk.CompositeTransform(transforms)
    total = sitk.TransformToDisplacementField(composite, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(),
                                              fixed.GetSpacing(), fixed.GetDirection())
    return sitk.GetArrayFromImage(total)


def jacobian_determinant(displacement_mm: np.ndarray, grid: sitk.Image) -> np.ndarray:
    """det(I + du/dx) with derivatives taken in physical space (handles oblique directions).

    Written out element-wise (float32) rather than as N 3x3 matrices: a 1 mm brain has 7 million voxels.
    """
    spacing = np.array(grid.GetSpacing())
    direction = direction_matrix(grid).astype(np.float32)
    # grad[c][a]: derivative of component c along index axis a (x, y, z) per mm.
    grad = []
    for c in range(3):
        dz, dy, dx = np.gradient(np.asarray(displacement_mm[..., c], dtype=np.float32))
        grad.append((dx / np.float32(spacing[0]), dy / np.float32(spacing[1]), dz / np.float32(spacing[2])))
    # Chain rule: index-aligned derivatives rotate into physical axes by the direction matrix;
    # J[c][b] = sum_a grad[c][a] * direction[b, a] + (c == b).
    jac = [[sum(grad[c][a] * direction[b, a] for a in range(3) if direction[b, a] != 0) + (1.0 if c == b else 0.0)
            for b in range(3)] for c in range(3)]
    return (jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
            - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
            + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0])).astype(np.float32)


# ---- storage order, transforms and slab-wise evaluation on large grids ----------------------------------

def canonical_storage(image: sitk.Image) -> sitk.Image:
    """The same physical image with its voxel axes permuted/flipped to the storage order closest to LPS.

    Exact (no resampling). Steps that depend on the voxel order (shrinking, random metric samples) then
    see the same array whatever order the file stored, so results do not depend on it.
    """
    try:
        return sitk.DICOMOrient(image, "LPS")
    except RuntimeError:  # not a 3D scalar/vector image DICOMOrient handles
        return image


def total_transform(working_displacement: sitk.Image | None, affine: sitk.Transform | None) -> sitk.Transform:
    """x -> affine(x + d_working(x)) as one ITK transform (what `compose_to_fixed_grid` samples).

    A CompositeTransform of the affine and the working-grid displacement field: compact (the field lives
    on the small working grid) and exact; SimpleITK, ANTs and Slicer read it from an .h5 file.
    """
    transforms = []
    if affine is not None:
        transforms.append(sitk.AffineTransform(affine))
    if working_displacement is not None:
        transforms.append(sitk.DisplacementFieldTransform(sitk.Cast(working_displacement, sitk.sitkVectorFloat64)))
    if not transforms:
        return sitk.CompositeTransform([sitk.TranslationTransform(3)])
    return sitk.CompositeTransform(transforms)


def slab_ranges(reference: sitk.Image, bytes_per_voxel: int, budget_bytes: int = 64 * 1024 ** 2):
    """(z0, z1) slice ranges of `reference` so that one slab of `bytes_per_voxel` data fits the budget."""
    nx, ny, nz = reference.GetSize()
    step = max(1, int(budget_bytes // max(nx * ny * bytes_per_voxel, 1)))
    return [(z, min(z + step, nz)) for z in range(0, nz, step)]


def _slab(reference: sitk.Image, z0: int, z1: int):
    nx, ny, _ = reference.GetSize()
    origin = reference.TransformIndexToPhysicalPoint((0, 0, int(z0)))
    return (nx, ny, int(z1 - z0)), origin, reference.GetSpacing(), reference.GetDirection()


def resample_in_slabs(image: sitk.Image, reference: sitk.Image, transform: sitk.Transform | None, reduce,
                      out_dtype, interpolator=sitk.sitkLinear, default: float = 0.0, pixel_type=None,
                      budget_bytes: int = 64 * 1024 ** 2) -> np.ndarray:
    """reduce(array of a slab of `image` resampled onto `reference`) for every z-slab, stacked (z, y, x).

    Keeps memory to one slab of the resampled image (e.g. a many-channel probability map) at a time.
    """
    pixel_type = image.GetPixelID() if pixel_type is None else pixel_type
    per_voxel = image.GetNumberOfComponentsPerPixel() * 4
    out = np.empty(reference.GetSize()[::-1], dtype=out_dtype)
    for z0, z1 in slab_ranges(reference, per_voxel, budget_bytes):
        size, origin, spacing, direction = _slab(reference, z0, z1)
        slab = sitk.Resample(image, size, transform or sitk.Transform(), interpolator, origin, spacing, direction,
                             default, pixel_type)
        out[z0:z1] = reduce(slab)
        del slab
    return out


def _jacobian_in_slabs(reference: sitk.Image, field_of, bytes_per_voxel: int, budget_bytes: int) -> np.ndarray:
    """det J (float32, z, y, x) on `reference`, one z-slab plus a 1-slice halo at a time, of the displacement
    field (z, y, x, 3; mm) that `field_of(lo, hi)` gives for the slices [lo, hi): equal to
    `jacobian_determinant` of the whole field, its temporaries bounded by the budget."""
    nz = reference.GetSize()[2]
    det = np.empty(reference.GetSize()[::-1], dtype=np.float32)
    for z0, z1 in slab_ranges(reference, bytes_per_voxel, budget_bytes):
        lo, hi = max(z0 - 1, 0), min(z1 + 1, nz)
        det[z0:z1] = jacobian_determinant(field_of(lo, hi), reference)[z0 - lo: z0 - lo + z1 - z0]
    return det


def jacobian_determinant_of_transform(transform: sitk.Transform, reference: sitk.Image,
                                      budget_bytes: int = 64 * 1024 ** 2) -> np.ndarray:
    """det J of `transform` sampled on `reference` slab by slab: the whole field is never held."""
    def field_of(lo, hi):
        size, origin, spacing, direction = _slab(reference, lo, hi)
        return sitk.GetArrayFromImage(sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, size,
                                                                        origin, spacing, direction))
    return _jacobian_in_slabs(reference, field_of, 8 * 3 * 5, budget_bytes)


def jacobian_determinant_of_field(field_mm: np.ndarray, reference: sitk.Image,
                                  budget_bytes: int = 64 * 1024 ** 2) -> np.ndarray:
    """det J of a displacement field (z, y, x, 3; mm) sampled on `reference`, read in place slab by slab."""
    return _jacobian_in_slabs(reference, lambda lo, hi: field_mm[lo:hi], 4 * 3 * 5, budget_bytes)


def displacement_on(transform: sitk.Transform, reference: sitk.Image, pixel_type=sitk.sitkVectorFloat64):
    """The transform sampled as a displacement field (mm) on `reference`'s grid (ITK, multi-threaded)."""
    return sitk.TransformToDisplacementField(transform, pixel_type, reference.GetSize(), reference.GetOrigin(),
                                             reference.GetSpacing(), reference.GetDirection())


def physical_box(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) corners (mm, LPS) of the axis-aligned box around the image's field of view."""
    size = np.array(image.GetSize(), dtype=np.float64)
    corners = np.array([[i, j, k] for i in (-0.5, size[0] - 0.5) for j in (-0.5, size[1] - 0.5)
                        for k in (-0.5, size[2] - 0.5)])
    points = corners @ index_to_physical_matrix(image).T + np.array(image.GetOrigin())
    return points.min(axis=0), points.max(axis=0)


def field_of_view_overlap(moving: sitk.Image, fixed: sitk.Image) -> float:
    """Fraction of the fixed field of view's box that the moving one's box covers (0: disjoint)."""
    (m_low, m_high), (f_low, f_high) = physical_box(moving), physical_box(fixed)
    overlap = np.clip(np.minimum(m_high, f_high) - np.maximum(m_low, f_low), 0, None)
    return float(np.prod(overlap) / max(np.prod(f_high - f_low), 1e-12))
