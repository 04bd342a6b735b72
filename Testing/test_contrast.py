"""One contrast for the registration (inference/contrast.py): a T2- or PD-like brain is mapped into the T1
brain's contrast from the network's own segmentations; two images of one contrast are left as they are."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from JointRegSegLib.core.errors import CheckpointError
from JointRegSegLib.inference.brainmask import BrainLocation
from JointRegSegLib.inference.contrast import contrast_map

# channels of the default label table: white matter, cortex, lateral ventricle, thalamus
CHANNELS = {"white": 15, "cortex": 17, "ventricle": 19, "thalamus": 7}
T1 = {"white": 1000.0, "cortex": 550.0, "ventricle": 120.0, "thalamus": 800.0}
T2 = {"white": 300.0, "cortex": 550.0, "ventricle": 1000.0, "thalamus": 400.0}
T1_LIKE = np.zeros(29)
for tissue, channel in CHANNELS.items():
    T1_LIKE[channel] = T1[tissue] / 1000


def _location(intensities: dict, scale: float = 1.0, seed: int = 0) -> BrainLocation:
    """A brain of nested shells (ventricle, thalamus, white matter, cortex) on a 2 mm grid, its network
    probabilities soft (0.85 on the true tissue) and its intensities noisy."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(32) - 16.0,) * 3, indexing="ij")
    radius = np.sqrt(z ** 2 + y ** 2 + x ** 2)
    tissue = np.select([radius < 4, radius < 7, radius < 11, radius < 14], ["ventricle", "thalamus", "white", "cortex"],
                       "")
    probabilities = np.full((29,) + radius.shape, 0.15 / 28, np.float32)
    image = np.zeros(radius.shape, np.float32)
    for name, channel in CHANNELS.items():
        probabilities[channel][tissue == name] = 0.85
        image[tissue == name] = intensities[name] * scale
    probabilities[0][tissue == ""] = 0.85
    image = np.where(tissue != "", image + rng.normal(0, 20 * scale, image.shape), 0).astype(np.float32)
    grid = sitk.GetImageFromArray(image)
    grid.SetSpacing((2.0, 2.0, 2.0))
    return BrainLocation(grid, grid, torch.from_numpy(probabilities)[None], tissue != "", 0.0)


def _mean_of(image: sitk.Image, location: BrainLocation, tissue: str) -> float:
    probabilities = location.probabilities[0, CHANNELS[tissue]].numpy()
    return float(sitk.GetArrayViewFromImage(image)[probabilities > 0.5].mean())


def test_a_t2_like_moving_brain_is_mapped_into_the_t1_fixed_brains_contrast():
    moving, fixed = _location(T2, seed=1), _location(T1, scale=3.0, seed=2)
    mapping = contrast_map(moving, fixed, T1_LIKE)
    assert mapping.agreement < 0 and mapping.applies
    assert mapping.mapped_role == "moving"
    assert mapping.record()["mapped"] == "moving image mapped into the fixed image's contrast"
    mapped = mapping.apply(moving.image)
    for tissue in CHANNELS:   # each tissue lands within 5 % of the fixed brain's intensity for it
        assert _mean_of(mapped, moving, tissue) == pytest.approx(T1[tissue] * 3.0, rel=0.05), tissue
    # outside the brain: the fixed image's background
    assert float(sitk.GetArrayViewFromImage(mapped)[0, 0, 0]) == pytest.approx(0.0, abs=1e-3)


def test_when_the_fixed_brain_is_the_t2_like_one_it_is_the_one_mapped():
    mapping = contrast_map(_location(T1), _location(T2), T1_LIKE)
    assert mapping.applies and mapping.mapped_role == "fixed"
    assert mapping.t1_likeness["moving"] > 0.9 > mapping.t1_likeness["fixed"]


def test_two_brains_of_one_contrast_are_left_as_they_are():
    mapping = contrast_map(_location(T1, seed=1), _location(T1, scale=0.2, seed=2), T1_LIKE)
    assert mapping.agreement > 0.95 and not mapping.applies and mapping.record()["mapped"] is None


def test_an_empty_brain_gives_no_map():
    empty = _location(T1)
    empty.mask[:] = False
    assert contrast_map(empty, _location(T1), T1_LIKE) is None


@pytest.fixture(scope="module")
def default_run_pair():
    from JointRegSegLib.io.imageio import read_image
    from JointRegSegLib.models.installed import default_model_path
    samples = Path(__file__).resolve().parents[1] / "Resources" / "SampleData"
    return (read_image(samples / "colin27_t1_brain_2mm.nii.gz", "moving"),
            read_image(samples / "itk_subject_t1_brain.nii.gz", "fixed"), default_model_path())


def _t2_like(image: sitk.Image) -> sitk.Image:
    array = sitk.GetArrayFromImage(image)
    inside = array > 0
    low, mid, high = np.percentile(array[inside], [5, 40, 95])
    out = sitk.GetImageFromArray(np.where(inside, np.interp(array, [low, mid, high], [1000, 550, 300]), 0)
                                 .astype(np.float32))
    out.CopyInformation(image)
    return out


def test_the_default_model_registers_a_t2_like_brain_in_the_t1_brains_contrast_and_says_so(default_run_pair):
    from JointRegSegLib.inference.pipeline import register_and_segment
    moving, fixed, model = default_run_pair
    t1 = register_and_segment(moving, fixed, model, device="cpu")
    assert t1.qc["contrast"]["mapped"] is None
    t2 = register_and_segment(_t2_like(moving), fixed, model, device="cpu")
    assert t2.qc["contrast"]["mapped"] == "moving image mapped into the fixed image's contrast"
    assert t2.qc["contrast"]["tissue_contrast_agreement"] < 0.5
    assert t2.qc["registration_status"] == "ok"
    from JointRegSegLib.io.report import self_check_lines
    assert any("the registration saw the moving image mapped into the fixed image's contrast" in line
               for line in self_check_lines(t2))
    # the warped T2-like labels land where the T1 run puts them (Dice of the two warped segmentations)
    a, b = (sitk.GetArrayFromImage(r.warped_moving_segmentation) > 0 for r in (t1, t2))
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.9


def test_an_unknown_registration_input_is_refused_by_name(default_run_pair):
    from JointRegSegLib.inference.pipeline import register_and_segment
    from JointRegSegLib.models.checkpoint import load_model
    moving, fixed, model = default_run_pair
    odd = load_model(model)
    odd.card["registration_input"] = "t1-only"
    with pytest.raises(CheckpointError, match="registration_input 't1-only'"):
        register_and_segment(moving, fixed, odd, device="cpu")
