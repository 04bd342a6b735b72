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
    "brbs": "He et al., Learning Better Registration to Learn Better Few-Shot Medical Image Segmentation: "
            "Authenticity, Diversity, and Robustness (BRBS), IEEE TNNLS 2022",
    "pcreg-rt": "He et al., Few-shot Learning for Deformable Medical Image Registration with Perception-"
                "Correspondence Decoupling and Reverse Teaching (PC-Reg-RT), IEEE JBHI 2021",
    "uresnet": "Estienne et al., U-ReSNet: Ultimate Coupling of Registration and Segmentation with Deep Nets, "
               "MICCAI 2019",
    "unsupervised": "baseline: the same networks trained independently (registration by LNCC + diffusion only, "
                    "segmentation by supervised Dice only); no coupling",
}


class Strategy:
    name = ""
    phases = ("reg_pretrain", "seg_pretrain", "joint")
    weights: dict = {}  # the method's published (or documented) loss weights; a config's "weights" override

    def __init__(self, config: dict, net: nn.Module, data: FewShotData):
        self.config, self.net, self.data = config, net, data
        self.w = {**self.weights, **config.get("weights", {})}
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

    def image_terms(self, moving: str, fixed: str, ddf) -> tuple[torch.Tensor, dict]:
        """The moving image warped by `ddf`, and that warp's similarity and smoothness terms."""
        warped = self.net.warp(self.data.images[moving], ddf)
        return warped, {"similarity": self.similarity(warped, self.data.images[fixed]), "smooth": self.smooth(ddf)}


class DeepAtlas(Strategy):
    """Registration (Eq. 1): -LNCC + w_smooth * diffusion + w_anatomy * Dice(warped moving seg, fixed seg),
    predicted segmentations standing in for missing manual ones after pretraining. Segmentation (Eq. 2):
    w_supervised * Dice on a labelled image + w_anatomy * Dice(seg(fixed), warped labels). Joint phase:
    one segmentation update every `seg_every` registration updates (the paper's 1:20)."""

    name = "deepatlas"
    weights = {"similarity": 1.0, "smooth": 1.0, "anatomy": 1.0, "supervised": 1.0}

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
        _, terms = self.image_terms(moving, fixed, ddf)
        total = self.w["similarity"] * terms["similarity"] + self.w["smooth"] * terms["smooth"]
        return self.with_anatomy(terms, total, moving, fixed, ddf, use_predicted)

    def with_anatomy(self, terms: dict, total, moving: str, fixed: str, ddf, use_predicted: bool,
                     seg_fixed=None) -> dict:
        """Add w_anatomy * Dice(warped moving segmentation, fixed segmentation) where both exist;
        `seg_fixed` passes one the caller already has."""
        if self.w["anatomy"]:
            seg_m = self.segmentation_or_label(moving, use_predicted)
            seg_f = seg_fixed if seg_fixed is not None else self.segmentation_or_label(fixed, use_predicted)
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
    weights = {"adv": 1.0, "drc": 10.0, "cc": 1.0, "R": 1.0, "acm": 1.0, "ce": 1.0}

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
        _, terms = self.image_terms(moving, fixed, ddf)
        return {"loss": self.w["cc"] * terms["similarity"] + self.w["R"] * terms["smooth"], **terms}

    def registration(self, moving, fixed):
        ddf = self.field(moving, fixed)
        warped, terms = self.image_terms(moving, fixed, ddf)
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


def _soft_dice_and_ce(logits: torch.Tensor, target: torch.Tensor, dice: nn.Module) -> torch.Tensor:
    return dice(torch.softmax(logits, 1), target) + _soft_cross_entropy(logits, target).mean()


class BRBS(DeepAtlas):
    """BRBS (He et al., TNNLS 2022): learn a better registration, then learn segmentation from it.

    - KCC, registration update on a pair (A, B) with stationary velocity v = R(A, B):
      similarity(A o exp(v), B) + BiC + SeC + w_smooth * diffusion, where
      BiC (bidirectional consistency) = similarity(B o exp(-v), A) (the inverse map must align B back onto
      A) + w_inverse * |R(B, A) + v|^2 (the network's B -> A prediction must be that inverse), and
      SeC (semantic consistency) = Dice(S_A o exp(v), S_B) + Dice(S_B o exp(-v), S_A) with manual labels,
      or predicted ones where missing once segmentation has been pretrained.
    - S3P (space-style sampling), segmentation update: for a labelled L and another image U,
      alpha, beta ~ U[0, 1]: the style image beta * (U o exp(-v)) + (1 - beta) * L (U's appearance on L's
      anatomy) is deformed by exp(alpha * v), L's labels by the same map: a dense family of new labelled
      images between L and U in space and style.
    - MMR (mix misalignment regularisation): two S3P samples are mixed, X = g X_a + (1 - g) X_b with
      g ~ U[0, 1], and S(X) is pulled towards g S(X_a) + (1 - g) S(X_b) (mean squared error, targets
      detached), so segmentation answers misaligned regions with low confidence.
    Segmentation loss: Dice + cross-entropy on both S3P samples + w_mmr * MMR. The slides give no loss
    weights; all are 1 here (w_inverse 0.1, velocity in voxels). Schedule: registration pretraining by
    KCC without predicted labels, segmentation pretraining on S3P/MMR, then one registration and one
    segmentation update per joint step.
    """

    name = "brbs"
    weights = {"similarity": 1.0, "smooth": 1.0, "bic": 1.0, "inverse": 0.1, "sec": 1.0, "supervised": 1.0,
               "mmr": 1.0}

    def updates(self, phase, index, rng):
        if phase == "reg_pretrain":
            return [("reg_pretrain", "reg_pretrain", lambda p=self.pair(rng): self.registration(*p, False))]
        samples = [(*self.pair(rng, True), rng.random(), rng.random()) for _ in range(2)]
        seg = lambda g=rng.random(): self.segmentation(samples, g)  # noqa: E731
        if phase == "seg_pretrain":
            return [("seg_pretrain", "seg_pretrain", seg)]
        return [("reg", "joint_reg", lambda p=self.pair(rng): self.registration(*p, True)),
                ("seg", "joint_seg", seg)]

    def registration(self, a, b, use_predicted):
        image_a, image_b = self.data.images[a], self.data.images[b]
        velocity = self.net.velocity(image_a, image_b)
        shape = image_b.shape[2:]
        forward, inverse = self.net.displacement(velocity, shape), self.net.displacement(-velocity, shape)
        terms = {"similarity": self.similarity(self.net.warp(image_a, forward), image_b),
                 "smooth": 0.5 * (self.smooth(forward) + self.smooth(inverse))}
        terms["bic"] = self.similarity(self.net.warp(image_b, inverse), image_a) + \
            self.w["inverse"] * (self.net.velocity(image_b, image_a) + velocity).pow(2).mean()
        total = self.w["similarity"] * terms["similarity"] + self.w["smooth"] * terms["smooth"] + \
            self.w["bic"] * terms["bic"]
        seg_a, seg_b = self.segmentation_or_label(a, use_predicted), self.segmentation_or_label(b, use_predicted)
        if seg_a is not None and seg_b is not None and self.w["sec"]:
            terms["sec"] = 0.5 * (self.dice(self.net.warp(seg_a, forward), seg_b) +
                                  self.dice(self.net.warp(seg_b, inverse), seg_a))
            total = total + self.w["sec"] * terms["sec"]
        return {"loss": total, **terms}

    @torch.no_grad()
    def space_style_sample(self, labelled, other, alpha, beta):
        data = self.data
        image_l, image_u = data.images[labelled], data.images[other]
        velocity = self.net.velocity(image_l, image_u)
        shape = image_l.shape[2:]
        style = beta * self.net.warp(image_u, self.net.displacement(-velocity, shape)) + (1.0 - beta) * image_l
        space = self.net.displacement(alpha * velocity, shape)
        return self.net.warp(style, space), self.net.warp(data.onehot(data.labels[labelled]), space)

    def segmentation(self, samples, gamma):
        (x_a, y_a), (x_b, y_b) = (self.space_style_sample(*sample) for sample in samples)
        logits_a, logits_b = self.net.segment(x_a), self.net.segment(x_b)
        terms = {"supervised": 0.5 * (_soft_dice_and_ce(logits_a, y_a, self.dice) +
                                      _soft_dice_and_ce(logits_b, y_b, self.dice))}
        target = (gamma * torch.softmax(logits_a, 1) + (1.0 - gamma) * torch.softmax(logits_b, 1)).detach()
        mixed = self.net.segment(gamma * x_a + (1.0 - gamma) * x_b)
        terms["mmr"] = F.mse_loss(torch.softmax(mixed, 1), target)
        return {"loss": self.w["supervised"] * terms["supervised"] + self.w["mmr"] * terms["mmr"], **terms}


class PCRegRT(DeepAtlas):
    """PC-Reg-RT (He et al., JBHI 2021): segmentation perception guides registration; registration
    teaches segmentation back.

    - Perception-correspondence decoupling: the registration's similarity is a per-voxel LNCC map weighted
      by the fixed image's task-region perception, w = floor + (1 - floor) * P, P = the foreground
      probability (manual labels where present, else the segmentation net's, detached) dilated by a 5-voxel
      max filter; so background the task does not need cannot pull the ROI out of place. The perceived
      regions are also aligned directly: Dice(S_moving o phi, S_fixed) (weight w_anatomy).
    - Reverse teaching: registration turns each labelled image into teaching material for segmentation:
      the warped labelled image with its exactly warped labels (Dice + cross-entropy), and pseudo-labels on
      the unlabelled target (warped labels), their cross-entropy weighted voxel-wise by the local similarity
      of warped and target image (LNCC in [0, 1]) so badly registered voxels teach little (weight w_rt).
    Weights: similarity 1, smooth 1, anatomy 1, supervised 1, rt 1, floor 0.1 (the slides give none).
    Schedule as DeepAtlas (pretraining of each net, then alternating updates, 1 segmentation update every
    `seg_every` registration updates).
    """

    name = "pcreg-rt"
    weights = {**DeepAtlas.weights, "rt": 1.0}

    def __init__(self, config, net, data):
        super().__init__(config, net, data)
        self.similarity_map = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=9, reduction="none")
        self.floor = float(config.get("perception_floor", 0.1))

    def perception(self, segmentation: torch.Tensor) -> torch.Tensor:
        foreground = (1.0 - segmentation[:, :1]).clamp(0, 1)
        return self.floor + (1.0 - self.floor) * F.max_pool3d(foreground, 5, stride=1, padding=2)

    def registration(self, moving, fixed, use_predicted):
        ddf = self.field(moving, fixed)
        warped = self.net.warp(self.data.images[moving], ddf)
        local = self.similarity_map(warped, self.data.images[fixed])
        seg_f = self.segmentation_or_label(fixed, use_predicted)
        if seg_f is None:
            similarity = local.mean()
        else:
            weight = self.perception(seg_f)
            similarity = (local * weight).sum() / weight.sum()
        terms = {"similarity": similarity, "smooth": self.smooth(ddf)}
        total = self.w["similarity"] * terms["similarity"] + self.w["smooth"] * terms["smooth"]
        return self.with_anatomy(terms, total, moving, fixed, ddf, use_predicted, seg_fixed=seg_f)

    def segmentation(self, labelled, other):
        data = self.data
        labels = data.onehot(data.labels[labelled])
        terms = {"supervised": self.dice(torch.softmax(self.net.segment(data.images[labelled]), 1), labels)}
        with torch.no_grad():
            ddf = self.field(labelled, other)
            warped_image = self.net.warp(data.images[labelled], ddf)
            pseudo = self.net.warp(labels, ddf)
            trust = (-self.similarity_map(warped_image, data.images[other])).clamp(0, 1)
        terms["augmented"] = _soft_dice_and_ce(self.net.segment(warped_image), pseudo, self.dice)
        terms["pseudo"] = (trust * _soft_cross_entropy(self.net.segment(data.images[other]), pseudo)).mean()
        total = self.w["supervised"] * terms["supervised"] + self.w["rt"] * (terms["augmented"] + terms["pseudo"])
        return {"loss": total, **terms}


class UReSNetTraining(Strategy):
    """U-ReSNet (Estienne et al., MICCAI 2019), end to end on the `uresnet` architecture (Eq. 4-7):
    L = MSE(W(M, D), R) + LNCC(W(M, D), R) + alpha |A - I|_1 + beta |grad u|_1
        + gamma Dice(S(M), M_seg) + delta Dice(W(S(M), D), R_seg),
    D = the affine A after the elastic u. Weights as published where they carry over (alpha 0.1, gamma =
    delta = 1); beta, given in the paper's own units (1e-11), is 1 here on the voxel displacement's spatial
    gradient. Few-shot: the Dice terms use whichever of the two images has labels; the moving image is a
    labelled one half of the time. The paper trains end to end from the start, so every phase of the shared
    budget runs this one update; segmentation takes each image alone (the encoder is shared by both
    branches), where the paper's decoder reads the pair.
    """

    name = "uresnet"
    weights = {"alpha": 0.1, "beta": 1.0, "gamma": 1.0, "delta": 1.0}

    def __init__(self, config, net, data):
        super().__init__(config, net, data)
        if not hasattr(net, "elastic_and_affine"):
            raise ValueError("strategy 'uresnet' needs the 'uresnet' architecture (--arch uresnet)")

    def optimizers(self):
        return {"all": torch.optim.Adam(self.net.parameters(), lr=self.config["lr"].get("all", 1e-3))}

    def updates(self, phase, index, rng):
        return [("all", phase, lambda p=self.pair(rng, rng.random() < 0.5): self.end_to_end(*p))]

    def end_to_end(self, moving, fixed):
        data, net = self.data, self.net
        image_m, image_f = data.images[moving], data.images[fixed]
        elastic, matrix = net.elastic_and_affine(image_m, image_f)
        ddf = net.compose(elastic, matrix)
        warped = net.warp(image_m, ddf)
        gradients = [torch.diff(elastic, dim=d).abs().mean() for d in (2, 3, 4)]
        terms = {"mse": F.mse_loss(warped, image_f), "similarity": self.similarity(warped, image_f),
                 "affine": (matrix - torch.eye(3, 4, device=matrix.device)).abs().mean(),
                 "gradient": sum(gradients) / 3}
        total = terms["mse"] + terms["similarity"] + self.w["alpha"] * terms["affine"] + \
            self.w["beta"] * terms["gradient"]
        if moving in data.labels or fixed in data.labels:
            predicted = torch.softmax(net.segment(image_m), 1)
            if moving in data.labels:
                terms["seg_moving"] = self.dice(predicted, data.onehot(data.labels[moving]))
                total = total + self.w["gamma"] * terms["seg_moving"]
            if fixed in data.labels:
                terms["seg_warped"] = self.dice(net.warp(predicted, ddf), data.onehot(data.labels[fixed]))
                total = total + self.w["delta"] * terms["seg_warped"]
        return {"loss": total, **terms}


STRATEGIES = {cls.name: cls for cls in (DeepAtlas, DeepRS, BRBS, PCRegRT, UReSNetTraining, Unsupervised)}
