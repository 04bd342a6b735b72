"""Test-time refinement (instance optimisation) of a predicted velocity field for one pair."""
from __future__ import annotations

import torch
from monai.losses import DiceLoss, DiffusionLoss, GlobalMutualInformationLoss, LocalNormalizedCrossCorrelationLoss

from ..core.errors import JointRegSegError

SIMILARITIES = ("lncc", "mi")


def similarity_loss(name: str, kernel_size: int = 9) -> torch.nn.Module:
    if name == "lncc":
        return LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=kernel_size, kernel_type="rectangular")
    if name == "mi":
        return GlobalMutualInformationLoss(num_bins=32, sigma_ratio=0.5)
    raise JointRegSegError(f"unknown refinement similarity {name!r}; choose one of {SIMILARITIES}")


def refine_velocity(network, velocity_low: torch.Tensor, moving: torch.Tensor, fixed: torch.Tensor,
                    iterations: int, similarity: str = "lncc", smoothness: float = 1.0,
                    learning_rate: float = 0.05, label_guidance: tuple | None = None,
                    label_weight: float = 1.0, on_step=None) -> torch.Tensor:
    """Optimise `velocity_low` for this pair: similarity(warped moving, fixed) + smoothness * diffusion(ddf).

    The similarity is evaluated at the full working resolution: on average-pooled images the
    objective is too flat to recover displacements below the pooled voxel size (measured: a 2 mm
    shift was recovered at half, 1.9 mm at full resolution on a 3 mm brain grid).

    `label_guidance` = (moving_onehot, fixed_onehot) adds a Dice term between the warped moving labels
    and the fixed labels (label-driven instance optimisation). `on_step(i)` is called after each step
    and may raise to cancel; the velocity is left unchanged by a cancelled call.
    """
    similarity_fn = similarity_loss(similarity)
    smooth_fn = DiffusionLoss()
    dice_fn = DiceLoss(include_background=False, reduction="mean") if label_guidance is not None else None
    velocity = velocity_low.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([velocity], lr=learning_rate)
    shape = fixed.shape[2:]
    with torch.enable_grad():
        for step in range(int(iterations)):
            ddf = network.displacement(velocity, shape)
            loss = similarity_fn(network.warp(moving, ddf), fixed) + smoothness * smooth_fn(ddf)
            if dice_fn is not None:
                moving_onehot, fixed_onehot = label_guidance
                loss = loss + label_weight * dice_fn(network.warp(moving_onehot, ddf), fixed_onehot)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if on_step is not None:
                on_step(step, float(loss.detach()))
    return velocity.detach()


def choose_velocity_scale(network, velocity_low: torch.Tensor, moving: torch.Tensor, fixed: torch.Tensor,
                          scales, kernel_size: int = 5) -> tuple[float, torch.Tensor, list[float]]:
    """The scale s among `scales` whose flow exp(s * v) best aligns the pair (LNCC at the working
    resolution); returns (s, its full-resolution displacement, the LNCC loss of every candidate). One
    scalar per pair, no gradient: the
    network's direction is kept and only its length is chosen. Measured on held-out pairs: the network
    overshoots a pure rigid motion (the residual after the affine is nil, the best scale about 0.5) and
    undershoots real cross-template pairs (about 1.25)."""
    similarity_fn = similarity_loss("lncc", kernel_size)
    shape = fixed.shape[2:]
    losses, best, best_ddf = [], None, None
    with torch.no_grad():
        for s in scales:
            ddf = network.displacement(float(s) * velocity_low, shape)
            losses.append(float(similarity_fn(network.warp(moving, ddf), fixed)))
            if best is None or losses[-1] < losses[best]:
                best, best_ddf = len(losses) - 1, ddf
    return float(scales[best]), best_ddf, losses
