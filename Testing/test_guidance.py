"""Label-driven instance optimisation: corrected segmentations of both images steer the refinement, so a
correction improves the transform right away."""
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import TINY_CARD, grid_for, phantom_array, phantom_labels, sample_on

from JointRegSegLib import InputImageError, register_and_segment
from JointRegSegLib.inference.qc import dice_per_label

SHIFT = np.array([5.0, -4.0, 3.0])


@pytest.fixture
def shifted_pair():
    grid = grid_for("axis-aligned")
    moved = lambda p: p + SHIFT  # noqa: E731
    return (sample_on(grid, phantom_array), sample_on(grid, phantom_labels),
            sample_on(grid, phantom_array, moved), sample_on(grid, phantom_labels, moved))


def _warped_truth(result, moving_labels):
    transform = sitk.DisplacementFieldTransform(sitk.Cast(result.displacement, sitk.sitkVectorFloat64))
    return sitk.Resample(moving_labels, result.displacement, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


@pytest.mark.slow
def test_corrected_labels_improve_the_registration_at_once(tiny_model, shifted_pair):
    # The annotator's correction says the structures sit 7 mm away from where the fixed image's intensities put
    # them (a boundary the image does not show): image similarity alone cannot find that, the guidance must.
    moving, moving_labels, _, fixed_labels = shifted_pair
    fixed = moving
    scores = {}
    for name, guide in (("plain", None), ("guided", (moving_labels, fixed_labels))):
        result = register_and_segment(moving, fixed, tiny_model, device="cpu", affine=False, refine_iterations=40,
                                      guide_labels=guide)
        warped = _warped_truth(result, moving_labels)
        scores[name] = float(np.mean(list(dice_per_label(sitk.GetArrayFromImage(warped),
                                                         sitk.GetArrayFromImage(fixed_labels),
                                                         TINY_CARD["labels"]).values())))
        assert result.qc["folding_percent"] < 0.1
    before = float(np.mean(list(dice_per_label(sitk.GetArrayFromImage(moving_labels),
                                               sitk.GetArrayFromImage(fixed_labels), TINY_CARD["labels"]).values())))
    assert scores["guided"] > scores["plain"] + 0.01, scores
    assert scores["guided"] > before + 0.05, (before, scores)


def test_guidance_labels_outside_the_label_table_are_named(tiny_model, shifted_pair):
    moving, moving_labels, fixed, fixed_labels = shifted_pair
    array = sitk.GetArrayFromImage(moving_labels)
    array[array == 1] = 7
    stray = sitk.GetImageFromArray(array)
    stray.CopyInformation(moving_labels)
    with pytest.raises(InputImageError, match=r"values \[7\] that are not in the model's label table"):
        register_and_segment(moving, fixed, tiny_model, device="cpu", affine=False,
                             guide_labels=(stray, fixed_labels))
