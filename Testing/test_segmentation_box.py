"""Full-resolution segmentations are resampled only where a structure can win, with the same result."""
import numpy as np
import SimpleITK as sitk
import torch

from JointRegSegLib.geometry import make_grid, resample_in_slabs
from JointRegSegLib.pipeline import _labels_on

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
        boxed = _labels_on(probabilities, grid, reference, transform)
        full = _everywhere(probabilities, grid, reference, transform)
        assert set(np.unique(full)) == {0, 1, 2, 3}
        np.testing.assert_array_equal(boxed, full)


def test_no_structure_anywhere_gives_an_empty_segmentation():
    grid = make_grid((20, 20, 20), (2.0, 2.0, 2.0), np.eye(3), np.zeros(3))
    logits = torch.zeros(1, 3, 20, 20, 20)
    logits[0, 0] = 5.0
    reference = make_grid((30, 30, 30), (1.0, 1.0, 1.0), np.eye(3), np.zeros(3))
    assert not _labels_on(torch.softmax(logits, 1), grid, reference).any()
