"""Held-out synthetic evaluation: subjects synthesised from Colin27 (an anatomy no training source
contains), scored by Dice against their own labels and by end-point error against the true field."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..inference.affine_torch import card_theta, warp_with_theta
from ..models.networks import cascade_velocity
from ..data import atlas_sources
from ..data.generator import BrainSynthesizer, SynthesisSettings, mapping_error_mm, sampling_grid
from ..core.intensity import normalize
from ..inference.qc import dice_per_label


def colin27_source(grid: sitk.Image | None = None) -> atlas_sources.SynthSource:
    """Colin27 on the common grid, built exactly as the image-bearing training sources are."""
    grid = grid or atlas_sources.common_grid()
    image, labels = atlas_sources.colin27_heldout()
    image_array = sitk.GetArrayFromImage(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                       sitk.sitkFloat32))
    target = sitk.GetArrayFromImage(sitk.Resample(labels, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                  sitk.sitkUInt8))
    mask = image_array > 0.05 * image_array.max()
    target = np.where(mask, target, 0).astype(np.uint8)
    generation = atlas_sources._with_clusters(target, image_array, mask)
    return atlas_sources.SynthSource("colin27-heldout", generation, target, np.where(mask, image_array, 0),
                                     "Colin27 ch2bet + AAL (Debian mricron-data)", "BSD-3-clause (MRIcron)")


def _mean_dice(a: torch.Tensor, b: torch.Tensor, table) -> float:
    values = list(dice_per_label(a.cpu().numpy().squeeze(), b.cpu().numpy().squeeze(), table).values())
    return float(np.nanmean(values))


@torch.no_grad()
def heldout_synthetic_metrics(model, pairs: int = 6, seed: int = 1234, source=None, real_fraction: float = 0.5,
                              affine_schedule=None) -> dict:
    """Network-only metrics on synthetic pairs of the held-out anatomy (fixed: a deformed synthetic subject;
    moving: the undeformed anatomy with another contrast, so the true field is the fixed one's)."""
    net = model.network.eval()
    card = model.card
    table = card["labels"]
    passes = int(card.get("inference", {}).get("passes", 1))
    source = source or colin27_source()
    rng = np.random.default_rng(seed)
    rows = []
    synthesizer = BrainSynthesizer([source], SynthesisSettings())
    for index in range(pairs):
        real = index < pairs * real_fraction
        seed = None if real else int(rng.integers(1 << 30))   # otherwise one random contrast for both images
        fixed = synthesizer.sample(rng, 0, strength=1.0, use_real=real, mixture_seed=seed)
        moving = synthesizer.sample(rng, 0, deform=False, use_real=real, mixture_seed=seed)
        fixed_image = normalize(fixed.image, card["intensity"])
        moving_image = normalize(moving.image, card["intensity"])
        theta = card_theta(moving_image, fixed_image, card, net, schedule=affine_schedule)
        moving_aligned = warp_with_theta(moving_image, theta)
        target_aligned = warp_with_theta(moving.target.float(), theta, "nearest")
        velocity = cascade_velocity(net, moving_aligned, fixed_image, passes)
        ddf = net.displacement(velocity, fixed_image.shape[2:])
        warped_target = net.warp_nearest(target_aligned, ddf).long()
        predicted = net.segment(fixed_image).argmax(1, keepdim=True)
        # end-point error: where the pipeline sends each fixed voxel vs where the generator took it from
        brain = fixed.generation[0, 0] > 0
        epe = lambda u: float(mapping_error_mm(sampling_grid(theta, u), fixed.grid, moving.grid,
                                               synthesizer.settings.spacing_mm)[brain].mean())
        rows.append({
            "dice_affine": _mean_dice(target_aligned.long(), fixed.target, table),
            "dice_network": _mean_dice(warped_target, fixed.target, table),
            "segmentation_dice": _mean_dice(predicted, fixed.target, table),
            "epe_affine_mm": epe(torch.zeros_like(ddf)), "epe_network_mm": epe(ddf),
            "real_contrast": real,
        })
    mean = lambda key: round(float(np.mean([r[key] for r in rows])), 4)
    structures = sum(int(e["value"]) != 0 for e in table)
    return {"heldout_synthetic_pairs": len(rows), "registration_dice_affine_only": mean("dice_affine"),
            "registration_dice_mean": mean("dice_network"), "segmentation_dice_mean": mean("segmentation_dice"),
            "epe_affine_only_mm": mean("epe_affine_mm"), "epe_network_mm": mean("epe_network_mm"),
            "per_pair": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
            "network_passes": passes,
            "note": f"network only ({passes} pass{'es' if passes > 1 else ''}), working grid; synthetic pairs of "
                    f"{source.name}, an anatomy held out of training (half with its real T1 contrast, half with one "
                    f"random contrast shared by both images); mean Dice over the {structures} structures"}
