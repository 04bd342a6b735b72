"""Few-shot training on tiny data: the loop runs every phase, writes a loadable checkpoint whose card
records strategy, data and metrics, resumes after a stop, and synthetic subjects are diffeomorphic."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import TINY_CARD, phantom_array, phantom_labels, sample_on

from JointRegSegLib import Cancelled, load_model
from JointRegSegLib.data.synth import appearance, random_deformation, synthesize
from JointRegSegLib.geometry import jacobian_determinant, make_grid
from JointRegSegLib.training.train import train

GRID = {"size": [32, 32, 32], "spacing": [3.0, 3.0, 3.0], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
CONFIG = {"name": "tiny-deepatlas", "strategy": "deepatlas", "seed": 0,
          "architecture": TINY_CARD["architecture"], "intensity": TINY_CARD["intensity"],
          "steps": {"reg_pretrain": 4, "seg_pretrain": 3, "joint": 4}, "seg_every": 2,
          "weights": {"similarity": 1.0, "smooth": 1.0, "anatomy": 1.0, "supervised": 1.0},
          "lr": {"reg_pretrain": 1e-3, "seg_pretrain": 1e-3, "reg": 5e-4, "seg": 1e-4}, "checkpoint_every": 3}


def test_random_deformation_is_smooth_and_fold_free():
    grid = make_grid((40, 48, 40), (2.5, 2.5, 2.5), np.eye(3), np.zeros(3))
    field = random_deformation(grid, np.random.default_rng(1), smooth_mm=4.0)
    det = jacobian_determinant(field, grid)
    assert (det <= 0).mean() == 0.0
    magnitude = np.linalg.norm(field, axis=-1)
    assert 1.0 < magnitude.mean() < 20.0


def test_appearance_keeps_background_and_changes_contrast():
    array = np.zeros((20, 20, 20), np.float32)
    array[5:15, 5:15, 5:15] = np.linspace(10, 100, 10)[None, None, :]
    out = appearance(array, np.random.default_rng(0))
    assert (out[array == 0] == 0).all()
    assert not np.allclose(out[array > 0], (array[array > 0] - 10) / 90)


@pytest.fixture
def tiny_dataset(tmp_path):
    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    grid = make_grid(GRID["size"], GRID["spacing"], np.eye(3), np.zeros(3))
    base = sample_on(make_grid((48, 48, 48), (2.0, 2.0, 2.0), np.eye(3), np.zeros(3)), phantom_array)
    base_labels = sample_on(make_grid((48, 48, 48), (2.0, 2.0, 2.0), np.eye(3), np.zeros(3)), phantom_labels)
    rng = np.random.default_rng(0)
    items = []
    for i, split in enumerate(["train"] * 5 + ["val"] * 2):
        image, labels = synthesize(base, base_labels, grid, rng, deform=i > 0, strength=0.5)
        name = f"s{i}"
        sitk.WriteImage(image, str(folder / "images" / f"{name}.nii.gz"))
        sitk.WriteImage(labels, str(folder / "labels" / f"{name}.nii.gz"))
        items.append({"name": name, "image": f"images/{name}.nii.gz", "labels": f"labels/{name}.nii.gz",
                      "split": split, "labelled": i == 0, "source": "phantom", "synthetic": i > 0})
    manifest = {"format": "jointregseg-dataset", "version": 1, "seed": 0, "working_grid": GRID,
                "label_table": TINY_CARD["labels"], "modality": "synthetic", "items": items,
                "validation_pairs": [{"moving": "s5", "fixed": "s6"}], "sources": [{"name": "phantom"}],
                "notes": "test phantom"}
    (folder / "dataset.json").write_text(json.dumps(manifest))
    return folder


def test_deepatlas_training_writes_a_documented_checkpoint(tmp_path, tiny_dataset):
    out = train(CONFIG, tiny_dataset, tmp_path / "m.safetensors", device="cpu")
    model = load_model(out)
    card = model.card
    assert card["training"]["strategy"] == "deepatlas"
    assert card["training"]["labelled_images"] == ["s0"]
    assert card["training"]["unlabelled_images"] == 4
    assert card["data"]["sources"] == [{"name": "phantom"}]
    assert 0.0 <= card["metrics"]["registration_dice_mean"] <= 1.0
    assert card["working_grid"]["size"] == GRID["size"]
    log = (tmp_path / "m.log.csv").read_text().splitlines()
    phases = {line.split(",")[1] for line in log[1:]}
    assert phases == {"reg_pretrain", "seg_pretrain", "joint_reg", "joint_seg"}
    assert not (tmp_path / "m.partial.safetensors").exists()


def test_training_resumes_after_a_stop(tmp_path, tiny_dataset):
    out = tmp_path / "m.safetensors"
    seen = []

    def stop_after_five(stage, fraction):
        seen.append(fraction)
        if len(seen) > 5:
            raise Cancelled("stop for the test")

    with pytest.raises(Cancelled):
        train(CONFIG, tiny_dataset, out, device="cpu", progress=stop_after_five)
    state = json.loads((tmp_path / "m.state.json").read_text())
    assert state["next_step"] == 3
    partial = load_model(tmp_path / "m.partial.safetensors")
    train(CONFIG, tiny_dataset, out, device="cpu")
    steps = [int(line.split(",")[0]) for line in (tmp_path / "m.log.csv").read_text().splitlines()[1:]]
    # steps 3.. ran again after the resume, none before step 3 twice
    assert steps.count(0) == 1 and steps.count(3) == 2
    final = load_model(out)
    assert not all(torch.equal(a, b) for a, b in zip(partial.network.state_dict().values(),
                                                      final.network.state_dict().values()))


def test_strategy_list_matches_the_implementations():
    from JointRegSegLib.training.cli import STRATEGIES as listed
    from JointRegSegLib.training.strategies import STRATEGIES
    assert set(listed) == set(STRATEGIES)


@pytest.mark.parametrize("strategy", ["deeprs", "unsupervised"])
def test_other_strategies_train_and_record_their_paper(tmp_path, tiny_dataset, strategy):
    config = {**CONFIG, "name": f"tiny-{strategy}", "strategy": strategy,
              "steps": {"reg_pretrain": 3, "seg_pretrain": 2, "joint": 3}}
    if strategy == "deeprs":
        config["weights"] = {"adv": 1.0, "drc": 10.0, "cc": 1.0, "R": 1.0, "acm": 1.0, "ce": 1.0}
        config["discriminator"] = {"channels": [4, 8], "strides": [2]}
    out = train(config, tiny_dataset, tmp_path / "m.safetensors", device="cpu")
    card = load_model(out).card
    assert card["training"]["strategy"] == strategy
    assert card["training"]["paper"] and card["training"]["implements"]
    rows = [line.split(",") for line in (tmp_path / "m.log.csv").read_text().splitlines()[1:]]
    phases = {row[1] for row in rows}
    expected = {"joint_disc", "joint_reg", "joint_seg"} if strategy == "deeprs" else {"joint_reg"}
    assert expected <= phases
    assert not (tmp_path / "m.aux.safetensors").exists()


def test_torchrun_ddp_with_two_cpu_processes(tmp_path, tiny_dataset):
    import os
    import subprocess
    import sys
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**CONFIG, "steps": {"reg_pretrain": 2, "seg_pretrain": 2, "joint": 2}}))
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "JointRegSegLib", "train", "--config", str(config), "--data", str(tiny_dataset),
                           "--out", str(out), "--device", "cpu"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    card = load_model(out).card
    assert card["training"]["world_size"] == 2
    # one log row per update, written by rank 0 only
    assert len((tmp_path / "ddp.log.csv").read_text().splitlines()) == 1 + 2 + 2 + 2 + 1
