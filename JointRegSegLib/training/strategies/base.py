"""What every strategy shares: the interface the loop in `train.py` calls, pair sampling, and the losses
more than one method uses (LNCC, diffusion or bending energy, Dice, soft cross-entropy, per-class NCC).

A strategy names the optimisers (one per network group) and, for every step, the updates to make:
`(optimiser key, log name, compute)` where `compute()` returns the loss terms (`"loss"` is the one
back-propagated). The loop owns sampling order, logging, checkpoints, resuming and distributed training.
"""
from __future__ import annotations

import random

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import BendingEnergyLoss, DiceLoss, DiffusionLoss, LocalNormalizedCrossCorrelationLoss

from ..dataset import FewShotData

REGULARISERS = {"diffusion": DiffusionLoss, "bending": BendingEnergyLoss}


class Strategy:
    name = ""
    weights: dict = {}  # the method's published (or documented) loss weights; a config's "weights" override
    regulariser = "diffusion"  # smoothness of the displacement; a config's "regulariser" overrides
    SEGMENTATION_LOSSES = ("ce", "ce+dice", "dice")  # what a config's "segmentation_loss" may name

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
