"""The recursive cascade (`network_passes`): each pass registers what the passes before left over."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from JointRegSegLib.core.errors import CheckpointError
from JointRegSegLib.inference.pipeline import register_and_segment


def _constant_velocity(model, voxels_zyx):
    """Make the network answer the same small shift whatever it sees (in working-grid voxels)."""
    net = model.network

    def velocity(moving, fixed):
        low = [n // net.integrator.downsample for n in fixed.shape[2:]]
        field = torch.zeros(1, 3, *low)
        for axis, v in enumerate(voxels_zyx):
            field[:, axis] = v / net.integrator.downsample
        return field
    net.velocity = velocity


def _median_displacement_mm(result):
    field = sitk.GetArrayFromImage(result.displacement)
    return np.median(field.reshape(-1, 3), axis=0)


def test_two_passes_add_the_second_answer_to_the_first(phantom_pair, tiny_model):
    moving, fixed = phantom_pair
    _constant_velocity(tiny_model, (0.0, 0.0, 0.5))         # half a working voxel along x, per pass
    one = register_and_segment(moving, fixed, tiny_model, affine=False, device="cpu")
    two = register_and_segment(moving, fixed, tiny_model, affine=False, device="cpu", network_passes=2)
    shift_one, shift_two = _median_displacement_mm(one), _median_displacement_mm(two)
    assert abs(shift_one[0]) > 0.1
    np.testing.assert_allclose(shift_two, 2 * shift_one, atol=0.05 * abs(shift_one[0]) + 1e-3)
    assert one.qc["network_passes"] == 1 and two.qc["network_passes"] == 2


def test_the_card_sets_the_default_passes(phantom_pair, tiny_model):
    moving, fixed = phantom_pair
    _constant_velocity(tiny_model, (0.0, 0.0, 0.5))
    tiny_model.card["inference"] = {"passes": 3}
    three = register_and_segment(moving, fixed, tiny_model, affine=False, device="cpu")
    one = register_and_segment(moving, fixed, tiny_model, affine=False, device="cpu", network_passes=1)
    assert three.qc["network_passes"] == 3
    np.testing.assert_allclose(_median_displacement_mm(three)[0], 3 * _median_displacement_mm(one)[0], rtol=0.05)


def test_zero_passes_is_refused_by_name(phantom_pair, tiny_model):
    moving, fixed = phantom_pair
    with pytest.raises(ValueError, match="network_passes 0"):
        register_and_segment(moving, fixed, tiny_model, affine=False, device="cpu", network_passes=0)


def test_scale_search_shortens_a_network_that_overshoots(phantom_pair, tiny_model):
    """A network answering twice the true shift (fixed is the phantom moved by (2, -1, 1.5) mm): the scale
    search among the card's scales picks 0.5 and the run lands on the true shift; off, the run keeps the
    overshoot; asked for without scales in the card, it is refused by name."""
    moving, fixed = phantom_pair
    truth_mm = np.array([2.0, -1.0, 1.5])
    _constant_velocity(tiny_model, tuple(2 * truth_mm[::-1] / 2.5))   # working voxels of 2.5 mm, z y x
    with pytest.raises(ValueError, match="lists no `inference.scales`"):
        register_and_segment(moving, fixed, tiny_model, affine=False, device="cpu", scale_search=True)
    tiny_model.card["inference"] = {"scales": [0.25, 0.5, 1.0]}
    searched = register_and_segment(moving, fixed, tiny_model, affine=False, device="cpu")
    plain = register_and_segment(moving, fixed, tiny_model, affine=False, device="cpu", scale_search=False)
    assert searched.qc["velocity_scale"] == 0.5 and plain.qc["velocity_scale"] == 1.0
    tiny_model.card["inference"] = {"scales": ["half"]}
    with pytest.raises(CheckpointError, match="inference.scales"):
        register_and_segment(moving, fixed, tiny_model, affine=False, device="cpu")
    np.testing.assert_allclose(_median_displacement_mm(plain), 2 * truth_mm, atol=0.3)
    np.testing.assert_allclose(_median_displacement_mm(searched), truth_mm, atol=0.3)
