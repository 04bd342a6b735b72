"""`--strategy synth`: joint registration + segmentation trained on label-driven synthetic subjects.

Registration follows SynthMorph (Hoffmann et al., IEEE TMI 2022): two images synthesised from one label
map under independent deformations and independent contrasts; the loss is the soft Dice of the warped
moving *generation* labels against the fixed ones plus a diffusion penalty on the displacement, so the
network learns anatomy-driven, contrast-agnostic alignment. Segmentation follows SynthSeg (Billot et al.,
MedIA 2023): Dice + cross-entropy against the target labels of every synthetic image. Both are trained
jointly on the same pairs (the DeepAtlas coupling is implicit: both heads see the same anatomy).

Train as you infer: every pair goes through the very affine pre-alignment that runs at inference
(`affine_torch.fit_affine`, after a random affine of each image), so the deformable network learns only
the residual it meets at run time.

With `train_passes` > 1 the registration network is trained as the recursive cascade that inference runs
(`networks.cascade_velocity`, shared weights, loss on the composed flow), as in recursive cascaded networks
(Zhao et al., ICCV 2019); SynthMorph itself trains one pass.

With a `flow` weight the registration is also supervised by the generator's true mapping (`flow_error_mm`,
end-point error in mm over the fixed brain; on every pair, or with `flow_pairs: same_anatomy` only on pairs
of one anatomy): SynthMorph trains on label overlap alone, which cannot see a shift inside a uniform
structure and let the network add sub-millimetre deformation to pairs whose only difference is an affine.

With `parts: ["registration"]` only the registration network trains (from `--init`, whose segmentation,
affine and card it keeps; no segmentation term): how a registration is re-trained under a segmentation
that has a label table of its own.

With `parts: ["segmentation"]` (and `labels`/`sources`: "whole-brain") only the segmentation network is
trained, from a parent model (`--init`, `relabelled_model`) whose registration and affine it keeps: one
synthetic subject a step, with a procedural head around the brain or without (`data/head_layers.py`, as
SynthStrip's generator), any contrast and resolution, scored by the partial-label loss
(`partial_labels.py`: a source that lacks a structure never teaches background there) plus the soft Dice
of the brain mask. The registration then runs on the brains the new segmentation finds (card
`brain_mask.registration`).

Deviations from the papers, on purpose: a stationary velocity field (diffeomorphic) instead of
SynthMorph's direct displacement in some variants; 2 mm working grid and a few thousand steps on a CPU
where the papers train ~10^5 steps on GPUs; the label maps are the offline ones (Colin27 held out).
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss, DiffusionLoss, LocalNormalizedCrossCorrelationLoss

from ...core.intensity import normalize
from ...data.generator import BrainSynthesizer, SynthesisSettings, mapping_error_mm, sampling_grid
from ...data.label_table import LABEL_TABLE
from ...data.source_cache import load_sources
from ...inference.affine_torch import fit_affine, warp_with_theta
from ...models.checkpoint import load_model, new_model
from ...models.networks import cascade_velocity
from ..partial_labels import partial_label_loss
from .base import Strategy

TRAIN_AFFINE_SCHEDULE = ((4, 40), (2, 20))


def synth_card(config: dict, meta: dict) -> dict:
    return {
        "name": config["name"], "description": config.get("description", ""),
        "architecture": config["architecture"], "labels": copy.deepcopy(meta.get("label_table", LABEL_TABLE)),
        "modality": config.get("modality", "MR brain-extracted (contrast-agnostic training, T1 tested)"),
        "intensity": config["intensity"],
        "working_grid": {**(config.get("working_grid") or meta["grid"]), "center": "mass"},
        "prealignment": {"kind": "torch-mi", "schedule": [list(s) for s in config.get("affine_schedule",
                                                                                     [[4, 80], [2, 60], [1, 30]])]},
        "segment_foreground_only": True,
        "segmentation": config.get("segmentation", {"mode": "fusion", "largest_component": True}),
        "refinement": config.get("refinement", {"similarity": "lncc", "smoothness": 1.0, "learning_rate": 0.05}),
    }


# what a segmentation-only config may set in the new model's card (see configs/brain-head-synth.json)
CARD_KEYS = ("segmentation", "inference", "brain_mask", "self_check", "registration_input", "licence")


def relabelled_model(parent, config: dict):
    """`parent` with the segmentation network re-made for the label table config["labels"] names
    ("whole-brain": `WHOLE_BRAIN_TABLE`): the registration, affine and every segmentation weight whose shape
    still fits are kept (the last layer, one channel per class, starts afresh); the card keeps the parent's
    pre-alignment and inference settings and says what changed."""
    from ...data.label_table import WHOLE_BRAIN_TABLE
    if config.get("labels") != "whole-brain":
        raise ValueError("a segmentation-only run needs \"labels\": \"whole-brain\" in its config")
    card = copy.deepcopy(parent.card)
    for key in ("weights_sha256", "parameter_count", "metrics"):
        card.pop(key, None)
    card.update({"name": config["name"], "description": config.get("description", ""),
                 "labels": copy.deepcopy(WHOLE_BRAIN_TABLE), "modality": config.get("modality", card.get("modality")),
                 "parent": {"name": parent.card.get("name"), "weights_sha256": parent.card.get("weights_sha256")}})
    for key in CARD_KEYS:
        if key in config:
            card[key] = copy.deepcopy(config[key])
    model = new_model(card, seed=int(config.get("seed", 0)))
    own = model.network.state_dict()
    inherited = parent.network.state_dict()
    kept = {k: v for k, v in inherited.items() if k in own and own[k].shape == v.shape}
    # the last layer (one output channel per class): a class the parent had (same value, same name, and
    # background) keeps its channel, so the new model starts segmenting those as the parent does; the new
    # classes start quiet (small weights, bias -2) and are learned. From a fresh last layer instead, the
    # 14 structures had a Dice of 0.13 after 600 steps (0.70 for the parent on held-out Colin27).
    parent_names = {int(e["value"]): e["name"] for e in parent.label_table}
    shared = [int(e["value"]) for e in card["labels"] if parent_names.get(int(e["value"])) == e["name"]]
    for key in [k for k in own if k.startswith("segmentation.") and k not in kept and k in inherited]:
        weight, parent_weight = own[key].clone(), inherited[key]
        channel_axis = 0 if weight.ndim == 1 else 1      # ConvTranspose3d weights: (in, out, ...)
        if weight.ndim > 1 and weight.shape[0] != parent_weight.shape[0]:
            channel_axis = 0
        if weight.ndim == 1:
            weight[:] = -2.0
        else:
            weight *= 0.1
        for value in shared:
            weight.select(channel_axis, value).copy_(parent_weight.select(channel_axis, value))
        kept[key] = weight
    model.network.load_state_dict(kept, strict=False)
    return model


def _parameter_groups(net, segmentation_only: bool, lr: float, config: dict) -> list[dict]:
    """Adam parameter groups; `output_layer_lr_factor` (segmentation-only runs) gives the segmentation's last
    layer (one output channel per class) a larger step: classes added to a trained network start quiet
    (`relabelled_model`), and at the body's learning rate five of them were still never predicted after
    1,600 steps (their weights had moved from 0.03 to 0.03, their biases from -2.0 to -2.05)."""
    trained = net.segmentation if segmentation_only else net
    factor = float(config.get("output_layer_lr_factor", 1.0))
    if factor == 1.0:
        return [{"params": list(trained.parameters())}]
    if not segmentation_only:
        raise ValueError("output_layer_lr_factor applies to segmentation-only runs (\"parts\": [\"segmentation\"])")
    output = [p for name, p in net.segmentation.named_parameters() if name.startswith(_output_layer(net.segmentation))]
    ids = {id(p) for p in output}
    return [{"params": [p for p in net.segmentation.parameters() if id(p) not in ids]},
            {"params": output, "lr_factor": factor}]


def _output_layer(segmentation) -> str:
    """Name prefix of the segmentation network's last parametrised layer (the one writing class channels)."""
    last = [name.rsplit(".", 1)[0] for name, _ in segmentation.named_parameters()][-1]
    return last + "."


def onehot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    return F.one_hot(labels[:, 0].clamp(0, classes - 1), classes).permute(0, 4, 1, 2, 3).float()


class SynthPairs:
    """Aligned synthetic training pairs exactly as inference sees them (normalised, affinely pre-aligned)."""

    def __init__(self, synthesizer: BrainSynthesizer, intensity: dict, affine_schedule=TRAIN_AFFINE_SCHEDULE,
                 affine_samples: int = 8000, same_contrast_probability: float = 0.7,
                 same_anatomy_probability: float = 0.0):
        self.synthesizer = synthesizer
        self.same_anatomy_probability = same_anatomy_probability
        self.same_contrast_probability = same_contrast_probability
        self.same_contrast = False
        self.same_anatomy = False
        self.affine_samples = affine_samples
        self.intensity = intensity
        self.affine_schedule = affine_schedule

    def pair(self, rng: np.random.Generator, index: int | None = None):
        index = int(rng.integers(len(self.synthesizer.sources))) if index is None else index
        # contrast of the pair: both real images (the run-time case) when the source has one, one shared
        # random mixture, or two independent mixtures (contrast-agnostic, as SynthMorph)
        draw = rng.random()
        # pairs of one anatomy under different affines (no relative deformation): after pre-alignment the
        # right answer is the identity, so the network learns to add no deformation nobody asked for
        elastic = not (self.same_anatomy_probability > 0 and rng.random() < self.same_anatomy_probability)
        has_real = self.synthesizer.sources[index].image is not None
        if draw < self.same_contrast_probability:
            both_real = has_real and rng.random() < 0.6
            seed = None if both_real else int(rng.integers(1 << 30))
            fixed = self.synthesizer.sample(rng, index, use_real=both_real, mixture_seed=seed, elastic=elastic)
            moving = self.synthesizer.sample(rng, index, use_real=both_real, mixture_seed=seed, elastic=elastic)
        else:
            fixed = self.synthesizer.sample(rng, index, elastic=elastic)
            moving = self.synthesizer.sample(rng, index, elastic=elastic)
        self.same_contrast = draw < self.same_contrast_probability
        self.same_anatomy = not elastic
        fixed_image = normalize(fixed.image, self.intensity)
        moving_image = normalize(moving.image, self.intensity)
        theta = fit_affine(moving_image, fixed_image, schedule=self.affine_schedule, samples=self.affine_samples,
                           seed=int(rng.integers(1 << 30)))
        aligned = {
            "image": warp_with_theta(moving_image, theta),
            "generation": warp_with_theta(moving.generation.float(), theta, "nearest").long(),
            "target": None if moving.target is None else warp_with_theta(moving.target.float(), theta,
                                                                           "nearest").long(),
        }
        return fixed, fixed_image, aligned, moving, theta


def flow_error_mm(fixed, moving_subject, theta, ddf_low, pool: int, spacing_mm: float) -> torch.Tensor:
    """Mean end-point error (mm) over the fixed brain of the mapping x -> theta(x + u(x)) at the velocity's
    resolution, against the true one the generator knows (both subjects' source grids). A supervised term
    the SynthMorph paper does not have: its label Dice cannot see a shift inside a uniform structure, nor
    tell a pair of one anatomy that the answer is the pre-alignment's small affine residual."""
    fixed_grid = F.avg_pool3d(fixed.grid.permute(0, 4, 1, 2, 3), pool).permute(0, 2, 3, 4, 1)
    brain = F.avg_pool3d((fixed.generation > 0).float(), pool)[0, 0] > 0.5
    error = mapping_error_mm(sampling_grid(theta, ddf_low), fixed_grid, moving_subject.grid, spacing_mm)
    return error[brain].mean()


class SynthData:
    """What a synthetic run trains from: label-map sources and their record. From a `--data` folder of
    offline sources (`sources.npz`, built on first use) or from a data set (`dataset.json`, `data build` /
    `data import`): then every labelled training image is a source (its label map drives the synthesis, its
    image is the real one) and `fewshot` holds the data set for validation."""

    def __init__(self, sources: list, meta: dict, fewshot=None):
        self.sources, self.meta, self.fewshot = sources, meta, fewshot

    @classmethod
    def from_dataset(cls, data_dir, intensity: dict, device) -> "SynthData":
        from ...data.atlas_sources import real_image_source
        from ..dataset import load_fewshot
        fewshot = load_fewshot(data_dir, intensity, device)
        sources = [real_image_source(name, fewshot.images[name][0, 0].float().cpu().numpy(),
                                     fewshot.labels[name][0, 0].cpu().numpy(), 0.02, str(data_dir))
                   for name in fewshot.labelled]
        if not sources:
            from ...core.errors import JointRegSegError
            raise JointRegSegError(f"{data_dir}: no labelled training image; synthesis needs label maps")
        meta = {"grid": fewshot.manifest["working_grid"], "label_table": fewshot.manifest["label_table"],
                "sources": [{"name": name, "folder": str(data_dir)} for name in fewshot.labelled]}
        return cls(sources, meta, fewshot)


class Synth(Strategy):
    """SynthMorph registration + SynthSeg segmentation on label-driven synthetic subjects (module docstring)."""
    name = "synth"
    paper = "SynthMorph (Hoffmann et al., IEEE TMI 2022) + SynthSeg (Billot et al., MedIA 2023)"
    checkpoint_every = 50
    # label Dice and smoothness (SynthMorph), segmentation (SynthSeg); LNCC on same-contrast pairs and the
    # supervised end-point error are off unless a config weighs them
    weights = {"dice": 1.0, "smooth": 1.0, "segmentation": 1.0, "image": 0.0, "flow": 0.0}

    def __init__(self, config: dict, net, data: SynthData):
        self.config, self.net, self.data = config, net, data
        device = next(net.parameters()).device
        self.segmentation_only = _segmentation_only(config)
        self.registration_only = config.get("parts") == ["registration"]
        settings = SynthesisSettings(**{**({"spacing_mm": float(min(data.meta["grid"]["spacing"]))}
                                            if data.fewshot is not None else {}), **config.get("synthesis", {})})
        if self.segmentation_only:
            from ...data.head_layers import HeadSettings, HeadSynthesizer
            self.synthesizer = HeadSynthesizer(data.sources, settings, device, HeadSettings(**config.get("head", {})))
        else:
            self.synthesizer = BrainSynthesizer(data.sources, settings, device)
        self.pairs = SynthPairs(self.synthesizer, config["intensity"], tuple(tuple(s) for s in config.get(
            "train_affine_schedule", TRAIN_AFFINE_SCHEDULE)), same_contrast_probability=config.get(
            "same_contrast_probability", 0.7), same_anatomy_probability=config.get("same_anatomy_probability", 0.0))
        self.w = {**self.weights, **config.get("weights", {})}
        self.lr = config.get("lr", 1e-3)
        self.train_passes = int(config.get("train_passes", 1))
        self.flow_pairs = config.get("flow_pairs", "all")
        if self.flow_pairs not in ("all", "same_anatomy"):
            raise ValueError(f"flow_pairs {self.flow_pairs!r}: must be 'all' or 'same_anatomy'")
        if self.train_passes < 1:
            raise ValueError(f"train_passes {self.train_passes}: must be at least 1")
        self.dice = DiceLoss(include_background=False, reduction="mean")
        self.smooth = DiffusionLoss()
        self.image_similarity = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=5, kernel_type="rectangular")
        self.segmentation_loss = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)

    # --- what the loop asks -------------------------------------------------------------------
    @classmethod
    def load_data(cls, config: dict, data_dir, device) -> SynthData:
        if (Path(data_dir) / "dataset.json").is_file():
            return SynthData.from_dataset(data_dir, config["intensity"], device)
        return SynthData(*load_sources(data_dir, config.get("sources", "subcortical")))

    @classmethod
    def build_model(cls, config: dict, data: SynthData, init, device, seed: int):
        if init is not None and _segmentation_only(config):
            return relabelled_model(load_model(init, device), config)
        if init is not None:
            return load_model(init, device)
        return new_model(synth_card(config, data.meta), seed=seed)

    def plan(self) -> list:
        return [("synth", i) for i in range(int(self.config["steps"]))]

    def make_rng(self, seed: int, start: int, rank: int):
        return np.random.default_rng(seed * 1_000_003 + start + 7_919 * rank)

    def optimizers(self) -> dict:
        if self.registration_only:
            return {"synth": torch.optim.Adam(self.net.registration.parameters(), lr=self.lr)}
        return {"synth": torch.optim.Adam(_parameter_groups(self.net, self.segmentation_only, self.lr, self.config),
                                          lr=self.lr)}

    def before_step(self, step: int, total: int, optimizers: dict, rng) -> None:
        for group in optimizers["synth"].param_groups:   # cosine decay to 10 % over the run
            group["lr"] = group.get("lr_factor", 1.0) * self.lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / total)))

    def updates(self, phase: str, index: int, rng) -> list:
        if self.segmentation_only:
            return [self._segmentation_update(rng)]
        return [self._pair_update(index, rng)]

    def finish(self, model, data_dir, record: dict) -> None:
        model.card["training"] = {**record, "implements": " ".join((__doc__ or "").split()),
                                  "steps": int(self.config["steps"])}
        if self.data.fewshot is not None:
            from ...evaluation.validation import evaluate_pairs
            model.card["data"] = {"folder": str(data_dir), "sources": self.data.meta["sources"],
                                  "grid": self.data.meta["grid"]}
            if self.data.fewshot.manifest.get("validation_pairs"):
                model.card["metrics"] = evaluate_pairs(model, self.data.fewshot)
            return
        model.card["data"] = {"sources": self.data.meta["sources"], "held_out": "Colin27 (ch2bet + AAL, Debian "
                              "mricron-data): no image or label map of it was used in training",
                              "grid": self.data.meta["grid"]}
        if self.config.get("heldout_metrics", True):
            from ...evaluation.validation import heldout_synthetic_metrics
            model.card["metrics"] = heldout_synthetic_metrics(model, pairs=int(self.config.get("heldout_pairs", 6)))

    # --- the two kinds of step ----------------------------------------------------------------
    def _segmentation_update(self, rng):
        """One subject a step, head or brain, any contrast: the segmentation (and brain mask) alone."""
        subject = self.synthesizer.sample_head(rng)
        image = normalize(subject.image, self.config["intensity"])

        def compute():
            loss = partial_label_loss(self.net.segment(image), subject.target, subject.brain, subject.known)
            return {"loss": loss, "segmentation": loss}
        return "synth", f"{subject.source}{'+head' if subject.head else ''}", compute

    def _pair_update(self, index: int, rng):
        fixed, fixed_image, moving, moving_subject, theta = self.pairs.pair(rng)
        same_contrast, same_anatomy = self.pairs.same_contrast, self.pairs.same_anatomy
        net, w = self.net, self.w

        def compute():
            # the same recursive cascade as inference (card `inference.passes`), trained end to end on its
            # composed flow: each later pass learns the residual the earlier ones leave, not a fresh pair
            velocity = cascade_velocity(net, moving["image"], fixed_image, self.train_passes)
            # the label loss at the velocity's (half) resolution: soft one-hots average-pooled, warped by the
            # half-resolution displacement the network integrates anyway (8x cheaper than at full size)
            ddf_low = net.integrator.integrate_low(velocity)
            generation_classes = int(max(fixed.generation.max(), moving["generation"].max())) + 1
            pool = net.integrator.downsample
            moving_soft = F.avg_pool3d(onehot(moving["generation"], generation_classes), pool)
            fixed_soft = F.avg_pool3d(onehot(fixed.generation, generation_classes), pool)
            terms = {"dice": self.dice(net.warp(moving_soft, ddf_low), fixed_soft), "smooth": self.smooth(ddf_low)}
            if same_contrast and w.get("image", 0) > 0:
                # dense image term where the contrasts agree (label Dice alone only pulls at label edges)
                moving_half, fixed_half = F.avg_pool3d(moving["image"], pool), F.avg_pool3d(fixed_image, pool)
                terms["image"] = self.image_similarity(net.warp(moving_half, ddf_low), fixed_half)
            if w.get("flow", 0) > 0 and (self.flow_pairs == "all" or same_anatomy):
                terms["flow"] = flow_error_mm(fixed, moving_subject, theta, ddf_low, pool,
                                              self.synthesizer.settings.spacing_mm)
            # segmentation on one image per step (the fixed one when it has labels), alternating otherwise
            candidates = [(img, tgt) for img, tgt in ((fixed_image, fixed.target), (moving["image"], moving["target"]))
                          if tgt is not None]
            if candidates and not self.registration_only:
                image, target = candidates[index % len(candidates)]
                terms["segmentation"] = self.segmentation_loss(net.segment(image), target)
            return {"loss": sum(w[k] * v for k, v in terms.items()), **terms}
        return "synth", fixed.source, compute


def _segmentation_only(config: dict) -> bool:
    return config.get("parts", ["registration", "segmentation"]) == ["segmentation"]
