"""Heads around the brains: procedural extracerebral layers for label-driven synthesis.

The offline label maps are brains; scanners write heads. As SynthStrip (Hoppe et al., NeuroImage 2022) and
SynthSeg's generator do, the tissue around the brain is drawn from the brain mask: shells at random
thickness (cerebrospinal fluid rim, inner table, diploe, outer table, scalp/muscle, fat), their boundaries
wobbled by a smooth random field so the skull is not a perfect offset of the brain, plus a neck/face block
under the brain and two eyes in front of it, each with its own generation label (so each gets its own
random intensity: any contrast). A random half-space may cut the field of view (partial coverage: the
brain too; its labels are cut with it). Brain voxels are never covered.

`HeadSynthesizer` is `BrainSynthesizer` with these heads (probability `head_probability`, else the
brain-extracted image as before) and a brain mask per sample; sources that are heads already
(`PartialSource.head`, the ITK subject) keep their own.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .generator import BrainSynthesizer, SynthesisSettings, random_theta, random_velocity_ddf, render, sampling_grid, warp

HEAD_LABEL_BASE = 300          # generation labels of the head layers: 300 + k (above every source's own)
LAYERS = ("csf rim", "inner table", "diploe", "outer table", "scalp", "fat")
THICKNESS_MM = ((0.5, 4.0), (1.0, 3.5), (0.0, 4.0), (1.0, 3.0), (2.0, 7.0), (0.0, 6.0))
NECK, NECK_FAT, EYE, EYE_WALL = (HEAD_LABEL_BASE + len(LAYERS) + k for k in range(4))


@dataclass
class HeadSettings:
    head_probability: float = 0.65
    wobble_mm: tuple = (0.0, 4.0)
    neck_probability: float = 0.7
    eye_probability: float = 0.7
    cut_probability: float = 0.25
    cut_depth_fraction: tuple = (0.0, 0.35)     # how far into the grid the cut reaches, from a random side
    air_noise: tuple = (0.0, 0.04)


def smooth_field(shape, rng: np.random.Generator, device, control: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
    coarse = torch.randn((1, 1, control, control, control), generator=generator).to(device)
    return F.interpolate(coarse, size=list(shape), mode="trilinear", align_corners=True)


def physical_coordinates(shape, spacing_mm: float, center_lps, device) -> tuple:
    """LPS x, y, z (mm) of each voxel of an identity-direction grid (z, y, x arrays)."""
    axes = [(torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2) * spacing_mm + c
            for n, c in zip(shape, center_lps[::-1])]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    return x, y, z


def add_head(generation: torch.Tensor, brain: torch.Tensor, distance_mm: torch.Tensor, rng: np.random.Generator,
             settings: HeadSettings, spacing_mm: float, center_lps) -> torch.Tensor:
    """Generation labels (1, 1, z, y, x) with head layers outside `brain`; brain voxels unchanged."""
    shape = generation.shape[2:]
    device = generation.device
    out = generation.clone()
    outside = ~brain
    wobble = smooth_field(shape, rng, device) * rng.uniform(*settings.wobble_mm)
    distance = distance_mm + wobble
    edge = 0.0
    for k, (low, high) in enumerate(THICKNESS_MM):
        thickness = rng.uniform(low, high)
        # the first layer takes every outside voxel up to its edge: the wobble never opens a gap at the brain
        layer = outside & (distance <= edge + thickness) & ((distance > edge) if k else True)
        out[layer] = HEAD_LABEL_BASE + k
        edge += thickness
    head_edge = edge
    x, y, z = physical_coordinates(shape, spacing_mm, center_lps, device)
    x, y, z = x[None, None], y[None, None], z[None, None]
    brain_z = z[brain]
    if brain_z.numel() and rng.random() < settings.neck_probability:
        # a neck / face block under the brain: an elliptic column around the brain's centre, slightly anterior
        bottom = float(brain_z.min())
        top = bottom + rng.uniform(10, 45)
        cx, cy = float(x[brain].mean()), float(y[brain].mean()) - rng.uniform(0, 25)
        rx, ry = rng.uniform(45, 70), rng.uniform(55, 85)
        column = outside & (z < top) & (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1) & (out == generation)
        fat = smooth_field(shape, rng, device, control=7) > rng.uniform(0.3, 1.2)
        out[column] = NECK
        out[column & fat] = NECK_FAT
    if brain_z.numel() and rng.random() < settings.eye_probability:
        front = float(y[brain].min())
        eye_z = float(brain_z.min()) + rng.uniform(25, 45)
        radius = rng.uniform(9, 13)
        for side in (-1, 1):
            cx = side * rng.uniform(28, 36)
            cy = front + rng.uniform(-5, 15)
            d = ((x - cx) ** 2 + (y - cy) ** 2 + (z - eye_z) ** 2).sqrt()
            out[outside & (d < radius + 1.5) & (distance > head_edge * 0.5)] = EYE_WALL
            out[outside & (d < radius) & (distance > head_edge * 0.5)] = EYE
    out[brain] = generation[brain]
    return out


def random_cut(shape, rng: np.random.Generator, settings: HeadSettings, device) -> torch.Tensor | None:
    """A half-space mask (True = kept) that removes a slab from a random side of the grid, or None."""
    if rng.random() >= settings.cut_probability:
        return None
    axis = int(rng.integers(3))
    n = shape[axis]
    depth = int(rng.uniform(*settings.cut_depth_fraction) * n)
    keep = torch.ones(shape, dtype=torch.bool, device=device)
    index = [slice(None)] * 3
    index[axis] = slice(0, depth) if rng.random() < 0.5 else slice(n - depth, n)
    keep[tuple(index)] = False
    return keep[None, None]


@dataclass
class HeadSample:
    image: torch.Tensor       # (1, 1, z, y, x)
    target: torch.Tensor      # (1, 1, z, y, x) long, whole-brain values (0 where unknown or outside)
    brain: torch.Tensor       # (1, 1, z, y, x) bool
    generation: torch.Tensor
    known: tuple
    source: str
    head: bool


class HeadSynthesizer(BrainSynthesizer):
    """Synthetic subjects with or without a head (see the module docstring), for segmentation training."""

    def __init__(self, sources, settings: SynthesisSettings | None = None, device="cpu",
                 head: HeadSettings | None = None, center_lps=(0.0, 18.0, 10.0)):
        super().__init__(sources, settings, device)
        from scipy.ndimage import distance_transform_edt
        self.head = head or HeadSettings()
        self.center_lps = tuple(center_lps)
        self._brains, self._distances = [], []
        for source in sources:
            brain = source.brain if source.brain is not None else source.generation > 0
            distance = distance_transform_edt(~brain, sampling=self.settings.spacing_mm).astype(np.float32)
            self._brains.append(torch.from_numpy(np.ascontiguousarray(brain))[None, None].to(self.device))
            self._distances.append(torch.from_numpy(distance)[None, None].to(self.device))

    def sample_head(self, rng: np.random.Generator, index: int | None = None, head: bool | None = None) -> HeadSample:
        index = int(rng.integers(len(self.sources))) if index is None else index
        source = self.sources[index]
        generation, target, image = self._tensors[index]
        brain = self._brains[index]
        shape = generation.shape[2:]
        with_head = bool(getattr(source, "head", False))
        if not with_head and (head if head is not None else rng.random() < self.head.head_probability):
            generation = add_head(generation.long(), brain, self._distances[index], rng, self.head,
                                  self.settings.spacing_mm, self.center_lps).float()
            with_head = True
        if target is None:
            target = torch.zeros_like(generation)
        keep = random_cut(shape, rng, self.head, self.device)
        if keep is not None:
            generation, target, brain = generation * keep, target * keep, brain & keep
        theta = random_theta(rng, self.settings).to(self.device)
        ddf = random_velocity_ddf(shape, rng, self.settings, self.device)
        grid = sampling_grid(theta, ddf)
        warped_generation = warp(generation, grid, "nearest")
        use_real = image is not None and rng.random() < self.settings.real_image_probability
        warped_image = warp(image, grid, "bilinear") if use_real else None
        warped_brain = warp(brain.float(), grid, "nearest") > 0.5
        real_where = None
        if use_real and not getattr(source, "head", False):
            real_where = warped_brain    # a brain-only real image: the head around it is synthetic
        picture = render(warped_generation, rng, self.settings, warped_image, real_where=real_where)
        sigma = rng.uniform(*self.head.air_noise)
        if sigma > 0:
            generator = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
            noise = torch.randn(picture.shape, generator=generator).to(picture.device).abs() * sigma
            picture = picture + noise * (warped_generation == 0)
        known = tuple(getattr(source, "known", ()))
        return HeadSample(picture, warp(target, grid, "nearest").long(), warped_brain, warped_generation.long(),
                          known, source.name, with_head)
