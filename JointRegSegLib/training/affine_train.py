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
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..inference.affine_torch import learned_theta, normalised_points
from ..models.checkpoint import load_model, new_model, save_model
from ..data.generator import BrainSynthesizer, SynthesisSettings
from ..core.device import resolve_device
from ..core.intensity import normalize
from ..core.progress import Reporter

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


def train_affine(config: dict, data_dir, out_path, init, device="auto", progress=None, cancel=None) -> Path:
    """Add (or keep training) the learned affine of the model `init`; write the result to `out_path`."""
    from .synth_train import load_sources
    if not init:
        raise ValueError("--strategy affine needs --init MODEL: the learned affine is added to an existing model")
    out_path = Path(out_path)
    reporter = Reporter(progress, cancel)
    device = resolve_device(device)
    base = load_model(init, device="cpu")
    card = copy.deepcopy(base.card)
    spec = card["architecture"].get("affine") or config.get("affine", DEFAULT_SPEC)
    card["architecture"]["affine"] = spec
    seed = int(config.get("seed", 0))
    torch.manual_seed(seed)
    model = new_model(card, seed=seed)
    missing = model.network.load_state_dict(base.network.state_dict(), strict=False).missing_keys
    assert all(k.startswith("affine.") for k in missing), missing
    network = model.network.to(device)
    for name, parameter in network.named_parameters():
        parameter.requires_grad_(name.startswith("affine."))
    regressor = network.affine.train()

    sources, meta = load_sources(Path(data_dir))
    grid = card["working_grid"]
    settings = SynthesisSettings(spacing_mm=float(grid["spacing"][0]), **config.get("synthesis", {}))
    synthesizer = BrainSynthesizer(sources, settings, device=device)
    half_extent = torch.tensor([n * s / 2 for n, s in zip(grid["size"], grid["spacing"])], device=device)
    steps, batch = int(config.get("steps", 1500)), int(config.get("batch", 2))
    optimizer = torch.optim.Adam(regressor.parameters(), lr=float(config.get("lr", 1e-3)))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    rng = np.random.default_rng(seed)
    log_path = out_path.with_suffix(".log.csv")
    began = time.perf_counter()
    with open(log_path, "w", newline="", encoding="utf-8") as log:
        writer = csv.writer(log)
        writer.writerow(["step", "error_mm", "seconds"])
        recent = []
        for step in range(steps):
            reporter.update("train affine", step / steps)
            movings, fixeds, truths, points = [], [], [], []
            with torch.no_grad():
                for _ in range(batch):
                    moving, fixed = _pair(synthesizer, rng)
                    movings.append(normalize(moving.image, card["intensity"]))
                    fixeds.append(normalize(fixed.image, card["intensity"]))
                    truths.append(true_theta(moving, fixed))
                    brain = torch.nonzero(fixed.generation[0, 0] > 0)
                    pick = brain[torch.from_numpy(rng.integers(len(brain), size=4000)).to(brain.device)]
                    points.append(normalised_points(pick, fixed.generation.shape[2:]))
            predicted = learned_theta(regressor, torch.cat(movings), torch.cat(fixeds))
            loss = sum(affine_error_mm(predicted[k], truths[k][0], points[k], half_extent) for k in range(batch)) / batch
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            recent.append(float(loss))
            writer.writerow([step, f"{float(loss):.4f}", f"{time.perf_counter() - began:.1f}"])
            if step % 50 == 0:
                log.flush()
    regressor.eval()
    tail = float(np.mean(recent[-100:]))
    model.network = network.to("cpu")
    model.card["prealignment"] = {
        "kind": "learned", "schedule": config.get("polish_schedule", DEFAULT_POLISH),
        "learned_affine": {"steps": steps, "batch": batch, "seed": seed, "training_error_mm_last100": round(tail, 3),
                           "data": f"synthetic pairs of {len(sources)} training sources ({meta['grid']})",
                           "trained_from": Path(init).name}}
    model.card["name"] = config.get("name", card["name"])
    save_model(model, out_path)
    reporter.update("train affine", 1.0)
    print(json.dumps({"steps": steps, "error_mm_last100": tail, "seconds": time.perf_counter() - began}))
    return out_path
