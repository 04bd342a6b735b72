"""Label-driven synthesis of training images (the SynthSeg / SynthMorph idea), on the fly, in torch.

From a source's generation labels: a random affine and a random smooth diffeomorphic deformation
(stationary velocity integrated by scaling and squaring), then an image with a random Gaussian mixture
(one mean and spread per generation label), blur, random anisotropic resolution, bias field, gamma,
noise and occasional crops. With probability `real_image_probability` the source's real image (where
it has one) is used instead of the mixture, under the same spatial and intensity changes. Target labels
follow the same deformation, so labels stay consistent with the image.

MONAI and TorchIO offer these transforms for one image at a time on the CPU through numpy; here they
run batched in torch on whatever device trains, and the deformation is returned so synthetic pairs can
be scored by end-point error against their true field.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import DVF2DDF


@dataclass
class SynthesisSettings:
    rotation_deg: float = 15.0
    scale: float = 0.12
    shear: float = 0.03
    shift_fraction: float = 0.05          # of the grid half-extent
    velocity_std_mm: tuple = (0.0, 4.0)   # drawn per sample
    control_spacing_mm: tuple = (16.0, 48.0)
    blur_voxels: tuple = (0.0, 1.0)
    anisotropy_probability: float = 0.3
    anisotropy_factor: tuple = (1.5, 3.5)
    bias_strength: float = 0.3
    gamma_std: float = 0.25
    noise_std: tuple = (0.0, 0.04)
    crop_probability: float = 0.15
    real_image_probability: float = 0.4
    spacing_mm: float = 2.0
    integration_steps: int = 7
    extra: dict = field(default_factory=dict)


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    return (np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
            @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]))


def random_theta(rng: np.random.Generator, settings: SynthesisSettings, strength: float = 1.0) -> torch.Tensor:
    """A random affine in normalised grid coordinates, (1, 3, 4)."""
    rotation = _rotation(np.deg2rad(rng.uniform(-1, 1, 3) * settings.rotation_deg * strength))
    scale = np.diag(np.exp(rng.uniform(-1, 1, 3) * settings.scale * strength))
    shear = np.eye(3) + np.triu(rng.uniform(-1, 1, (3, 3)) * settings.shear * strength, 1)
    linear = rotation @ scale @ shear
    shift = rng.uniform(-1, 1, 3) * settings.shift_fraction * strength
    return torch.from_numpy(np.concatenate([linear, shift[:, None]], 1)[None]).float()


def random_velocity_ddf(shape, rng: np.random.Generator, settings: SynthesisSettings, device,
                        strength: float = 1.0) -> torch.Tensor:
    """Displacement (1, 3, z, y, x) in voxels of a smooth diffeomorphism (SVF by scaling and squaring)."""
    spacing = rng.uniform(*settings.control_spacing_mm)
    coarse = [max(2, int(round(n * settings.spacing_mm / spacing))) for n in shape]
    std_mm = rng.uniform(*settings.velocity_std_mm) * strength
    generator = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
    noise = torch.randn((1, 3, *coarse), generator=generator).to(device)
    half = [max(2, n // 2) for n in shape]
    velocity = F.interpolate(noise, size=half, mode="trilinear", align_corners=True)
    velocity = velocity * (std_mm / (2 * settings.spacing_mm))
    ddf = DVF2DDF(num_steps=settings.integration_steps, mode="bilinear", padding_mode="zeros")(velocity)
    return F.interpolate(ddf, size=list(shape), mode="trilinear", align_corners=False) * 2


def sampling_grid(theta: torch.Tensor, ddf_voxels: torch.Tensor) -> torch.Tensor:
    """Normalised sampling grid of x -> theta(x + u(x)), u in voxels (channels z, y, x as MONAI's)."""
    shape = ddf_voxels.shape[2:]
    base = F.affine_grid(torch.eye(3, 4, device=ddf_voxels.device)[None], [1, 1, *shape], align_corners=False)
    sizes = torch.tensor(shape[::-1], dtype=ddf_voxels.dtype, device=ddf_voxels.device)   # x, y, z
    u = ddf_voxels[0].flip(0).permute(1, 2, 3, 0) * (2 / sizes)                              # voxels -> normalised
    moved = base[0] + u
    return (moved @ theta[0, :, :3].t().to(moved) + theta[0, :, 3].to(moved))[None]


def mapping_error_mm(grid: torch.Tensor, fixed_grid: torch.Tensor, moving_grid: torch.Tensor,
                     spacing_mm: float) -> torch.Tensor:
    """Per fixed voxel, how far (mm, in the source) a returned mapping lands from the true one.

    `grid` (1, z, y, x, 3): where the pipeline samples the moving image for each fixed voxel (normalised
    moving coordinates, any resolution); `fixed_grid` (same shape): the fixed subject's own source grid
    there (`Synthetic.grid`, average-pooled to that resolution); `moving_grid` (1, Z, Y, X, 3): the moving
    subject's source grid at full size. The true mapping takes a fixed voxel to the moving point that came
    from the same source point, so the error is |moving_grid(grid(x)) - fixed_grid(x)|. Differentiable in
    `grid` (the synthetic training's supervised flow term)."""
    source_points = F.grid_sample(moving_grid.permute(0, 4, 1, 2, 3), grid, mode="bilinear",
                                  padding_mode="border", align_corners=False).permute(0, 2, 3, 4, 1)
    # normalised source coordinates -> mm: half the source's extent along x, y, z
    half_extent = torch.tensor([n * spacing_mm / 2 for n in moving_grid.shape[1:4][::-1]], dtype=grid.dtype,
                               device=grid.device)
    return ((source_points - fixed_grid) * half_extent).norm(dim=-1)[0]


def warp(volume: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    return F.grid_sample(volume, grid, mode=mode, padding_mode="zeros", align_corners=False)


def _gaussian_blur(image: torch.Tensor, sigmas) -> torch.Tensor:
    for axis, sigma in enumerate(sigmas):
        if sigma < 0.2:
            continue
        radius = max(1, int(math.ceil(2.5 * sigma)))
        x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
        kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
        kernel = kernel / kernel.sum()
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = len(kernel)
        padding = [0, 0, 0]
        padding[axis] = radius
        image = F.conv3d(image, kernel.view(shape), padding=tuple(padding))
    return image


def render(generation: torch.Tensor, rng: np.random.Generator, settings: SynthesisSettings,
           real_image: torch.Tensor | None = None, mixture_seed: int | None = None,
           real_where: torch.Tensor | None = None) -> torch.Tensor:
    """An intensity image (1, 1, z, y, x) in about [0, 1] from warped generation labels (and optionally the
    warped real image); 0 outside the brain. `mixture_seed` fixes the Gaussian mixture (two images of one
    source rendered with the same seed share a contrast). `real_where` (bool, with `real_image`): the real
    image only there, the mixture elsewhere (a real brain inside a synthetic head)."""
    brain = generation > 0
    if real_image is not None:
        region = brain if real_where is None else real_where & brain
        foreground = real_image[region]
        high = torch.quantile(foreground[:: max(1, foreground.numel() // 100_000)], 0.995) if foreground.numel() else 1
        image = real_image / max(float(high), 1e-6)
    if real_image is None or real_where is not None:
        real = image if real_image is not None else None
        classes = int(generation.max()) + 1
        mixture = rng if mixture_seed is None else np.random.default_rng(mixture_seed)
        classes = max(classes, 256) if mixture_seed is not None else classes   # same draws whatever the max label
        means = torch.from_numpy(mixture.uniform(0.05, 1.0, classes)).float().to(generation.device)
        spreads = torch.from_numpy(mixture.uniform(0.0, 0.08, classes)).float().to(generation.device)
        labels = generation.long()
        generator = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
        image = means[labels] + spreads[labels] * torch.randn(labels.shape, generator=generator).to(labels.device)
        if real is not None:
            image = torch.where(real_where, real, image)
    image = image * brain
    image = _gaussian_blur(image, rng.uniform(*settings.blur_voxels, 3))
    if rng.random() < settings.anisotropy_probability:
        axis = int(rng.integers(3))
        factor = rng.uniform(*settings.anisotropy_factor)
        shape = list(image.shape[2:])
        low = list(shape)
        low[axis] = max(2, int(round(shape[axis] / factor)))
        sigmas = [0.0, 0.0, 0.0]
        sigmas[axis] = factor / 2.355
        image = F.interpolate(F.interpolate(_gaussian_blur(image, sigmas), size=low, mode="trilinear",
                                            align_corners=False), size=shape, mode="trilinear", align_corners=False)
    generator = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
    coarse = torch.randn((1, 1, 4, 4, 4), generator=generator).to(image.device)
    bias = F.interpolate(coarse, size=list(image.shape[2:]), mode="trilinear", align_corners=True)
    image = image.clamp_min(0) * torch.exp(bias * rng.uniform(0, settings.bias_strength))
    image = image.clamp_min(0) ** float(np.exp(rng.normal(0, settings.gamma_std)))
    sigma = rng.uniform(*settings.noise_std)
    image = image + sigma * torch.randn(image.shape, generator=generator).to(image.device)
    image = (image.clamp_min(0) * brain)
    if rng.random() < settings.crop_probability:
        axis = int(rng.integers(3))
        n = image.shape[2 + axis]
        width = int(rng.uniform(0.05, 0.15) * n)
        index = [slice(None)] * 5
        index[2 + axis] = slice(0, width) if rng.random() < 0.5 else slice(n - width, n)
        image[tuple(index)] = 0
    return image


@dataclass
class Synthetic:
    image: torch.Tensor            # (1, 1, z, y, x) float in about [0, 1]
    generation: torch.Tensor       # (1, 1, z, y, x) long
    target: torch.Tensor | None    # (1, 1, z, y, x) long, model label values
    grid: torch.Tensor             # the sampling grid that made it from the source (normalised)
    source: str
    real: bool


class BrainSynthesizer:
    """Synthetic subjects from `atlas_sources.SynthSource`s (all on one grid), as torch tensors on `device`."""

    def __init__(self, sources, settings: SynthesisSettings | None = None, device="cpu"):
        self.settings = settings or SynthesisSettings()
        self.device = torch.device(device)
        self.sources = sources
        self._tensors = []
        for source in sources:
            as_tensor = lambda a, dtype: None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(
                dtype)[None, None].to(self.device)
            self._tensors.append((as_tensor(source.generation, torch.float32),
                                  as_tensor(source.target, torch.float32),
                                  as_tensor(source.image, torch.float32)))

    def sample(self, rng: np.random.Generator, index: int | None = None, strength: float = 1.0,
               deform: bool = True, use_real: bool | None = None, mixture_seed: int | None = None,
               elastic: bool = True) -> Synthetic:
        """One synthetic subject; `use_real` forces (or forbids) the source's real image, `mixture_seed`
        fixes the random contrast (see `render`); `deform=False`: the source's own geometry;
        `elastic=False`: a random affine but the source's own shape (for pairs of one anatomy)."""
        index = int(rng.integers(len(self.sources))) if index is None else index
        generation, target, image = self._tensors[index]
        shape = generation.shape[2:]
        theta = random_theta(rng, self.settings, strength if deform else 0.0).to(self.device)
        ddf = random_velocity_ddf(shape, rng, self.settings, self.device, strength if deform and elastic else 0.0)
        grid = sampling_grid(theta, ddf)
        warped_generation = warp(generation, grid, "nearest")
        if use_real is None:
            use_real = rng.random() < self.settings.real_image_probability
        use_real = bool(use_real) and image is not None
        warped_image = warp(image, grid, "bilinear") if use_real else None
        synthetic = render(warped_generation, rng, self.settings, warped_image, mixture_seed)
        warped_target = None if target is None else warp(target, grid, "nearest").long()
        return Synthetic(synthetic, warped_generation.long(), warped_target, grid, self.sources[index].name, use_real)


# `synthesize`'s changes: a real anatomy moved as much as two subjects' pre-aligned brains differ, its
# intensities changed as scanners do (the few-shot data sets of `data build` and the benchmarks' pairs)
SUBJECT_SETTINGS = {"rotation_deg": 6.0, "scale": 0.06, "shear": 0.0, "velocity_std_mm": (4.0, 4.0),
                    "control_spacing_mm": (40.0, 40.0), "blur_voxels": (0.0, 0.0), "anisotropy_probability": 0.0,
                    "bias_strength": 0.15, "gamma_std": 0.2, "noise_std": (0.005, 0.03), "crop_probability": 0.0,
                    "real_image_probability": 1.0}


def synthesize(image, labels, grid, rng: np.random.Generator, deform: bool = True, strength: float = 1.0):
    """(image, labels or None) of one subject made from a real one (SimpleITK images, any grid) on `grid`
    (a SimpleITK image): resampled there in physical space, then through the generator (`BrainSynthesizer`,
    real image) with a random affine (+-6 deg, +-6 % scale, shift +-5 mm) and diffeomorphism (velocity std
    4 mm on a 40 mm control grid, both times `strength`) and its intensity changes (bias field, gamma,
    noise); `deform=False, strength=0` only resamples. Labels follow the image's deformation."""
    import SimpleITK as sitk
    from .atlas_sources import real_image_source
    on_grid = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    labels_on_grid = None if labels is None else sitk.Resample(labels, grid, sitk.Transform(),
                                                                 sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    if not deform and strength <= 0:
        return on_grid, labels_on_grid
    source = real_image_source("subject", sitk.GetArrayFromImage(on_grid),
                               None if labels_on_grid is None else sitk.GetArrayFromImage(labels_on_grid), 0.0)
    spacing = float(min(grid.GetSpacing()))
    half_extent_mm = min(n * s for n, s in zip(grid.GetSize(), grid.GetSpacing())) / 2
    settings = SynthesisSettings(**{**SUBJECT_SETTINGS, "spacing_mm": spacing,
                                    "shift_fraction": 5.0 / half_extent_mm})
    subject = BrainSynthesizer([source], settings).sample(rng, 0, strength=strength, deform=deform, use_real=True)
    out = sitk.GetImageFromArray(subject.image[0, 0].numpy().astype(np.float32))
    out.CopyInformation(grid)
    out_labels = None
    if subject.target is not None:
        out_labels = sitk.GetImageFromArray(subject.target[0, 0].numpy().astype(np.uint8))
        out_labels.CopyInformation(grid)
    return out, out_labels
