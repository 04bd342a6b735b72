"""Full-resolution segmentations are resampled only where a structure can win, with the same result."""
import numpy as np
import SimpleITK as sitk
import torch

from JointRegSegLib.core.geometry import make_grid, resample_in_slabs
from JointRegSegLib.inference.fullres_labels import labels_on

from conftest import rotation


def _everywhere(probabilities, grid, reference, transform):
    probs = probabilities[0].permute(1, 2, 3, 0).contiguous().numpy()
    probs[..., 0] += 1e-6
    prob_image = sitk.GetImageFromArray(probs, isVector=True)
    prob_image.CopyInformation(grid)
    return resample_in_slabs(prob_image, reference, transform, lambda s: sitk.GetArrayFromImage(s).argmax(-1),
                             np.uint8, pixel_type=sitk.sitkVectorFloat32)


def test_labels_in_the_structure_box_equal_labels_resampled_everywhere():
    rng = np.random.default_rng(0)
    grid = make_grid((40, 48, 40), (2.0, 2.0, 2.0), np.eye(3), np.zeros(3))
    logits = torch.full((1, 4, 40, 48, 40), -4.0)
    logits[0, 0] = 4.0
    z, y, x = np.meshgrid(*[np.arange(n) for n in (40, 48, 40)], indexing="ij")
    for c, centre in enumerate([(14, 20, 12), (22, 28, 26), (18, 24, 18)], start=1):   # three blobs, one corner
        blob = ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) < 16
        logits[0, c][torch.from_numpy(blob)] = 6.0 + float(rng.normal())
    probabilities = torch.softmax(logits, 1)
    reference = make_grid((70, 60, 50), (1.1, 1.3, 1.7), rotation((10.0, -5.0, 20.0)), np.array([3.0, -2.0, 1.0]))
    affine = sitk.AffineTransform(rotation((4.0, 3.0, -6.0)).ravel().tolist(), (2.0, -1.5, 0.5), (0.0, 0.0, 0.0))
    for transform in (None, affine):
        boxed = labels_on(probabilities, grid, reference, transform)
        full = _everywhere(probabilities, grid, reference, transform)
        assert set(np.unique(full)) == {0, 1, 2, 3}
        np.testing.assert_array_equal(boxed, full)


def test_no_structure_anywhere_gives_an_empty_segmentation():
    grid = make_grid((20, 20, 20), (2.0, 2.0, 2.0), np.eye(3), np.zeros(3))
    logits = torch.zeros(1, 3, 20, 20, 20)
    logits[0, 0] = 5.0
    reference = make_grid((30, 30, 30), (1.0, 1.0, 1.0), np.eye(3), np.zeros(3))
    assert not labels_on(torch.softmax(logits, 1), grid, reference).any()


def test_smooth_probabilities_through_a_rotation_match_itk_resampling_and_a_warp_falls_back_to_it():
    """Where classes meet gradually (smooth random logits, many borders), the cells whose corners agree take
    their label directly and the rest are interpolated: the labels equal ITK's linear resampling + argmax.
    A displacement-field transform is not affine: the whole box is then resampled by ITK."""
    from JointRegSegLib.inference.fullres_labels import affine_index_map
    generator = torch.Generator().manual_seed(3)
    grid = make_grid((30, 36, 28), (2.0, 2.0, 2.0), rotation((0.0, 0.0, 90.0)), np.array([-5.0, 4.0, 2.0]))
    logits = torch.nn.functional.avg_pool3d(torch.randn(1, 5, 28, 36, 30, generator=generator), 5, 1, 2) * 12
    logits[0, 0] += 0.5
    probabilities = torch.softmax(logits, 1)
    reference = make_grid((64, 50, 58), (0.9, 1.2, 1.1), rotation((-8.0, 12.0, 5.0)), np.array([-2.0, 3.0, 0.0]))
    affine = sitk.AffineTransform(rotation((6.0, -4.0, 2.0)).ravel().tolist(), (1.5, 0.5, -2.0), (0.0, 0.0, 0.0))
    assert affine_index_map(reference, grid, affine) is not None
    fast = labels_on(probabilities, grid, reference, affine)
    itk = _everywhere(probabilities, grid, reference, affine)
    assert len(np.unique(itk)) == 5
    np.testing.assert_array_equal(fast, itk)

    field = np.zeros((36, 40, 36, 3))
    field[..., 0] = 3.0 * np.sin(np.linspace(0, np.pi, 36))[:, None, None]   # a bend: not affine
    displacement = sitk.GetImageFromArray(field, isVector=True)
    displacement.SetOrigin((-40.0, -44.0, -40.0))
    displacement.SetSpacing((2.5, 2.5, 2.5))
    bend = sitk.DisplacementFieldTransform(displacement)
    assert affine_index_map(reference, grid, bend) is None
    bump = sitk.GetImageFromArray(np.zeros((36, 40, 36, 3)), isVector=True)   # zero at every probe point
    bump.SetOrigin((-40.0, -44.0, -40.0))
    bump.SetSpacing((2.5, 2.5, 2.5))
    bump[18, 20, 18] = (4.0, 0.0, 0.0)
    assert affine_index_map(reference, grid, sitk.DisplacementFieldTransform(bump)) is None   # not linear
    np.testing.assert_array_equal(labels_on(probabilities, grid, reference, bend),
                                  _everywhere(probabilities, grid, reference, bend))


def test_brain_mask_from_the_background_channel_equals_the_two_class_argmax():
    """brain_on resamples only the background probability: the same voxels as the argmax of the two-class
    map (background, brain) at threshold 1/2, through a rotation and without one."""
    from JointRegSegLib.inference.brainmask import brain_on
    generator = torch.Generator().manual_seed(5)
    grid = make_grid((30, 36, 28), (2.0, 2.0, 2.0), rotation((0.0, 5.0, 0.0)), np.array([1.0, -2.0, 0.0]))
    background = torch.sigmoid(torch.nn.functional.avg_pool3d(torch.randn(1, 1, 28, 36, 30, generator=generator),
                                                              5, 1, 2) * 20)[0, 0]
    two_class = torch.stack([background, 1 - background])[None]
    reference = make_grid((64, 50, 58), (0.9, 1.2, 1.1), rotation((-8.0, 12.0, 5.0)), np.array([-2.0, 3.0, 0.0]))
    affine = sitk.AffineTransform(rotation((6.0, -4.0, 2.0)).ravel().tolist(), (1.5, 0.5, -2.0), (0.0, 0.0, 0.0))
    for transform in (None, affine):
        brain = brain_on(background, grid, reference, transform, 0.5)
        assert 0.1 < brain.mean() < 0.9
        np.testing.assert_array_equal(brain, labels_on(two_class, grid, reference, transform) == 1)
