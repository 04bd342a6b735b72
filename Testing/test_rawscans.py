"""Raw scans in (issue 28): head synthesis, partial-label training, the self-check and its rescue."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from JointRegSegLib.inference import selfcheck
from JointRegSegLib.data.head_layers import HEAD_LABEL_BASE, HeadSettings, add_head, random_cut
from JointRegSegLib.training.partial_labels import partial_label_loss


def _ball_brain(shape=(40, 48, 40), radius=12.0):
    z, y, x = np.meshgrid(*(np.arange(n) - n / 2 for n in shape), indexing="ij")
    brain = np.sqrt(z ** 2 + y ** 2 + x ** 2) < radius
    generation = np.where(brain, 1 + (x > 0), 0)
    from scipy.ndimage import distance_transform_edt
    distance = distance_transform_edt(~brain, sampling=2.0).astype(np.float32)
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a))[None, None]
    return as_t(generation).long(), as_t(brain), as_t(distance)


@pytest.mark.parametrize("seed", range(5))
def test_head_layers_surround_the_brain_and_never_cover_it(seed):
    generation, brain, distance = _ball_brain()
    rng = np.random.default_rng(seed)
    settings = HeadSettings(neck_probability=1.0, eye_probability=1.0)
    head = add_head(generation, brain, distance, rng, settings, 2.0, (0.0, 0.0, 0.0))
    assert torch.equal(head[brain], generation[brain])                     # the brain is untouched
    layers = head[~brain]
    assert (layers[layers > 0] >= HEAD_LABEL_BASE).all()                   # everything added is a head label
    shell = (~brain) & (distance <= 4.0)
    assert (head[shell] >= HEAD_LABEL_BASE).float().mean() > 0.9          # a skull/CSF shell hugs the brain
    far = (~brain) & (distance > 34)
    assert far.any() and (head[far] == 0).float().mean() > 0.3            # air far away


def test_field_of_view_cut_removes_image_labels_and_brain_together():
    rng = np.random.default_rng(3)
    keep = None
    while keep is None:
        keep = random_cut((20, 24, 20), rng, HeadSettings(cut_probability=1.0, cut_depth_fraction=(0.3, 0.3)), "cpu")
    assert keep.shape == (1, 1, 20, 24, 20) and 0 < keep.float().mean() < 1


def test_the_training_brain_leaves_out_the_csf_under_the_skull_and_keeps_the_ventricles():
    # a template's mask (radius 30 mm) around tissue (radius 26 mm, bright) with a ventricle (dark, 8 mm,
    # in the middle) and a dark 4 mm CSF layer between tissue and mask surface, on a 2 mm grid
    from JointRegSegLib.data.wholebrain_sources import tissue_brain
    z, y, x = np.mgrid[:40, :40, :40]
    radius_mm = 2.0 * np.sqrt((z - 19.5) ** 2 + (y - 19.5) ** 2 + (x - 19.5) ** 2)
    within = radius_mm <= 30
    image = np.where(radius_mm <= 26, 100.0, 20.0)
    image[radius_mm <= 8] = 15.0                      # ventricle
    image[(radius_mm > 14) & (radius_mm <= 18)] = 60.0  # grey matter between
    image[~within] = 0.0
    brain = tissue_brain(image, within, 2.0)
    assert brain[radius_mm <= 25].all()                          # tissue and the ventricle inside it
    assert not brain[(radius_mm > 27.5) & within].any()          # the CSF layer under the mask's surface
    # a label map's tissue always counts as brain
    labelled = (radius_mm > 27.5) & within & (x < 10)
    assert tissue_brain(image, within, 2.0, labelled=labelled)[labelled].all()


def _logits(prediction: torch.Tensor, classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(prediction, classes).permute(3, 0, 1, 2)[None].float() * 8.0


def test_partial_labels_do_not_teach_background_for_a_missing_structure():
    # a source that labels only class 1: inside its brain, class 2 voxels are unlabelled (target 0)
    shape, classes = (8, 8, 8), 4
    target = torch.zeros((1, 1, *shape), dtype=torch.long)
    target[..., 2:4, 2:6, 2:6] = 1
    brain = torch.zeros((1, 1, *shape), dtype=torch.bool)
    brain[..., 1:7, 1:7, 1:7] = True
    structure_two = brain[0, 0] & (target[0, 0] == 0)
    truth = torch.where(brain[0, 0], torch.where(target[0, 0] == 1, 1, 2), 0)
    right = partial_label_loss(_logits(truth, classes), target, brain, known=(1,))
    as_three = partial_label_loss(_logits(torch.where(structure_two, 3, truth), classes), target, brain, known=(1,))
    as_background = partial_label_loss(_logits(torch.where(structure_two, 0, truth), classes), target, brain, known=(1,))
    as_one = partial_label_loss(_logits(torch.where(structure_two, 1, truth), classes), target, brain, known=(1,))
    assert right == pytest.approx(float(as_three), abs=1e-5)   # any structure the source does not define is fine
    assert as_background > right + 1.0                         # but background inside the brain is not
    assert as_one > right + 1.0                                # nor the structure it does define
    # the gradient at an unlabelled brain voxel never favours background
    logits = torch.zeros((1, classes, *shape), requires_grad=True)
    partial_label_loss(logits, target, brain, known=(1,)).backward()
    assert (logits.grad[0, 0][structure_two] > 0).all()        # descent lowers background there
    assert (logits.grad[0, 2][structure_two] < 0).all() and (logits.grad[0, 3][structure_two] < 0).all()


def test_a_fully_labelled_source_is_plain_supervision():
    shape, classes = (6, 6, 6), 3
    target = torch.randint(0, classes, (1, 1, *shape))
    brain = target > 0
    good = partial_label_loss(_logits(target[0, 0], classes), target, brain, known=(1, 2))
    swapped = partial_label_loss(_logits(torch.where(target[0, 0] > 0, 3 - target[0, 0], 0), classes), target, brain,
                                 known=(1, 2))
    assert swapped > good + 1.0


def _probabilities(labels: np.ndarray, classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.from_numpy(labels).long(), classes).permute(3, 0, 1, 2)[None].float()


def test_self_check_flags_disagreement_and_passes_agreement():
    table = [{"value": 0, "name": "background"}, {"value": 1, "name": "a"}, {"value": 2, "name": "b"}]
    labels = np.zeros((20, 20, 20), np.int64)
    labels[4:10, 4:16, 4:16], labels[10:16, 4:16, 4:16] = 1, 2
    same = selfcheck.agreement(_probabilities(labels, 3), _probabilities(labels, 3), table)
    assert selfcheck.status(selfcheck.summary(same), 0.5) == "ok" and selfcheck.summary(same) == 1.0
    shifted = selfcheck.agreement(_probabilities(labels, 3), _probabilities(np.roll(labels, 7, axis=0), 3), table)
    assert selfcheck.summary(shifted) < 0.5 and selfcheck.status(selfcheck.summary(shifted), 0.5) == "check"
    assert selfcheck.status(None, 0.5) == "check"   # nothing found to agree on is not a success


@pytest.fixture(scope="module")
def sample_pair():
    from JointRegSegLib.io.imageio import read_image
    from JointRegSegLib.models.installed import default_model_path
    from pathlib import Path
    samples = Path(__file__).resolve().parents[1] / "Resources" / "SampleData"
    return (read_image(samples / "colin27_t1_brain_2mm.nii.gz", "moving"),
            read_image(samples / "itk_subject_t1_brain.nii.gz", "fixed"), default_model_path())


def _shifted(image: sitk.Image, mm) -> sitk.Image:
    out = sitk.Image(image)
    out.SetOrigin([o + s for o, s in zip(image.GetOrigin(), mm)])
    return out


def test_a_failed_registration_is_flagged_and_leaves_the_fixed_segmentation_the_networks_own(sample_pair):
    from JointRegSegLib.inference.pipeline import register_and_segment
    moving, fixed, model = sample_pair
    good = register_and_segment(moving, fixed, model, device="cpu")
    assert good.qc["registration_status"] == "ok" and good.qc["agreement_mean"] >= good.qc["agreement_threshold"]
    assert not [w for w in good.qc["warnings"] if "registration needs checking" in w]
    failed = register_and_segment(_shifted(moving, (0.0, 60.0, 0.0)), fixed, model, device="cpu", affine=False)
    assert failed.qc["registration_status"] == "check"
    assert any("registration needs checking" in w for w in failed.qc["warnings"])
    network_only = register_and_segment(_shifted(moving, (0.0, 60.0, 0.0)), fixed, model, device="cpu", affine=False,
                                        segmentation_mode="network")
    # the failed registration never reached the fixed segmentation: it is the network's own, voxel for voxel
    assert np.array_equal(sitk.GetArrayFromImage(failed.fixed_segmentation),
                          sitk.GetArrayFromImage(network_only.fixed_segmentation))
    assert failed.qc["segmentation_mode"] == "network"


def test_the_rescue_tries_the_other_affine_and_says_so(sample_pair):
    from JointRegSegLib.inference.pipeline import register_and_segment
    moving, fixed, model = sample_pair
    from JointRegSegLib.models.checkpoint import load_model
    strict = load_model(model)
    strict.card["self_check"] = {"threshold": 0.99}   # nothing passes: every rescue is tried, the best kept
    result = register_and_segment(moving, fixed, strict, device="cpu")
    attempts = result.qc["registration_attempts"]
    assert [a["affine_method"] for a in attempts] == ["torch", "classical"]
    assert result.qc["registration_status"] == "check"
    best = max(a["agreement_mean"] for a in attempts)
    assert result.qc["agreement_mean"] == best


def test_qc_picture_tells_left_from_right_by_hue_and_marks_det_j_below_one():
    import colorsys
    from JointRegSegLib.data.label_table import LABEL_TABLE, WHOLE_BRAIN_TABLE
    from JointRegSegLib.io.report import _det_ticks, side_distinct_colours
    for table in (LABEL_TABLE, WHOLE_BRAIN_TABLE):
        shown = {e["name"]: e["color"] for e in side_distinct_colours(table)}
        for name, colour in shown.items():
            if name.startswith("left ") and "right " + name[5:] in shown:
                left_hue = colorsys.rgb_to_hls(*colour)[0]
                right_hue = colorsys.rgb_to_hls(*shown["right " + name[5:]])[0]
                assert min(abs(left_hue - right_hue), 1 - abs(left_hue - right_hue)) > 0.05, name
    ticks = _det_ticks(0.62, 1.55)
    assert any(t < 1.0 for t in ticks if t > 0.62) and 1.0 in ticks


def test_the_card_licence_is_checked_and_shown(tmp_path):
    from JointRegSegLib.models.card import licence_text, validate_card
    from JointRegSegLib.models.checkpoint import load_model
    from JointRegSegLib.core.errors import CheckpointError
    from JointRegSegLib.models.installed import default_model_path
    card = load_model(default_model_path()).card
    assert licence_text(card), "the shipped default model must say under which licence its weights travel"
    broken = dict(card, licence={"note": "no weights entry"})
    with pytest.raises(CheckpointError, match="licence"):
        validate_card(broken)
    assert licence_text({"licence": {"weights": "CC-BY-NC-4.0", "note": "x"}}) == "CC-BY-NC-4.0 (x)"


def test_a_cache_of_sources_drawn_under_an_older_brain_convention_is_built_again(tmp_path, monkeypatch):
    import json
    from JointRegSegLib.data import source_cache, wholebrain_sources
    built = []

    def tiny_sources():
        built.append(1)
        generation = np.zeros((4, 4, 4), np.int32)
        generation[1:3, 1:3, 1:3] = 1
        return [wholebrain_sources.PartialSource("tiny", generation, generation.astype(np.uint8), None, "test", "none",
                                                 brain=generation > 0)]
    monkeypatch.setattr(wholebrain_sources, "training_sources", tiny_sources)
    source_cache.load_sources(tmp_path, "whole-brain")
    source_cache.load_sources(tmp_path, "whole-brain")
    assert len(built) == 1                                              # a current cache is reused
    meta = json.loads((tmp_path / "sources.json").read_text())
    meta.pop("brain")                                                   # as written before the convention
    (tmp_path / "sources.json").write_text(json.dumps(meta))
    sources, meta = source_cache.load_sources(tmp_path, "whole-brain")
    assert len(built) == 2 and meta["brain"] == wholebrain_sources.BRAIN_CONVENTION
    assert sources[0].brain.sum() == 8
