"""Training strategies: what each method adds to the one loop in `train.py`, one module per method
over the shared pieces in `base.py` (the seed papers, synthesis, the learned affine). `STRATEGIES` maps a config's "strategy" to its class, `PAPERS` to
the paper it implements; each class's docstring (copied into the model card as `training.implements`)
says what is implemented and where it deviates from the paper and the authors' code, and why."""
from __future__ import annotations

from .affine import LearnedAffine
from .base import Strategy
from .brbs import BRBS
from .deepatlas import DeepAtlas, Unsupervised
from .deeprs import DeepRS, PixelDiscriminator
from .pcreg import PCRegRT
from .synth import Synth
from .uresnet import UReSNetTraining

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
    "synth": Synth.paper,
    "affine": LearnedAffine.paper,
    "unsupervised": "baseline: the same networks trained independently (registration by LNCC + diffusion only, "
                    "segmentation by supervised Dice only); no coupling",
}

STRATEGIES = {cls.name: cls for cls in (DeepAtlas, DeepRS, BRBS, PCRegRT, UReSNetTraining, Unsupervised, Synth,
                                         LearnedAffine)}

__all__ = ["BRBS", "PAPERS", "STRATEGIES", "DeepAtlas", "DeepRS", "LearnedAffine", "PCRegRT", "PixelDiscriminator",
           "Strategy", "Synth", "UReSNetTraining", "Unsupervised"]
