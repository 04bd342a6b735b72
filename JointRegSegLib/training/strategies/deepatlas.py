"""DeepAtlas (Xu & Niethammer, MICCAI 2019) and the uncoupled baseline trained by the same loop."""
from __future__ import annotations

import torch

from .base import Strategy


class DeepAtlas(Strategy):
    """DeepAtlas (Xu & Niethammer, MICCAI 2019): weakly supervised registration and semi-supervised
    segmentation, each teaching the other through the anatomy loss.

    - Registration (Eq. 1): -LNCC(M o phi, T) + w_smooth * regulariser(phi) + w_anatomy *
      Dice(S_M o phi, S_T). Pretraining (the paper's mono-network) draws any pair and uses the anatomy
      term only where both images have manual labels. Joint training draws only pairs with at least one
      labelled image ("we do not use two unlabeled images for training"); the other image's segmentation
      is predicted by the segmentation net (detached). Two unlabelled images never get the anatomy term.
    - Segmentation (Eq. 2): w_supervised * Dice(S(L), Y_L) on the labelled image(s) of the pair +
      w_anatomy * the anatomy loss, in whichever direction the pair comes: labelled moving ->
      Dice(Y_M o phi, S(T)) (the warped atlas labels supervise the target), labelled target ->
      Dice(S(M) o phi, Y_T) (the moving image's prediction, warped, must match the manual labels).
      The registration is held fixed. When both images are labelled the anatomy loss does not train
      segmentation (as the paper says).
    - Schedule: registration pretraining, segmentation pretraining with the registration fixed (the
      paper's Semi-DA start for few labels), then alternating updates, one segmentation update every
      `seg_every` registration updates (the paper's 1:20).
    Documented deviations: the regulariser defaults to diffusion (sum of squared first derivatives of the
    voxel displacement), not the paper's bending energy: the authors' public code (uncbiag/DeepAtlas,
    train_reg.py) uses this L2 gradient regulariser, our maps are diffeomorphic by construction (scaling
    and squaring of a stationary velocity), and the paper's weight for bending energy is tuned for
    displacements in [-1, 1] coordinates; `"regulariser": "bending"` selects MONAI's bending energy.
    The similarity is local NCC (MONAI's LNCC, window 9, as every method here), where the paper writes
    a (global) NCC (deviation).
    Weights are 1 (the paper's values were tuned on its data). `"joint_pairs": "any"` lets joint
    registration also draw two unlabelled images (similarity and regulariser only).
    """

    name = "deepatlas"
    weights = {"similarity": 1.0, "smooth": 1.0, "anatomy": 1.0, "supervised": 1.0}

    def updates(self, phase, index, rng):
        if phase == "reg_pretrain":
            return [("reg_pretrain", "reg_pretrain", lambda p=self.pair(rng): self.registration(*p, False))]
        if phase == "seg_pretrain":
            return [("seg_pretrain", "seg_pretrain", lambda p=self.labelled_pair(rng): self.segmentation(*p))]
        any_pair = self.config.get("joint_pairs", "labelled") == "any"
        pair = self.pair(rng) if any_pair else self.labelled_pair(rng)
        steps = [("reg", "joint_reg", lambda p=pair: self.registration(*p, True))]
        if (index + 1) % int(self.config.get("seg_every", 20)) == 0:
            steps.append(("seg", "joint_seg", lambda p=self.labelled_pair(rng): self.segmentation(*p)))
        return steps

    def segmentation_or_label(self, name: str, use_predicted: bool):
        if name in self.data.labels:
            return self.onehot(name)
        if not use_predicted:
            return None
        with torch.no_grad():
            return torch.softmax(self.net.segment(self.data.images[name]), dim=1)

    def anatomy_targets(self, moving: str, fixed: str, use_predicted: bool):
        """(S_moving, S_fixed) for the registration's anatomy loss, or None: manual labels where they
        exist, predictions for the other image only if one of the two is labelled and `use_predicted`."""
        labels = self.data.labels
        if moving not in labels and fixed not in labels:
            return None
        seg_m = self.segmentation_or_label(moving, use_predicted)
        seg_f = self.segmentation_or_label(fixed, use_predicted)
        return None if seg_m is None or seg_f is None else (seg_m, seg_f)

    def registration(self, moving: str, fixed: str, use_predicted: bool) -> dict:
        ddf = self.field(moving, fixed)
        _, terms = self.image_terms(moving, fixed, ddf)
        total = self.w["similarity"] * terms["similarity"] + self.w["smooth"] * terms["smooth"]
        targets = self.anatomy_targets(moving, fixed, use_predicted) if self.w["anatomy"] else None
        if targets is not None:
            seg_m, seg_f = targets
            terms["anatomy"] = self.dice(self.net.warp(seg_m, ddf), seg_f)
            total = total + self.w["anatomy"] * terms["anatomy"]
        return {"loss": total, **terms}

    def segmentation(self, moving: str, fixed: str) -> dict:
        data, labels = self.data, self.data.labels
        labelled = [n for n in (moving, fixed) if n in labels]
        if not labelled:
            raise ValueError(f"DeepAtlas segmentation update on two unlabelled images ({moving}, {fixed})")
        terms = {"supervised": sum(self.dice(torch.softmax(self.net.segment(data.images[n]), 1), self.onehot(n))
                                   for n in labelled) / len(labelled)}
        total = self.w["supervised"] * terms["supervised"]
        if self.w["anatomy"] and len(labelled) == 1:
            with torch.no_grad():
                ddf = self.field(moving, fixed)
            if moving in labels:   # atlas labels warped onto the unlabelled target supervise S(target)
                predicted = torch.softmax(self.net.segment(data.images[fixed]), 1)
                terms["anatomy"] = self.dice(predicted, self.net.warp(self.onehot(moving), ddf))
            else:                  # S(moving) warped onto the labelled target must match its labels
                predicted = torch.softmax(self.net.segment(data.images[moving]), 1)
                terms["anatomy"] = self.dice(self.net.warp(predicted, ddf), self.onehot(fixed))
            total = total + self.w["anatomy"] * terms["anatomy"]
        return {"loss": total, **terms}


class Unsupervised(DeepAtlas):
    """The baseline the joint methods claim to beat (the paper's mono-networks): the same networks and
    loop with the coupling removed. Registration by LNCC + diffusion on any pair, no anatomy term;
    segmentation by supervised Dice on the labelled images only."""

    name = "unsupervised"

    def __init__(self, config, net, data):
        super().__init__(config, net, data)
        self.w = {**self.w, "anatomy": 0.0}

    def updates(self, phase, index, rng):
        if phase == "joint":
            steps = [("reg", "joint_reg", lambda p=self.pair(rng): self.registration(*p, False))]
            if (index + 1) % int(self.config.get("seg_every", 20)) == 0:
                steps.append(("seg", "joint_seg", lambda p=self.labelled_pair(rng): self.segmentation(*p)))
            return steps
        return super().updates(phase, index, rng)
