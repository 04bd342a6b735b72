"""Physical-space correctness: known deformations are recovered in mm; the written transform
reproduces the warped image in SimpleITK for oblique, flipped and anisotropic inputs."""
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import BRAIN_CARD, GEOMETRIES, grid_for, phantom_array, rotation, sample_on, smooth_field, warp_by

from JointRegSegLib import new_model, register_and_segment
from JointRegSegLib.core.geometry import make_grid, physical_center, physical_points
from JointRegSegLib.io.outputs import write_result


def known_mapping(center):
    """fixed mm -> moving mm: an affine (rotation, anisotropic scale, shift) after a smooth local field."""
    matrix = rotation((4, -3, 6)) @ np.diag([1.06, 0.95, 1.03])
    shift = np.array([4.0, -3.0, 2.5])

    def mapping(points):
        q = points - center
        return (q + smooth_field(q / 2.0, 8.0)) @ matrix.T + shift + center
    return mapping


@pytest.mark.slow
@pytest.mark.parametrize("geometry", ["lps-oblique", "axis-aligned"])
def test_refinement_recovers_known_affine_plus_smooth_deformation(sample_brain, geometry):
    center = physical_center(sample_brain)
    direction = GEOMETRIES[geometry][0]
    fixed_grid = make_grid((64, 64, 48), (3.0, 3.2, 3.5), direction, center)
    fixed, truth = warp_by(sample_brain, fixed_grid, known_mapping(center))
    points = physical_points(fixed_grid)
    brain = sitk.GetArrayFromImage(fixed) > 30

    affine_only = register_and_segment(sample_brain, fixed, new_model(BRAIN_CARD), refine_iterations=0)
    refined = register_and_segment(sample_brain, fixed, new_model(BRAIN_CARD), refine_iterations=100)

    def error_mm(result):
        return np.linalg.norm(points + sitk.GetArrayFromImage(result.displacement) - truth, axis=-1)[brain]

    before = np.linalg.norm(points - truth, axis=-1)[brain].mean()
    err_affine, err_refined = error_mm(affine_only), error_mm(refined)
    message = (f"{geometry}: mean error {before:.2f} mm unregistered, {err_affine.mean():.2f} mm affine only, "
               f"{err_refined.mean():.2f} mm refined (p95 {np.percentile(err_refined, 95):.2f} mm)")
    print(message)
    assert before > 8.0, message
    assert err_refined.mean() < 0.85, message
    assert np.percentile(err_refined, 95) < 2.0, message
    assert err_refined.mean() < 0.7 * err_affine.mean(), message
    assert refined.qc["folding_percent"] < 0.01, message


@pytest.mark.parametrize("geometry", ["lps-oblique", "flipped", "anisotropic"])
def test_written_transform_reproduces_warped_image(tmp_path, tiny_model, geometry):
    fixed = sample_on(grid_for(geometry), phantom_array, lambda p: p @ rotation((3, 2, -4)).T + [2.0, -3.0, 1.0])
    moving = sample_on(grid_for("lps-oblique", center=(4, -2, 3)), phantom_array)
    result = register_and_segment(moving, fixed, tiny_model, refine_iterations=15)
    written = write_result(result, tmp_path / "out")
    warped = sitk.GetArrayFromImage(result.warped)
    scale = warped.max() - warped.min()

    from_h5 = sitk.Resample(moving, fixed, sitk.ReadTransform(str(written["transform"])), sitk.sitkLinear,
                            float(warped.min()), sitk.sitkFloat32)
    assert np.abs(sitk.GetArrayFromImage(from_h5) - warped).max() < 1e-4 * scale

    field = sitk.Cast(sitk.ReadImage(str(written["displacement"])), sitk.sitkVectorFloat64)
    from_field = sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field), sitk.sitkLinear,
                               float(warped.min()), sitk.sitkFloat32)
    # float32 on disk: sub-micrometre displacement rounding only
    assert np.abs(sitk.GetArrayFromImage(from_field) - warped).max() < 1e-2 * scale
    # a real gzip stream (stored, not deflated, for speed), and no temporary file left beside the outputs
    assert written["displacement"].read_bytes()[:2] == b"\x1f\x8b"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(str(p.name) for p in written.values())

    on_disk = sitk.ReadImage(str(written["warped"]))
    assert on_disk.GetSize() == fixed.GetSize()
    np.testing.assert_allclose(on_disk.GetDirection(), fixed.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(on_disk.GetOrigin(), fixed.GetOrigin(), atol=1e-4)
    # and the registration actually moved something: the displacement is far from zero
    assert np.abs(sitk.GetArrayFromImage(result.displacement)).max() > 1.0


def test_uncompressed_outputs_hold_the_same_volumes(tmp_path, tiny_model):
    """write_result(compress=False) (what the Slicer module asks of its worker: files read back at once) writes
    the same .nii.gz volumes, as gzip streams that store the data undeflated."""
    import gzip
    fixed = sample_on(grid_for("axis-aligned"), phantom_array)
    moving = sample_on(grid_for("lps-oblique", center=(2, -1, 1)), phantom_array)
    result = register_and_segment(moving, fixed, tiny_model, affine=False)
    packed = write_result(result, tmp_path / "packed")
    plain = write_result(result, tmp_path / "plain", compress=False)
    for key in ("warped", "fixed_segmentation", "moving_segmentation", "warped_moving_segmentation", "jacobian"):
        a, b = sitk.ReadImage(str(packed[key])), sitk.ReadImage(str(plain[key]))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b), err_msg=key)
        assert a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection(), key
        raw = len(gzip.decompress(plain[key].read_bytes()))
        assert plain[key].stat().st_size > raw, key            # stored: the stream is larger than the data


def test_segmentations_live_on_their_own_grids(tiny_model):
    fixed = sample_on(grid_for("anisotropic"), phantom_array)
    moving = sample_on(grid_for("flipped", center=(3, 0, -2)), phantom_array)
    result = register_and_segment(moving, fixed, tiny_model, affine=False)
    for image, reference in [(result.fixed_segmentation, fixed), (result.moving_segmentation, moving),
                             (result.warped_moving_segmentation, fixed), (result.jacobian_determinant, fixed)]:
        assert image.GetSize() == reference.GetSize()
        np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-9)
        np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-6)
    values = set(np.unique(sitk.GetArrayFromImage(result.fixed_segmentation)))
    assert values <= {0, 1, 2}


# issue 14, item 12: the same physical images stored with other voxel orders give the same transform ------

def _reorder(image, permutation, flips):
    return sitk.Flip(sitk.PermuteAxes(image, permutation), flips)


def test_results_do_not_depend_on_storage_order(sample_brain):
    center = physical_center(sample_brain)
    fixed_grid = make_grid((64, 64, 48), (3.0, 3.2, 3.5), rotation((6, -4, 10)), center)
    fixed, _ = warp_by(sample_brain, fixed_grid, known_mapping(center))
    moving = sitk.Resample(sample_brain, make_grid((70, 80, 60), (2.6, 2.6, 2.6), np.eye(3), center),
                           sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    model = new_model(BRAIN_CARD)
    reference = register_and_segment(moving, fixed, model)
    reordered = register_and_segment(_reorder(moving, [1, 2, 0], [True, False, True]),
                                     _reorder(fixed, [2, 0, 1], [False, True, True]), model)
    points = physical_points(fixed_grid)[::4, ::4, ::4].reshape(-1, 3)
    a, b = reference.transform, reordered.transform
    distance = np.array([np.linalg.norm(np.subtract(a.TransformPoint(p), b.TransformPoint(p))) for p in points])
    print(f"storage order: median {np.median(distance):.4f} mm, max {distance.max():.4f} mm")
    assert distance.max() < 0.1


def test_jacobian_of_a_field_slab_by_slab_equals_the_whole_and_the_written_field_is_the_transform(tmp_path,
                                                                                                 tiny_model):
    """det J is taken slab by slab from the field sampled once on the fixed grid; that same field is what
    displacement_field.nii.gz holds, and it equals the written transform sampled on the fixed grid."""
    from JointRegSegLib.core.geometry import jacobian_determinant, jacobian_determinant_of_field
    fixed_grid = grid_for("lps-oblique")
    field_mm = smooth_field(physical_points(fixed_grid) - physical_center(fixed_grid), 3.0).astype(np.float32)
    whole = jacobian_determinant(field_mm, fixed_grid)
    slabbed = jacobian_determinant_of_field(field_mm, fixed_grid, budget_bytes=fixed_grid.GetSize()[0] *
                                            fixed_grid.GetSize()[1] * 60 * 5)    # a few slices a slab
    np.testing.assert_array_equal(slabbed, whole)
    moving = sample_on(grid_for("axis-aligned"), phantom_array)
    result = register_and_segment(moving, sample_on(fixed_grid, phantom_array), tiny_model, device="cpu")
    write_result(result, tmp_path)
    written = sitk.ReadImage(str(tmp_path / "displacement_field.nii.gz"))
    transform = sitk.ReadTransform(str(tmp_path / "transform.h5"))
    resampled = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat32, fixed_grid.GetSize(),
                                                  fixed_grid.GetOrigin(), fixed_grid.GetSpacing(),
                                                  fixed_grid.GetDirection())
    np.testing.assert_allclose(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(resampled), atol=1e-4)
    det = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "jacobian_determinant.nii.gz")))
    np.testing.assert_allclose(det, jacobian_determinant(sitk.GetArrayFromImage(written), fixed_grid), atol=1e-5)
    # the path for fixed grids too large to keep the field: det J slab by slab from the transform, the same
    from JointRegSegLib.core.geometry import jacobian_determinant_of_transform
    np.testing.assert_allclose(jacobian_determinant_of_transform(transform, fixed_grid), det, atol=1e-5)
