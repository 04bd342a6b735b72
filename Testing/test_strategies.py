"""One test per mechanism of the five seed methods (issue 12), each on tiny synthetic volumes: it fails if
the mechanism is removed or altered. Data: `strategy_data.few_shot` (textured core/shell phantoms)."""
import math
import random

import numpy as np
import pytest
import torch
from strategy_data import config, few_shot, phantom, tiny_pair

from JointRegSegLib.training.strategies import BRBS, DeepAtlas, DeepRS, PCRegRT
from JointRegSegLib.training.strategies.base import soft_cross_entropy


def smooth_velocity(shape, amplitude=1.5, seed=0):
    """A smooth random low-resolution velocity (voxels of that grid), (1, 3, *shape)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, 3, 3, 3, generator=g)
    return amplitude * torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def fixed_velocities(net, data, table: dict, shape):
    """Make `net.velocity(m, f)` return table[(m, f)] (by image identity), zero for pairs not listed."""
    by_id = {id(image): name for name, image in data.images.items()}

    def velocity(moving, fixed):
        key = (by_id[id(moving)], by_id[id(fixed)])
        return table.get(key, torch.zeros(1, 3, *shape))
    net.velocity = velocity


def grads(module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


# --- DeepAtlas ---------------------------------------------------------------------------------------
def test_deepatlas_anatomy_loss_only_on_labelled_pairs():
    data = few_shot(5, labelled=(0, 1))
    s = DeepAtlas(config(), tiny_pair(), data)
    # two unlabelled images: never an anatomy term, even with predicted segmentations
    assert "anatomy" not in s.registration("s2", "s3", use_predicted=True)
    # one labelled image: the anatomy term, the other segmentation predicted (joint phase only)
    assert "anatomy" in s.registration("s0", "s3", use_predicted=True)
    assert "anatomy" in s.registration("s3", "s0", use_predicted=True)
    assert "anatomy" not in s.registration("s0", "s3", use_predicted=False)
    # the mono-network pretraining: only when both are labelled
    assert "anatomy" in s.registration("s0", "s1", use_predicted=False)
    # joint registration and segmentation updates never draw two unlabelled images; both orders occur
    seen = []
    s.registration = lambda m, f, p: seen.append(("reg", m, f)) or {}
    s.segmentation = lambda m, f: seen.append(("seg", m, f)) or {}
    rng = random.Random(0)
    for index in range(60):
        for _, _, compute in s.updates("joint", index, rng):
            compute()
    assert all(m in data.labels or f in data.labels for _, m, f in seen)
    assert any(m in data.labels for _, m, f in seen if f not in data.labels)
    assert any(f in data.labels for _, m, f in seen if m not in data.labels)
    with pytest.raises(ValueError, match="two unlabelled"):
        DeepAtlas.segmentation(s, "s2", "s3")


def test_deepatlas_segmentation_step_both_directions():
    data = few_shot(4)
    net = tiny_pair()
    s = DeepAtlas(config(weights={"supervised": 0.0}), net, data)  # the anatomy term alone
    fixed_velocities(net, data, {("s0", "s2"): smooth_velocity((12, 12, 12)),
                                 ("s2", "s0"): smooth_velocity((12, 12, 12), seed=1)}, (12, 12, 12))
    for moving, fixed in (("s0", "s2"), ("s2", "s0")):
        net.zero_grad()
        terms = s.segmentation(moving, fixed)
        assert "anatomy" in terms
        terms["loss"].backward()
        assert grads(net.segmentation) > 0, (moving, fixed)
    # labelled target: S(moving) warped onto it must match its manual labels
    ddf = net.displacement(net.velocity(data.images["s2"], data.images["s0"]), (24, 24, 24))
    predicted = torch.softmax(net.segment(data.images["s2"]), 1)
    expected = s.dice(net.warp(predicted, ddf), s.onehot("s0"))
    assert torch.allclose(s.segmentation("s2", "s0")["anatomy"], expected)


def test_deepatlas_bending_energy_option():
    data = few_shot(3)
    s = DeepAtlas(config(regulariser="bending"), tiny_pair(), data)
    axes = torch.meshgrid(*[torch.arange(16.0)] * 3, indexing="ij")
    linear = torch.stack([0.1 * axes[0], 0.05 * axes[1], 0 * axes[2]])[None]
    quadratic = torch.stack([0.01 * axes[0] ** 2, 0 * axes[1], 0 * axes[2]])[None]
    assert float(s.smooth(linear)) < 1e-10 < float(s.smooth(quadratic))
    assert float(DeepAtlas(config(), tiny_pair(), data).smooth(linear)) > 1e-4  # diffusion does penalise it


# --- DeepRS ------------------------------------------------------------------------------------------
def test_deeprs_structure_sampling_scales_deformation():
    data = few_shot(4)
    net = tiny_pair()
    s = DeepRS(config(), net, data)
    fixed_velocities(net, data, {("s0", "s2"): smooth_velocity((12, 12, 12))}, (12, 12, 12))
    full = s.field("s0", "s2")
    image0, labels0 = s.structure_sample("s0", "s2", 0.0)
    assert torch.allclose(image0, data.images["s0"], atol=1e-5)
    assert torch.allclose(labels0, s.onehot("s0"), atol=1e-5)
    image1, labels1 = s.structure_sample("s0", "s2", 1.0)
    assert torch.allclose(image1, net.warp(data.images["s0"], full), atol=1e-6)
    assert torch.allclose(labels1, net.warp(s.onehot("s0"), full), atol=1e-6)
    ratio = float(s.field("s0", "s2", 0.5).abs().mean() / full.abs().mean())
    assert 0.4 < ratio < 0.6, ratio
    # each segmentation update draws its own alpha ~ U[0, 1]
    alphas = []
    s.segmentation = lambda m, f, alpha, use_acm: alphas.append(alpha) or {}
    rng = random.Random(0)
    for index in range(40):
        for key, _, compute in s.updates("joint", index, rng):
            if key == "seg":
                compute()
    assert len(set(alphas)) == 40 and min(alphas) < 0.15 and max(alphas) > 0.85 and 0 <= min(alphas)


def test_deeprs_discriminator_learns():
    data = few_shot(5, size=16)
    s = DeepRS(config(lr={**config()["lr"], "disc": 1e-3}), tiny_pair(), data)
    optimiser = s.optimizers()["disc"]
    assert isinstance(optimiser, torch.optim.RMSprop)
    rng, losses, last = random.Random(0), [], {}
    for _ in range(80):
        optimiser.zero_grad()
        last = s.discriminate(*s.pair(rng, True))
        last["loss"].backward()
        optimiser.step()
        losses.append(float(last["loss"].detach()))
    assert abs(losses[0] - math.log(4)) < 0.05            # starts at chance
    assert np.mean(losses[-10:]) < 0.85 * math.log(4)     # and leaves it
    assert float(last["d_real"]) > float(last["d_fake"]) + 0.1
    # the joint phase and registration pretraining both update it
    keys = {k for phase in ("reg_pretrain", "joint") for k, _, _ in s.updates(phase, 0, rng)}
    assert "disc" in keys


def test_deeprs_region_constraint():
    data = few_shot(4)
    net = tiny_pair()
    s = DeepRS(config(weights={"adv": 0.0, "cc": 0.0, "R": 0.0}), net, data)  # DRC alone
    same = data.images["s2"]
    assert float(s.region_constraint(same, same)) == 0.0
    assert float(s.region_constraint(data.images["s0"], same)) > 0.0
    terms = s.registration("s0", "s2")
    assert torch.allclose(terms["loss"], 10.0 * terms["drc"])  # the paper's weight 10
    net.zero_grad()
    terms["loss"].backward()
    assert grads(net.registration) > 0  # it pulls the registration
    # every channel on its own: swapping the two structures' probabilities is a violation even though
    # the foreground is unchanged
    probabilities = torch.softmax(net.segment(same), 1)
    swapped = probabilities[:, [0, 2, 1]]
    s.net.segment = lambda image: torch.log(probabilities if image is same else swapped)
    assert float(s.region_constraint(data.images["s0"], same)) > 1e-4


# --- BRBS --------------------------------------------------------------------------------------------
def test_brbs_inverse_consistency():
    data = few_shot(4)
    net = tiny_pair()
    s = BRBS(config(), net, data)
    v = smooth_velocity((12, 12, 12), amplitude=1.0)
    fixed_velocities(net, data, {("s0", "s2"): v, ("s2", "s0"): -v}, (12, 12, 12))
    consistent = s.registration("s0", "s2", False)
    fixed_velocities(net, data, {("s0", "s2"): v, ("s2", "s0"): v}, (12, 12, 12))
    inconsistent = s.registration("s0", "s2", False)
    assert float(consistent["inverse"]) < 0.05 * float(inconsistent["inverse"])
    # the network runs both ways: B -> A similarity is part of the loss
    image_a, image_b = data.images["s0"], data.images["s2"]
    forward, backward = s.field("s0", "s2"), s.field("s2", "s0")
    both = s.similarity(net.warp(image_a, forward), image_b) + s.similarity(net.warp(image_b, backward), image_a)
    assert torch.allclose(inconsistent["similarity"], both)


def test_brbs_semantic_consistency_weight():
    data = few_shot(4, labelled=(0, 1))
    s = BRBS(config(), tiny_pair(), data)
    assert s.w["sec"] == 100.0 and s.w["inverse"] == 0.1 and s.w["mmr"] == 0.01
    terms = s.registration("s0", "s1", False)
    expected = terms["similarity"] + terms["smooth"] + 0.1 * terms["inverse"] + 100.0 * terms["sec"]
    assert torch.allclose(terms["loss"], expected)
    # predicted segmentations stand in once segmentation is trained, for two unlabelled images too
    assert "sec" in s.registration("s2", "s3", True) and "sec" not in s.registration("s2", "s3", False)
    # pairs: two unlabelled images about a third of the time, else a labelled one, either order
    rng = random.Random(0)
    pairs = [s.registration_pair(rng) for _ in range(300)]
    unlabelled = sum(m not in data.labels and f not in data.labels for m, f in pairs) / len(pairs)
    assert 0.25 < unlabelled < 0.42


def test_brbs_s3p_style_and_space_from_two_images():
    data = few_shot(5)
    net = tiny_pair()
    s = BRBS(config(), net, data)
    rng = random.Random(0)
    draws = [s.s3p_draw(rng) for _ in range(400)]
    assert all(d[0] in data.labels and d[1] != d[2] and d[0] not in d[1:3] for d in draws)
    coefficients = np.array([d[3:] for d in draws])
    assert ((coefficients >= 0) & (coefficients <= 1)).all()
    # Beta(0.3, 0.3) is U-shaped: 56.5 % of draws within 0.1 of 0 or 1 (uniform: 20 %)
    assert 0.49 < float(((coefficients < 0.1) | (coefficients > 0.9)).mean()) < 0.64
    v = smooth_velocity((12, 12, 12))
    fixed_velocities(net, data, {("s0", "s3"): v}, (12, 12, 12))  # L -> space image; style map is identity
    image_l, style_image = data.images["s0"], data.images["s2"]
    # beta = 1, alpha = 0: the style image's appearance on L's anatomy (identity registration here), L's labels
    new_image, new_labels, _ = s.space_style_sample("s0", "s2", "s3", 0.0, 1.0)
    assert torch.allclose(new_image, style_image, atol=1e-5) and torch.allclose(new_labels, s.onehot("s0"), atol=1e-5)
    # beta = 0, alpha = 1: L's own appearance in the space image's geometry, labels by the same map
    space = net.displacement(v, (24, 24, 24))
    new_image, new_labels, _ = s.space_style_sample("s0", "s2", "s3", 1.0, 0.0)
    assert torch.allclose(new_image, net.warp(image_l, space), atol=1e-5)
    assert torch.allclose(new_labels, net.warp(s.onehot("s0"), space), atol=1e-5)
    # the space comes from the space image only: another style image does not move anything
    other_style = s.space_style_sample("s0", "s4", "s3", 1.0, 0.0)[1]
    assert torch.allclose(other_style, new_labels)


def test_brbs_mixup_regularisation():
    data = few_shot(4)
    net = tiny_pair()
    s = BRBS(config(), net, data)
    x_a, x_b = data.images["s1"], data.images["s2"]
    assert float(s.mix_misalignment(x_a, x_b, 0.3)) > 0  # a non-linear segmentation net is penalised
    linear = torch.nn.Conv3d(1, 3, 3, padding=1)
    real_segment, net.segment = net.segment, lambda image: linear(image)
    assert float(s.mix_misalignment(x_a, x_b, 0.3)) < 1e-10  # ... a linear one is not
    net.segment = real_segment
    # the update mixes (style image registered onto L, moved to U2's space) with U2 itself
    seen = []
    s.mix_misalignment = lambda a, b, gamma: seen.append((a, b, gamma)) or torch.zeros(())
    v = smooth_velocity((12, 12, 12))
    fixed_velocities(net, data, {("s0", "s2"): v}, (12, 12, 12))
    terms = s.segmentation("s0", "s1", "s2", 0.5, 0.5, 0.25)
    a, b, gamma = seen[0]
    assert b is data.images["s2"] and gamma == 0.25
    assert torch.allclose(a, net.warp(data.images["s1"], net.displacement(v, (24, 24, 24))), atol=1e-5)
    assert "mmr" in terms and "supervised" in terms


# --- PC-Reg-RT ---------------------------------------------------------------------------------------
def test_pcreg_perception_decoupled_inputs():
    """The correspondence loss reads per-class perception-masked images (one channel per foreground
    class, zero outside it) and sums one NCC per class; what no class perceives does not count."""
    data = few_shot(4)
    net = tiny_pair()
    s = PCRegRT(config(), net, data)
    m, f = data.images["s1"], data.images["s2"]
    labels_m = data.onehot(torch.from_numpy(phantom(np.random.default_rng(7), 24)[1])[None, None])
    labels_f = torch.roll(labels_m, 1, dims=2)
    masked = s.perceived_images(m, labels_m)
    assert masked.shape[1] == 2
    assert torch.equal(masked[:, 0] != 0, (labels_m[:, 1] > 0) & (m[:, 0] != 0))
    assert float(masked[:, 1][labels_m[:, 2] == 0].abs().max()) == 0.0
    ddf = smooth_velocity((24, 24, 24), amplitude=0.8)
    base = s.correspondence(m, f, labels_m, labels_f, ddf)
    per_class = sum(s.class_similarity(net.warp(masked[:, c:c + 1], ddf), s.perceived_images(f, labels_f)[:, c:c + 1])
                    for c in range(2))
    assert torch.allclose(base, per_class)
    # background outside every perceived class does not change it; content inside a class does
    background = (labels_m[:, :1] > 0) & (labels_f[:, :1] > 0)
    assert torch.allclose(s.correspondence(m + 5.0 * background, f + 3.0 * background, labels_m, labels_f, ddf), base)
    inside = labels_f[:, 1:2] > 0
    assert not torch.allclose(s.correspondence(m, f + inside * torch.rand_like(f), labels_m, labels_f, ddf), base)
    # the perception is the segmentation net's arg-max, and the registration update uses it
    assert torch.equal(s.perception(m).argmax(1), net.segment(m).argmax(1))
    s.perception = lambda image: labels_m if image is m else labels_f
    terms = s.registration("s1", "s2")
    expected = s.correspondence(m, f, labels_m, labels_f, s.field("s1", "s2"))
    assert torch.allclose(terms["similarity"], expected)


def test_pcreg_reverse_teaching_both_directions():
    data = few_shot(4)
    net = tiny_pair()
    s = PCRegRT(config(), net, data)
    fixed_velocities(net, data, {("s0", "s2"): smooth_velocity((12, 12, 12)),
                                 ("s2", "s0"): smooth_velocity((12, 12, 12), seed=1)}, (12, 12, 12))
    # labelled moving -> unlabelled fixed: warped labels are the fixed image's pseudo-labels
    ddf = s.field("s0", "s2")
    terms = s.reverse_teaching("s0", "s2")
    pseudo = net.warp(s.onehot("s0"), ddf)
    assert torch.allclose(terms["taught"], soft_cross_entropy(net.segment(data.images["s2"]), pseudo).mean())
    assert torch.allclose(terms["loss"], terms["anchor"] + 0.5 * terms["taught"])
    # unlabelled moving -> labelled fixed: the warped unlabelled image learns the fixed image's labels
    ddf = s.field("s2", "s0")
    terms = s.reverse_teaching("s2", "s0")
    warped = net.warp(data.images["s2"], ddf)
    assert torch.allclose(terms["taught"], soft_cross_entropy(net.segment(warped), s.onehot("s0")).mean())
    net.zero_grad()
    terms["taught"].backward()
    assert grads(net.segmentation) > 0
    # the joint phase teaches in both orders, and never from two unlabelled images
    taught = []
    s.reverse_teaching = lambda m, f: taught.append((m, f)) or {}
    s.registration = lambda m, f: {}
    rng = random.Random(0)
    for index in range(60):
        for key, _, compute in s.updates("joint", index, rng):
            compute()
    assert any(m in data.labels for m, _ in taught) and any(f in data.labels for _, f in taught)
    assert all((m in data.labels) != (f in data.labels) for m, f in taught)


def test_shipped_configs_name_only_weights_their_strategy_uses():
    """A renamed or dropped loss weight in a config would otherwise be ignored silently."""
    import json
    from pathlib import Path

    from JointRegSegLib.training.strategies import STRATEGIES
    paths = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.json"))
    configs = [(p, json.loads(p.read_text(encoding="utf-8"))) for p in paths]
    # only configs trained by this loop's strategies (others dispatch to their own trainer)
    configs = [(p, c) for p, c in configs if c.get("strategy", "deepatlas") in STRATEGIES]
    assert len(configs) >= 6
    for path, config in configs:
        strategy = STRATEGIES[config.get("strategy", "deepatlas")]
        unknown = set(config.get("weights", {})) - set(strategy.weights)
        assert not unknown, (path.name, unknown)


def test_segmentation_dice_term_only_when_configured():
    """DeepRS's L_ce and PC-Reg-RT's supervised and reverse-teaching terms are the papers' cross-entropy by
    default; "ce+dice" adds a soft Dice term, "dice" (their committed configs, a documented deviation) is
    soft Dice alone; anything else is refused by name."""
    from monai.losses import DiceLoss
    data = few_shot(4)
    net = tiny_pair()
    with torch.no_grad():
        dss_image, dss_labels = DeepRS(config(), net, data).structure_sample("s0", "s2", 1.0)
    plain = DeepRS(config(), net, data).segmentation("s0", "s2", 1.0, use_acm=False)
    expected_ce = soft_cross_entropy(net.segment(dss_image), dss_labels).mean()
    assert torch.allclose(plain["ce"], expected_ce, atol=1e-6)
    both = DeepRS(config(segmentation_loss="ce+dice"), net, data).segmentation("s0", "s2", 1.0, use_acm=False)
    dice = DiceLoss(include_background=False)(torch.softmax(net.segment(dss_image), 1), dss_labels)
    assert torch.allclose(both["ce"], expected_ce + dice, atol=1e-5) and float(dice) > 0.1
    dice_only = DeepRS(config(segmentation_loss="dice"), net, data).segmentation("s0", "s2", 1.0, use_acm=False)
    assert torch.allclose(dice_only["ce"], dice, atol=1e-5)
    with pytest.raises(ValueError, match="segmentation_loss 'focal'"):
        DeepRS(config(segmentation_loss="focal"), net, data)
    labelled = [n for n in data.train if n in data.labels][:1]
    pc_plain = PCRegRT(config(), net, data).supervised(labelled)["supervised"]
    pc_both = PCRegRT(config(segmentation_loss="ce+dice"), net, data).supervised(labelled)["supervised"]
    assert float(pc_both) > float(pc_plain) + 0.1
    net.zero_grad()
    (pc_both - pc_plain).backward()        # the Dice term alone trains the segmentation network
    assert grads(net.segmentation) > 0
