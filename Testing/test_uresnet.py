"""U-ReSNet: the affine head is part of the one output displacement, and the network stays under the
paper's 40k parameters."""
import numpy as np
import torch

from JointRegSegLib.networks import UReSNet
from JointRegSegLib.training.cli import _architecture

ARCH = {"name": "uresnet", "channels": [8, 16], "integration_steps": 7, "velocity_downsample": 2}


def test_uresnet_is_as_small_as_the_paper_says():
    net = UReSNet(ARCH, num_classes=9)
    assert sum(p.numel() for p in net.parameters()) < 40_000


def test_untrained_uresnet_predicts_the_identity():
    torch.manual_seed(0)
    net = UReSNet(ARCH, num_classes=3).eval()
    image = torch.rand(1, 1, 16, 24, 16)
    with torch.no_grad():
        ddf = net.displacement(net.velocity(image, torch.rand_like(image)), image.shape[2:])
    assert float(ddf.abs().max()) < 1e-3


def test_affine_and_elastic_compose_into_one_displacement():
    net = UReSNet(ARCH, num_classes=3)
    shape = (12, 14, 10)
    elastic = torch.zeros(1, 3, *shape)
    elastic[:, 2] = 1.5                                    # elastic: 1.5 voxels along the last axis
    angle = np.deg2rad(10)
    matrix = torch.tensor([[[np.cos(angle), -np.sin(angle), 0, 2.0],
                            [np.sin(angle), np.cos(angle), 0, 0.0],
                            [0, 0, 1, -1.0]]], dtype=torch.float32)
    ddf = net.compose(elastic, matrix)
    # The sample for voxel x lies at A(x + u(x)) in centred coordinates, as the paper's W(M, Phi x A).
    x = torch.tensor([3.0, 4.0, 2.0])                      # index
    centred = x - (torch.tensor(shape) - 1) / 2
    expected = matrix[0, :, :3] @ (centred + torch.tensor([0, 0, 1.5])) + matrix[0, :, 3] - centred
    assert torch.allclose(ddf[0, :, 3, 4, 2], expected, atol=1e-5)


def test_arch_option_accepts_the_issue_spelling_and_keeps_a_matching_config():
    assert _architecture({}, "ureset")["name"] == "uresnet"
    custom = {"architecture": {"name": "uresnet", "channels": [4, 8]}}
    assert _architecture(custom, "uresnet")["channels"] == [4, 8]
    assert _architecture(custom, None)["channels"] == [4, 8]
    assert _architecture({}, None)["name"] == "unet-pair"
