"""BRBS (He et al., TNNLS 2022): knowledge-consistent registration (BiC + SeC), space-style sampling
(S3P) and mix misalignment regularisation (MMR)."""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from .base import Strategy


class BRBS(Strategy):
    """BRBS (He et al., TNNLS 2022): learn a better registration, then learn segmentation from it. Follows
    the authors' reference code (github.com/YutingHe-list/BRBS, pytorch/TrainBRBS.py):

    - Pairs for registration: a labelled image with an unlabelled one (2/3) or two unlabelled images
      (1/3), in random order.
    - KCC, registration update on a pair (A, B), the network run both ways: phi = R(A, B), psi = R(B, A).
      similarity(A o phi, B) + similarity(B o psi, A) + w_smooth * (diffusion(phi) + diffusion(psi))
      + BiC: w_inverse * MSE(w, -(u o psi)) with u, w the displacements of phi, psi (psi must be phi's
      inverse; the reference compares w with -(u o phi), the same condition to first order, which is
      not zero for an exact inverse pair) + SeC: w_sec * [Dice(S_A o phi, S_B) + Dice(S_B o psi, S_A)], manual
      labels where present and the segmentation net's (detached) prediction otherwise, also for two
      unlabelled images. Weights as the reference: similarity 1, smooth 1, inverse 0.1, SeC 100.
    - S3P (space-style sampling), segmentation update: a labelled image L, two other images U1 (style)
      and U2 (space); alpha, beta ~ Beta(0.3, 0.3). Style: L + beta * (U1 o R(U1, L) - L), U1's appearance
      registered onto L's anatomy; space: the map L -> U2 scaled by alpha. The style image and L's labels
      are deformed by that map: a dense family of labelled images between the three.
    - MMR (mix misalignment regularisation): X_a = U1 registered onto L then moved to U2's space (U1's
      appearance with registration's misalignment), X_b = U2; gamma ~ Beta(0.3, 0.3); MSE between
      S(gamma X_a + (1 - gamma) X_b) and gamma S(X_a) + (1 - gamma) S(X_b) on the network outputs, so
      segmentation answers misaligned regions with low confidence. Weight 0.01 as the reference.
    - Segmentation loss: Dice(S(S3P image), S3P labels) + w_mmr * MMR; one registration and one
      segmentation update per joint step.
    Documented deviations: maps are exp of a stationary velocity, and S3P's space map is exp(alpha * v)
    (the reference scales the displacement; the scaled velocity stays diffeomorphic and agrees at
    alpha = 0 and 1); the inverse loss is computed on the integrated displacements in voxels;
    registration is pretrained (KCC with manual labels only) and segmentation pretrained on S3P/MMR
    before the joint phase (the reference trains jointly from the start, with a longer budget); the
    smoothness is MONAI's diffusion (the reference's l2 gradient loss up to a constant); Dice excludes
    the background channel, as for every method here; the reference's random rotation/scaling
    augmentation is not applied; S3P's style and space images are any two other training images,
    labelled ones included, where the reference draws them from the unlabelled set (their labels are
    not used).
    """

    name = "brbs"
    weights = {"similarity": 1.0, "smooth": 1.0, "inverse": 0.1, "sec": 100.0, "supervised": 1.0, "mmr": 0.01}

    def updates(self, phase, index, rng):
        if phase == "reg_pretrain":
            return [("reg_pretrain", "reg_pretrain", lambda p=self.registration_pair(rng): self.registration(*p, False))]
        sample = self.s3p_draw(rng)
        seg = lambda: self.segmentation(*sample)  # noqa: E731
        if phase == "seg_pretrain":
            return [("seg_pretrain", "seg_pretrain", seg)]
        return [("reg", "joint_reg", lambda p=self.registration_pair(rng): self.registration(*p, True)),
                ("seg", "joint_seg", seg)]

    # --- registration (KCC) -------------------------------------------------------------------
    def registration_pair(self, rng: random.Random) -> tuple[str, str]:
        unlabelled = self.unlabelled
        if len(unlabelled) >= 2 and rng.random() < 1.0 / 3.0:
            a, b = rng.sample(unlabelled, 2)
        else:
            return self.labelled_pair(rng)
        return (a, b) if rng.random() < 0.5 else (b, a)

    def segmentation_or_label(self, name: str, use_predicted: bool):
        if name in self.data.labels:
            return self.onehot(name)
        if not use_predicted:
            return None
        with torch.no_grad():
            return torch.softmax(self.net.segment(self.data.images[name]), dim=1)

    def inverse_consistency(self, forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
        """MSE between the backward displacement w and -u o psi (u the forward one, psi = id + w):
        w = -u(x + w(x)) holds exactly when phi o psi is the identity, so this is zero for true inverses."""
        return F.mse_loss(backward, -self.net.warp(forward, backward))

    def registration(self, a: str, b: str, use_predicted: bool) -> dict:
        image_a, image_b = self.data.images[a], self.data.images[b]
        forward, backward = self.field(a, b), self.field(b, a)
        terms = {"similarity": self.similarity(self.net.warp(image_a, forward), image_b)
                 + self.similarity(self.net.warp(image_b, backward), image_a),
                 "smooth": self.smooth(forward) + self.smooth(backward),
                 "inverse": self.inverse_consistency(forward, backward)}
        total = self.w["similarity"] * terms["similarity"] + self.w["smooth"] * terms["smooth"] + \
            self.w["inverse"] * terms["inverse"]
        seg_a, seg_b = self.segmentation_or_label(a, use_predicted), self.segmentation_or_label(b, use_predicted)
        if seg_a is not None and seg_b is not None and self.w["sec"]:
            terms["sec"] = self.dice(self.net.warp(seg_a, forward), seg_b) + \
                self.dice(self.net.warp(seg_b, backward), seg_a)
            total = total + self.w["sec"] * terms["sec"]
        return {"loss": total, **terms}

    # --- segmentation (S3P + MMR) -------------------------------------------------------------
    def s3p_draw(self, rng: random.Random) -> tuple:
        """(labelled L, style image U1, space image U2, alpha, beta, gamma) for one segmentation update."""
        labelled = rng.choice(self.data.labelled)
        others = [n for n in self.data.train if n != labelled]
        style, space = rng.sample(others, 2) if len(others) >= 2 else (others[0], others[0])
        draw = np.random.default_rng(rng.getrandbits(32)).beta
        return labelled, style, space, float(draw(0.3, 0.3)), float(draw(0.3, 0.3)), float(draw(0.3, 0.3))

    @torch.no_grad()
    def space_style_sample(self, labelled, style, space, alpha, beta):
        """S3P: (new image, new labels, U1 on L's anatomy moved to U2's space) for the segmentation update."""
        data = self.data
        image_l = data.images[labelled]
        style_on_l = self.net.warp(data.images[style], self.field(style, labelled))   # U1 o R(U1, L)
        velocity = self.net.velocity(image_l, data.images[space])                    # L -> U2
        full = self.net.displacement(velocity, image_l.shape[2:])
        partial = self.net.displacement(alpha * velocity, image_l.shape[2:])
        new_image = self.net.warp(image_l + beta * (style_on_l - image_l), partial)
        new_labels = self.net.warp(self.onehot(labelled), partial)
        return new_image, new_labels, self.net.warp(style_on_l, full)

    def segmentation(self, labelled, style, space, alpha, beta, gamma):
        new_image, new_labels, misaligned = self.space_style_sample(labelled, style, space, alpha, beta)
        terms = {"supervised": self.dice(torch.softmax(self.net.segment(new_image), 1), new_labels)}
        terms["mmr"] = self.mix_misalignment(misaligned, self.data.images[space], gamma)
        return {"loss": self.w["supervised"] * terms["supervised"] + self.w["mmr"] * terms["mmr"], **terms}

    def mix_misalignment(self, x_a: torch.Tensor, x_b: torch.Tensor, gamma: float) -> torch.Tensor:
        """MMR: S(gamma x_a + (1 - gamma) x_b) against gamma S(x_a) + (1 - gamma) S(x_b) (network outputs)."""
        target = gamma * self.net.segment(x_a) + (1.0 - gamma) * self.net.segment(x_b)
        return F.mse_loss(self.net.segment(gamma * x_a + (1.0 - gamma) * x_b), target)
