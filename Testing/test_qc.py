"""QC numbers: folding % and Jacobian determinants on fields with known answers."""
import numpy as np
import pytest

from JointRegSegLib.core.geometry import make_grid, physical_points
from JointRegSegLib.inference.qc import dice_per_label, jacobian_stats, label_volumes_ml
from conftest import rotation


@pytest.mark.parametrize("direction", [np.eye(3), rotation((20, -35, 50))], ids=["axis-aligned", "oblique"])
def test_folding_fraction_matches_analytic_value(direction):
    # u = A sin(2 pi s / L) e along a physical direction e: det J = 1 + A (2 pi / L) cos(2 pi s / L).
    # With A 2 pi / L = 2, det J <= 0 where cos <= -1/2, i.e. one third of each period.
    grid = make_grid((60, 60, 60), (1.0, 1.0, 1.0), direction, np.zeros(3))
    points = physical_points(grid)
    axis = np.array([1.0, 2.0, -0.5]) / np.linalg.norm([1.0, 2.0, -0.5])
    period, amplitude = 20.0, 20.0 / np.pi
    s = points @ axis
    u = amplitude * np.sin(2 * np.pi * s / period)[..., None] * axis
    stats, det = jacobian_stats(u, grid)
    inner = (slice(2, -2),) * 3  # one-sided differences at the border
    analytic = 1 + amplitude * 2 * np.pi / period * np.cos(2 * np.pi * s / period)
    assert np.abs(det[inner] - analytic[inner]).max() < 0.1
    assert stats["folding_percent"] == pytest.approx(100 / 3, abs=1.5)
    assert stats["jacobian_min"] == pytest.approx(-1.0, abs=0.1)


def test_no_folding_for_a_pure_affine_field():
    grid = make_grid((20, 20, 20), (2.0, 1.0, 3.0), rotation((5, 10, 15)), np.zeros(3))
    points = physical_points(grid)
    matrix = np.diag([1.2, 0.9, 1.1])
    stats, det = jacobian_stats(points @ matrix.T - points, grid)
    assert stats["folding_percent"] == 0.0
    np.testing.assert_allclose(det, np.linalg.det(matrix), rtol=1e-4)


def test_label_volumes_and_dice():
    table = [{"value": 0, "name": "bg", "color": [0, 0, 0]}, {"value": 2, "name": "b", "color": [1, 0, 0]}]
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[:5] = 2
    assert label_volumes_ml(labels, (2.0, 2.0, 2.0), table) == {"b": pytest.approx(500 * 8 / 1000)}
    other = np.zeros_like(labels)
    other[:10, :5] = 2
    assert dice_per_label(labels, other, table)["b"] == pytest.approx(2 * 250 / (500 + 500))


def test_implausible_volumes_are_flagged():
    # issue 14, item 6: an 8x8x8 input, a structure bigger than the anatomy, fixed vs moving x10
    import SimpleITK as sitk
    from JointRegSegLib.inference.qc import volume_flags
    table = [{"value": 0, "name": "bg", "color": [0, 0, 0]}, {"value": 1, "name": "pallidum", "color": [1, 0, 0]},
             {"value": 2, "name": "thalamus", "color": [0, 1, 0], "volume_ml": [4, 12]}]
    tiny = sitk.GetImageFromArray(np.pad(np.ones((6, 6, 6), np.float32), 1))
    tiny.SetSpacing((10.0, 10.0, 10.0))
    flags = volume_flags({"pallidum": 1443.0, "thalamus": 6.0}, {"pallidum": 2.0, "thalamus": 6.5}, tiny, tiny,
                         table)
    text = " | ".join(flags)
    assert "8x8x8 voxels" in text
    assert "pallidum: 1443.0 ml in the fixed image is more than all its anatomy (216.0 ml)" in text
    assert "pallidum: 1443.00 ml in the fixed image vs 2.00 ml" in text
    big = sitk.GetImageFromArray(np.pad(np.ones((60, 60, 60), np.float32), 2))
    assert volume_flags({"pallidum": 2.1, "thalamus": 7.0}, {"pallidum": 1.9, "thalamus": 7.5}, big, big,
                        table) == []
    out_of_range = volume_flags({"pallidum": 2.1, "thalamus": 26.7}, {"pallidum": 1.9, "thalamus": 25.0}, big, big,
                                table)
    assert out_of_range == ["thalamus: 26.70 ml in the fixed image is outside the expected 4-12 ml",
                            "thalamus: 25.00 ml in the moving image is outside the expected 4-12 ml"]


def test_pipeline_reports_volume_flags(tiny_model):
    import SimpleITK as sitk
    from JointRegSegLib import register_and_segment
    rng = np.random.default_rng(0)
    small = sitk.GetImageFromArray((rng.random((8, 8, 8)) * 100).astype(np.float32))
    small.SetSpacing((6.0, 6.0, 6.0))
    result = register_and_segment(small, small, tiny_model, affine=False)
    assert any("8x8x8 voxels" in flag for flag in result.qc["volume_flags"])
