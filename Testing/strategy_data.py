"""Tiny synthetic few-shot sets for the strategy tests: textured two-structure phantoms (core and shell)
that differ in position, size and texture, built in memory (no files), and a tiny network pair."""
from __future__ import annotations

import numpy as np
import torch

from JointRegSegLib.models.networks import JointRegSegNet
from JointRegSegLib.training.dataset import FewShotData

LABEL_TABLE = [{"value": 0, "name": "background"}, {"value": 1, "name": "core"}, {"value": 2, "name": "shell"}]
TINY_PAIR = {"name": "unet-pair", "registration": {"channels": [4, 8, 8], "strides": [2, 2]},
             "segmentation": {"channels": [4, 8, 8], "strides": [2, 2]},
             "integration_steps": 4, "velocity_downsample": 2}
LR = {"reg_pretrain": 1e-3, "seg_pretrain": 1e-3, "reg": 1e-3, "seg": 1e-3, "disc": 2e-4}


def phantom(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    axes = np.meshgrid(*[np.arange(size, dtype=np.float32) - (size - 1) / 2] * 3, indexing="ij")
    centre = rng.uniform(-1.5, 1.5, 3)
    radii = size * rng.uniform(0.30, 0.38, 3)
    radius = np.sqrt(sum(((a - c) / r) ** 2 for a, c, r in zip(axes, centre, radii)))
    labels = np.where(radius < 0.55, 1, np.where(radius < 1.0, 2, 0)).astype(np.int64)
    image = 0.4 * (radius < 1.0) + 0.6 * (radius < 0.55)
    for _ in range(12):
        blob = rng.uniform(-size / 3, size / 3, 3)
        dist2 = sum((a - b) ** 2 for a, b in zip(axes, blob))
        image = image + rng.uniform(-0.2, 0.2) * np.exp(-dist2 / (2 * (size / 8) ** 2)) * (radius < 1.0)
    return image.astype(np.float32), labels


def few_shot(n: int = 5, labelled=(0,), size: int = 24, seed: int = 0) -> FewShotData:
    rng = np.random.default_rng(seed)
    images, labels = {}, {}
    names = [f"s{i}" for i in range(n)]
    for i, name in enumerate(names):
        image, label = phantom(rng, size)
        images[name] = torch.from_numpy(image)[None, None]
        if i in labelled:
            labels[name] = torch.from_numpy(label)[None, None]
    manifest = {"label_table": LABEL_TABLE, "sources": [{"name": "phantom"}], "notes": "test phantoms", "seed": seed}
    return FewShotData(manifest, images, labels, {}, names, [])


def tiny_pair(seed: int = 0) -> JointRegSegNet:
    torch.manual_seed(seed)
    return JointRegSegNet(TINY_PAIR, num_classes=len(LABEL_TABLE))


def config(**extra) -> dict:
    return {"lr": dict(LR), "seg_every": 1, "discriminator": {"channels": [4, 8], "strides": [2]}, **extra}
