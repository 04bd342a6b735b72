"""U-ReSNet: the affine head is part of the one output displacement and learns a known affine, inference
returns exactly the trained transform, and the network stays under the paper's 40k parameters."""
import numpy as np
import torch

from JointRegSegLib.models.networks import UReSNet
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


def _blobs(size=20, seed=0):
    """A smooth textured volume (1, 1, size, size, size) with structure everywhere inside a ball."""
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.arange(size, dtype=np.float32) - (size - 1) / 2] * 3, indexing="ij")
    image = np.zeros((size,) * 3, np.float32)
    for _ in range(10):
        centre = rng.uniform(-size / 4, size / 4, 3)
        image += rng.uniform(0.3, 1.0) * np.exp(-sum((a - c) ** 2 for a, c in zip(axes, centre)) / (2 * 2.5 ** 2))
    return torch.from_numpy(image)[None, None]


def _strategy(net, moving, fixed):
    from JointRegSegLib.training.dataset import FewShotData
    from JointRegSegLib.training.strategies import UReSNetTraining
    manifest = {"label_table": [{"value": 0}, {"value": 1}]}
    data = FewShotData(manifest, {"m": moving, "f": fixed}, {}, {}, ["m", "f"], [])
    return UReSNetTraining({"lr": {"all": 1e-3}}, net, data)


def test_uresnet_affine_head_recovers_affine():
    """Fixed = moving under a known affine; training the affine head with the strategy's loss finds it."""
    torch.manual_seed(0)
    net = UReSNet({**ARCH, "channels": [4, 8], "integration_steps": 4}, num_classes=2)
    moving = _blobs()
    truth = torch.tensor([[[1.06, 0.0, 0.0, 1.5], [0.0, 1.0, 0.03, -1.0], [0.0, -0.03, 0.97, 0.8]]])
    with torch.no_grad():
        fixed = net.warp(moving, net.compose(torch.zeros(1, 3, 20, 20, 20), truth))
    strategy = _strategy(net, moving, fixed)
    optimiser = torch.optim.Adam(net.affine_head.parameters(), lr=2e-2)
    for _ in range(100):
        optimiser.zero_grad()
        strategy.end_to_end("m", "f")["loss"].backward()
        optimiser.step()
    with torch.no_grad():
        _, _, matrix = strategy.transform(moving, fixed)
    assert float((matrix[0, :, 3] - truth[0, :, 3]).abs().max()) < 0.3       # translation, voxels
    assert float((matrix[0, :, :3] - truth[0, :, :3]).abs().max()) < 0.05    # linear part


def test_uresnet_inference_uses_trained_transform():
    """What inference returns (velocity -> displacement, as pipeline and evaluate call it) is exactly the
    displacement the training loss warps with, at full resolution: no pooling, no resampling."""
    torch.manual_seed(0)
    net = UReSNet(ARCH, num_classes=3).eval()
    with torch.no_grad():
        for parameter in [*net.elastic["head"].parameters(), *net.affine_head.parameters()]:
            parameter.normal_(std=0.05)
    moving, fixed = _blobs(seed=1), _blobs(seed=2)
    strategy = _strategy(net, moving, fixed)
    with torch.no_grad():
        trained, elastic, _ = strategy.transform(moving, fixed)
        inferred = net.displacement(net.velocity(moving, fixed), fixed.shape[2:])
    assert float(elastic.abs().max()) > 0.1 and float(trained.abs().std()) > 0.05  # a non-trivial transform
    assert inferred.shape == trained.shape
    assert torch.allclose(inferred, trained, atol=1e-6)


def test_uresnet_segmentation_trains_the_background_channel():
    """U-ReSNet's sigmoid heads are independent, so the arg-max at inference is only meaningful if every
    channel is trained: the Dice term must send gradient to the background channel of the head too."""
    from JointRegSegLib.training.dataset import FewShotData
    from JointRegSegLib.training.strategies import UReSNetTraining
    torch.manual_seed(0)
    net = UReSNet({**ARCH, "channels": [4, 8], "integration_steps": 4}, num_classes=2)
    moving, fixed = _blobs(seed=1), _blobs(seed=2)
    labels = (moving > 0.5).long()
    manifest = {"label_table": [{"value": 0}, {"value": 1}]}
    data = FewShotData(manifest, {"m": moving, "f": fixed}, {"m": labels}, {}, ["m", "f"], [])
    terms = UReSNetTraining({"lr": {"all": 1e-3}}, net, data).end_to_end("m", "f")
    assert "seg_moving" in terms
    terms["seg_moving"].backward()
    head = net.seg_decoder["head"]
    assert float(head.bias.grad[0].abs()) > 0 and float(head.weight.grad[0].abs().sum()) > 0
