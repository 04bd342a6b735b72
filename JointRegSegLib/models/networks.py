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

CHANNELS_LAST = torch.channels_last_3d


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


class AffineRegressor(nn.Module):
    """A learned affine pre-alignment (the U-ReSNet affine head, here its own small encoder): (moving,
    fixed) on the working grid, average-pooled by `pool`, with three coordinate channels so positions
    can be regressed, through stride-2 convolutions to a 3^3 feature grid and two dense layers, to the
    affine theta (B, 3, 4) in torch's normalised grid coordinates (`F.affine_grid` convention: fixed
    voxel -> moving point). The last layer starts at zero: an untrained regressor returns the identity."""

    def __init__(self, spec: dict):
        super().__init__()
        self.pool = int(spec.get("pool", 2))
        channels = [5, *spec.get("channels", [16, 32, 64, 64])]
        self.features = nn.Sequential(*[nn.Sequential(nn.Conv3d(a, b, 3, stride=2, padding=1), nn.LeakyReLU(0.2))
                                        for a, b in zip(channels[:-1], channels[1:])], nn.AdaptiveAvgPool3d(3))
        hidden = int(spec.get("hidden", 128))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels[-1] * 27, hidden), nn.LeakyReLU(0.2),
                                  nn.Linear(hidden, 12))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        pair = torch.cat([moving, fixed], dim=1)
        if self.pool > 1:
            pair = F.avg_pool3d(pair, self.pool)
        batch = pair.shape[0]
        eye = torch.eye(3, 4, dtype=pair.dtype, device=pair.device)[None].expand(batch, 3, 4)
        coords = F.affine_grid(eye, [batch, 1, *pair.shape[2:]], align_corners=False).permute(0, 4, 1, 2, 3)
        delta = self.head(self.features(torch.cat([pair, coords], dim=1))).view(batch, 3, 4)
        return eye + delta


class KeypointAffine(nn.Module):
    """A learned affine from matched keypoints (the KeyMorph idea): one small U-Net, shared by both images,
    turns each image (average-pooled by `pool`) into K heat maps; each map's soft-argmax is a keypoint, and
    the affine (B, 3, 4), fixed voxel -> moving point in torch's normalised grid coordinates, is the least
    squares fit taking the fixed keypoints onto the moving ones (weighted by how peaked both maps are,
    pulled slightly towards the identity). Unlike a dense head regressing 12 numbers, the estimate is
    equivariant by construction: moving the image moves its keypoints.

    The heat-map logits are multiplied by `sharpness` (30) before the softmax: an untrained U-Net's
    logits vary by ~0.1 over the volume, so the plain softmax is uniform over ~40k voxels and every
    keypoint sits at the centre (spread 0.002), the fit is degenerate and only the ridge answers, which
    kept a training at its initial error (17 mm after 850 steps). The peak weight 1 / (1 + spread / 0.05)
    keeps a gradient for broad maps, where exp(-spread / 0.05) underflowed to 2e-9."""

    def __init__(self, spec: dict):
        super().__init__()
        self.pool = int(spec.get("pool", 2))
        self.keypoints = int(spec.get("keypoints", 32))
        self.ridge = float(spec.get("ridge", 1e-3))
        self.sharpness = float(spec.get("sharpness", 30.0))
        self.heatmaps = _unet(1, self.keypoints, {"channels": spec.get("channels", [16, 32, 64]),
                                                  "strides": spec.get("strides", [2, 2])})

    def locate(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keypoints (B, K, 3 as x, y, z normalised) and their peakedness (B, K) in [0, 1]."""
        if self.pool > 1:
            image = F.avg_pool3d(image, self.pool)
        shape = image.shape[2:]
        logits = self.heatmaps(image).flatten(2)                                          # (B, K, V)
        weights = torch.softmax(logits * self.sharpness, dim=-1)
        eye = torch.eye(3, 4, dtype=image.dtype, device=image.device)[None]
        coords = F.affine_grid(eye, [1, 1, *shape], align_corners=False).view(-1, 3)      # (V, 3) x, y, z
        points = weights @ coords
        spread = (weights * ((coords[None, None] - points[:, :, None]) ** 2).sum(-1)).sum(-1)
        return points, 1.0 / (1.0 + spread / 0.05)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        moving_points, moving_peak = self.locate(moving)
        fixed_points, fixed_peak = self.locate(fixed)
        weight = (moving_peak * fixed_peak).clamp_min(1e-4)[..., None]                     # (B, K, 1)
        design = torch.cat([fixed_points, torch.ones_like(fixed_points[..., :1])], dim=-1)  # (B, K, 4)
        eye = torch.eye(3, 4, dtype=design.dtype, device=design.device)[None].expand(len(design), 3, 4)
        normal = design.transpose(1, 2) @ (weight * design) + self.ridge * torch.eye(4, dtype=design.dtype,
                                                                                     device=design.device)
        right = design.transpose(1, 2) @ (weight * moving_points) + self.ridge * eye.transpose(1, 2)
        return torch.linalg.solve(normal, right).transpose(1, 2)


AFFINE_HEADS = {"regressor": AffineRegressor, "keypoints": KeypointAffine}


class JointRegSegNet(nn.Module):
    """Registration U-Net (moving, fixed -> velocity) and segmentation U-Net (image -> label logits)."""

    def __init__(self, architecture: dict, num_classes: int):
        super().__init__()
        self.registration = _unet(2, 3, architecture["registration"])
        _zero_last_conv(self.registration)
        # channels-last weights and input take oneDNN's fast 3D convolution path on CPU: the segmentation
        # net runs in half the time (34 vs 68 ms at 80x96x80, 2 threads), same numbers; the registration
        # net (two input channels) gains nothing, so it keeps the default layout
        self.segmentation = _unet(1, num_classes, architecture["segmentation"]).to(memory_format=CHANNELS_LAST)
        self.integrator = VelocityIntegrator(architecture.get("integration_steps", 7),
                                             architecture.get("velocity_downsample", 2))
        self.warp = Warp(mode="bilinear", padding_mode="border")
        self.warp_nearest = Warp(mode="nearest", padding_mode="zeros")
        if "affine" in architecture:
            spec = architecture["affine"]
            self.affine = AFFINE_HEADS[spec.get("kind", "regressor")](spec)

    def velocity(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Low-resolution velocity field for the pair (both already on the working grid, normalised)."""
        return self.integrator.reduce(self.registration(torch.cat([moving, fixed], dim=1)))

    def displacement(self, velocity_low: torch.Tensor, full_shape) -> torch.Tensor:
        return self.integrator(velocity_low, full_shape)

    def segment(self, image: torch.Tensor) -> torch.Tensor:
        return self.segmentation(image.contiguous(memory_format=CHANNELS_LAST)).contiguous()


def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2 if stride == 1 else 0),
                         nn.LeakyReLU(0.2))


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose3d(cin, cout, 2, stride=2), nn.LeakyReLU(0.2))


class UReSNetEncoder(nn.Module):
    """Two blocks (8 and 16 channels), each a 2x2x2 stride-2 convolution then a 3x3x3 convolution."""

    def __init__(self, channels=(8, 16)):
        super().__init__()
        c1, c2 = channels
        self.block1 = nn.Sequential(_conv(1, c1, 2, 2), _conv(c1, c1))
        self.block2 = nn.Sequential(_conv(c1, c2, 2, 2), _conv(c2, c2))

    def forward(self, image):
        half = self.block1(image)
        return half, self.block2(half)


class _Parts:
    """Modules addressed together (for an optimiser) without registering them twice in the state dict."""

    def __init__(self, *modules: nn.Module):
        self.modules = modules

    def parameters(self):
        for module in self.modules:
            yield from module.parameters()


class UReSNet(nn.Module):
    """U-ReSNet (Estienne et al. 2019): one encoder shared by both images (siamese branches), an affine
    head (global average pooling + one dense layer -> 3x4 matrix), an elastic decoder and a segmentation
    decoder, under 40k parameters. The elastic part is a stationary velocity integrated by scaling and
    squaring (the paper integrates spatial gradients; the SVF keeps it diffeomorphic); the output
    transform samples the moving image at A(x + u(x)), the paper's W(M, Phi x A), and is returned as one
    dense displacement so refinement, QC and export treat it like every other model's: at full resolution,
    exactly the transform the training loss saw. Heads: the affine head is linear (identity at start),
    the velocity head linear (the paper's sigmoid bounds the grid gradients of its own parameterisation),
    the segmentation head's sigmoid is applied by the training loss (the arg-max at inference is the same).
    """

    def __init__(self, architecture: dict, num_classes: int):
        super().__init__()
        c1, c2 = architecture.get("channels", (8, 16))
        self.encoder = UReSNetEncoder((c1, c2))
        self.affine_head = nn.Linear(2 * c2, 12)
        nn.init.zeros_(self.affine_head.weight)
        nn.init.zeros_(self.affine_head.bias)
        self.elastic = nn.ModuleDict({"up1": _up(2 * c2, c1), "conv1": _conv(3 * c1, c2),
                                      "up2": _up(c2, c1), "conv2": _conv(c1 + 2, c1),
                                      "head": nn.Conv3d(c1, 3, 3, padding=1)})
        _zero_last_conv(self.elastic["head"])
        self.seg_decoder = nn.ModuleDict({"up1": _up(c2, c1), "conv1": _conv(2 * c1, c1),
                                          "up2": _up(c1, c1), "conv2": _conv(c1 + 1, c1),
                                          "head": nn.Conv3d(c1, num_classes, 3, padding=1)})
        downsample = architecture.get("velocity_downsample", 2)
        self.integrator = VelocityIntegrator(architecture.get("integration_steps", 7), downsample)
        self.output = VelocityIntegrator(0, 1)  # the composed displacement passes through unchanged
        self.warp = Warp(mode="bilinear", padding_mode="border")
        self.warp_nearest = Warp(mode="nearest", padding_mode="zeros")

    # The training strategies address the parts by role; the shared encoder belongs to both.
    @property
    def registration(self) -> _Parts:
        return _Parts(self.encoder, self.affine_head, self.elastic)

    @property
    def segmentation(self) -> _Parts:
        return _Parts(self.encoder, self.seg_decoder)

    def elastic_and_affine(self, moving, fixed):
        half_m, deep_m = self.encoder(moving)
        half_f, deep_f = self.encoder(fixed)
        deep = torch.cat([deep_m, deep_f], dim=1)
        delta = self.affine_head(deep.mean(dim=(2, 3, 4))).view(-1, 3, 4)
        matrix = torch.eye(3, 4, device=delta.device, dtype=delta.dtype) + delta
        e = self.elastic
        x = e["conv1"](torch.cat([e["up1"](deep), half_m, half_f], dim=1))
        x = e["conv2"](torch.cat([e["up2"](x), moving, fixed], dim=1))
        velocity_low = self.integrator.reduce(e["head"](x))
        return self.integrator(velocity_low, fixed.shape[2:]), matrix

    def compose(self, elastic_ddf: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """Displacement (voxels) of x -> A(x + u(x)), coordinates centred on the grid."""
        shape = elastic_ddf.shape[2:]
        axes = [torch.arange(n, device=elastic_ddf.device, dtype=elastic_ddf.dtype) - (n - 1) / 2 for n in shape]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]
        moved = grid + elastic_ddf
        sampled = torch.einsum("bij,bj...->bi...", matrix[:, :, :3], moved) + matrix[:, :, 3, None, None, None]
        return sampled - grid

    def velocity(self, moving, fixed):
        """For this architecture the 'velocity' handed to refinement is the whole composed displacement."""
        elastic_ddf, matrix = self.elastic_and_affine(moving, fixed)
        return self.output.reduce(self.compose(elastic_ddf, matrix))

    def displacement(self, velocity_low, full_shape):
        return self.output(velocity_low, full_shape)

    def segment(self, image):
        half, deep = self.encoder(image)
        d = self.seg_decoder
        x = d["conv1"](torch.cat([d["up1"](deep), half], dim=1))
        x = d["conv2"](torch.cat([d["up2"](x), image], dim=1))
        return d["head"](x)


ARCHITECTURES = {"unet-pair": JointRegSegNet, "uresnet": UReSNet}


def cascade_velocity(network: nn.Module, moving: torch.Tensor, fixed: torch.Tensor, passes: int = 1) -> torch.Tensor:
    """The network run `passes` times, each pass on the moving image as warped by the passes before (a
    recursive cascade with shared weights); the velocities add up (first-order composition of the flows,
    still one diffeomorphism)."""
    velocity = network.velocity(moving, fixed)
    for _ in range(passes - 1):
        warped = network.warp(moving, network.displacement(velocity, fixed.shape[2:]))
        velocity = velocity + network.velocity(warped, fixed)
    return velocity


def build_network(architecture: dict, num_classes: int) -> nn.Module:
    from ..core.errors import CheckpointError
    name = architecture.get("name")
    if name not in ARCHITECTURES:
        raise CheckpointError(f"model card: unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    try:
        return ARCHITECTURES[name](architecture, num_classes)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"model card: architecture {name!r} has invalid parameters: {err}") from None
