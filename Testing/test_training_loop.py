"""The one training loop: every strategy runs through `training.train.train` (resumable, logged, with a loss
curve), and the seed methods draw their training images through the synthetic strategy's generator."""
import json

import numpy as np
import pytest
import torch
from conftest import TINY_CARD

from JointRegSegLib import Cancelled, load_model, new_model, save_model
from JointRegSegLib.training.dataset import AugmentedData, augmentation_settings
from JointRegSegLib.training.strategies import STRATEGIES
from JointRegSegLib.training.train import train
from strategy_data import few_shot, phantom
from test_training import CONFIG, tiny_dataset  # noqa: F401,F811  (the few-shot data set fixture)


def test_every_strategy_is_a_strategy_of_the_one_loop():
    from JointRegSegLib.training.strategies.base import Strategy
    assert {"synth", "affine", "deepatlas"} <= set(STRATEGIES)
    for name, strategy in STRATEGIES.items():
        assert issubclass(strategy, Strategy), name
        for hook in ("load_data", "build_model", "create", "plan", "optimizers", "updates", "before_step", "finish"):
            assert callable(getattr(strategy, hook)), (name, hook)


def test_seed_method_images_are_drawn_through_the_generator_with_their_labels():
    """Each step a new draw; within a step one draw (image and labels deformed together); validation
    images and evaluation labels untouched."""
    data = few_shot(n=4, labelled=(0,))
    data.manifest["working_grid"] = {"size": [24] * 3, "spacing": [2.0] * 3}
    data.images["v0"] = torch.from_numpy(phantom(np.random.default_rng(9), 24)[0])[None, None]
    data.val.append("v0")
    augmented = AugmentedData(data, augmentation_settings({}, data), TINY_CARD["intensity"])
    name = data.labelled[0]
    augmented.next_step(np.random.default_rng(0))
    first, first_labels = augmented.images[name], augmented.labels[name]
    assert augmented.images[name] is first                       # one draw per step
    assert not torch.equal(first, data.images[name])
    # the labels follow the image: the inner structure (label 1) is where the drawn image is brightest
    inner, outer = first[first_labels == 1].mean(), first[first_labels == 2].mean()
    assert float(inner) > float(outer) + 0.2
    moved = (first_labels == 1) != (data.labels[name] == 1)
    assert moved.any()                                             # and they moved with it
    augmented.next_step(np.random.default_rng(1))
    assert not torch.equal(augmented.images[name], first)
    for val in data.val:
        assert augmented.images[val] is data.images[val]
    assert augmented.hidden_labels is data.hidden_labels
    assert augmentation_settings({"augmentation": False}, data) is None


def test_a_seed_method_trains_on_augmented_images_and_its_card_says_so(tmp_path, tiny_dataset):  # noqa: F811
    """Augmentation is on by default (the generator's settings recorded in the card); `"augmentation":
    false` trains on the data set's images as they are, and says that too."""
    augmented = load_model(train(CONFIG, tiny_dataset, tmp_path / "a.safetensors", device="cpu"))
    record = augmented.card["training"]["augmentation"]
    assert record["real_image_probability"] == 1.0 and record["bias_strength"] > 0
    plain = load_model(train({**CONFIG, "augmentation": False}, tiny_dataset, tmp_path / "p.safetensors",
                             device="cpu"))
    assert plain.card["training"]["augmentation"] is None
    assert not all(torch.equal(a, b) for a, b in zip(augmented.network.state_dict().values(),
                                                      plain.network.state_dict().values()))


@pytest.fixture
def phantom_sources(tmp_path):
    from test_synthesis import _phantom_sources_dir
    return _phantom_sources_dir(tmp_path / "sources")


def test_the_learned_affine_resumes_after_a_stop_and_writes_its_loss_curve(tmp_path, phantom_sources):
    """The learned affine's training (its own loop before) now resumes like every strategy: stopped after
    its first checkpoint, run again, every step logged once; the loss curve is drawn."""
    card = {**TINY_CARD, "working_grid": {"size": [40, 48, 40], "spacing": [2.0, 2.0, 2.0],
                                          "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}}
    base = save_model(new_model(card, seed=1), tmp_path / "base.safetensors")
    config = {"strategy": "affine", "steps": 4, "batch": 1, "checkpoint_every": 2, "polish_schedule": [[1, 5]],
              "affine": {"kind": "keypoints", "pool": 2, "keypoints": 4, "channels": [4, 8], "strides": [2]}}
    out = tmp_path / "affine.safetensors"
    seen = []

    def stop_after_three(stage, fraction):
        seen.append(fraction)
        if len(seen) == 3:
            raise Cancelled("stop for the test")

    with pytest.raises(Cancelled):
        train(config, phantom_sources, out, init=base, device="cpu", progress=stop_after_three)
    assert json.loads(out.with_suffix(".state.json").read_text())["next_step"] == 2
    train(config, phantom_sources, out, init=base, device="cpu")
    rows = out.with_suffix(".log.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in rows] == [0, 1, 2, 3]
    assert all('"error_mm"' in row for row in rows)
    assert out.with_suffix(".loss-curve.png").stat().st_size > 1000
    assert not out.with_suffix(".partial.safetensors").exists()
    trained = load_model(out)
    assert trained.card["prealignment"]["learned_affine"]["trained_from"] == "base.safetensors"


def test_a_registration_only_run_keeps_every_other_weight(tmp_path, phantom_sources):
    """`parts: ["registration"]`: the registration network trains; the segmentation (and its label table) stay
    the `--init` model's bit for bit."""
    from test_synthesis import _tiny_synth_config
    first = load_model(train(_tiny_synth_config(steps=1), phantom_sources, tmp_path / "first.safetensors"))
    again = load_model(train(_tiny_synth_config(steps=2, parts=["registration"]), phantom_sources,
                             tmp_path / "again.safetensors", init=tmp_path / "first.safetensors"))
    before, after = first.network.state_dict(), again.network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("registration."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("registration."))
    assert again.card["labels"] == first.card["labels"]
