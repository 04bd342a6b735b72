"""The label-driven training-data generator, the torch affine pre-alignment and segmentation fusion."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from JointRegSegLib.inference.affine_torch import fit_affine, prealign, warp_with_theta
from JointRegSegLib.data.atlas_sources import SynthSource, intensity_clusters
from JointRegSegLib.data.generator import BrainSynthesizer, SynthesisSettings, random_velocity_ddf, render
from JointRegSegLib.core.geometry import jacobian_determinant, make_grid, voxel_ddf_to_mm
from JointRegSegLib.inference.segfusion import joint_probabilities

from conftest import phantom_array, rotation


def _phantom_source(shape=(40, 48, 40)) -> SynthSource:
    """Nested ellipsoids with blobs: generation labels 1..4, target labels 1..2, and an image."""
    grid = make_grid(shape[::-1], (2.0, 2.0, 2.0), np.eye(3), np.zeros(3))
    from JointRegSegLib.core.geometry import physical_points
    points = physical_points(grid)
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    radius = np.sqrt((x / 34) ** 2 + (y / 40) ** 2 + (z / 32) ** 2)
    generation = np.select([radius < 0.3, radius < 0.55, radius < 0.8, radius < 1.0], [4, 3, 2, 1], 0).astype(np.int32)
    target = np.select([radius < 0.3, (radius < 0.8) & (x > 0)], [1, 2], 0).astype(np.uint8)
    image = phantom_array(points) * (radius < 1.0)
    return SynthSource("phantom", generation, target, image.astype(np.float32), "test phantom", "n/a")


def _quiet_settings(**changes) -> SynthesisSettings:
    """No blur, bias, noise, gamma or crops: image values are a function of the generation label alone."""
    base = dict(blur_voxels=(0.0, 0.0), anisotropy_probability=0.0, bias_strength=0.0, gamma_std=0.0,
                noise_std=(0.0, 0.0), crop_probability=0.0, real_image_probability=0.0)
    base.update(changes)
    return SynthesisSettings(**base)


def test_generator_labels_stay_consistent_with_image():
    source = _phantom_source()
    synthesizer = BrainSynthesizer([source], _quiet_settings(velocity_std_mm=(3.0, 3.0)))
    rng = np.random.default_rng(0)
    for _ in range(3):
        sample = synthesizer.sample(rng, 0)
        image, generation = sample.image[0, 0], sample.generation[0, 0]
        assert (image[generation == 0] == 0).all()
        spreads = [float(image[generation == k].std()) for k in range(1, 5) if (generation == k).sum() > 20]
        means = [float(image[generation == k].mean()) for k in range(1, 5) if (generation == k).sum() > 20]
        assert max(spreads) < 0.12, "each generation label must hold one Gaussian of intensities"
        assert np.ptp(means) > 0.1
        # target labels moved with the image: target 1 is the innermost generation label
        inner = sample.target[0, 0] == 1
        assert inner.sum() > 50
        assert float((generation[inner] == 4).float().mean()) > 0.97


def test_generator_deformations_are_diffeomorphic_and_not_trivial():
    settings = SynthesisSettings(velocity_std_mm=(6.0, 6.0), control_spacing_mm=(16.0, 16.0))
    ddf = random_velocity_ddf((40, 48, 40), np.random.default_rng(3), settings, "cpu")
    grid = make_grid((40, 48, 40), (2.0, 2.0, 2.0), np.eye(3), np.zeros(3))
    ddf_mm = voxel_ddf_to_mm(ddf[0].numpy(), grid)
    magnitude = np.linalg.norm(ddf_mm, axis=-1)
    assert magnitude.max() > 3.0, "the deformation should move the anatomy by millimetres"
    det = jacobian_determinant(ddf_mm, grid)
    assert det.min() > 0, "scaling and squaring of a smooth velocity must not fold"


def test_generator_intensities_vary_between_samples_and_shared_seed_shares_contrast():
    source = _phantom_source()
    synthesizer = BrainSynthesizer([source], _quiet_settings(velocity_std_mm=(0.0, 0.0), rotation_deg=0.0,
                                                            scale=0.0, shear=0.0, shift_fraction=0.0))
    rng = np.random.default_rng(1)
    label_means = lambda s: np.array([float(s.image[s.generation == k].mean()) for k in range(1, 5)])
    a, b = synthesizer.sample(rng, 0), synthesizer.sample(rng, 0)
    assert np.abs(label_means(a) - label_means(b)).max() > 0.05
    c, d = synthesizer.sample(rng, 0, mixture_seed=7), synthesizer.sample(rng, 0, mixture_seed=7)
    assert np.allclose(label_means(c), label_means(d), atol=0.01)


def test_intensity_clusters_split_by_intensity():
    image = np.concatenate([np.full(100, 10.0), np.full(100, 50.0), np.full(100, 90.0)]).reshape(3, 10, 10)
    clusters = intensity_clusters(image, image > 0, k=3)
    assert [int(np.unique(clusters[i])[0]) for i in range(3)] == [1, 2, 3]


def test_render_uses_real_image_when_given():
    generation = torch.ones(1, 1, 8, 8, 8)
    real = torch.linspace(0, 1, 512).view(1, 1, 8, 8, 8)
    out = render(generation, np.random.default_rng(0), _quiet_settings(), real)
    assert torch.corrcoef(torch.stack([out.flatten(), real.flatten()]))[0, 1] > 0.99


def test_torch_affine_recovers_known_affine_in_grid_coordinates():
    source = _phantom_source((48, 56, 48))
    fixed = torch.from_numpy(source.image)[None, None]
    fixed = fixed / fixed.max()
    truth = torch.tensor([[[1.05, -0.12, 0.0, 0.04], [0.12, 1.05, 0.0, -0.03], [0.0, 0.0, 0.95, 0.02]]])
    inverse = torch.linalg.inv(torch.cat([truth[0], torch.tensor([[0, 0, 0, 1.0]])]))[:3][None]
    moving = warp_with_theta(fixed, inverse)
    theta = fit_affine(moving, fixed, schedule=((2, 80), (1, 40)))
    grid_true = torch.nn.functional.affine_grid(truth, list(fixed.shape), align_corners=False)
    grid_fit = torch.nn.functional.affine_grid(theta, list(fixed.shape), align_corners=False)
    # normalised -> mm: half extent = size * spacing / 2 with 2 mm voxels
    error_mm = ((grid_fit - grid_true) * torch.tensor([48.0, 56.0, 48.0])).norm(dim=-1)
    inside = fixed[0, 0] > 0
    assert float(error_mm[0][inside].median()) < 1.0


def test_torch_prealign_recovers_physical_affine_between_oblique_grids():
    """A 10 degree rotation + 6 mm shift between two differently stored phantoms, recovered in mm."""
    from conftest import TINY_CARD, sample_on
    card = {**TINY_CARD, "working_grid": {"size": [48, 48, 48], "spacing": [2.5, 2.5, 2.5]}}
    fixed_grid = make_grid((56, 56, 56), (2.0, 2.0, 2.0), np.eye(3), np.zeros(3))
    moving_grid = make_grid((60, 54, 50), (1.8, 2.1, 2.4), rotation((12, -8, 20)), np.zeros(3))
    truth = sitk.AffineTransform(3)
    truth.SetMatrix(rotation((0, 0, 10)).ravel().tolist())
    truth.SetTranslation((6.0, -3.0, 2.0))
    fixed = sample_on(fixed_grid, phantom_array)
    inverse = truth.GetInverse()
    matrix, offset = np.array(inverse.GetMatrix()).reshape(3, 3), np.array(inverse.GetTranslation())
    moving = sample_on(moving_grid, phantom_array, lambda p: p @ matrix.T + offset)   # moving(y) = phantom(T^-1 y)
    found = prealign(moving, fixed, card)
    from JointRegSegLib.core.geometry import physical_points
    points = physical_points(fixed_grid).reshape(-1, 3)[::97]
    inside = np.linalg.norm(points / np.array([42, 48, 38]), axis=1) < 0.9
    error = [np.linalg.norm(np.array(found.TransformPoint(p)) - np.array(truth.TransformPoint(p)))
             for p in points[inside]]
    assert np.median(error) < 1.5, np.median(error)


class _ShiftNet(torch.nn.Module):
    """Stand-in network: a zero velocity (identity map) and MONAI's warp."""

    def __init__(self):
        super().__init__()
        from monai.networks.blocks import Warp
        from JointRegSegLib.models.networks import VelocityIntegrator
        self.integrator = VelocityIntegrator(7, 2)
        self.warp = Warp(mode="bilinear", padding_mode="border")

    def displacement(self, velocity, shape):
        return self.integrator(velocity, shape)


def test_fusion_beats_either_segmentation_on_constructed_case():
    rng = np.random.default_rng(0)
    truth = torch.zeros(1, 24, 24, 24, dtype=torch.long)
    truth[:, 6:18, 6:18, 6:18] = 1

    def noisy():   # each view wrong in its own random 25 % of voxels, and less sure where wrong
        wrong = torch.from_numpy(rng.random((1, 24, 24, 24)) < 0.25)
        p_truth = torch.where(wrong, 0.4, 0.9)
        p_one = torch.where(truth == 1, p_truth, 1 - p_truth)
        return torch.log(torch.stack([1 - p_one, p_one], dim=1))
    fixed_logits, moving_logits = noisy(), noisy()
    velocity = torch.zeros(1, 3, 12, 12, 12)
    net = _ShiftNet()
    dice = lambda logits: float(2 * ((logits.argmax(1) == 1) & (truth == 1)).sum()
                                / ((logits.argmax(1) == 1).sum() + (truth == 1).sum()))
    p_fixed, p_moving = fixed_logits.exp(), moving_logits.exp()
    network, _ = joint_probabilities(net, velocity, p_fixed, p_moving, (24, 24, 24), "network", False)
    propagated, _ = joint_probabilities(net, velocity, p_fixed, p_moving, (24, 24, 24), "propagation", False)
    fused, _ = joint_probabilities(net, velocity, p_fixed, p_moving, (24, 24, 24), "fusion", True)
    assert dice(fused) > max(dice(network), dice(propagated)) + 0.05


def test_largest_component_removes_speckles():
    logits = torch.full((1, 2, 20, 20, 20), -5.0)
    logits[:, 0] = 0.0
    logits[:, 1, 5:12, 5:12, 5:12] = 5.0      # the structure
    logits[:, 1, 17, 17, 17] = 5.0            # a speckle on the rim
    net = _ShiftNet()
    probabilities = torch.softmax(logits, 1)
    cleaned, _ = joint_probabilities(net, torch.zeros(1, 3, 10, 10, 10), probabilities, probabilities, (20, 20, 20),
                                     "network")
    labels = cleaned.argmax(1)[0]
    assert labels[17, 17, 17] == 0 and labels[8, 8, 8] == 1


def test_same_anatomy_samples_differ_only_by_an_affine():
    """`elastic=False` (the same-anatomy training pairs): the sampling grid is an affine map of the voxel
    grid (zero second differences); with `elastic=True` it is not."""
    synthesizer = BrainSynthesizer([_phantom_source()], _quiet_settings(velocity_std_mm=(4.0, 4.0)))

    def curvature(sample):
        grid = sample.grid[0].double()
        return float((grid[2:] - 2 * grid[1:-1] + grid[:-2]).abs().max())

    rigid = synthesizer.sample(np.random.default_rng(5), 0, elastic=False)
    elastic = synthesizer.sample(np.random.default_rng(5), 0, elastic=True)
    assert curvature(rigid) < 1e-5
    assert curvature(elastic) > 1e-3
    assert not torch.allclose(rigid.grid, elastic.grid)


def test_mirror_permutation_pairs_left_and_right_structures():
    from JointRegSegLib.data.label_table import LABEL_TABLE
    from JointRegSegLib.inference.segfusion import lateral_axis, mirror_permutation
    permutation = mirror_permutation(LABEL_TABLE)
    names = {e["value"]: e["name"] for e in LABEL_TABLE}
    assert permutation[0] == 0
    for value in range(1, 15):
        assert names[permutation[value]].split(" ", 1)[1] == names[value].split(" ", 1)[1]
        assert names[permutation[value]].split(" ")[0] != names[value].split(" ")[0]
    assert mirror_permutation([{"value": 0, "name": "background"}, {"value": 1, "name": "liver"}]) is None
    assert lateral_axis(np.eye(3).ravel()) == 4
    assert lateral_axis(np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]]).ravel()) == 2   # the k axis runs left-right


def test_mirror_averaged_segmentation_of_a_symmetric_image_is_left_right_consistent():
    """A network that favours one side (as a trained one may) gives, mirror-averaged, the same structure
    on both sides of a mirror-symmetric image, labelled left on the left and right on the right."""
    from JointRegSegLib.inference.segfusion import segment_probabilities
    table = [{"value": 0, "name": "background"}, {"value": 1, "name": "left blob"},
             {"value": 2, "name": "right blob"}]
    from JointRegSegLib.inference.segfusion import mirror_permutation

    class Biased(torch.nn.Module):
        def segment(self, image):
            bright = image[:, 0] > 0.5
            x = torch.arange(image.shape[-1]).view(1, 1, 1, -1).expand_as(bright)
            logits = torch.zeros(1, 3, *image.shape[2:])
            logits[:, 0] = 1.0
            logits[:, 1] = torch.where(bright & (x >= image.shape[-1] // 2), 4.0, -4.0)  # finds the left one only
            logits[:, 2] = torch.where(bright & (x < image.shape[-1] // 2), 0.5, -4.0)   # the right one barely
            return logits

    image = torch.zeros(1, 1, 8, 8, 16)
    image[..., 2:6, 2:6, 2:5] = 1.0
    image[..., 2:6, 2:6, 11:14] = 1.0          # the mirror image of the first blob
    labels = segment_probabilities(Biased(), image, mirror_permutation(table), 4).argmax(1)[0]
    assert (labels[2:6, 2:6, 11:14] == 1).all()  # +x is the patient's left (LPS)
    assert (labels[2:6, 2:6, 2:5] == 2).all()
    assert (labels == 1).sum() == (labels == 2).sum()
    plain = Biased().segment(image).argmax(1)[0]
    assert (plain[2:6, 2:6, 2:5] == 0).all()     # without the mirror the weak side is lost


def test_heldout_dataset_never_trains_on_its_validation_anatomy(tmp_path, monkeypatch):
    """`data build --held-out colin27`: training subjects come only from training sources, labelled images
    alternate between the sources that carry label maps, validation subjects are all the held-out anatomy,
    and each written label map lies inside its image's brain."""
    from JointRegSegLib.data import atlas_sources, build_heldout
    from JointRegSegLib.core.geometry import physical_points
    from JointRegSegLib.training.dataset import load_fewshot
    from JointRegSegLib.evaluation.validation import validation_note

    def phantom_on(grid, name, with_target):
        points = physical_points(grid) - np.array(atlas_sources.COMMON_GRID["center_lps"])
        x, y, z = points[..., 0], points[..., 1], points[..., 2]
        radius = np.sqrt((x / 40) ** 2 + (y / 46) ** 2 + (z / 36) ** 2)   # inside the phantom image
        generation = np.select([radius < 0.3, radius < 0.6, radius < 1.0], [3, 2, 1], 0).astype(np.int32)
        target = np.select([radius < 0.3, (radius < 0.8) & (x > 0)], [1, 2], 0).astype(np.uint8)
        image = (phantom_array(points) * (radius < 1.0)).astype(np.float32)
        return SynthSource(name, generation, target if with_target else None, image, "test phantom", "n/a")

    monkeypatch.setattr(atlas_sources, "training_sources", lambda grid: [
        phantom_on(grid, "aal-like", True), phantom_on(grid, "aseg-like", True), phantom_on(grid, "unlabelled", False)])
    colin = phantom_on(build_heldout.study_grid(4.0)[1], "colin", True)
    colin_image = sitk.GetImageFromArray(colin.image)
    colin_image.CopyInformation(build_heldout.study_grid(4.0)[1])
    colin_labels = sitk.GetImageFromArray(colin.target)
    colin_labels.CopyInformation(colin_image)
    monkeypatch.setattr(atlas_sources, "colin27_heldout", lambda: (colin_image, colin_labels))

    folder = build_heldout.build_heldout_dataset(tmp_path / "data", seed=3, n_train=5, n_val=2, n_labelled=2,
                                                 spacing=8.0)
    data = load_fewshot(folder, {"kind": "percentile", "lower": 1.0, "upper": 99.5})
    items = {e["name"]: e for e in data.manifest["items"]}
    assert [items[n]["source"] for n in data.labelled] == ["aal-like", "aseg-like"]
    assert {items[n]["source"] for n in data.train} == {"aal-like", "aseg-like", "unlabelled"}
    assert {items[n]["source"] for n in data.val} == {"colin27"} and len(data.val) == 2
    assert data.manifest["held_out"] == ["colin27"]
    assert list(data.images[data.val[0]].shape[2:]) == data.manifest["working_grid"]["size"][::-1]
    for name, labels in {**data.labels, **data.hidden_labels}.items():
        raw = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / items[name]["image"])))
        assert (labels[0, 0].numpy() > 0).sum() > 20
        # labels follow the image's deformation (the generator's occasional crop blanks a slab of image only)
        assert (raw[labels[0, 0].numpy() > 0] > 0).mean() > 0.8, name
    assert "anatomies held out of training" in validation_note(data, data.manifest["label_table"])


def test_affine_training_target_maps_one_synthetic_subject_onto_another():
    """The learned affine's training target (`true_theta`): two affinely moved copies of one anatomy, the
    moving one warped by it, match the fixed one far better than before, and its mm error metric is 0 for
    itself and the shift size for a pure shift."""
    from JointRegSegLib.inference.affine_torch import warp_with_theta
    from JointRegSegLib.training.strategies.affine import affine_error_mm, true_theta
    synthesizer = BrainSynthesizer([_phantom_source()], _quiet_settings(real_image_probability=1.0))
    rng = np.random.default_rng(5)
    fixed = synthesizer.sample(rng, 0, elastic=False, use_real=True)
    moving = synthesizer.sample(rng, 0, elastic=False, use_real=True)
    theta = true_theta(moving, fixed)
    brain = fixed.generation[0, 0] > 0
    error = lambda image: float((image[0, 0] - fixed.image[0, 0])[brain].abs().mean())  # noqa: E731
    assert error(warp_with_theta(moving.image, theta)) < 0.3 * error(moving.image)
    points = torch.rand(500, 3) * 2 - 1
    half_extent = torch.tensor([40.0, 48.0, 40.0])
    shifted = theta[0].clone()
    shifted[0, 3] += 0.1                                    # 0.1 normalised along x = 4 mm on this grid
    assert float(affine_error_mm(theta[0], theta[0], points, half_extent)) == 0.0
    assert abs(float(affine_error_mm(shifted, theta[0], points, half_extent)) - 4.0) < 1e-4


def test_keypoint_affine_is_identity_for_one_image_and_trainable():
    """The learned affine's keypoint head: the same image twice gives the identity (keypoints match
    themselves), and its output depends differentiably on its heat-map network."""
    from JointRegSegLib.models.networks import KeypointAffine
    torch.manual_seed(0)
    head = KeypointAffine({"pool": 2, "keypoints": 8, "channels": [4, 8], "strides": [2]})
    source = _phantom_source((24, 32, 24))
    image = torch.from_numpy(source.image)[None, None] / source.image.max()
    theta = head(image, image)
    assert torch.allclose(theta, torch.eye(3, 4)[None], atol=1e-4)
    shifted = torch.roll(image, 3, dims=4)
    moved = head(shifted, image)
    moved.sum().backward()
    assert sum(float(p.grad.abs().sum()) for p in head.parameters() if p.grad is not None) > 0


def test_untrained_keypoint_affine_spreads_its_keypoints():
    """An untrained keypoint head must place its keypoints across the image with usable weights: with
    the heat maps' softmax at the logits' raw scale every keypoint sat at the centre, the fit was
    degenerate, and training never left its initial error."""
    from JointRegSegLib.models.networks import KeypointAffine
    torch.manual_seed(0)
    head = KeypointAffine({"pool": 2, "keypoints": 16, "channels": [4, 8], "strides": [2]})
    image = torch.rand(1, 1, 32, 40, 32)
    points, peak = head.locate(image)
    assert float(points.std(dim=1).min()) > 0.1          # normalised coordinates span [-1, 1]
    assert float(peak.min()) > 1e-2


def test_shipped_learned_affine_recovers_a_known_rigid_motion():
    """The default model's learned affine (card kind "learned") on Colin27, a brain held out of its
    training, moved by a known 10 degree rotation and 5 mm shift onto an oblique grid: the learned affine
    alone lands within a few mm, and with the card's short MI polish (what a run uses) within 1 mm."""
    import copy
    from pathlib import Path
    from JointRegSegLib.models.checkpoint import load_model
    from JointRegSegLib.core.geometry import physical_points
    from JointRegSegLib.models.installed import default_model_path
    model = load_model(default_model_path())
    assert model.card["prealignment"]["kind"] == "learned"
    fixed = sitk.ReadImage(str(Path(__file__).resolve().parent.parent / "Resources" / "SampleData" /
                               "colin27_t1_brain_2mm.nii.gz"), sitk.sitkFloat32)
    centre = np.array(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()]))
    truth = sitk.Euler3DTransform(centre.tolist(), *np.radians([6.0, -5.0, 6.0]), (3.0, -3.0, 2.5))
    moving_grid = make_grid((90, 100, 60), (2.0, 2.2, 3.0), rotation((5, 0, -10)), centre)
    moving = sitk.Resample(fixed, moving_grid, truth.GetInverse(), sitk.sitkLinear, 0.0)  # moving(T x) = fixed(x)
    points = physical_points(fixed).reshape(-1, 3)
    points = points[(sitk.GetArrayFromImage(fixed).reshape(-1) > 0)][::53]
    expected = np.array([truth.TransformPoint(p) for p in points])

    def median_error(card):
        found = prealign(moving, fixed, card, network=model.network)
        return float(np.median(np.linalg.norm(np.array([found.TransformPoint(p) for p in points]) - expected, axis=1)))

    motion = float(np.median(np.linalg.norm(expected - points, axis=1)))
    learned_only = copy.deepcopy(model.card)
    learned_only["prealignment"]["schedule"] = []
    assert median_error(learned_only) < min(5.0, motion / 2), motion
    assert median_error(model.card) < 1.0


def test_affine_training_adds_a_learned_affine_and_keeps_the_rest(tmp_path):
    """`train --strategy affine`: the output model carries the learned affine and a card that asks for
    it, every other weight is the input model's bit for bit, and the run-time pre-alignment uses it."""
    import json
    from conftest import TINY_CARD, sample_on
    from JointRegSegLib import new_model, save_model
    from JointRegSegLib.inference.affine_torch import prealign
    from JointRegSegLib.models.checkpoint import load_model
    from JointRegSegLib.training.train import train
    card = {**TINY_CARD, "working_grid": {"size": [40, 48, 40], "spacing": [2.0, 2.0, 2.0],
                                          "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}}
    base = save_model(new_model(card, seed=1), tmp_path / "base.safetensors")
    source = _phantom_source((40, 48, 40))
    data = tmp_path / "sources"
    data.mkdir()
    np.savez_compressed(data / "sources.npz", **{"phantom/generation": source.generation,
                                                  "phantom/target": source.target, "phantom/image": source.image})
    (data / "sources.json").write_text(json.dumps({"grid": "test", "sources": [
        {"name": "phantom", "provenance": "test", "licence": "n/a", "has_target": True, "has_image": True}]}))
    config = {"strategy": "affine", "steps": 3, "batch": 1, "polish_schedule": [[1, 5]],
              "affine": {"kind": "keypoints", "pool": 2, "keypoints": 4, "channels": [4, 8], "strides": [2]}}
    out = train(config, data, tmp_path / "with_affine.safetensors", init=base, device="cpu")
    trained, original = load_model(out), load_model(base)
    assert trained.card["prealignment"]["kind"] == "learned"
    assert trained.card["prealignment"]["schedule"] == [[1, 5]]
    weights = trained.network.state_dict()
    assert any(name.startswith("affine.") for name in weights)
    for name, value in original.network.state_dict().items():
        assert torch.equal(weights[name], value), name
    assert len((tmp_path / "with_affine.log.csv").read_text().splitlines()) == 4
    grid = make_grid((40, 48, 40), (2.0, 2.0, 2.0), np.eye(3), np.zeros(3))
    fixed = sample_on(grid, phantom_array)
    found = prealign(fixed, fixed, trained.card, network=trained.network)
    assert np.allclose(np.array(found.GetMatrix()).reshape(3, 3), np.eye(3), atol=0.05)


def _tiny_synth_config(**changes) -> dict:
    config = {
        "name": "tiny-synth", "strategy": "synth", "seed": 0, "steps": 2, "heldout_metrics": False,
        "architecture": {"name": "unet-pair", "registration": {"channels": [4, 8], "strides": [2]},
                         "segmentation": {"channels": [4, 8], "strides": [2]}, "integration_steps": 3,
                         "velocity_downsample": 2},
        "working_grid": {"size": [40, 48, 40], "spacing": [2.0, 2.0, 2.0], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]},
        "intensity": {"kind": "percentile", "lower": 1.0, "upper": 99.5},
        "train_affine_schedule": [[2, 3]],
        "synthesis": {"blur_voxels": [0.0, 0.0], "anisotropy_probability": 0.0, "bias_strength": 0.0,
                      "gamma_std": 0.0, "noise_std": [0.0, 0.0], "crop_probability": 0.0},
    }
    config.update(changes)
    return config


def _phantom_sources_dir(path):
    import json
    source = _phantom_source()
    path.mkdir()
    np.savez_compressed(path / "sources.npz", **{"phantom/generation": source.generation,
                                                  "phantom/target": source.target, "phantom/image": source.image})
    (path / "sources.json").write_text(json.dumps({"grid": {"size": [40, 48, 40], "spacing": [2.0] * 3,
                                                            "center_lps": [0.0, 0.0, 0.0]},
                                                   "sources": [{"name": "phantom", "provenance": "test",
                                                                "licence": "n/a", "has_target": True,
                                                                "has_image": True}]}))
    return path


def test_synthetic_training_trains_the_inference_cascade(tmp_path):
    """`train_passes` 2 trains the two-pass cascade inference runs (other weights than one pass from the
    same seed and pairs); 0 passes is refused by name."""
    import pytest
    from JointRegSegLib.models.checkpoint import load_model
    from JointRegSegLib.training.train import train
    data = _phantom_sources_dir(tmp_path / "data")
    weights = {}
    for passes in (1, 2):
        config = _tiny_synth_config(train_passes=passes, weights={"flow": 0.25})
        out = train(config, data, tmp_path / f"p{passes}.safetensors")
        weights[passes] = load_model(out).network.state_dict()
        log = (tmp_path / f"p{passes}.log.csv").read_text().splitlines()
        assert len(log) == 3 and all('""flow""' in row for row in log[1:])   # header + 2 steps, each supervised
    changed = [k for k in weights[1] if "registration" in k and not torch.equal(weights[1][k], weights[2][k])]
    assert changed
    with pytest.raises(ValueError, match="train_passes 0"):
        train(_tiny_synth_config(train_passes=0), data, tmp_path / "p0.safetensors")
    with pytest.raises(ValueError, match="flow_pairs 'some'"):
        train(_tiny_synth_config(flow_pairs="some"), data, tmp_path / "pf.safetensors")


def test_flow_term_measures_the_true_mapping_error_in_mm():
    """The supervised flow term is 0 for the generator's true mapping and the shift's length in mm for
    none: the moving subject sits 3 mm (along x) further in its source than the fixed one."""
    from types import SimpleNamespace
    import torch.nn.functional as F
    from JointRegSegLib.training.strategies.synth import flow_error_mm
    shape = (20, 24, 16)                                         # z, y, x; source spacing 2 mm
    identity = F.affine_grid(torch.eye(3, 4)[None], [1, 1, *shape], align_corners=False)
    shift = torch.tensor([3.0 / (shape[2] * 2.0 / 2), 0.0, 0.0])  # 3 mm along x, normalised
    generation = torch.zeros((1, 1, *shape), dtype=torch.long)
    generation[:, :, 4:16, 6:18, 4:12] = 1
    fixed = SimpleNamespace(grid=identity, generation=generation)
    moving = SimpleNamespace(grid=identity + shift)
    theta = torch.eye(3, 4)[None]
    half = [n // 2 for n in shape]
    none = torch.zeros((1, 3, *half))
    assert float(flow_error_mm(fixed, moving, theta, none, 2, 2.0)) == pytest.approx(3.0, abs=1e-4)
    # the right answer: sample the moving image 3 mm (1.5 voxels of 2 mm, 0.75 of the 4 mm half grid) back
    truth = none.clone()
    truth[:, 2] = -0.75
    assert float(flow_error_mm(fixed, moving, theta, truth, 2, 2.0)) == pytest.approx(0.0, abs=1e-4)
    wrong = none.clone()
    wrong[:, 2] = 0.75
    assert float(flow_error_mm(fixed, moving, theta, wrong, 2, 2.0)) == pytest.approx(6.0, abs=1e-4)
