"""Networks of a joint registration + segmentation model, built on MONAI.

The registration net predicts a stationary velocity field; scaling and squaring (MONAI DVF2DDF)
integrates it at a reduced resolution and the displacement is upsampled, which keeps the map
diffeomorphic in practice while costing a fraction of a full-resolution integration.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import DVF2DDF, Warp
from monai.networks.nets import UNet


def _unet(in_channels: int, out_channels: int, spec: dict) -> UNet:
    return UNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                channels=tuple(spec["channels"]), strides=tuple(spec["strides"]),
                num_res_units=int(spec.get("num_res_units", 0)), act=spec.get("act", "LEAKYRELU"),
                norm=spec.get("norm", "INSTANCE"))


def _zero_last_conv(net: nn.Module) -> None:
    """Start the velocity head near zero so an untrained net predicts (almost) the identity."""
    last = [m for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))][-1]
    nn.init.normal_(last.weight, std=1e-5)
    if last.bias is not None:
        nn.init.zeros_(last.bias)


class VelocityIntegrator(nn.Module):
    """Half-resolution stationary velocity (voxels of that grid) -> full-resolution displacement (voxels)."""

    def __init__(self, steps: int = 7, downsample: int = 2):
        super().__init__()
        self.downsample = int(downsample)
        self.integrate = DVF2DDF(num_steps=int(steps), mode="bilinear", padding_mode="zeros") if steps > 0 else None

    def reduce(self, velocity_full: torch.Tensor) -> torch.Tensor:
        if self.downsample == 1:
            return velocity_full
        return F.avg_pool3d(velocity_full, self.downsample) / self.downsample

    def integrate_low(self, velocity_low: torch.Tensor) -> torch.Tensor:
        """Displacement at the velocity's own resolution (voxels of that grid)."""
        return self.integrate(velocity_low) if self.integrate is not None else velocity_low

    def forward(self, velocity_low: torch.Tensor, full_shape) -> torch.Tensor:
        ddf_low = self.integrate_low(velocity_low)
        if self.downsample == 1:
            return ddf_low
        return F.interpolate(ddf_low, size=tuple(full_shape), mode="trilinear",
                             align_corners=False) * self.downsample


class JointRegSegNet(nn.Module):
    """Registration U-Net (moving, fixed -> velocity) and segmentation U-Net (image -> label logits)."""

    def __init__(self, architecture: dict, num_classes: int):
        super().__init__()
        self.registration = _unet(2, 3, architecture["registration"])
        _zero_last_conv(self.registration)
        self.segmentation = _unet(1, num_classes, architecture["segmentation"])
        self.integrator = VelocityIntegrator(architecture.get("integration_steps", 7),
                                             architecture.get("velocity_downsample", 2))
        self.warp = Warp(mode="bilinear", padding_mode="border")
        self.warp_nearest = Warp(mode="nearest", padding_mode="zeros")

    def velocity(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Low-resolution velocity field for the pair (both already on the working grid, normalised)."""
        return self.integrator.reduce(self.registration(torch.cat([moving, fixed], dim=1)))

    def displacement(self, velocity_low: torch.Tensor, full_shape) -> torch.Tensor:
        return self.integrator(velocity_low, full_shape)

    def segment(self, image: torch.Tensor) -> torch.Tensor:
        return self.segmentation(image)


ARCHITECTURES = {"unet-pair": JointRegSegNet}


def build_network(architecture: dict, num_classes: int) -> nn.Module:
    from .errors import CheckpointError
    name = architecture.get("name")
    if name not in ARCHITECTURES:
        raise CheckpointError(f"model card: unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    try:
        return ARCHITECTURES[name](architecture, num_classes)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"model card: architecture {name!r} has invalid parameters: {err}") from None
