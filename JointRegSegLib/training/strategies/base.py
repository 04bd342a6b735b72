"""What every strategy shares: the interface the one training loop (`training/train.py`) calls, pair
sampling, and the losses more than one method uses (LNCC, diffusion or bending energy, Dice, soft
cross-entropy, per-class NCC).

A strategy says how its data loads (`load_data`), how its model starts (`build_model`, unless the loop
resumes one), its step plan (`plan`: (phase, index) per step), its optimisers (one per network group) and
learning-rate schedule (`before_step`), for every step the updates to make: `(optimiser key, log name,
compute)` where `compute()` returns the loss terms (`"loss"` is the one back-propagated), and what the
finished model's card records (`finish`). The loop owns the order of steps, logging, the loss curve,
checkpoints, resuming and distributed training. The defaults here are the seed methods' (few-shot data
sets from `data build` / `data import`, phases reg_pretrain -> seg_pretrain -> joint).
"""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import BendingEnergyLoss, DiceLoss, DiffusionLoss, LocalNormalizedCrossCorrelationLoss

from ...core.errors import JointRegSegError
from ...models.checkpoint import load_model, new_model
from ..dataset import AugmentedData, FewShotData, augmentation_settings, load_fewshot

REGULARISERS = {"diffusion": DiffusionLoss, "bending": BendingEnergyLoss}


class Strategy:
    name = ""
    weights: dict = {}  # the method's published (or documented) loss weights; a config's "weights" override
    regulariser = "diffusion"  # smoothness of the displacement; a config's "regulariser" overrides
    SEGMENTATION_LOSSES = ("ce", "ce+dice", "dice")  # what a config's "segmentation_loss" may name

    checkpoint_every = 100

    def __init__(self, config: dict, net: nn.Module, data: FewShotData):
        self.config, self.net, self.data = config, net, data
        self.w = {**self.weights, **config.get("weights", {})}
        self.similarity = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=9)
        kind = config.get("regulariser", self.regulariser)
        if kind not in REGULARISERS:
            raise ValueError(f"regulariser {kind!r}: expected one of {sorted(REGULARISERS)}")
        self.regulariser = kind
        self.smooth = REGULARISERS[kind]()
        self.dice = DiceLoss(include_background=False)
        self.segmentation_loss = config.get("segmentation_loss", "ce")
        if self.segmentation_loss not in self.SEGMENTATION_LOSSES:
            raise ValueError(f"segmentation_loss {self.segmentation_loss!r}: expected one of "
                             f"{list(self.SEGMENTATION_LOSSES)}")

    def cross_entropy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The methods' cross-entropy segmentation loss (mean over voxels), or what the config's
        `"segmentation_loss"` puts in its place: `"ce+dice"` adds a soft Dice term, `"dice"` uses soft Dice
        alone (documented deviations where a method uses them: on 14 small structures cross-entropy leaves
        the net at background for hundreds of steps, and a method whose other mechanisms read the
        segmentation then has nothing to read)."""
        kind = self.segmentation_loss
        dice = self.dice(torch.softmax(logits, 1), target) if kind != "ce" else 0.0
        if kind == "dice":
            return dice
        return soft_cross_entropy(logits, target).mean() + dice

    # --- what the loop asks -------------------------------------------------------------------
    @classmethod
    def load_data(cls, config: dict, data_dir, device) -> FewShotData:
        data = load_fewshot(data_dir, config["intensity"], device)
        if not data.labelled:
            raise JointRegSegError(f"{data_dir}: no labelled training image; joint training needs at least one")
        settings = augmentation_settings(config, data)
        return data if settings is None else AugmentedData(data, settings, config["intensity"])

    @classmethod
    def build_model(cls, config: dict, data: FewShotData, init, device, seed: int):
        """A new model for the data set's label table, or `init` fine-tuned (its card updated to the data)."""
        if init is None:
            return new_model(default_card(config, data), seed=seed)
        model = load_model(init, device)
        model.card = {**model.card, "parent": {"name": model.card.get("name"), "path": str(init),
                                               "weights_sha256": model.card.get("weights_sha256")}}
        model.card.update({k: v for k, v in default_card(config, data).items() if k not in ("architecture",)})
        return model

    @classmethod
    def create(cls, config: dict, model, data):
        return cls(config, model.network, data)

    def plan(self) -> list[tuple[str, int]]:
        """(phase, index) for every step: registration pretraining, segmentation pretraining, joint training."""
        steps = self.config["steps"]
        return [(phase, i) for phase in ("reg_pretrain", "seg_pretrain", "joint") for i in range(int(steps.get(phase, 0)))]

    def make_rng(self, seed: int, start: int, rank: int):
        return random.Random(seed + start + 1_000_003 * rank)

    def before_step(self, step: int, total: int, optimizers: dict, rng) -> None:
        """Before each step: this step's draw of the training images through the generator (when the data
        set is augmented); the seed methods keep their configs' constant learning rates."""
        if isinstance(self.data, AugmentedData):
            self.data.next_step(np.random.default_rng(rng.getrandbits(63)))

    def finish(self, model, data_dir, record: dict) -> None:
        """The finished model's card: how it was trained, on what, and its validation metrics."""
        from ...evaluation.validation import evaluate_pairs
        data = self.data.raw if isinstance(self.data, AugmentedData) else self.data
        model.card["training"] = {**record, "implements": " ".join((type(self).__doc__ or "").split()),
                                  "augmentation": _augmentation_record(self.data),
                                  "labelled_images": data.labelled,
                                  "unlabelled_images": len(data.train) - len(data.labelled)}
        model.card["data"] = {"folder": str(data_dir), "sources": data.manifest["sources"],
                              "notes": data.manifest["notes"], "seed": data.manifest["seed"],
                              "summary": describe_data(data)}
        model.card["metrics"] = evaluate_pairs(model, data)

    def auxiliary(self) -> dict[str, nn.Module]:
        """Training-only networks (saved with the resumable state, not in the model)."""
        return {}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        lr = self.config["lr"]
        reg, seg = self.net.registration.parameters, self.net.segmentation.parameters
        return {"reg_pretrain": torch.optim.Adam(reg(), lr=lr["reg_pretrain"]),
                "seg_pretrain": torch.optim.Adam(seg(), lr=lr["seg_pretrain"]),
                "reg": torch.optim.Adam(reg(), lr=lr["reg"]),
                "seg": torch.optim.Adam(seg(), lr=lr["seg"])}

    def updates(self, phase: str, index: int, rng: random.Random) -> list:
        raise NotImplementedError(f"strategy {self.name!r} defines no updates")

    # --- shared pieces ------------------------------------------------------------------------
    @property
    def unlabelled(self) -> list:
        return [n for n in self.data.train if n not in self.data.labels]

    def pair(self, rng: random.Random, moving_labelled: bool = False) -> tuple[str, str]:
        """(moving, fixed), two different training images; the moving one labelled if asked."""
        train = self.data.train
        moving = rng.choice(self.data.labelled) if moving_labelled else rng.choice(train)
        return moving, rng.choice([n for n in train if n != moving])

    def labelled_pair(self, rng: random.Random) -> tuple[str, str]:
        """A pair with at least one labelled image, which one is moving drawn at random."""
        labelled = rng.choice(self.data.labelled)
        other = rng.choice([n for n in self.data.train if n != labelled])
        return (labelled, other) if rng.random() < 0.5 else (other, labelled)

    def field(self, moving: str, fixed: str, scale: float = 1.0):
        m, f = self.data.images[moving], self.data.images[fixed]
        velocity = self.net.velocity(m, f)
        return self.net.displacement(velocity * scale, f.shape[2:])

    def image_terms(self, moving: str, fixed: str, ddf) -> tuple[torch.Tensor, dict]:
        """The moving image warped by `ddf`, and that warp's similarity and smoothness terms."""
        warped = self.net.warp(self.data.images[moving], ddf)
        return warped, {"similarity": self.similarity(warped, self.data.images[fixed]), "smooth": self.smooth(ddf)}

    def onehot(self, name: str) -> torch.Tensor:
        return self.data.onehot(self.data.labels[name])


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-voxel cross-entropy against soft (warped one-hot) labels, shape (B, 1, ...)."""
    return -(target * F.log_softmax(logits, dim=1)).sum(1, keepdim=True)


def soft_dice_and_ce(logits: torch.Tensor, target: torch.Tensor, dice: nn.Module) -> torch.Tensor:
    return dice(torch.softmax(logits, 1), target) + soft_cross_entropy(logits, target).mean()


def hard_onehot(probabilities: torch.Tensor) -> torch.Tensor:
    """Arg-max of class probabilities (B, C, ...) as a one-hot map of the same shape."""
    return F.one_hot(probabilities.argmax(1), probabilities.shape[1]).movedim(-1, 1).to(probabilities.dtype)


def default_card(config: dict, data: FewShotData) -> dict:
    return {
        "name": config["name"], "description": config.get("description", ""),
        "architecture": config["architecture"], "labels": data.manifest["label_table"],
        "modality": data.manifest.get("modality", "unknown"), "intensity": config["intensity"],
        "working_grid": {**data.manifest["working_grid"], "center": "mass"},
        "segment_foreground_only": bool(config.get("segment_foreground_only", False)),
        "refinement": config.get("refinement", {"similarity": "lncc", "smoothness": 1.0, "learning_rate": 0.05}),
    }


def describe_data(data: FewShotData) -> str:
    """The training data in words, counted from the manifest (not a fixed sentence)."""
    items = {e["name"]: e for e in data.manifest["items"]}

    def part(names: list) -> str:
        synthetic = sum(bool(items[n].get("synthetic")) for n in names)
        sources = sorted({str(items[n].get("source", "unknown")) for n in names})
        return f"{len(names)} ({len(names) - synthetic} real, {synthetic} synthetic; from {', '.join(sources) or 'none'})"

    grid = data.manifest.get("working_grid", {})
    text = (f"Training images: {part(data.train)}, of which {len(data.labelled)} with labels used in training "
            f"({', '.join(data.labelled) or 'none'}) and {len(data.train) - len(data.labelled)} without. "
            f"Validation images: {part(data.val)}, labels for evaluation only. "
            f"Modality {data.manifest.get('modality', 'unknown')}; working grid {grid.get('size')} voxels of "
            f"{grid.get('spacing')} mm.")
    return f"{text} {data.manifest['notes']}" if data.manifest.get("notes") else text


def _augmentation_record(data) -> dict | None:
    """The generator settings the training images were drawn with (None: the data set's images as they are)."""
    if not isinstance(data, AugmentedData):
        return None
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(data.synthesizer.settings).items()}
