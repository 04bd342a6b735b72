"""U-ReSNet (Estienne et al., MICCAI 2019): one small network, trained end to end."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from .base import Strategy


class UReSNetTraining(Strategy):
    """U-ReSNet (Estienne et al., MICCAI 2019), end to end on the `uresnet` architecture (Eq. 4-7):
    L = MSE(W(M, D), R) + LNCC(W(M, D), R) + alpha |A - I|_1 + beta |grad u|_1
        + gamma Dice(S(M), M_seg) + delta Dice(W(S(M), D), R_seg),
    D = the affine A after the elastic u, and exactly that D is what inference returns. Segmentation
    head activation: a sigmoid per class, as the paper's heads; Dice on the sigmoid maps of every class,
    background included, so that the arg-max over the classes at inference compares channels that were
    all trained (left out, the background channel would keep whatever its initial weights output). Weights
    as published where they carry over (alpha 0.1, gamma = delta = 1); beta, given in the paper's own units
    (1e-11), is 1 here on the voxel displacement's spatial gradient. Few-shot: the Dice terms use
    whichever of the two images has labels; the moving image is a labelled one half of the time. The
    paper trains end to end from the start, so every phase of the shared budget runs this one update.
    Documented deviations: the elastic part is a stationary velocity integrated by scaling and squaring
    (the paper's head predicts the spatial gradient of the sampling grid through a sigmoid, in (0, 2),
    integrated by cumulative sum: that sigmoid is what keeps its maps monotone; the velocity head is
    linear because the SVF keeps the map invertible instead); segmentation takes each image alone (the
    encoder is shared by both branches), where the paper's decoder reads the pair; |A - I|_1 is the mean
    of the 12 entries, not their sum (alpha 0.1 on the mean is 0.1 / 12 on the paper's sum; the
    committed models were trained so).
    """

    name = "uresnet"
    weights = {"alpha": 0.1, "beta": 1.0, "gamma": 1.0, "delta": 1.0}

    def __init__(self, config, net, data):
        super().__init__(config, net, data)
        if not hasattr(net, "elastic_and_affine"):
            raise ValueError("strategy 'uresnet' needs the 'uresnet' architecture (--arch uresnet)")
        # every channel, background included: with independent sigmoids an untrained background channel
        # would compete at the arg-max with whatever value it happens to output
        self.dice = DiceLoss(include_background=True)

    def optimizers(self):
        return {"all": torch.optim.Adam(self.net.parameters(), lr=self.config["lr"].get("all", 1e-3))}

    def updates(self, phase, index, rng):
        return [("all", phase, lambda p=self.pair(rng, rng.random() < 0.5): self.end_to_end(*p))]

    def transform(self, image_m, image_f):
        """(the displacement D trained and returned at inference, elastic displacement, affine matrix)."""
        elastic, matrix = self.net.elastic_and_affine(image_m, image_f)
        return self.net.compose(elastic, matrix), elastic, matrix

    def end_to_end(self, moving, fixed):
        data, net = self.data, self.net
        image_m, image_f = data.images[moving], data.images[fixed]
        ddf, elastic, matrix = self.transform(image_m, image_f)
        warped = net.warp(image_m, ddf)
        gradients = [torch.diff(elastic, dim=d).abs().mean() for d in (2, 3, 4)]
        terms = {"mse": F.mse_loss(warped, image_f), "similarity": self.similarity(warped, image_f),
                 "affine": (matrix - torch.eye(3, 4, device=matrix.device)).abs().mean(),
                 "gradient": sum(gradients) / 3}
        total = terms["mse"] + terms["similarity"] + self.w["alpha"] * terms["affine"] + \
            self.w["beta"] * terms["gradient"]
        if moving in data.labels or fixed in data.labels:
            predicted = torch.sigmoid(net.segment(image_m))
            if moving in data.labels:
                terms["seg_moving"] = self.dice(predicted, self.onehot(moving))
                total = total + self.w["gamma"] * terms["seg_moving"]
            if fixed in data.labels:
                terms["seg_warped"] = self.dice(net.warp(predicted, ddf), self.onehot(fixed))
                total = total + self.w["delta"] * terms["seg_warped"]
        return {"loss": total, **terms}
