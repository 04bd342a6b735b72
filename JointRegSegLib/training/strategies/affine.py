"""`jointregseg train --strategy affine`: teach a model's learned affine (networks.AffineRegressor) on
synthetic pairs whose true affine is known.

Each pair is two synthetic subjects of one training source (`data.generator`), each under its own random
affine and smooth deformation, in the contrasts the deformable training uses (both real T1, one shared
random mixture, or two unrelated mixtures). The true affine between them is the least-squares affine of
each subject's sampling grid over its brain, composed (`true_theta`); the loss is the mean distance in mm,
over the fixed brain's voxels, between where the predicted and the true affine send them. Only the affine
regressor trains: the rest of the model (registration and segmentation networks) is kept bit for bit.
At run time the learned affine starts a short mutual-information polish (`affine_torch.prealign`).
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from ...core.intensity import normalize
from ...data.generator import BrainSynthesizer, SynthesisSettings
from ...inference.affine_torch import learned_theta, normalised_points
from ...models.checkpoint import load_model, new_model
from .base import Strategy
from ...data.source_cache import load_sources
from .synth import SynthData


DEFAULT_SPEC = {"kind": "keypoints", "pool": 2, "keypoints": 32, "channels": [16, 32, 64], "strides": [2, 2]}
DEFAULT_POLISH = [[2, 30], [1, 20]]


def _homogeneous(theta: torch.Tensor) -> torch.Tensor:
    bottom = torch.tensor([[[0.0, 0.0, 0.0, 1.0]]], dtype=theta.dtype, device=theta.device).expand(len(theta), 1, 4)
    return torch.cat([theta, bottom], dim=1)


def grid_affine(sampling_grid: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
    """Least-squares affine (1, 3, 4) of a normalised sampling grid (1, z, y, x, 3) over the brain voxels."""
    shape = sampling_grid.shape[1:4]
    eye = torch.eye(3, 4, dtype=sampling_grid.dtype, device=sampling_grid.device)[None]
    base = torch.nn.functional.affine_grid(eye, [1, 1, *shape], align_corners=False)[0][brain[0, 0]]
    target = sampling_grid[0][brain[0, 0]]
    design = torch.cat([base, torch.ones_like(base[:, :1])], dim=1).double()
    solution = torch.linalg.lstsq(design, target.double()).solution           # (4, 3)
    return solution.t()[None].to(sampling_grid.dtype)


def true_theta(moving, fixed) -> torch.Tensor:
    """The affine (1, 3, 4) taking fixed voxels to the moving points of the same anatomy: Mm^-1 Mf."""
    m = _homogeneous(grid_affine(moving.grid, moving.generation > 0))
    f = _homogeneous(grid_affine(fixed.grid, fixed.generation > 0))
    return (torch.linalg.inv(m.double()) @ f.double())[:, :3].to(moving.grid.dtype)


def affine_error_mm(predicted: torch.Tensor, truth: torch.Tensor, points: torch.Tensor,
                    half_extent_mm: torch.Tensor) -> torch.Tensor:
    """Mean distance in mm between where two thetas send `points` (N, 3, normalised x, y, z)."""
    homogeneous = torch.cat([points, torch.ones_like(points[:, :1])], dim=1)
    difference = homogeneous @ (predicted - truth).t()
    return (difference * half_extent_mm).norm(dim=1).mean()


def _pair(synthesizer: BrainSynthesizer, rng: np.random.Generator):
    index = int(rng.integers(len(synthesizer.sources)))
    has_real = synthesizer.sources[index].image is not None
    draw = rng.random()
    if draw < 0.7:
        both_real = has_real and rng.random() < 0.6
        seed = None if both_real else int(rng.integers(1 << 30))
        return (synthesizer.sample(rng, index, use_real=both_real, mixture_seed=seed),
                synthesizer.sample(rng, index, use_real=both_real, mixture_seed=seed))
    return synthesizer.sample(rng, index), synthesizer.sample(rng, index)


class LearnedAffine(Strategy):
    """The learned affine of an existing model, trained on synthetic pairs with a known affine (module
    docstring); every other weight stays the `--init` model's."""
    name = "affine"
    paper = "JointRegSeg's learned affine: a keypoint affine (as KeyMorph, Yu et al., MIDL 2022) trained on synthetic pairs"
    checkpoint_every = 100

    def __init__(self, config: dict, net, data: SynthData, card: dict):
        self.config, self.net, self.data, self.card = config, net, data, card
        for name, parameter in net.named_parameters():
            parameter.requires_grad_(name.startswith("affine."))
        self.regressor = net.affine
        device = next(net.parameters()).device
        self.grid = card["working_grid"]
        settings = SynthesisSettings(spacing_mm=float(self.grid["spacing"][0]), **config.get("synthesis", {}))
        self.synthesizer = BrainSynthesizer(data.sources, settings, device=device)
        self.half_extent = torch.tensor([n * s / 2 for n, s in zip(self.grid["size"], self.grid["spacing"])],
                                        device=device)
        self.batch = int(config.get("batch", 2))
        self.lr = float(config.get("lr", 1e-3))
        self.recent = []

    @classmethod
    def create(cls, config: dict, model, data: SynthData):
        return cls(config, model.network, data, model.card)

    @classmethod
    def load_data(cls, config: dict, data_dir, device) -> SynthData:
        return SynthData(*load_sources(Path(data_dir)))

    @classmethod
    def build_model(cls, config: dict, data: SynthData, init, device, seed: int):
        if not init:
            raise ValueError("--strategy affine needs --init MODEL: the learned affine is added to an existing model")
        base = load_model(init, device="cpu")
        card = copy.deepcopy(base.card)
        card["architecture"]["affine"] = card["architecture"].get("affine") or config.get("affine", DEFAULT_SPEC)
        model = new_model(card, seed=seed)
        missing = model.network.load_state_dict(base.network.state_dict(), strict=False).missing_keys
        assert all(k.startswith("affine.") for k in missing), missing
        model.card["trained_from"] = Path(init).name
        return model

    def plan(self) -> list:
        return [("affine", i) for i in range(int(self.config.get("steps", 1500)))]

    def make_rng(self, seed: int, start: int, rank: int):
        return np.random.default_rng(seed * 1_000_003 + start + 7_919 * rank)

    def optimizers(self) -> dict:
        return {"affine": torch.optim.Adam(self.regressor.parameters(), lr=self.lr)}

    def before_step(self, step: int, total: int, optimizers: dict, rng) -> None:
        for group in optimizers["affine"].param_groups:   # cosine annealing to 0 over the run
            group["lr"] = self.lr * 0.5 * (1 + np.cos(np.pi * step / total))

    def updates(self, phase: str, index: int, rng) -> list:
        movings, fixeds, truths, points = [], [], [], []
        intensity = self.card["intensity"]
        with torch.no_grad():
            for _ in range(self.batch):
                moving, fixed = _pair(self.synthesizer, rng)
                movings.append(normalize(moving.image, intensity))
                fixeds.append(normalize(fixed.image, intensity))
                truths.append(true_theta(moving, fixed))
                brain = torch.nonzero(fixed.generation[0, 0] > 0)
                pick = brain[torch.from_numpy(rng.integers(len(brain), size=4000)).to(brain.device)]
                points.append(normalised_points(pick, fixed.generation.shape[2:]))

        def compute():
            predicted = learned_theta(self.regressor, torch.cat(movings), torch.cat(fixeds))
            error = sum(affine_error_mm(predicted[k], truths[k][0], points[k], self.half_extent)
                        for k in range(self.batch)) / self.batch
            self.recent = (self.recent + [float(error.detach())])[-100:]
            return {"loss": error, "error_mm": error}
        return [("affine", "affine", compute)]

    def finish(self, model, data_dir, record: dict) -> None:
        """The card asks for the learned affine; its training record stays the `--init` model's (the
        registration and segmentation networks were trained so)."""
        trained_from = model.card.pop("trained_from", None)
        model.card["prealignment"] = {
            "kind": "learned", "schedule": self.config.get("polish_schedule", DEFAULT_POLISH),
            "learned_affine": {"steps": len(self.plan()), "batch": self.batch, "seed": int(self.config.get("seed", 0)),
                               "training_error_mm_last100": round(float(np.mean(self.recent)), 3) if self.recent else None,
                               "data": f"synthetic pairs of {len(self.data.sources)} training sources ({self.data.meta['grid']})",
                               "trained_from": trained_from}}
        model.card["name"] = self.config.get("name", model.card["name"])
