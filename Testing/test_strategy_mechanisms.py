"""Mechanism tests for the seed methods (issue 25): each fails when its mechanism is removed, weakened,
mis-wired or cut off from the gradient, not only when a value changes.

How they look at a mechanism:
- a term enters the loss with its weight: the loss recomputed with that term's weight raised by delta
  changes by delta * term, and its gradient (with respect to the parameters the term must train) by
  delta * the term's own gradient, which is non-zero (`assert_term_enters`). delta is 1 / |term|, so a
  term of 1e-10 on an untrained network is as visible as one of 1;
- a two-way term sends gradient to both directions' fields (velocities held as parameters here);
- the adversarial term sends gradient to the registration network; the discriminator is stepped in the
  joint phase on its own;
- compositions are checked on a case where the two orders differ, in mm, through `register_and_segment`.

Mutations: `MUTATIONS` below lists small scripted edits of the engine, each of which breaks one
mechanism. `python Testing/test_strategy_mechanisms.py` applies each to a temporary copy of
JointRegSegLib (the working tree is never touched), runs that mechanism's tests against the copy and
reports which were caught; `-m "slow"` runs the same as a test (`make test-all`). Every mutation listed is
caught (last run: see benchmarks/METHODS.md, "Mechanism tests").
"""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from strategy_data import config, few_shot, tiny_pair

from JointRegSegLib.training.strategies import BRBS, DeepAtlas, DeepRS, PCRegRT, UReSNetTraining
from JointRegSegLib.training.strategies.base import soft_cross_entropy

SIZE, HALF = 16, 8
LOW = (8, 8, 8)  # the tiny pair's velocity grid (16^3 volumes, velocity_downsample 2)


# --- helpers -----------------------------------------------------------------------------------------
def smooth_velocity(shape=LOW, amplitude=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, 3, 3, 3, generator=g)
    return amplitude * F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def learnable_velocities(net, data, table: dict) -> dict:
    """Make `net.velocity(m, f)` return a parameter per listed (moving, fixed) pair (zero for others), so
    a test can ask which direction's field a term sends gradient to."""
    by_id = {id(image): name for name, image in data.images.items()}
    params = {pair: torch.nn.Parameter(v.clone()) for pair, v in table.items()}

    def velocity(moving, fixed):
        key = (by_id[id(moving)], by_id[id(fixed)])
        return params[key] if key in params else torch.zeros(1, 3, *LOW)
    net.velocity = velocity
    return params


def wake(module, std=0.02, seed=1):
    """Give the zero-initialised last layer of a registration net weights, so its fields are not ~0."""
    torch.manual_seed(seed)
    last = [m for m in module.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))][-1]
    with torch.no_grad():
        last.weight.normal_(std=std)


def gradient(value, params) -> list:
    if not value.requires_grad:      # a detached term: no gradient to anything
        return [torch.zeros_like(p) for p in params]
    found = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(found, params)]


def norm(tensors) -> float:
    return float(sum(float((t.double() ** 2).sum()) for t in tensors) ** 0.5)


def assert_term_enters(strategy, compute, term, params, weight=None):
    """`term` enters `compute()["loss"]` as weight * term: raising the weight by delta moves the loss by
    delta * term and its gradient on `params` by delta * grad(term), which is non-zero."""
    weight = weight or term
    base = compute()
    value = base[term]
    assert float(value.detach().abs()) > 0, f"{term} is 0: nothing to see"
    delta = 1.0 / float(value.detach().abs())
    before, own = gradient(base["loss"], params), gradient(value, params)
    assert norm(own) > 0, f"{term} sends no gradient to these parameters"
    original = strategy.w[weight]
    strategy.w[weight] = original + delta
    try:
        bumped = compute()
        after = gradient(bumped["loss"], params)
    finally:
        strategy.w[weight] = original
    change = float((bumped["loss"] - base["loss"]).detach())
    assert abs(change - delta * float(value.detach())) < 1e-3, (term, change)   # ~ +-1 expected
    error = norm([a - b - delta * o for a, b, o in zip(after, before, own)])
    assert error < 1e-3 * delta * norm(own), (term, error, delta * norm(own))


def assert_term_absent(strategy, compute, weight, params):
    """Changing `weight` changes neither the loss nor its gradient on `params`."""
    base = compute()
    before = gradient(base["loss"], params)
    original = strategy.w[weight]
    strategy.w[weight] = original + 10.0
    try:
        bumped = compute()
        after = gradient(bumped["loss"], params)
    finally:
        strategy.w[weight] = original
    assert float((bumped["loss"] - base["loss"]).abs()) < 1e-6
    assert norm([a - b for a, b in zip(after, before)]) < 1e-6 * max(norm(before), 1e-12)


def parameters(parts) -> list:
    return [p for p in parts.parameters() if p.requires_grad]


def test_mutant_copy_is_imported():
    """In a mutation run, the package under test is the mutated copy (otherwise every mutation 'passes')."""
    root = os.environ.get("JOINTREGSEG_MUTANT_ROOT")
    if root is None:
        pytest.skip("only in a mutation run")
    import JointRegSegLib
    assert Path(JointRegSegLib.__file__).resolve().is_relative_to(Path(root).resolve())


# --- BRBS: BiC (inverse consistency), SeC, two-way similarity ------------------------------------------
def brbs_two_way(labelled=(0, 1)):
    data = few_shot(4, labelled=labelled, size=SIZE)
    net = tiny_pair()
    s = BRBS(config(), net, data)
    v = learnable_velocities(net, data, {("s0", "s1"): smooth_velocity(amplitude=1.0),
                                         ("s1", "s0"): smooth_velocity(amplitude=1.0, seed=5)})
    return s, net, data, [v[("s0", "s1")], v[("s1", "s0")]]


def test_brbs_registration_terms_enter_the_loss_with_their_weights():
    s, _, _, velocities = brbs_two_way()
    compute = lambda: s.registration("s0", "s1", False)  # noqa: E731
    for term in ("similarity", "smooth", "inverse", "sec"):
        assert_term_enters(s, compute, term, velocities)
    terms = compute()
    # the logged BiC term is the whole MSE(w, -(u o psi)), not a scaled copy
    with torch.no_grad():
        u, w = s.field("s0", "s1"), s.field("s1", "s0")
        assert torch.allclose(terms["inverse"], F.mse_loss(w, -s.net.warp(u, w)), rtol=1e-5)
    assert s.w["inverse"] == 0.1 and s.w["sec"] == 100.0
    expected = terms["similarity"] + terms["smooth"] + 0.1 * terms["inverse"] + 100.0 * terms["sec"]
    assert torch.allclose(terms["loss"], expected)


def test_brbs_tiny_terms_of_an_untrained_network_still_enter_the_loss():
    """On the untrained network the fields are ~1e-5 voxels and BiC is ~1e-10: invisible in a total loss
    of ~1, but the check scales the weight change to the term."""
    data = few_shot(4, labelled=(0, 1), size=SIZE)
    net = tiny_pair()
    s = BRBS(config(), net, data)
    compute = lambda: s.registration("s0", "s1", False)  # noqa: E731
    assert float(compute()["inverse"].detach()) < 1e-6
    assert_term_enters(s, compute, "inverse", parameters(net.registration))


def test_brbs_two_way_terms_train_both_directions():
    """phi = R(A, B) and psi = R(B, A): similarity, smoothness, BiC and SeC each send gradient to both."""
    s, _, _, (forward, backward) = brbs_two_way()
    terms = s.registration("s0", "s1", False)
    for term in ("similarity", "smooth", "inverse", "sec"):
        g_forward, g_backward = gradient(terms[term], [forward, backward])
        assert norm([g_forward]) > 0 and norm([g_backward]) > 0, term


def test_brbs_inverse_consistency_is_zero_for_an_inverse_pair_only():
    """BiC = MSE(w, -(u o psi)): w(x) = -u(x + w(x)) holds for psi = phi^-1; the reference's first-order
    form -(u o phi) does not vanish there."""
    s, net, data, (forward_v, backward_v) = brbs_two_way()
    with torch.no_grad():
        backward_v.copy_(-forward_v)
        u, w = s.field("s0", "s1"), s.field("s1", "s0")
        exact = float(s.inverse_consistency(u, w))
        first_order = float(F.mse_loss(w, -net.warp(u, u)))
        assert exact < 0.2 * first_order, (exact, first_order)
        backward_v.copy_(forward_v)
        assert float(s.inverse_consistency(s.field("s0", "s1"), s.field("s1", "s0"))) > 20 * exact


# --- BRBS: S3P ---------------------------------------------------------------------------------------
def brbs_s3p():
    data = few_shot(5, size=SIZE)
    net = tiny_pair()
    s = BRBS(config(), net, data)
    table = {("s1", "s0"): smooth_velocity(seed=1),          # style image U1 -> labelled L
             ("s0", "s1"): smooth_velocity(seed=2),          # the wrong direction, L -> U1
             ("s1", "s2"): smooth_velocity(seed=3),          # U1 -> U2, not asked for
             ("s0", "s2"): smooth_velocity(seed=4)}          # L -> space image U2
    learnable_velocities(net, data, table)
    return s, net, data


def test_brbs_s3p_registers_the_style_image_onto_the_labelled_one():
    s, net, data = brbs_s3p()
    image_l, style = data.images["s0"], data.images["s1"]
    with torch.no_grad():
        style_on_l = net.warp(style, s.field("s1", "s0"))
        assert float((style_on_l - style).abs().mean()) > 0.01    # the style map is not the identity
        # beta = 1, alpha = 0: U1's appearance on L's anatomy, L's labels unmoved
        new_image, new_labels, _ = s.space_style_sample("s0", "s1", "s2", 0.0, 1.0)
        assert torch.allclose(new_image, style_on_l, atol=1e-5)
        assert torch.allclose(new_labels, s.onehot("s0"), atol=1e-5)
        # beta = 0.3: the appearance moves 30 % of the way from L to U1-on-L
        new_image, _, _ = s.space_style_sample("s0", "s1", "s2", 0.0, 0.3)
        assert torch.allclose(new_image, image_l + 0.3 * (style_on_l - image_l), atol=1e-5)


def test_brbs_s3p_space_map_scaled_by_alpha():
    s, net, data = brbs_s3p()
    with torch.no_grad():
        velocity = net.velocity(data.images["s0"], data.images["s2"])
        half = net.displacement(0.5 * velocity, (SIZE,) * 3)
        full = net.displacement(velocity, (SIZE,) * 3)
        new_image, new_labels, misaligned = s.space_style_sample("s0", "s1", "s2", 0.5, 0.0)
        assert torch.allclose(new_image, net.warp(data.images["s0"], half), atol=1e-5)
        assert torch.allclose(new_labels, net.warp(s.onehot("s0"), half), atol=1e-5)
        # MMR's X_a: U1 registered onto L, then moved all the way to U2's space
        style_on_l = net.warp(data.images["s1"], s.field("s1", "s0"))
        assert torch.allclose(misaligned, net.warp(style_on_l, full), atol=1e-5)


# --- BRBS: MMR ---------------------------------------------------------------------------------------
def test_brbs_mmr_enters_the_segmentation_loss_with_its_weight():
    s, net, data = brbs_s3p()
    compute = lambda: s.segmentation("s0", "s1", "s2", 0.5, 0.5, 0.25)  # noqa: E731
    seg = parameters(net.segmentation)
    assert s.w["mmr"] == 0.01
    for term in ("supervised", "mmr"):
        assert_term_enters(s, compute, term, seg)


def test_brbs_mmr_mixes_misaligned_style_image_with_space_image():
    s, net, data = brbs_s3p()
    seen = []
    real = s.mix_misalignment
    s.mix_misalignment = lambda a, b, gamma: seen.append((a, b, gamma)) or real(a, b, gamma)
    s.segmentation("s0", "s1", "s2", 0.5, 0.5, 0.25)
    x_a, x_b, gamma = seen[0]
    with torch.no_grad():   # X_a: U1 registered onto L (a non-identity map here), then moved to U2's space
        style_on_l = net.warp(data.images["s1"], s.field("s1", "s0"))
        expected = net.warp(style_on_l, s.field("s0", "s2"))
    assert torch.allclose(x_a, expected, atol=1e-5) and x_b is data.images["s2"] and gamma == 0.25
    # MMR itself: S(g x_a + (1 - g) x_b) against g S(x_a) + (1 - g) S(x_b), at this gamma
    value = real(x_a, x_b, 0.25)
    segment = net.segment
    target = 0.25 * segment(x_a) + 0.75 * segment(x_b)
    assert torch.allclose(value, F.mse_loss(segment(0.25 * x_a + 0.75 * x_b), target), rtol=1e-5)
    assert not torch.allclose(value, real(x_a, x_b, 0.5), rtol=1e-3)


# --- DeepRS: ACM -------------------------------------------------------------------------------------
def half_confidence(s, flip=False):
    """Stub the discriminator: confident (D ~ 1) on one half of the volume, not at all on the other;
    records what it was shown."""
    shown = []

    def logits(image, fixed):
        shown.append((image, fixed))
        half = torch.zeros_like(image)
        half[..., :HALF, :, :] = 1.0
        if flip:
            half = 1.0 - half
        return 30.0 * (2.0 * half - 1.0)
    s.discriminator.logits = logits
    return shown


def test_deeprs_acm_weights_the_weak_loss_voxel_by_voxel():
    data = few_shot(4, size=SIZE)
    net = tiny_pair()
    wake(net.registration)
    s = DeepRS(config(), net, data)
    shown = half_confidence(s)
    terms = s.segmentation("s0", "s2", 0.7, use_acm=True)
    with torch.no_grad():
        image, labels = s.structure_sample("s0", "s2", 0.7)
    # D judges (DSS image, fixed image)
    assert torch.allclose(shown[0][0], image, atol=1e-6) and shown[0][1] is data.images["s2"]
    weak = soft_cross_entropy(net.segment(data.images["s2"]), labels)          # (1, 1, z, y, x)
    mask = torch.zeros_like(weak)
    mask[..., :HALF, :, :] = 1.0
    assert torch.allclose(terms["acm"], (mask * weak).mean(), rtol=1e-4)
    # where D is not confident the weak loss counts for nothing: the two halves add up to the unweighted loss
    half_confidence(s, flip=True)
    other = s.segmentation("s0", "s2", 0.7, use_acm=True)["acm"]
    assert torch.allclose(terms["acm"] + other, weak.mean(), rtol=1e-4)
    assert abs(float((terms["acm"] - other).detach())) > 0.01 * float(weak.mean().detach())


def test_deeprs_acm_enters_the_segmentation_loss_with_its_weight():
    data = few_shot(4, size=SIZE)
    net = tiny_pair()
    wake(net.registration)
    s = DeepRS(config(), net, data)
    half_confidence(s)
    compute = lambda: s.segmentation("s0", "s2", 0.7, use_acm=True)  # noqa: E731
    for term in ("acm", "ce"):
        assert_term_enters(s, compute, term, parameters(net.segmentation))
    assert "acm" not in s.segmentation("s0", "s2", 0.7, use_acm=False)


# --- DeepRS: adversarial term reaches the registration ----------------------------------------------
def test_deeprs_adversarial_gradient_reaches_the_registration_network():
    data = few_shot(4, size=SIZE)
    net = tiny_pair()
    wake(net.registration)
    s = DeepRS(config(), net, data)
    wake(s.discriminator, std=0.2)
    terms = s.registration("s0", "s2")
    # -log D(warped, fixed): the non-saturating generator loss, on the warped moving image
    with torch.no_grad():
        warped = net.warp(data.images["s0"], s.field("s0", "s2"))
        expected = -torch.log(s.discriminator(warped, data.images["s2"])).mean()
    assert torch.allclose(terms["adversarial"], expected, rtol=1e-4)
    registration = parameters(net.registration)
    compute = lambda: s.registration("s0", "s2")  # noqa: E731
    for term, weight in (("adversarial", "adv"), ("drc", "drc"), ("similarity", "cc"), ("smooth", "R")):
        assert_term_enters(s, compute, term, registration, weight)


# --- DeepRS: the discriminator -----------------------------------------------------------------------
def step_phase(s, optimizers, phase, index, rng):
    """One step of train.py's loop: for each update, zero the gradients, back-propagate, step its optimiser."""
    keys = []
    for key, _, compute in s.updates(phase, index, rng):
        for module in (s.net, s.discriminator):
            module.zero_grad(set_to_none=True)
        compute()["loss"].backward()
        optimizers[key].step()
        keys.append(key)
    return keys


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def moved(before, module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


@pytest.mark.parametrize("phase", ["reg_pretrain", "joint"])
def test_deeprs_discriminator_is_updated_before_registration_in_each_phase(phase):
    data = few_shot(4, size=SIZE)
    s = DeepRS(config(), tiny_pair(), data)
    optimizers = s.optimizers()
    assert {id(p) for g in optimizers["disc"].param_groups for p in g["params"]} == \
        {id(p) for p in s.discriminator.parameters()}
    before_d, before_r = snapshot(s.discriminator), snapshot(s.net.registration)
    keys = step_phase(s, optimizers, phase, 0, random.Random(0))
    assert keys[:2] == ["disc", "reg_pretrain" if phase == "reg_pretrain" else "reg"]
    assert moved(before_d, s.discriminator), f"no discriminator update in {phase}"
    assert moved(before_r, s.net.registration)
    # only the discriminator's update moves it
    before_d = snapshot(s.discriminator)
    for key, _, compute in s.updates(phase, 1, random.Random(1)):
        if key != "disc":
            s.net.zero_grad(), s.discriminator.zero_grad()
            compute()["loss"].backward()
            optimizers[key].step()
    assert not moved(before_d, s.discriminator)


def test_deeprs_discriminator_real_and_fake_inputs():
    """Real: x_r = beta * moving + (1 - beta) * fixed (beta 0.2); fake: the current warped moving image."""
    data = few_shot(4, size=SIZE)
    net = tiny_pair()
    wake(net.registration)
    s = DeepRS(config(), net, data)
    shown = half_confidence(s)
    terms = s.discriminate("s0", "s2")
    m, f = data.images["s0"], data.images["s2"]
    (real, real_f), (fake, fake_f) = shown
    assert real_f is f and fake_f is f
    assert torch.allclose(real, 0.2 * m + 0.8 * f, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(fake, net.warp(m, s.field("s0", "s2")), atol=1e-6)
    # the loss labels them real (1) and fake (0)
    r, k = torch.full_like(m, 0.0), torch.full_like(m, 0.0)
    r[..., :HALF, :, :], k[..., :HALF, :, :] = 1.0, 1.0
    expected = F.binary_cross_entropy_with_logits(30.0 * (2 * r - 1), torch.ones_like(r)) + \
        F.binary_cross_entropy_with_logits(30.0 * (2 * k - 1), torch.zeros_like(k))
    assert torch.allclose(terms["loss"], expected)


# --- DeepAtlas: the anatomy term trains segmentation only from one labelled image --------------------
def deepatlas():
    data = few_shot(5, labelled=(0, 1), size=SIZE)
    net = tiny_pair()
    wake(net.registration)
    return DeepAtlas(config(), net, data), net, data


def test_deepatlas_both_labelled_anatomy_does_not_train_segmentation():
    s, net, data = deepatlas()
    seg = parameters(net.segmentation)
    for pair in (("s0", "s1"), ("s1", "s0")):
        compute = lambda p=pair: s.segmentation(*p)  # noqa: E731
        terms = compute()
        assert "anatomy" not in terms
        assert torch.allclose(terms["loss"], terms["supervised"])
        assert_term_absent(s, compute, "anatomy", seg)
    # one labelled image: it does, in both orders
    for pair in (("s0", "s3"), ("s3", "s0")):
        assert_term_enters(s, lambda p=pair: s.segmentation(*p), "anatomy", seg)


def test_deepatlas_each_update_holds_the_other_network_fixed():
    s, net, data = deepatlas()
    for pair in (("s0", "s3"), ("s3", "s0")):
        terms = s.segmentation(*pair)               # registration held fixed
        assert norm(gradient(terms["loss"], parameters(net.registration))) == 0
        terms = s.registration(*pair, True)         # the predicted segmentation is a fixed target
        assert "anatomy" in terms
        assert norm(gradient(terms["loss"], parameters(net.segmentation))) == 0
        assert_term_enters(s, lambda p=pair: s.registration(*p, True), "anatomy", parameters(net.registration))


# --- U-ReSNet: composition order, and inference through the pipeline ---------------------------------
def rotation_about_axis0(degrees, translation):
    a = np.deg2rad(degrees)
    matrix = np.array([[1, 0, 0, translation[0]], [0, np.cos(a), -np.sin(a), translation[1]],
                       [0, np.sin(a), np.cos(a), translation[2]]])
    return torch.tensor(matrix[None], dtype=torch.float32)


def test_uresnet_composes_affine_after_elastic_where_orders_differ():
    from JointRegSegLib.models.networks import UReSNet
    net = UReSNet({"name": "uresnet", "channels": [4, 8], "integration_steps": 4}, num_classes=3)
    shape = (12, 14, 10)
    elastic = torch.zeros(1, 3, *shape)
    elastic[:, 1] = 1.5                                   # 1.5 voxels along axis 1, which the rotation turns
    matrix = rotation_about_axis0(20, (0.5, 2.0, -1.0))
    ddf = net.compose(elastic, matrix)
    centred = torch.tensor([3.0, 4.0, 2.0]) - (torch.tensor(shape) - 1) / 2
    a, t = matrix[0, :, :3], matrix[0, :, 3]
    after = a @ (centred + torch.tensor([0, 1.5, 0])) + t - centred        # A(x + u(x)), the paper's
    before = a @ centred + t + torch.tensor([0, 1.5, 0]) - centred         # u after A: the other order
    assert float((after - before).abs().max()) > 0.3
    assert torch.allclose(ddf[0, :, 3, 4, 2], after, atol=1e-5)
    # and the training loss warps with exactly that composition
    data = few_shot(2, size=SIZE)
    s = UReSNetTraining({"lr": {"all": 1e-3}}, net, data)
    net.elastic_and_affine = lambda m, f: (elastic, matrix)
    assert torch.equal(s.transform(data.images["s0"], data.images["s1"])[0], ddf)


def test_uresnet_pipeline_returns_the_trained_transform_in_mm():
    """register_and_segment with a U-ReSNet model returns x -> A(x + u(x)) at every interior voxel of the
    working grid, in mm: no pooling of the field, this order of composition, this axis convention."""
    from JointRegSegLib import new_model, register_and_segment
    from JointRegSegLib.core.geometry import make_grid
    size = 24
    card = {"name": "tiny-uresnet", "description": "untrained, for tests only",
            "architecture": {"name": "uresnet", "channels": [4, 8], "integration_steps": 4,
                             "velocity_downsample": 2},
            "labels": [{"value": 0, "name": "background", "color": [0, 0, 0]},
                       {"value": 1, "name": "core", "color": [0.9, 0.2, 0.1]}],
            "modality": "synthetic", "intensity": {"kind": "percentile", "lower": 1, "upper": 99},
            "working_grid": {"size": [size] * 3, "spacing": [2.0, 2.5, 3.0]},
            "refinement": {"similarity": "lncc", "smoothness": 1.0, "learning_rate": 0.05}}
    model = new_model(card, seed=0)
    rng = np.random.default_rng(0)
    elastic = torch.from_numpy(rng.normal(0.0, 0.6, (1, 3, size, size, size)).astype(np.float32))
    elastic[:, 1] += 1.0
    matrix = rotation_about_axis0(15, (0.7, -1.2, 0.4))
    model.network.elastic_and_affine = lambda m, f: (elastic, matrix)
    grid = make_grid([30, 28, 26], [2.0, 2.0, 2.0], np.eye(3), np.zeros(3))
    image = sitk.GetImageFromArray(rng.uniform(0, 100, (26, 28, 30)).astype(np.float32))
    image.CopyInformation(grid)
    result = register_and_segment(image, image, model, device="cpu", affine=False, scale_search=False,
                                  network_passes=1)
    working = result.working_displacement
    assert list(working.GetSize()) == [size] * 3
    centre = (size - 1) / 2
    a, t = matrix[0, :, :3].double().numpy(), matrix[0, :, 3].double().numpy()
    errors = []
    for index in rng.integers(4, size - 4, (40, 3)):       # (axis 0, 1, 2) of the tensor = ITK (z, y, x)
        x = index - centre
        target = a @ (x + elastic[0, :, index[0], index[1], index[2]].double().numpy()) + t + centre
        fixed_point = working.TransformIndexToPhysicalPoint([int(i) for i in index[::-1]])
        expected = working.TransformContinuousIndexToPhysicalPoint([float(i) for i in target[::-1]])
        errors.append(np.abs(np.array(result.transform.TransformPoint(fixed_point)) - expected).max())
    assert max(errors) < 1e-3, max(errors)


# --- U-ReSNet: every term with its weight ------------------------------------------------------------
def test_uresnet_terms_enter_the_loss_with_their_weights():
    from JointRegSegLib.models.networks import UReSNet
    torch.manual_seed(0)
    net = UReSNet({"name": "uresnet", "channels": [4, 8], "integration_steps": 4}, num_classes=3)
    with torch.no_grad():
        for p in [*net.elastic["head"].parameters(), *net.affine_head.parameters()]:
            p.normal_(std=0.05)
    data = few_shot(3, labelled=(0, 1), size=SIZE)
    s = UReSNetTraining({"lr": {"all": 1e-3}}, net, data)
    compute = lambda: s.end_to_end("s0", "s1")  # noqa: E731
    registration, segmentation = parameters(net.registration), parameters(net.segmentation)
    for term, weight, params in (("affine", "alpha", registration), ("gradient", "beta", registration),
                                 ("seg_moving", "gamma", segmentation), ("seg_warped", "delta", segmentation)):
        assert_term_enters(s, compute, term, params, weight)
    # the warped-segmentation term also trains the transform (W(S(M), D) against the fixed labels)
    assert norm(gradient(compute()["seg_warped"], [net.affine_head.weight, net.affine_head.bias])) > 0


# --- PC-Reg-RT ---------------------------------------------------------------------------------------
def test_pcreg_reverse_teaching_terms_enter_with_their_weights():
    data = few_shot(4, size=SIZE)
    net = tiny_pair()
    s = PCRegRT(config(), net, data)
    learnable_velocities(net, data, {("s0", "s2"): smooth_velocity(), ("s2", "s0"): smooth_velocity(seed=1)})
    seg = parameters(net.segmentation)
    for pair in (("s0", "s2"), ("s2", "s0")):
        for term, weight in (("anchor", "supervised"), ("taught", "rt")):
            assert_term_enters(s, lambda p=pair: s.reverse_teaching(*p), term, seg, weight)


# --- the mutation run --------------------------------------------------------------------------------
_REPO = Path(__file__).resolve().parent.parent

# (mechanism, tests that must catch it (-k expression), file under JointRegSegLib, old text, new text)
MUTATIONS = [
    # BRBS BiC (inverse consistency)
    ("brbs-bic", "brbs_registration_terms or brbs_two_way or brbs_inverse or brbs_tiny", "training/strategies/brbs.py",
     'self.w["inverse"] * terms["inverse"]', '0.0 * terms["inverse"]'),
    ("brbs-bic", "brbs_registration_terms or brbs_two_way or brbs_inverse or brbs_tiny", "training/strategies/brbs.py",
     'self.w["inverse"] * terms["inverse"]', 'self.w["inverse"] * terms["inverse"].detach()'),
    ("brbs-bic", "brbs_registration_terms or brbs_two_way or brbs_inverse or brbs_tiny", "training/strategies/brbs.py",
     "-self.net.warp(forward, backward))", "-self.net.warp(forward, backward).detach())"),
    ("brbs-bic", "brbs_registration_terms or brbs_two_way or brbs_inverse or brbs_tiny", "training/strategies/brbs.py",
     "-self.net.warp(forward, backward))", "-self.net.warp(forward, forward))"),
    ("brbs-bic", "brbs_registration_terms or brbs_two_way or brbs_inverse or brbs_tiny", "training/strategies/brbs.py",
     '"inverse": self.inverse_consistency(forward, backward)',
     '"inverse": 1e-4 * self.inverse_consistency(forward, backward)'),
    # BRBS two-way similarity / SeC
    ("brbs-two-way", "brbs_registration_terms or brbs_two_way", "training/strategies/brbs.py",
     "+ self.similarity(self.net.warp(image_b, backward), image_a)",
     "+ self.similarity(self.net.warp(image_b, backward.detach()), image_a)"),
    ("brbs-two-way", "brbs_registration_terms or brbs_two_way", "training/strategies/brbs.py",
     "self.dice(self.net.warp(seg_b, backward), seg_a)", "self.dice(seg_b, seg_a)"),
    ("brbs-two-way", "brbs_registration_terms or brbs_two_way", "training/strategies/brbs.py",
     "self.smooth(forward) + self.smooth(backward)", "2 * self.smooth(forward)"),
    # BRBS MMR
    ("brbs-mmr", "brbs_mmr", "training/strategies/brbs.py",
     'self.w["mmr"] * terms["mmr"]', '0.0 * terms["mmr"]'),
    ("brbs-mmr", "brbs_mmr", "training/strategies/brbs.py",
     'self.w["mmr"] * terms["mmr"]', 'self.w["mmr"] * terms["mmr"].detach()'),
    ("brbs-mmr", "brbs_mmr", "training/strategies/brbs.py",
     "self.net.segment(gamma * x_a + (1.0 - gamma) * x_b)", "self.net.segment(0.5 * x_a + 0.5 * x_b)"),
    ("brbs-mmr", "brbs_mmr", "training/strategies/brbs.py",
     "self.mix_misalignment(misaligned,", "self.mix_misalignment(new_image,"),
    ("brbs-mmr", "brbs_mmr", "training/strategies/brbs.py",
     "self.net.warp(style_on_l, full)", "self.net.warp(self.data.images[style], full)"),
    # BRBS S3P
    ("brbs-s3p", "brbs_s3p", "training/strategies/brbs.py",
     "self.net.warp(data.images[style], self.field(style, labelled))", "data.images[style]"),
    ("brbs-s3p", "brbs_s3p", "training/strategies/brbs.py",
     "self.field(style, labelled)", "self.field(labelled, style)"),
    ("brbs-s3p", "brbs_s3p", "training/strategies/brbs.py",
     "self.field(style, labelled)", "self.field(style, space)"),
    ("brbs-s3p", "brbs_s3p", "training/strategies/brbs.py",
     "image_l + beta * (style_on_l - image_l)", "style_on_l + beta * (image_l - style_on_l)"),
    ("brbs-s3p", "brbs_s3p", "training/strategies/brbs.py",
     "self.net.displacement(alpha * velocity", "self.net.displacement(velocity"),
    # DeepRS ACM
    ("deeprs-acm", "deeprs_acm", "training/strategies/deeprs.py",
     "confidence = self.discriminator(image, fixed_image)",
     "confidence = torch.ones_like(self.discriminator(image, fixed_image))"),
    ("deeprs-acm", "deeprs_acm", "training/strategies/deeprs.py",
     'terms["acm"] = (confidence * soft', 'terms["acm"] = (confidence.mean() * soft'),
    ("deeprs-acm", "deeprs_acm", "training/strategies/deeprs.py",
     "confidence = self.discriminator(image, fixed_image)",
     "confidence = self.discriminator(fixed_image, fixed_image)"),
    ("deeprs-acm", "deeprs_acm", "training/strategies/deeprs.py",
     'total = total + self.w["acm"] * terms["acm"]', 'total = total + 0.0 * terms["acm"]'),
    ("deeprs-acm", "deeprs_acm", "training/strategies/deeprs.py",
     "soft_cross_entropy(self.net.segment(fixed_image), labels)",
     "soft_cross_entropy(self.net.segment(image), labels)"),
    # DeepRS adversarial gradient to registration
    ("deeprs-adv", "deeprs_adversarial", "training/strategies/deeprs.py",
     "self.discriminator.logits(warped, fixed_image)", "self.discriminator.logits(warped.detach(), fixed_image)"),
    ("deeprs-adv", "deeprs_adversarial", "training/strategies/deeprs.py",
     "F.softplus(-self.discriminator.logits(warped, fixed_image))",
     "F.softplus(self.discriminator.logits(warped, fixed_image))"),
    ("deeprs-adv", "deeprs_adversarial", "training/strategies/deeprs.py",
     'total = (self.w["adv"] * terms["adversarial"]', 'total = (0.0 * terms["adversarial"]'),
    ("deeprs-adv", "deeprs_adversarial", "training/strategies/deeprs.py",
     "self.discriminator.logits(warped, fixed_image)",
     "self.discriminator.logits(self.data.images[moving], fixed_image)"),
    # DeepRS discriminator updates
    ("deeprs-disc", "deeprs_discriminator", "training/strategies/deeprs.py",
     '("disc", "joint_disc"', '("seg", "joint_disc"'),
    ("deeprs-disc", "deeprs_discriminator", "training/strategies/deeprs.py",
     '[("disc", "joint_disc", lambda: self.discriminate(*pair)),\n                ("reg", "joint_reg"',
     '[("reg", "joint_reg"'),
    ("deeprs-disc", "deeprs_discriminator", "training/strategies/deeprs.py",
     "self.discriminator.logits(reference, f), self.discriminator.logits(warped, f)",
     "self.discriminator.logits(warped, f), self.discriminator.logits(reference, f)"),
    ("deeprs-disc", "deeprs_discriminator", "training/strategies/deeprs.py",
     "reference = self.beta * m + (1.0 - self.beta) * f", "reference = f"),
    ("deeprs-disc", "deeprs_discriminator", "training/strategies/deeprs.py",
     '("disc", "reg_pretrain_disc"', '("reg_pretrain", "reg_pretrain_disc"'),
    # DeepAtlas: the anatomy term and the fixed other network
    ("deepatlas-anatomy", "deepatlas", "training/strategies/deepatlas.py",
     'if self.w["anatomy"] and len(labelled) == 1:', 'if self.w["anatomy"]:'),
    ("deepatlas-anatomy", "deepatlas", "training/strategies/deepatlas.py",
     'if self.w["anatomy"] and len(labelled) == 1:', 'if self.w["anatomy"] and len(labelled) >= 1:'),
    ("deepatlas-anatomy", "deepatlas", "training/strategies/deepatlas.py",
     'total = total + self.w["anatomy"] * terms["anatomy"]\n        return {"loss": total, **terms}\n\n\nclass',
     'total = total + self.w["supervised"] * terms["anatomy"]\n        return {"loss": total, **terms}\n\n\nclass'),
    ("deepatlas-anatomy", "deepatlas", "training/strategies/deepatlas.py",
     "with torch.no_grad():\n                ddf = self.field(moving, fixed)",
     "if True:\n                ddf = self.field(moving, fixed)"),
    ("deepatlas-anatomy", "deepatlas", "training/strategies/deepatlas.py",
     "with torch.no_grad():\n            return torch.softmax(", "if True:\n            return torch.softmax("),
    # U-ReSNet: composition order (networks.py) and inference through the pipeline
    ("uresnet-compose", "uresnet_composes or uresnet_pipeline", "models/networks.py",
     "moved = grid + elastic_ddf", "moved = grid"),
    ("uresnet-compose", "uresnet_composes or uresnet_pipeline", "models/networks.py",   # u after A: A x + u(x)
     "moved = grid + elastic_ddf\n        sampled = torch.einsum(\"bij,bj...->bi...\", matrix[:, :, :3], moved)",
     "moved = grid\n        sampled = elastic_ddf + torch.einsum(\"bij,bj...->bi...\", matrix[:, :, :3], moved)"),
    ("uresnet-compose", "uresnet_composes or uresnet_pipeline", "models/networks.py",
     '"bij,bj...->bi..."', '"bji,bj...->bi..."'),
    ("uresnet-compose", "uresnet_composes or uresnet_pipeline", "models/networks.py",
     "+ matrix[:, :, 3, None, None, None]", "- matrix[:, :, 3, None, None, None]"),
    ("uresnet-inference", "uresnet_pipeline", "models/networks.py",
     "self.output = VelocityIntegrator(0, 1)", "self.output = VelocityIntegrator(0, 2)"),
    ("uresnet-inference", "uresnet_pipeline", "models/networks.py",
     "return self.output(velocity_low, full_shape)", "return self.integrator(velocity_low, full_shape)"),
    ("uresnet-inference", "uresnet_pipeline", "inference/pipeline.py",
     "velocity = cascade_velocity(network, moving_r, fixed_r, network_passes)",
     "velocity = cascade_velocity(network, moving_r, fixed_r, network_passes)\n"
     "                velocity = torch.nn.functional.avg_pool3d(velocity, 3, 1, 1)"),
    ("uresnet-inference", "uresnet_pipeline", "core/geometry.py",
     "xyz = np.stack([ddf_voxels[2], ddf_voxels[1], ddf_voxels[0]], axis=-1)",
     "xyz = np.stack([ddf_voxels[0], ddf_voxels[1], ddf_voxels[2]], axis=-1)"),
    # U-ReSNet and PC-Reg-RT weights
    ("uresnet-terms", "uresnet_terms", "training/strategies/uresnet.py",
     'self.w["alpha"] * terms["affine"]', '0.1 * terms["affine"]'),
    ("uresnet-terms", "uresnet_terms", "training/strategies/uresnet.py",
     "self.dice(net.warp(predicted, ddf), self.onehot(fixed))",
     "self.dice(net.warp(predicted, ddf.detach()), self.onehot(fixed))"),
    ("uresnet-terms", "uresnet_terms", "training/strategies/uresnet.py",
     'self.w["beta"] * terms["gradient"]', 'self.w["beta"] * terms["gradient"].detach()'),
    ("pcreg-rt", "pcreg_reverse", "training/strategies/pcreg.py",
     'self.w["rt"] * terms["taught"]', '0.5 * terms["taught"]'),
    ("pcreg-rt", "pcreg_reverse", "training/strategies/pcreg.py",
     "anchor, taught = self.cross_entropy(logits_fixed, target), self.cross_entropy(logits_warped, target)",
     "anchor, taught = self.cross_entropy(logits_fixed, target), self.cross_entropy(logits_warped, target).detach()"),
    ("pcreg-rt", "pcreg_reverse", "training/strategies/pcreg.py",
     'self.w["supervised"] * terms["anchor"]', 'self.w["supervised"] * terms["anchor"].detach()'),
]


def _copy_package(destination: Path) -> Path:
    package = destination / "JointRegSegLib"
    shutil.copytree(_REPO / "JointRegSegLib", package, ignore=shutil.ignore_patterns("__pycache__"))
    return package


def run_mutation(mutation, timeout=300) -> tuple[str, float]:
    """Apply one mutation to a temporary copy of the package and run its tests there: 'caught', 'MISSED'
    or 'STALE' (the text to replace is not found exactly once: the mutation list needs updating)."""
    _, tests, relative, old, new = mutation
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jrs-mutant-") as tmp:
        package = _copy_package(Path(tmp))
        path = package / relative
        text = path.read_text(encoding="utf-8")
        if text.count(old) != 1:
            return "STALE", 0.0, f"the text to replace occurs {text.count(old)} times in {relative}"
        path.write_text(text.replace(old, new), encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": tmp, "JOINTREGSEG_MUTANT_ROOT": tmp, "PYTHONDONTWRITEBYTECODE": "1",
               "COLUMNS": "240"}
        command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-c",
                   str(_REPO / "pyproject.toml"), "--rootdir", str(_REPO), __file__,
                   "-k", f"({tests}) or mutant_copy_is_imported"]
        done = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        if re.search(r"FAILED \S*::test_mutant_copy_is_imported", done.stdout) or "no tests ran" in done.stdout:
            raise RuntimeError(f"the mutant copy was not the package imported:\n{done.stdout[-3000:]}")
    failed = re.search(r"^FAILED \S*::(\S+)(?: - (.*))?$", done.stdout, re.MULTILINE)
    why = f"{failed.group(1)}: {(failed.group(2) or '')[:70]}" if failed else ""
    return ("caught" if done.returncode != 0 else "MISSED"), time.perf_counter() - started, why


def run_all(mutations=MUTATIONS, out=print) -> list:
    results = []
    for mutation in mutations:
        outcome, seconds, why = run_mutation(mutation)
        results.append((*mutation, outcome))
        out(f"{outcome:7s} {seconds:5.1f} s  {mutation[0]:18s} {mutation[2]}: {mutation[3][:60]!r} -> "
            f"{mutation[4][:60]!r}\n        by {why}")
    return results


@pytest.mark.slow
def test_every_mutation_is_caught():
    results = run_all(out=lambda line: None)
    bad = [(r[0], r[3][:60], r[-1]) for r in results if r[-1] != "caught"]
    assert not bad, bad
    per_mechanism = {}
    for r in results:
        per_mechanism[r[0]] = per_mechanism.get(r[0], 0) + 1
    assert min(per_mechanism.values()) >= 3, per_mechanism


if __name__ == "__main__":
    selected = [m for m in MUTATIONS if len(sys.argv) < 2 or m[0] in sys.argv[1:]]
    outcomes = run_all(selected)
    missed = [r for r in outcomes if r[-1] != "caught"]
    print(f"{len(outcomes) - len(missed)} of {len(outcomes)} mutations caught")
    sys.exit(1 if missed else 0)
