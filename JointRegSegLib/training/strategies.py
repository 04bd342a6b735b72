"""Training strategies: what each paper adds to the shared loop in `train.py`.

A strategy names its phases, the optimisers (one per network group) and, for every step, the
updates to make: `(optimiser key, log name, compute)` where `compute()` returns the loss terms.
The loop owns sampling order, logging, checkpoints, resuming and distributed training.
"""
from __future__ import annotations

import random

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceLoss, DiffusionLoss, LocalNormalizedCrossCorrelationLoss
from monai.networks.nets import UNet

from .dataset import FewShotData

PAPERS = {
    "deepatlas": "Xu & Niethammer, DeepAtlas: Joint Semi-supervised Learning of Image Registration and "
                 "Segmentation, MICCAI 2019",
    "deeprs": "He et al., Deep Complementary Joint Model for Complex Scene Registration and Few-shot "
              "Segmentation on Medical Images (DeepRS), ECCV 2020",
    "unsupervised": "baseline: the same networks trained independently (registration by LNCC + diffusion only, "
                    "segmentation by supervised Dice only); no coupling",
}


class Strategy:
    name = ""
    phases = ("reg_pretrain", "seg_pretrain", "joint")

    def __init__(self, config: dict, net: nn.Module, data: FewShotData):
        self.config, self.net, self.data = config, net, data
        self.w = config["weights"]
        self.similarity = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=9)
        self.smooth = DiffusionLoss()
        self.dice = DiceLoss(include_background=False)

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
        raise NotImplementedError

    # --- shared pieces ------------------------------------------------------------------------
    def pair(self, rng: random.Random, moving_labelled: bool = False) -> tuple[str, str]:
        train = self.data.train
        moving = rng.choice(self.data.labelled) if moving_labelled else rng.choice(train)
        return moving, rng.choice([n for n in train if n != moving])

    def field(self, moving: str, fixed: str, scale: float = 1.0):
        m, f = self.data.images[moving], self.data.images[fixed]
        velocity = self.net.velocity(m, f)
        return self.net.displacement(velocity * scale, f.shape[2:])

    def image_terms(self, moving: str, fixed: str, ddf) -> dict:
        warped = self.net.warp(self.data.images[moving], ddf)
        return {"similarity": self.similarity(warped, self.data.images[fixed]), "smooth": self.smooth(ddf)}


class DeepAtlas(Strategy):
    """Registration (Eq. 1): -LNCC + w_smooth * diffusion + w_anatomy * Dice(warped moving seg, fixed seg),
    predicted segmentations standing in for missing manual ones after pretraining. Segmentation (Eq. 2):
    w_supervised * Dice on a labelled image + w_anatomy * Dice(seg(fixed), warped labels). Joint phase:
    one segmentation update every `seg_every` registration updates (the paper's 1:20)."""

    name = "deepatlas"

    def updates(self, phase, index, rng):
        if phase == "reg_pretrain":
            return [("reg_pretrain", "reg_pretrain", lambda p=self.pair(rng): self.registration(*p, False))]
        if phase == "seg_pretrain":
            return [("seg_pretrain", "seg_pretrain", lambda p=self.pair(rng, True): self.segmentation(*p))]
        steps = [("reg", "joint_reg", lambda p=self.pair(rng): self.registration(*p, True))]
        if (index + 1) % int(self.config.get("seg_every", 20)) == 0:
            steps.append(("seg", "joint_seg", lambda p=self.pair(rng, True): self.segmentation(*p)))
        return steps

    def segmentation_or_label(self, name: str, use_predicted: bool):
        if name in self.data.labels:
            return self.data.onehot(self.data.labels[name])
        if not use_predicted:
            return None
        with torch.no_grad():
            return torch.softmax(self.net.segment(self.data.images[name]), dim=1)

    def registration(self, moving: str, fixed: str, use_predicted: bool) -> dict:
        ddf = self.field(moving, fixed)
        terms = self.image_terms(moving, fixed, ddf)
        total = self.w["similarity"] * terms["similarity"] + self.w["smooth"] * terms["smooth"]
        if self.w["anatomy"]:
            seg_m = self.segmentation_or_label(moving, use_predicted)
            seg_f = self.segmentation_or_label(fixed, use_predicted)
            if seg_m is not None and seg_f is not None:
                terms["anatomy"] = self.dice(self.net.warp(seg_m, ddf), seg_f)
                total = total + self.w["anatomy"] * terms["anatomy"]
        return {"loss": total, **terms}

    def segmentation(self, labelled: str, other: str) -> dict:
        data = self.data
        labels = data.onehot(data.labels[labelled])
        terms = {"supervised": self.dice(torch.softmax(self.net.segment(data.images[labelled]), 1), labels)}
        total = self.w["supervised"] * terms["supervised"]
        if self.w["anatomy"]:
            with torch.no_grad():
                warped_labels = self.net.warp(labels, self.field(labelled, other))
            terms["anatomy"] = self.dice(torch.softmax(self.net.segment(data.images[other]), 1), warped_labels)
            total = total + self.w["anatomy"] * terms["anatomy"]
        return {"loss": total, **terms}


class Unsupervised(DeepAtlas):
    """The baseline the joint methods claim to beat: DeepAtlas's loop with the coupling removed."""

    name = "unsupervised"

    def __init__(self, config, net, data):
        super().__init__(config, net, data)
        self.w = {**self.w, "anatomy": 0.0}


def _soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-voxel cross-entropy against soft (warped one-hot) labels, shape (B, 1, ...)."""
    return -(target * F.log_softmax(logits, dim=1)).sum(1, keepdim=True)


class PixelDiscriminator(nn.Module):
    """DeepRS's pixel-wise discriminator: (image, fixed) -> per-voxel probability that they are aligned."""

    def __init__(self, spec: dict):
        super().__init__()
        self.net = UNet(spatial_dims=3, in_channels=2, out_channels=1, channels=tuple(spec["channels"]),
                        strides=tuple(spec["strides"]), act="LEAKYRELU", norm="INSTANCE")

    def forward(self, image: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(torch.cat([image, fixed], dim=1)))


class DeepRS(Strategy):
    """DeepRS (He et al., ECCV 2020), as implemented here:

    - DSS: each segmentation update warps a labelled (moving) image and its labels towards a random
      training image with the velocity scaled by alpha ~ U[0, 1] (scaling the stationary velocity keeps
      the sampled map diffeomorphic; the paper scales the displacement).
    - L_ce: soft cross-entropy between S(warped image) and the warped labels (the augmentation data).
    - ACM: L_acm = -D(warped image, fixed) * warped labels * log S(fixed), the pixel-wise discriminator
      weighting the weakly supervised loss so misaligned voxels count little.
    - DRC: mean squared error between S(warped moving) and S(fixed), all channels (ROIs separately,
      background together), pulling the registration to align the structures S sees.
    - Registration: L_reg = l_adv * -log D(warped, fixed) + l_drc * DRC + l_cc * LNCC + l_R * diffusion,
      on the full (alpha = 1) field.
    - Discriminator: L_D = -log D(x_r, f) - log(1 - D(warped, f)), x_r = beta * moving + (1 - beta) * fixed.
    Weights default to the paper's (adv 1, drc 10, cc 1, R 1, acm 1, ce 1). Optimisers: RMSprop for the
    discriminator as in the paper; Adam for registration and segmentation (the paper used RMSprop for
    registration; Adam trained faster here). Pretraining: registration by LNCC + diffusion, segmentation
    by L_ce on DSS samples, then every joint step updates D, registration and segmentation once each.
    """

    name = "deeprs"

    def __init__(self, config, net, data):
        super().__init__(config, net, data)
        self.discriminator = PixelDiscriminator(config.get("discriminator", {"channels": [8, 16, 32],
                                                                             "strides": [2, 2]}))
        self.beta = float(config.get("beta", 0.2))

    def auxiliary(self):
        return {"discriminator": self.discriminator}

    def optimizers(self):
        optimizers = super().optimizers()
        optimizers["disc"] = torch.optim.RMSprop(self.discriminator.parameters(),
                                                 lr=self.config["lr"].get("disc", 2e-4))
        return optimizers

    def updates(self, phase, index, rng):
        if phase == "reg_pretrain":
            return [("reg_pretrain", "reg_pretrain", lambda p=self.pair(rng): self.pretrain_registration(*p))]
        if phase == "seg_pretrain":
            return [("seg_pretrain", "seg_pretrain",
                     lambda p=self.pair(rng, True), a=rng.random(): self.segmentation(*p, a, use_acm=False))]
        pair, alpha = self.pair(rng, True), rng.random()
        return [("disc", "joint_disc", lambda: self.discriminate(*pair)),
                ("reg", "joint_reg", lambda: self.registration(*pair)),
                ("seg", "joint_seg", lambda: self.segmentation(*pair, alpha, use_acm=True))]

    def pretrain_registration(self, moving, fixed):
        ddf = self.field(moving, fixed)
        terms = self.image_terms(moving, fixed, ddf)
        return {"loss": self.w["cc"] * terms["similarity"] + self.w["R"] * terms["smooth"], **terms}

    def registration(self, moving, fixed):
        ddf = self.field(moving, fixed)
        terms = self.image_terms(moving, fixed, ddf)
        warped = self.net.warp(self.data.images[moving], ddf)
        fixed_image = self.data.images[fixed]
        terms["adversarial"] = -torch.log(self.discriminator(warped, fixed_image).clamp_min(1e-6)).mean()
        terms["drc"] = F.mse_loss(torch.softmax(self.net.segment(warped), 1),
                                  torch.softmax(self.net.segment(fixed_image), 1))
        total = (self.w["adv"] * terms["adversarial"] + self.w["drc"] * terms["drc"]
                 + self.w["cc"] * terms["similarity"] + self.w["R"] * terms["smooth"])
        return {"loss": total, **terms}

    def segmentation(self, moving, fixed, alpha, use_acm):
        data = self.data
        with torch.no_grad():
            ddf = self.field(moving, fixed, scale=alpha)
            warped_image = self.net.warp(data.images[moving], ddf)
            warped_labels = self.net.warp(data.onehot(data.labels[moving]), ddf)
        terms = {"ce": _soft_cross_entropy(self.net.segment(warped_image), warped_labels).mean()}
        total = self.w["ce"] * terms["ce"]
        if use_acm:
            with torch.no_grad():
                confidence = self.discriminator(warped_image, data.images[fixed])
            terms["acm"] = (confidence * _soft_cross_entropy(self.net.segment(data.images[fixed]),
                                                             warped_labels)).mean()
            terms["confidence"] = confidence.mean()
            total = total + self.w["acm"] * terms["acm"]
        return {"loss": total, **terms}

    def discriminate(self, moving, fixed):
        m, f = self.data.images[moving], self.data.images[fixed]
        with torch.no_grad():
            warped = self.net.warp(m, self.field(moving, fixed))
        reference = self.beta * m + (1.0 - self.beta) * f
        real, fake = self.discriminator(reference, f), self.discriminator(warped, f)
        loss = F.binary_cross_entropy(real, torch.ones_like(real)) + \
            F.binary_cross_entropy(fake, torch.zeros_like(fake))
        return {"loss": loss, "discriminator": loss}


STRATEGIES = {cls.name: cls for cls in (DeepAtlas, DeepRS, Unsupervised)}
