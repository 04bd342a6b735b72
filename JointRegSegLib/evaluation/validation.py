"""What training reports about a network, measured on its working grid (tensors, no resampling) and scored by
the one scoring core (scoring.py): a training data set's labelled validation pairs (`evaluate_pairs`, the card's
"metrics" after training and fine-tuning's before/after), and subjects synthesised from Colin27, an anatomy no
training source contains (`heldout_synthetic_metrics`, the synthetic training's card), scored also by the
end-point error against the true field."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from ..core.geometry import make_grid, voxel_ddf_to_mm
from ..core.intensity import normalize
from ..data import atlas_sources
from ..data.generator import BrainSynthesizer, SynthesisSettings, mapping_error_mm, sampling_grid
from ..inference.affine_torch import card_theta, warp_with_theta
from ..inference.refine import refine_velocity
from ..models.networks import cascade_velocity
from .scoring import PairScores, end_point_error_mm, mean_dice, score_pair


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.cpu().numpy().squeeze()


def score_network_pair(net, velocity, moving_labels, fixed_image, fixed_labels, label_table,
                       grid: sitk.Image | None = None) -> tuple[PairScores, torch.Tensor]:
    """Scores of a pair the network registered on its working grid: the moving labels warped by the displacement
    of `velocity`, the network's segmentation of the fixed image and, given the working `grid`, the folding and
    det J of the displacement. Returns the scores and the displacement (voxels)."""
    ddf = net.displacement(velocity, fixed_image.shape[2:])
    warped = net.warp_nearest(moving_labels.float(), ddf).long()
    predicted = net.segment(fixed_image).argmax(1)
    displacement_mm = voxel_ddf_to_mm(ddf[0].cpu().numpy(), grid) if grid is not None else None
    scores = score_pair(_array(warped), _array(fixed_labels), label_table, predicted=_array(predicted),
                        displacement_mm=displacement_mm, grid=grid)
    return scores, ddf


# -- a data set's validation pairs ---------------------------------------------------------------------------

def _labels_of(data, name):
    return data.labels.get(name, data.hidden_labels.get(name))


@torch.no_grad()
def evaluate_pairs(model, data, refine_iterations: int = 0) -> dict:
    """Mean scores over `data`'s validation pairs (a training data set loaded on its working grid: manifest,
    images, labels, hidden_labels and train, as training/dataset.py's FewShotData)."""
    if not data.manifest.get("validation_pairs"):
        return {"validation_pairs": 0, "refine_iterations": refine_iterations,
                "note": "no validation pairs (no labelled image held out of training): no validation figures"}
    net = model.network.eval()
    table = model.card["labels"]
    grid_spec = data.manifest["working_grid"]
    grid = make_grid(grid_spec["size"], grid_spec["spacing"], np.array(grid_spec["direction"]).reshape(3, 3),
                     np.zeros(3))
    reg, seg, before, folding = [], [], [], []
    for pair in data.manifest["validation_pairs"]:
        m_name, f_name = pair["moving"], pair["fixed"]
        m, f = data.images[m_name], data.images[f_name]
        velocity = net.velocity(m, f)
        if refine_iterations:
            velocity = refine_velocity(net, velocity, m, f, refine_iterations)
        m_lab, f_lab = _labels_of(data, m_name), _labels_of(data, f_name)
        scores, _ = score_network_pair(net, velocity, m_lab, f, f_lab, table, grid)
        reg.append(scores.registration_dice)
        before.append(mean_dice(_array(m_lab), _array(f_lab), table))
        seg.append(scores.segmentation_dice)
        folding.append(scores.deformation["folding_percent"])
    return {"validation_pairs": len(reg), "registration_dice_mean": float(np.mean(reg)),
            "dice_before_registration": float(np.mean(before)), "segmentation_dice_mean": float(np.mean(seg)),
            "folding_percent_mean": float(np.mean(folding)), "refine_iterations": refine_iterations,
            "note": validation_note(data, table)}


def validation_note(data, table) -> str:
    """What the validation figures measure, read from the manifest: how many structures, and whether the
    validation subjects share an anatomy with training (then the figures are optimistic for unseen brains)."""
    items = {e["name"]: e for e in data.manifest.get("items", [])}
    source = lambda name: items.get(name, {}).get("source", "unknown")  # noqa: E731
    names = {n for pair in data.manifest["validation_pairs"] for n in (pair["moving"], pair["fixed"])}
    val_sources = sorted({source(n) for n in names})
    train_sources = {source(n) for n in data.train}
    shared = [s for s in val_sources if s in train_sources]
    structures = sum(int(e["value"]) != 0 for e in table)
    text = (f"mean Dice over the {structures} structures of the label table, on the working grid; validation "
            f"subjects come from {', '.join(val_sources)}")
    if shared:
        return (f"{text}, anatomies that training also used ({', '.join(shared)}): these figures do not measure "
                "generalisation to unseen anatomy")
    return f"{text}, anatomies held out of training"


# -- held-out synthetic subjects -----------------------------------------------------------------------------

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
        scores, ddf = score_network_pair(net, velocity, target_aligned, fixed_image, fixed.target, table)
        # end-point error: where the pipeline sends each fixed voxel vs where the generator took it from
        brain = fixed.generation[0, 0] > 0
        epe = lambda u: end_point_error_mm(mapping_error_mm(sampling_grid(theta, u), fixed.grid,  # noqa: E731
                                                            moving.grid, synthesizer.settings.spacing_mm), brain)
        rows.append({
            "dice_affine": mean_dice(_array(target_aligned.long()), _array(fixed.target), table),
            "dice_network": scores.registration_dice,
            "segmentation_dice": scores.segmentation_dice,
            "epe_affine_mm": epe(torch.zeros_like(ddf)), "epe_network_mm": epe(ddf),
            "real_contrast": real,
        })
    mean = lambda key: round(float(np.mean([r[key] for r in rows])), 4)  # noqa: E731
    structures = sum(int(e["value"]) != 0 for e in table)
    return {"heldout_synthetic_pairs": len(rows), "registration_dice_affine_only": mean("dice_affine"),
            "registration_dice_mean": mean("dice_network"), "segmentation_dice_mean": mean("segmentation_dice"),
            "epe_affine_only_mm": mean("epe_affine_mm"), "epe_network_mm": mean("epe_network_mm"),
            "per_pair": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
            "network_passes": passes,
            "note": f"network only ({passes} pass{'es' if passes > 1 else ''}), working grid; synthetic pairs of "
                    f"{source.name}, an anatomy held out of training (half with its real T1 contrast, half with one "
                    f"random contrast shared by both images); mean Dice over the {structures} structures"}
