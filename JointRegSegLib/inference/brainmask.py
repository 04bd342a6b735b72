"""Find the brain in a head: the model's own segmentation, before any registration.

A raw scan holds skull, scalp, eyes and neck around the brain, and its intensity centre of mass can lie
well below the brain (a neck in the field of view). A model whose card asks for it (`brain_mask.registration`
= "masked") segments each image once on a grid centred on that centre of mass, moves the grid to the centre
of the brain it found (and segments again when it moved), and then registers the brains only: the learned
affine, its MI polish, the classical affine and the deformable network all see each image masked to its
own brain, as they were trained (brain-extracted images). The segmentation itself always sees the whole
image: it was trained on heads.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from ..core.geometry import make_grid, resample, resample_in_slabs, to_tensor, working_grid
from ..core.intensity import normalize

RECENTRE_MM = 4.0          # a brain centre closer than this to the grid's centre is left where it is


@dataclass
class BrainLocation:
    grid: sitk.Image             # working grid centred on the brain
    image: sitk.Image            # the image resampled onto it
    probabilities: torch.Tensor  # segmentation probabilities there (1, C, z, y, x), mirror-averaged as the card says
    mask: np.ndarray             # (z, y, x) bool: the brain on `grid`
    moved_mm: float              # how far the grid moved from the centre of mass


def background_value(image: sitk.Image) -> float:
    return float(sitk.GetArrayViewFromImage(image).min())


def brain_of(probabilities: torch.Tensor) -> np.ndarray:
    """Brain voxels: where background is not the most likely class, holes filled (ventricles, a dark
    structure the network missed), the largest connected piece kept."""
    labels = probabilities[0].max(0).indices.cpu().numpy() > 0
    return sitk.GetArrayFromImage(largest_filled(sitk.GetImageFromArray(labels.astype(np.uint8)))).astype(bool)


def largest_filled(mask: sitk.Image) -> sitk.Image:
    """A UInt8 mask's largest connected piece with its holes filled (an empty mask stays empty)."""
    if not sitk.GetArrayViewFromImage(mask).any():
        return mask
    largest = sitk.Cast(sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True) == 1,
                        sitk.sitkUInt8)
    return sitk.BinaryFillhole(largest)


def _centroid(mask: np.ndarray, grid: sitk.Image) -> np.ndarray:
    k, j, i = (float(v.mean()) for v in np.nonzero(mask))
    return np.array(grid.TransformContinuousIndexToPhysicalPoint((i, j, k)))


def locate_brain(image: sitk.Image, card: dict, segment, device, final_segment=None) -> BrainLocation:
    """Segment `image` (`segment`: a quick pass) on the card's working grid, move the grid to the centre of the
    brain found when it lies more than RECENTRE_MM away, and segment there (with `final_segment` when given,
    e.g. the mirror-averaged segmentation the run keeps; else `segment` again, only if the grid moved).
    `final_segment(tensor, direct)`: `direct` is the quick pass's probabilities on the same grid, or None."""
    spec = card["working_grid"]
    direction = np.array(spec.get("direction", np.eye(3).ravel()), float).reshape(3, 3)
    grid = working_grid(image, card)

    def on(grid_, segmenter):
        image_w = resample(image, grid_, default=background_value(image))
        with torch.no_grad():
            return image_w, segmenter(normalize(to_tensor(image_w, device), card["intensity"]))

    image_w, probabilities = on(grid, segment)
    mask = brain_of(probabilities)
    moved = 0.0
    if mask.any():
        centre = _centroid(mask, grid)
        current = np.array(grid.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in grid.GetSize()]))
        if np.linalg.norm(centre - current) >= RECENTRE_MM:
            grid, moved = make_grid(spec["size"], spec["spacing"], direction, centre), float(np.linalg.norm(centre - current))
            probabilities = None
    if probabilities is not None and final_segment is not None:
        # the grid stayed: the quick pass is the final segmentation's unmirrored half, not run again
        quick = probabilities
        image_w, probabilities = on(grid, lambda tensor: final_segment(tensor, quick))
        mask = brain_of(probabilities)
    elif probabilities is None:
        image_w, probabilities = on(grid, final_segment or segment)
        mask = brain_of(probabilities)
    return BrainLocation(grid, image_w, probabilities, mask, moved)


def mask_image(location: BrainLocation) -> sitk.Image:
    """The brain mask on the location's grid as a UInt8 image with that geometry."""
    out = sitk.GetImageFromArray(location.mask.astype(np.uint8))
    out.CopyInformation(location.grid)
    return out


def masked(image: sitk.Image, brain: sitk.Image, transform: sitk.Transform | None = None) -> sitk.Image:
    """`image` with everything outside `brain` (a mask on any grid, mapped by `transform` from the image's
    space to the mask's) set to the image's background: what a skull-stripping tool hands over."""
    on_image = resample(brain, image, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.Mask(image, on_image, outsideValue=background_value(image))


def brain_on(background: torch.Tensor, grid: sitk.Image, reference: sitk.Image, transform, below: float) -> np.ndarray:
    """Brain voxels (z, y, x) of `reference`: where the background probability (z, y, x on the working
    `grid`), linearly resampled through `transform` (reference point -> grid point), is below `below`;
    outside the grid: background. One channel resampled by ITK, slab by slab: the same voxels as the argmax of
    the two-class map (background, brain) through fullres_labels, several times faster."""
    probability = sitk.GetImageFromArray(background.numpy().astype(np.float32))
    probability.CopyInformation(grid)
    return resample_in_slabs(probability, reference, transform, lambda slab: sitk.GetArrayViewFromImage(slab) < below,
                             bool, default=1.0, pixel_type=sitk.sitkFloat32)


def full_resolution_mask(labels: np.ndarray, like: sitk.Image) -> sitk.Image:
    """The brain mask from a full-resolution map whose non-zero voxels are brain, on `like`'s grid: its
    largest connected piece, holes filled (UInt8, 1 = brain)."""
    mask = sitk.GetImageFromArray((labels > 0).astype(np.uint8))
    mask.CopyInformation(like)
    return largest_filled(mask)


# T1-like intensity of each structure (any fixed contrast does: the registration network was trained on
# random contrasts; T1's order keeps the images familiar to a reader of the code)
T1_LIKE = {"cerebral white matter": 1.0, "cerebral cortex": 0.55, "lateral ventricle": 0.12, "third ventricle": 0.12,
           "fourth ventricle": 0.12, "cerebrospinal fluid": 0.18, "thalamus": 0.8, "caudate": 0.62, "putamen": 0.68,
           "pallidum": 0.85, "hippocampus": 0.55, "amygdala": 0.57, "accumbens": 0.6, "ventral diencephalon": 0.82,
           "cerebellum": 0.72, "brainstem": 0.9}


def rendering_intensities(label_table: list) -> torch.Tensor:
    """Per network channel, the T1-like intensity of its structure (0 for background)."""
    channels = max(int(e["value"]) for e in label_table) + 1
    values = torch.zeros(channels)
    for entry in label_table:
        name = entry["name"].split(" ", 1)[1] if entry["name"].startswith(("left ", "right ")) else entry["name"]
        values[int(entry["value"])] = T1_LIKE.get(name, 0.5 if entry["value"] else 0.0)
    return values


def render_from_segmentation(probabilities: torch.Tensor, intensities: torch.Tensor) -> torch.Tensor:
    """An image (1, 1, z, y, x) in one fixed contrast, drawn from class probabilities: any MR contrast in, the
    same contrast out, so the registration network compares like with like (the segmentation network was
    trained contrast-agnostic on synthetic heads; the registration network on random contrasts)."""
    return (probabilities * intensities.to(probabilities).view(1, -1, 1, 1, 1)).sum(1, keepdim=True)


def brain_tensor(location: BrainLocation, card: dict, device) -> torch.Tensor:
    """The brain alone on its brain-centred grid, normalised as the model is fed."""
    brain = masked(location.image, mask_image(location))
    return normalize(to_tensor(brain, device), card["intensity"])


def prealign_brains(moving: BrainLocation, fixed: BrainLocation, card: dict, device, network) -> sitk.AffineTransform:
    """The card's torch affine (learned, then its MI polish) between the two brains on their brain-centred
    grids: as `affine_torch.prealign` on skull-stripped images, without resampling the full images again."""
    from .affine_torch import card_theta, theta_to_physical
    theta = card_theta(brain_tensor(moving, card, device), brain_tensor(fixed, card, device), card, network)
    return theta_to_physical(theta, fixed.grid, moving.grid)
