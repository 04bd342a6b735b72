"""Fast affine pre-alignment in torch on the model's working grid (the default; `affine.py` keeps the
classical SimpleITK Mattes-MI path as an option).

The same function aligns training pairs and run-time pairs, so the deformable network learns exactly
the residual it meets at run time ("train as you infer"). Both images sit on working grids of the same
size and spacing, each centred on its own intensity centre of mass; the affine is optimised in torch's
normalised grid coordinates with global mutual information (contrast-agnostic: synthetic training pairs
have unrelated intensities), coarse to fine on average-pooled copies.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

# (pooling factor, iterations): 8, 4 then 2 mm on a 2 mm working grid
DEFAULT_SCHEDULE = ((4, 80), (2, 60), (1, 30))


def _mass_center(image: torch.Tensor) -> torch.Tensor:
    """Intensity centre of mass in normalised (x, y, z) grid coordinates, shape (B, 3)."""
    weights = image.clamp_min(0)[:, 0]
    total = weights.sum(dim=(1, 2, 3)).clamp_min(1e-8)
    coords = []
    for axis, n in zip((3, 2, 1), weights.shape[1:][::-1]):   # x is the last array axis
        line = (2 * torch.arange(n, dtype=image.dtype, device=image.device) + 1) / n - 1
        shape = [1, 1, 1, 1]
        shape[axis] = n
        coords.append((weights * line.view(shape)).sum(dim=(1, 2, 3)) / total)
    return torch.stack(coords, dim=1)


class _Adam:
    """Adam (Kingma & Ba) for a few tensors, as torch.optim.Adam with its defaults computes it: importing
    torch.optim pulls in torch._dynamo, 1.7 s of a cold run's start-up spent before the first step."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps, self.steps = list(params), lr, betas, eps, 0
        self.first = [torch.zeros_like(p) for p in self.params]
        self.second = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self):
        self.steps += 1
        b1, b2 = self.betas
        for p, m, v in zip(self.params, self.first, self.second):
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denominator = (v / (1 - b2 ** self.steps)).sqrt_().add_(self.eps)
            p.addcdiv_(m, denominator, value=-self.lr / (1 - b1 ** self.steps))


def _parzen(values: torch.Tensor, bins: int = 24) -> torch.Tensor:
    """Gaussian Parzen window weights (N, bins) of [0, 1] values, each row summing to 1."""
    centres = torch.linspace(0, 1, bins, device=values.device, dtype=values.dtype)
    sigma = 0.5 / (bins - 1)
    weights = torch.exp(-((values.reshape(-1, 1) - centres) ** 2) / (2 * sigma ** 2))
    return weights / weights.sum(1, keepdim=True).clamp_min(1e-8)


def _mutual_information(moving_values: torch.Tensor, fixed_windows: torch.Tensor, bins: int = 24):
    """Negative mutual information of [0, 1] moving values against the fixed samples' Parzen windows
    (`_parzen`, computed once per level: the fixed side does not change while the metric is optimised)."""
    wa, wb = _parzen(moving_values, bins), fixed_windows
    joint = wa.t() @ wb
    joint = joint / joint.sum().clamp_min(1e-8)
    pa, pb = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    return -(joint * (torch.log(joint + 1e-8) - torch.log(pa @ pb + 1e-8))).sum()


def normalised_points(indices: torch.Tensor, shape, dtype=torch.float32) -> torch.Tensor:
    """Voxel indices (N, 3 as z, y, x) of a grid of `shape` -> voxel centres in torch's normalised (x, y, z)
    coordinates (align_corners=False), as `F.affine_grid` and `F.grid_sample` use them."""
    sizes = torch.tensor(list(shape), dtype=dtype, device=indices.device)
    return ((2 * indices.to(dtype) + 1) / sizes - 1).flip(-1)


def _foreground(fixed_level: torch.Tensor) -> tuple:
    """Voxel centres of the fixed image's foreground (normalised x, y, z) and their Parzen windows, once per
    level: each iteration then draws its samples from them (the metric is estimated on samples, as elastix
    and ITK do; a fresh draw every iteration averages the sampling noise out of the optimum)."""
    shape = fixed_level.shape[2:]
    foreground = torch.nonzero(fixed_level[0, 0] > 0.02)
    if len(foreground) == 0:
        foreground = torch.nonzero(torch.ones(shape, dtype=torch.bool, device=fixed_level.device))
    normalised = normalised_points(foreground, shape, fixed_level.dtype)
    values = fixed_level[0, 0][foreground[:, 0], foreground[:, 1], foreground[:, 2]]
    return normalised, _parzen(values)


def mass_center_theta(moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """The translation (B, 3, 4) that brings the fixed image's intensity centre of mass onto the moving one's."""
    with torch.no_grad():
        shift = _mass_center(moving) - _mass_center(fixed)
    eye = torch.eye(3, dtype=fixed.dtype, device=fixed.device)[None].expand(len(shift), 3, 3)
    return torch.cat([eye, shift.view(-1, 3, 1)], dim=2)


def learned_theta(regressor: torch.nn.Module, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """The learned affine (the model's affine head, `networks.AFFINE_HEADS`): centres of mass first, then the
    head's affine of the centred pair; the two compose to one theta (fixed voxel -> moving point)."""
    centring = mass_center_theta(moving, fixed)
    residual = regressor(warp_with_theta(moving, centring), fixed)
    return torch.cat([residual[:, :, :3], residual[:, :, 3:] + centring[:, :, 3:]], dim=2)


def fit_affine(moving: torch.Tensor, fixed: torch.Tensor, schedule=DEFAULT_SCHEDULE,
               learning_rate: float = 0.02, samples: int = 20_000, seed: int = 0,
               initial: torch.Tensor | None = None) -> torch.Tensor:
    """theta (1, 3, 4) such that `F.affine_grid(theta, fixed.shape)` samples the moving image at the
    points matching the fixed grid's voxels (align_corners=False). Images: (1, 1, z, y, x) in [0, 1].
    Starts from `initial` (e.g. the learned affine) or from the centres of mass.

    Deterministic for a given `seed` (the metric's sample points)."""
    generator = torch.Generator().manual_seed(seed)
    start = (mass_center_theta(moving, fixed) if initial is None else initial).detach().to(fixed)
    eye = torch.eye(3, dtype=fixed.dtype, device=fixed.device)[None]
    linear = (start[:, :, :3] - eye).clone().requires_grad_(True)
    translation = start[:, :, 3:].clone().requires_grad_(True)
    optimizer = _Adam([linear, translation], learning_rate)
    with torch.enable_grad():
        for pool, iterations in schedule:
            fixed_level = F.avg_pool3d(fixed, pool) if pool > 1 else fixed
            moving_level = F.avg_pool3d(moving, pool) if pool > 1 else moving
            all_points, all_weights = _foreground(fixed_level)
            for _ in range(iterations):
                pick = torch.randint(len(all_points), (min(samples, len(all_points)),), generator=generator)
                points, fixed_weights = all_points[pick], all_weights[pick]
                mapped = points @ (eye + linear)[0].t() + translation[0, :, 0]
                warped = F.grid_sample(moving_level, mapped.view(1, 1, 1, -1, 3), mode="bilinear",
                                       padding_mode="zeros", align_corners=False).view(-1)
                loss = _mutual_information(warped, fixed_weights)
                linear.grad = translation.grad = None
                loss.backward()
                optimizer.step()
    return torch.cat([eye + linear, translation], dim=2).detach()


def theta_to_physical(theta: torch.Tensor, fixed_grid: sitk.Image, moving_grid: sitk.Image) -> sitk.AffineTransform:
    """The physical affine (fixed point -> moving point) of `theta` between two working grids of the same
    size and spacing (identity or any direction)."""
    theta = theta[0].double().cpu().numpy()
    size = np.array(fixed_grid.GetSize(), float)

    def index_from_normalised(grid: sitk.Image):
        # physical = origin + D diag(s) i, i = ((u + 1) n - 1) / 2  ->  physical = c + D diag(s n / 2) u
        direction = np.array(grid.GetDirection()).reshape(3, 3)
        scale = direction @ np.diag(np.array(grid.GetSpacing()) * size / 2)
        centre = np.array(grid.GetOrigin()) + direction @ (np.array(grid.GetSpacing()) * (size - 1) / 2)
        return scale, centre

    scale_f, centre_f = index_from_normalised(fixed_grid)
    scale_m, centre_m = index_from_normalised(moving_grid)
    linear, shift = theta[:, :3], theta[:, 3]
    matrix = scale_m @ linear @ np.linalg.inv(scale_f)
    translation = centre_m + scale_m @ shift - matrix @ centre_f
    return sitk.AffineTransform(matrix.ravel().tolist(), translation.tolist(), (0.0, 0.0, 0.0))


def warp_with_theta(image: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    grid = F.affine_grid(theta.to(image.dtype), list(image.shape), align_corners=False)
    return F.grid_sample(image, grid, mode=mode, padding_mode="zeros", align_corners=False)


def prealign(moving: sitk.Image, fixed: sitk.Image, card: dict, device="cpu",
             network: torch.nn.Module | None = None) -> sitk.AffineTransform:
    """The torch affine between two physical images: each resampled onto the model's working grid centred on
    its own centre of mass, normalised as the model is fed, aligned by `fit_affine` (card prealignment kind
    "torch-mi"), or by the model's learned affine then `fit_affine` polishing it on the card's (shorter)
    schedule (kind "learned"); the result maps fixed physical points to moving ones (as
    `affine.affine_prealign`)."""
    from ..core.geometry import resample, to_tensor, working_grid
    from ..core.intensity import normalize
    fixed_grid, moving_grid = working_grid(fixed, card), working_grid(moving, card)
    background = lambda image: float(sitk.GetArrayViewFromImage(image).min())
    fixed_t = normalize(to_tensor(resample(fixed, fixed_grid, default=background(fixed)), device), card["intensity"])
    moving_t = normalize(to_tensor(resample(moving, moving_grid, default=background(moving)), device),
                         card["intensity"])
    return theta_to_physical(card_theta(moving_t, fixed_t, card, network), fixed_grid, moving_grid)


def card_theta(moving: torch.Tensor, fixed: torch.Tensor, card: dict, network: torch.nn.Module | None = None,
               schedule=None) -> torch.Tensor:
    """The affine the model card asks for, between two normalised working-grid images: mutual information
    on the card's schedule, started from the learned affine when the card's kind is "learned"."""
    prealignment = card.get("prealignment", {})
    schedule = schedule or tuple(tuple(level) for level in prealignment.get("schedule", DEFAULT_SCHEDULE))
    initial = None
    if prealignment.get("kind") == "learned":
        if getattr(network, "affine", None) is None:
            raise ValueError("the model card asks for a learned affine but the network has none")
        with torch.no_grad():
            initial = learned_theta(network.affine, moving, fixed)
    if not schedule:
        return initial if initial is not None else mass_center_theta(moving, fixed)
    return fit_affine(moving, fixed, schedule=schedule, initial=initial)
