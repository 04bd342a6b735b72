"""register_and_segment: the core contract (DESIGN.md). Physical space in, physical space out."""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch

from . import selfcheck
from .affine import affine_prealign
from .brainmask import (brain_on, full_resolution_mask, locate_brain, mask_image, masked, prealign_brains,
                        render_from_segmentation, rendering_intensities)
from .affine_torch import prealign as prealign_torch
from .contrast import contrast_map
from .segfusion import joint_probabilities, lateral_axis, mirror_permutation, segment_probabilities
from ..models.checkpoint import JointRegSegModel, load_model
from ..core.device import resolve_device, run_with_cpu_fallback
from .fullres_labels import labels_on
from ..core.geometry import (border_taper, canonical_storage, displacement_image, displacement_on,
                       jacobian_determinant_of_field, jacobian_determinant_of_transform, resample, to_tensor,
                       total_transform, voxel_ddf_to_mm, working_grid)
from ..core.errors import CheckpointError, InputImageError
from ..io.imageio import label_image_like, validate_volume
from ..io.input_checks import input_warnings
from ..core.intensity import normalize
from ..models.networks import cascade_velocity
from ..core.progress import Reporter
from .qc import determinant_stats, label_volumes_ml, volume_flags
from .refine import choose_velocity_scale, refine_velocity


@dataclass
class Result:
    """Everything in LPS physical space; on the fixed grid unless the name says moving."""

    affine: sitk.AffineTransform | None  # the pre-alignment, composed into `transform` and `displacement`
    warped: sitk.Image                  # moving resampled onto the fixed grid by `transform`
    fixed_segmentation: sitk.Image
    moving_segmentation: sitk.Image     # on the moving grid
    warped_moving_segmentation: sitk.Image
    jacobian_determinant: sitk.Image
    label_table: list
    qc: dict = field(default_factory=dict)
    working_displacement: sitk.Image | None = None  # the deformable part (mm, float64) on the working grid
    _displacement: sitk.Image | None = field(default=None, repr=False, compare=False)
    fixed_brain_mask: sitk.Image | None = None      # UInt8, 1 = brain; models that output a brain mask
    moving_brain_mask: sitk.Image | None = None     # on the moving grid
    # `transform` sampled on the fixed grid as float32 vectors (mm): what displacement_field.nii.gz holds
    displacement_float32: sitk.Image | None = field(default=None, repr=False, compare=False)

    @property
    def transform(self) -> sitk.CompositeTransform:
        """x -> affine(x + d_working(x)): the affine and the working-grid field as one ITK composite
        transform (compact: its size does not grow with the fixed image). A fresh one each call."""
        return total_transform(self.working_displacement, self.affine)

    @property
    def displacement(self) -> sitk.Image:
        """Total displacement (mm, float64 vectors) on the fixed grid, fixed x -> moving x + u(x); sampled
        from `transform` on first use (24 bytes per fixed voxel: large volumes use `transform` instead)."""
        if self._displacement is None:
            self._displacement = displacement_on(self.transform, self.warped)
        return self._displacement


@dataclass
class _Attempt:
    """One registration of a run (its affine method, then the network) with its self-check."""

    method: str | None            # affine method, None without an affine step
    affine: sitk.AffineTransform | None
    grid: sitk.Image
    device: torch.device
    iterations: int               # refinement iterations run
    ddf_voxels: np.ndarray
    fixed_probs: torch.Tensor     # after fusion (when the check passed) and the clean-up
    moving_probs: torch.Tensor
    velocity_scale: float
    scores: dict                  # agreement per structure
    agreement_mean: float | None
    segmentation_mode: str        # the mode used: the card's, or "network" when the check failed
    brains: tuple | None          # background probabilities (fixed, moving) for the masks, when the card outputs them


# what the registration network is shown: the images; renderings of both from their own segmentations; or
# the images with one mapped into the other's contrast when their tissue contrasts differ (contrast.py)
REGISTRATION_INPUTS = ("images", "segmentation", "contrast-matched")
# the fixed-grid displacement field (12 bytes a voxel) is kept from the quality control for the writer up to
# this size (a 1 mm head: 87 MB); larger ones are sampled twice rather than held (the 4 GB bar at 512x512x300)
FIELD_KEPT_BYTES = 256 * 1024 ** 2


def _as_model(model, device) -> JointRegSegModel:
    if isinstance(model, JointRegSegModel):
        model.network.to(device).eval()
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_model(model, device)
    raise TypeError(f"model must be a checkpoint path or a JointRegSegModel, got {type(model).__name__}")


def _background(image: sitk.Image) -> float:
    return float(sitk.GetArrayViewFromImage(image).min())


def _guide_on(labels: sitk.Image, grid: sitk.Image, transform, role: str, label_table: list) -> torch.Tensor:
    """A guidance label map resampled (nearest) onto the working grid, one-hot (1, C, z, y, x)."""
    labels = validate_volume(labels, f"{role} guidance labels")
    array = sitk.GetArrayFromImage(resample(labels, grid, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
    values = {int(e["value"]) for e in label_table}
    unknown = sorted({int(v) for v in np.unique(array)} - values)
    if unknown:
        raise InputImageError(f"{role} guidance labels hold values {unknown} that are not in the model's label "
                              f"table {sorted(values)}")
    classes = max(values) + 1
    onehot = torch.nn.functional.one_hot(torch.from_numpy(array.astype(np.int64)), classes)
    return onehot.permute(3, 0, 1, 2)[None].float()


def _class_values(label_table: list) -> np.ndarray:
    """Map network channel -> label value (channels are label values; gaps map to 0)."""
    lut = np.zeros(max(e["value"] for e in label_table) + 1, dtype=np.uint8)
    for entry in label_table:
        lut[entry["value"]] = entry["value"]
    return lut


def register_and_segment(moving: sitk.Image, fixed: sitk.Image, model, device: str = "auto",
                         affine: bool = True, refine_iterations: int = 0, refine_similarity: str | None = None,
                         refine_smoothness: float | None = None, guide_labels: tuple | None = None,
                         affine_method: str | None = None, segmentation_mode: str | None = None,
                         network_passes: int | None = None, scale_search: bool | None = None, progress=None,
                         cancel=None) -> Result:
    """Register `moving` onto `fixed` and segment both with a joint model (see DESIGN.md, core contract).

    `guide_labels` = (moving label map, fixed label map), values from the model's label table, e.g. an
    annotator's corrected segmentations: test-time refinement then also maximises their overlap
    (label-driven instance optimisation; 50 iterations unless `refine_iterations` says otherwise).

    progress(stage, fraction) is called as work proceeds; cancel (an Event or a callable) stops it,
    raising Cancelled. Nothing is written anywhere by this function.

    `affine_method`: "torch" (the affine on the working grid the card's `prealignment` asks for: MI, or the
    learned affine then a short MI polish) or "classical" (SimpleITK Mattes MI); default: "torch" when the
    card's `prealignment` kind is "torch-mi" or "learned", else classical.
    `segmentation_mode`: "network", "propagation" or "fusion" (see segfusion.py); default: the card's.
    `network_passes`: how often the registration network runs (`networks.cascade_velocity`; no per-pair
    optimisation). Default: the card's `inference.passes`, else 1.
    `scale_search`: choose the length of the network's velocity among the card's `inference.scales` by
    image similarity (`refine.choose_velocity_scale`; one scalar, no optimisation of the field); default: on
    when the card lists scales. False: the network's output as it is.
    """
    reporter = Reporter(progress, cancel)
    started = time.perf_counter()
    with reporter.stage("validate inputs"):
        moving = validate_volume(moving, "moving")
        fixed = validate_volume(fixed, "fixed")
        torch_device = resolve_device(device)
    with reporter.stage("load model"):
        model = _as_model(model, torch_device)
        card = model.card
    affine_tx = None
    affine_method = affine_method or ("torch" if card.get("prealignment", {}).get("kind") in ("torch-mi", "learned")
                                      else "classical")
    if affine_method not in ("torch", "classical"):
        raise ValueError(f"affine_method {affine_method!r}: choose 'torch' or 'classical'")
    seg_card = card.get("segmentation", {})
    segmentation_mode = segmentation_mode or seg_card.get("mode", "network")
    if network_passes is None:
        network_passes = card.get("inference", {}).get("passes", 1)
    network_passes = int(network_passes)
    if network_passes < 1:
        raise ValueError(f"network_passes {network_passes}: must be at least 1")
    scales = card.get("inference", {}).get("scales", [])
    if not isinstance(scales, list) or not all(isinstance(s, (int, float)) and s > 0 for s in scales):
        raise CheckpointError(f"model card: inference.scales {scales!r} must be a list of positive numbers")
    if scale_search is None:
        scale_search = bool(scales)
    if scale_search and not scales:
        raise ValueError(f"scale_search: the model card of {card.get('name', 'this model')!r} lists no "
                         "`inference.scales` to choose from")
    threshold = selfcheck.threshold_of(card)
    masking = card.get("brain_mask", {}).get("registration") == "masked"
    outputs_masks = bool(card.get("brain_mask", {}).get("output"))
    refine_cfg = {**card.get("refinement", {})}
    similarity = refine_similarity or refine_cfg.get("similarity", "lncc")
    smoothness = refine_smoothness if refine_smoothness is not None else refine_cfg.get("smoothness", 1.0)
    permutation = mirror_permutation(model.label_table) if seg_card.get("mirror_average") else None
    mirror_axis = lateral_axis(card["working_grid"].get("direction", np.eye(3).ravel()))

    def segment(network, image, direct=None):
        return segment_probabilities(network, image, permutation, mirror_axis, direct)

    warnings_ = input_warnings(moving, fixed)
    locations = None                               # where each brain is, when the card registers brains only
    brain_info = None
    if masking:
        with reporter.stage("find the brains"), torch.no_grad():
            network = model.network.to(torch_device)
            quick = lambda t: torch.softmax(network.segment(t), 1)
            with ThreadPoolExecutor(max_workers=2, thread_name_prefix="jointregseg-brains") as pool:
                moving_job = pool.submit(locate_brain, moving, card, quick, torch_device)
                # the fixed image's grid is the run's working grid: its final segmentation is the run's
                fixed_job = pool.submit(locate_brain, fixed, card, quick, torch_device,
                                        lambda t, direct=None: segment(network, t, direct))
                locations = {"moving": moving_job.result(), "fixed": fixed_job.result()}
            brain_info = {role: {"brain_ml_working_grid": round(float(loc.mask.sum()) * float(np.prod(
                loc.grid.GetSpacing())) / 1000, 1), "grid_moved_to_brain_mm": round(loc.moved_mm, 1)}
                for role, loc in locations.items()}
            for role, info in brain_info.items():
                if not 600 <= info["brain_ml_working_grid"] <= 2600:
                    warnings_.append(f"the {role} image does not look like a head or brain MRI: the model found "
                                     f"{info['brain_ml_working_grid']:.0f} ml of brain in it (a brain is 1000-1800 ml); "
                                     "its results are not to be trusted")

    render_table = None
    registration_input = card.get("registration_input") or "images"
    if registration_input not in REGISTRATION_INPUTS:
        raise CheckpointError(f"model card: registration_input {registration_input!r} is not one of "
                              f"{', '.join(REGISTRATION_INPUTS)}")
    if registration_input == "contrast-matched" and not masking:
        raise CheckpointError("model card: registration_input 'contrast-matched' needs brain_mask.registration "
                              "'masked' (the contrasts are compared inside the brains the model finds)")
    if registration_input == "segmentation":
        render_table = rendering_intensities(model.label_table)
    # the images the registration sees: when their tissue contrasts differ, one in the other's contrast
    for_registration, registration_locations, contrast_record = {"moving": moving, "fixed": fixed}, locations, None
    if registration_input == "contrast-matched" and locations is not None:
        with reporter.stage("match contrasts"):
            mapping = contrast_map(locations["moving"], locations["fixed"], rendering_intensities(
                model.label_table).numpy())
            if mapping is not None:
                contrast_record = mapping.record()
                if mapping.applies:
                    role = mapping.mapped_role
                    for_registration[role] = mapping.apply(for_registration[role])
                    registration_locations = {**locations, role: dataclasses.replace(
                        locations[role], image=mapping.apply(locations[role].image))}

    def attempt(method: str | None, stage_name: str):
        """One registration (affine by `method`, then the network) and its self-check; nothing written."""
        affine_tx = None
        if affine and method is not None:
            with reporter.stage(stage_name) as stage:
                # on canonically ordered copies: the result must not depend on how the files store their axes
                if method == "torch" and locations is not None:
                    affine_tx = prealign_brains(registration_locations["moving"], registration_locations["fixed"],
                                                card, torch_device, model.network)
                elif method == "torch":
                    affine_tx = prealign_torch(canonical_storage(moving), canonical_storage(fixed), card,
                                               torch_device, network=model.network)
                else:
                    # the classical affine on full-resolution images (the brains only, when the card says so)
                    moving_c, fixed_c = moving, fixed
                    if locations is not None:
                        moving_c = masked(for_registration["moving"], mask_image(locations["moving"]))
                        fixed_c = masked(for_registration["fixed"], mask_image(locations["fixed"]))
                    affine_tx = affine_prealign(canonical_storage(moving_c), canonical_storage(fixed_c),
                                                on_iteration=lambda i: stage(min(i / 100.0, 0.99)))
        with reporter.stage("resample to working grid"):
            grid = working_grid(fixed, card) if locations is None else locations["fixed"].grid
            fixed_w = resample(fixed, grid, default=_background(fixed))
            moving_w = resample(moving, grid, affine_tx, default=_background(moving))
            fixed_w_reg, moving_w_reg = fixed_w, moving_w
            if locations is not None:
                fixed_r, moving_r = fixed_w, moving_w
                if for_registration["fixed"] is not fixed:
                    fixed_r = resample(for_registration["fixed"], grid, default=_background(for_registration["fixed"]))
                if for_registration["moving"] is not moving:
                    moving_r = resample(for_registration["moving"], grid, affine_tx,
                                        default=_background(for_registration["moving"]))
                fixed_w_reg = masked(fixed_r, mask_image(locations["fixed"]))
                moving_w_reg = masked(moving_r, mask_image(locations["moving"]), affine_tx)
            guide = None
            if guide_labels is not None:
                guide = [_guide_on(labels, grid, transform, role, card["labels"]) for labels, transform, role in
                         ((guide_labels[0], affine_tx, "moving"), (guide_labels[1], None, "fixed"))]
        iterations = refine_iterations or (50 if guide is not None else 0)

        def infer(dev: torch.device):
            network = model.network.to(dev)
            fixed_t = normalize(to_tensor(fixed_w, dev), card["intensity"])
            moving_t = normalize(to_tensor(moving_w, dev), card["intensity"])
            fixed_r, moving_r = fixed_t, moving_t
            if locations is not None:
                fixed_r = normalize(to_tensor(fixed_w_reg, dev), card["intensity"])
                moving_r = normalize(to_tensor(moving_w_reg, dev), card["intensity"])
            scale = 1.0
            with reporter.stage("network inference"), torch.no_grad():
                fixed_probs = (locations["fixed"].probabilities.to(dev) if locations is not None
                               else segment(network, fixed_t))
                moving_probs = segment(network, moving_t)
                if render_table is not None:
                    # both images in one contrast, drawn from their own segmentations (see render_from_segmentation)
                    fixed_r = render_from_segmentation(fixed_probs, render_table)
                    moving_r = render_from_segmentation(moving_probs, render_table)
                velocity = cascade_velocity(network, moving_r, fixed_r, network_passes)
            ddf = None   # the scale search leaves the displacement of its choice: not integrated twice
            if scale_search:
                with reporter.stage("velocity scale"):
                    scale, ddf, _ = choose_velocity_scale(network, velocity, moving_r, fixed_r, scales)
                velocity = scale * velocity
            if iterations > 0:
                ddf = None
                with reporter.stage("test-time refinement") as stage:
                    velocity = refine_velocity(
                        network, velocity, moving_r, fixed_r, iterations, similarity=similarity,
                        smoothness=smoothness, learning_rate=refine_cfg.get("learning_rate", 0.05),
                        label_guidance=None if guide is None else tuple(g.to(dev) for g in guide),
                        on_step=lambda i, _loss: stage((i + 1) / iterations))
            with torch.no_grad():
                if ddf is None:
                    ddf = network.displacement(velocity, fixed_t.shape[2:])
                # the self-check: the fixed image's own segmentation against the moving one carried over
                scores = selfcheck.agreement(fixed_probs, network.warp(moving_probs, ddf), model.label_table)
                mean = selfcheck.summary(scores)
                # a registration that fails its check never feeds the fixed segmentation: the network's own
                mode = segmentation_mode if selfcheck.status(mean, threshold) == "ok" else "network"
                # the brain: where the network's own background probability (before fusion and before the
                # largest-piece clean-up, which works structure by structure) is below 1 - brain_mask.threshold
                brains = None
                if outputs_masks:
                    brains = tuple(p[0, 0].cpu() for p in (fixed_probs, moving_probs))
                fixed_probs, moving_probs = joint_probabilities(
                    network, velocity, fixed_probs, moving_probs, fixed_t.shape[2:], mode,
                    seg_card.get("largest_component", True), ddf=ddf)
            return _Attempt(method, affine_tx, grid, dev, iterations, ddf[0].cpu().numpy(), fixed_probs.cpu(),
                            moving_probs.cpu(), scale, scores, mean, mode, brains)

        outcome, _ = run_with_cpu_fallback(infer, torch_device)
        model.network.to(torch_device)
        return outcome

    methods = [affine_method if affine else None]
    if affine and card.get("self_check", {}).get("rescue", True):
        methods.append("classical" if affine_method == "torch" else "torch")
    attempts = []
    for number, method in enumerate(methods):
        run = attempt(method, "affine pre-alignment" if number == 0 else f"rescue: {method} affine")
        attempts.append(run)
        if selfcheck.status(run.agreement_mean, threshold) == "ok":
            break
    best = max(attempts, key=lambda a: -1.0 if a.agreement_mean is None else a.agreement_mean)
    affine_tx, grid, used_device = best.affine, best.grid, best.device
    ddf_voxels, fixed_probs, moving_probs, brains = best.ddf_voxels, best.fixed_probs, best.moving_probs, best.brains
    velocity_scale, scores, agreement_mean, used_mode = (best.velocity_scale, best.scores, best.agreement_mean,
                                                         best.segmentation_mode)
    registration_status = selfcheck.status(agreement_mean, threshold)
    if registration_status == "check":
        tried = ", ".join(f"{a.method or 'no'} affine ({a.agreement_mean})" for a in attempts)
        warnings_.append(f"the registration needs checking: the fixed image's own segmentation and the moving "
                         f"segmentation carried by the registration agree only {agreement_mean} (mean Dice; 'ok' "
                         f"needs {threshold}); tried: {tried}. The fixed segmentation is the network's own, "
                         "without fusion; look at the QC picture before using the transform")

    with reporter.stage("compose transform"):
        working_mm = voxel_ddf_to_mm(ddf_voxels, grid) * border_taper(ddf_voxels.shape[1:])[..., None]
        working_disp = displacement_image(working_mm, grid)
        # one compact transform (affine + working-grid field); never a float64 field on a large fixed grid
        transform = total_transform(working_disp, affine_tx)
    with reporter.stage("warp moving"):
        warped = resample(moving, fixed, transform, default=_background(moving))
    with reporter.stage("segmentations"):
        lut = _class_values(model.label_table)
        to_grid = affine_tx.GetInverse() if affine_tx is not None else None
        # the two full-resolution label maps side by side: much of labels_on is small torch operations that
        # leave the second core idle (measured on a 1 mm pair: 1.29 s one after the other, 0.84 s side by side)
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="jointregseg-labels") as pool:
            fixed_job = pool.submit(labels_on, fixed_probs, grid, fixed)
            moving_job = pool.submit(labels_on, moving_probs, grid, moving, to_grid)
            fixed_labels, moving_labels = lut[fixed_job.result()], lut[moving_job.result()]
        if card.get("segment_foreground_only"):
            # models trained on brain-extracted images never saw background voxels labelled
            fixed_labels[sitk.GetArrayViewFromImage(fixed) <= _background(fixed)] = 0
            moving_labels[sitk.GetArrayViewFromImage(moving) <= _background(moving)] = 0
        fixed_seg = label_image_like(fixed_labels, fixed)
        moving_seg = label_image_like(moving_labels, moving)
        warped_seg = resample(moving_seg, fixed, transform, sitk.sitkNearestNeighbor)
        fixed_mask = moving_mask = None
        if outputs_masks:
            below = 1.0 - float(card.get("brain_mask", {}).get("threshold", 0.5))
            fixed_mask = full_resolution_mask(brain_on(brains[0], grid, fixed, None, below), fixed)
            moving_mask = full_resolution_mask(brain_on(brains[1], grid, moving, to_grid, below), moving)
    with reporter.stage("quality control"):
        fixed_grid_field = None
        if 12 * int(np.prod(fixed.GetSize())) <= FIELD_KEPT_BYTES:
            # the transform sampled on the fixed grid once: for det J here and for displacement_field.nii.gz
            fixed_grid_field = displacement_on(transform, fixed, sitk.sitkVectorFloat32)
            det = jacobian_determinant_of_field(sitk.GetArrayViewFromImage(fixed_grid_field), fixed)
        else:
            # a large fixed grid (a 512x512x300 field is 0.9 GB): det J slab by slab from the transform, and
            # the writer samples the field when it writes it, once the run's other arrays are gone
            det = jacobian_determinant_of_transform(transform, fixed)
        jac = determinant_stats(det)
        det_image = sitk.GetImageFromArray(det)
        det_image.CopyInformation(fixed)
        qc = {
            **jac,
            "registration_status": registration_status,
            "agreement_mean": agreement_mean,
            "agreement_threshold": threshold,
            "agreement_dice": scores,
            "registration_attempts": [{"affine_method": a.method, "agreement_mean": a.agreement_mean,
                                       "segmentation_mode": a.segmentation_mode} for a in attempts],
            "warnings": warnings_,
            "fixed_volumes_ml": label_volumes_ml(fixed_labels, fixed.GetSpacing(), model.label_table),
            "moving_volumes_ml": label_volumes_ml(moving_labels, moving.GetSpacing(), model.label_table),
            "device": str(used_device),
            "model": card.get("name", "unnamed"),
            "affine_prealignment": affine,
            "affine_method": best.method if affine else None,
            "registration_on_brain_masks": masking,
            "segmentation_mode": used_mode,
            "network_passes": network_passes,
            "velocity_scale": velocity_scale,
            "segmentation_mirror_average": permutation is not None,
            "affine_matrix": list(affine_tx.GetMatrix()) if affine_tx is not None else None,
            "affine_translation_mm": list(affine_tx.GetTranslation()) if affine_tx is not None else None,
            "affine_center_mm": list(affine_tx.GetCenter()) if affine_tx is not None else None,
            "refine_iterations": int(best.iterations),
            "refine_similarity": similarity if best.iterations else None,
            "working_grid": {"size": list(grid.GetSize()), "spacing": list(grid.GetSpacing())},
            "fixed_size": list(fixed.GetSize()), "moving_size": list(moving.GetSize()),
        }
        if brain_info is not None:
            qc["brain"] = brain_info
        if contrast_record is not None:
            qc["contrast"] = contrast_record
        if fixed_mask is not None:
            for role, mask in (("fixed", fixed_mask), ("moving", moving_mask)):
                qc[f"{role}_brain_mask_ml"] = round(float(sitk.GetArrayViewFromImage(mask).sum()) *
                                                    float(np.prod(mask.GetSpacing())) / 1000, 2)
        qc["volume_flags"] = volume_flags(qc["fixed_volumes_ml"], qc["moving_volumes_ml"], fixed, moving,
                                          model.label_table)
    qc["timing_s"] = dict(reporter.timings)
    qc["timing_s"]["total"] = round(time.perf_counter() - started, 4)
    return Result(working_displacement=working_disp, affine=affine_tx, warped=warped, fixed_segmentation=fixed_seg,
                  moving_segmentation=moving_seg, warped_moving_segmentation=warped_seg,
                  jacobian_determinant=det_image, label_table=copy.deepcopy(model.label_table), qc=qc,
                  fixed_brain_mask=fixed_mask, moving_brain_mask=moving_mask, displacement_float32=fixed_grid_field)
