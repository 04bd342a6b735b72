"""Few-shot training on tiny data: the loop runs every phase, writes a loadable checkpoint whose card
records strategy, data and metrics, resumes after a stop, and synthetic subjects are diffeomorphic."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import TINY_CARD, phantom_array, phantom_labels, sample_on

from JointRegSegLib import Cancelled, load_model
from JointRegSegLib.data.generator import synthesize
from JointRegSegLib.core.geometry import make_grid
from JointRegSegLib.training.train import train

GRID = {"size": [32, 32, 32], "spacing": [3.0, 3.0, 3.0], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
CONFIG = {"name": "tiny-deepatlas", "strategy": "deepatlas", "seed": 0,
          "architecture": TINY_CARD["architecture"], "intensity": TINY_CARD["intensity"],
          "steps": {"reg_pretrain": 4, "seg_pretrain": 3, "joint": 4}, "seg_every": 2,
          "weights": {"similarity": 1.0, "smooth": 1.0, "anatomy": 1.0, "supervised": 1.0},
          "lr": {"reg_pretrain": 1e-3, "seg_pretrain": 1e-3, "reg": 5e-4, "seg": 1e-4}, "checkpoint_every": 3}


def test_a_synthetic_subject_moves_the_anatomy_with_its_labels_and_keeps_the_background():
    """`data build`'s subjects come from the generator: the anatomy moves (labels overlap the original's
    only partly), labels move with the image (the image is bright where the labels are), the background
    stays 0 and intensities change."""
    source_grid = make_grid((48, 48, 48), (2.0, 2.0, 2.0), np.eye(3), np.zeros(3))
    image, labels = sample_on(source_grid, phantom_array), sample_on(source_grid, phantom_labels)
    grid = make_grid(GRID["size"], GRID["spacing"], np.eye(3), np.zeros(3))
    plain, plain_labels = synthesize(image, labels, grid, np.random.default_rng(0), deform=False, strength=0.0)
    moved, moved_labels = synthesize(image, labels, grid, np.random.default_rng(1))
    a, b = sitk.GetArrayFromImage(plain_labels) > 0, sitk.GetArrayFromImage(moved_labels) > 0
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert 0.3 < dice < 0.98
    values = sitk.GetArrayFromImage(moved)
    assert values[b].mean() > 2 * values[~b].mean()
    assert (values[sitk.GetArrayFromImage(plain) == 0] == 0).mean() > 0.9
    assert not np.allclose(values, sitk.GetArrayFromImage(plain))


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
    (folder / "dataset.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder


def test_deepatlas_training_writes_a_documented_checkpoint(tmp_path, tiny_dataset):
    out = train(CONFIG, tiny_dataset, tmp_path / "m.safetensors", device="cpu")
    model = load_model(out)
    card = model.card
    assert card["training"]["strategy"] == "deepatlas"
    assert card["training"]["labelled_images"] == ["s0"]
    assert card["training"]["unlabelled_images"] == 4
    assert card["data"]["sources"] == [{"name": "phantom"}]
    summary = card["data"]["summary"]  # counted from the manifest
    assert "Training images: 5 (1 real, 4 synthetic; from phantom)" in summary
    assert "1 with labels used in training (s0) and 4 without" in summary
    assert "Validation images: 2 (0 real, 2 synthetic" in summary and summary.endswith("test phantom")
    assert 0.0 <= card["metrics"]["registration_dice_mean"] <= 1.0
    assert card["working_grid"]["size"] == GRID["size"]
    log = (tmp_path / "m.log.csv").read_text(encoding="utf-8").splitlines()
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
    state = json.loads((tmp_path / "m.state.json").read_text(encoding="utf-8"))
    assert state["next_step"] == 3
    partial = load_model(tmp_path / "m.partial.safetensors")
    train(CONFIG, tiny_dataset, out, device="cpu")
    steps = [int(line.split(",")[0]) for line in (tmp_path / "m.log.csv").read_text(encoding="utf-8").splitlines()[1:]]
    # step 3 was logged, then stopped before its checkpoint, and ran again: the log lists every step once
    # (a step of the joint phases logs one row per update, so rows of one step come together)
    assert steps == sorted(steps) and set(steps) == set(range(steps[-1] + 1)) and steps[-1] >= 3
    final = load_model(out)
    assert not all(torch.equal(a, b) for a, b in zip(partial.network.state_dict().values(),
                                                      final.network.state_dict().values()))


def test_strategy_list_matches_the_implementations():
    from JointRegSegLib.training.cli import STRATEGIES as listed
    from JointRegSegLib.training.strategies import STRATEGIES
    assert set(STRATEGIES) <= set(listed)
    # names the CLI dispatches to their own trainer (not a strategy of this loop)
    assert set(listed) - set(STRATEGIES) <= {"synth", "affine"}


JOINT_UPDATES = {"deeprs": {"reg_pretrain_disc", "joint_disc", "joint_reg", "joint_seg"},
                 "brbs": {"joint_reg", "joint_seg"}, "pcreg-rt": {"stage1_seg", "stage1_reg", "joint_reg"},
                 "uresnet": {"joint"}, "unsupervised": {"joint_reg"}}


@pytest.mark.parametrize("strategy", sorted(JOINT_UPDATES))
def test_other_strategies_train_and_record_their_paper(tmp_path, tiny_dataset, strategy):
    config = {**CONFIG, "name": f"tiny-{strategy}", "strategy": strategy, "seg_every": 1,
              "steps": {"reg_pretrain": 3, "seg_pretrain": 2, "joint": 3}}
    config.pop("weights")  # each method's own published weights
    if strategy == "deeprs":
        config["discriminator"] = {"channels": [4, 8], "strides": [2]}
    if strategy == "uresnet":
        config["architecture"] = {"name": "uresnet", "channels": [4, 8], "integration_steps": 4}
        config["lr"] = {"all": 1e-3}
    out = train(config, tiny_dataset, tmp_path / "m.safetensors", device="cpu")
    card = load_model(out).card
    assert card["training"]["strategy"] == strategy
    assert card["training"]["paper"] and card["training"]["implements"]
    rows = [line.split(",") for line in (tmp_path / "m.log.csv").read_text(encoding="utf-8").splitlines()[1:]]
    phases = {row[1] for row in rows}
    assert JOINT_UPDATES[strategy] <= phases
    assert all(np.isfinite(float(row[2])) for row in rows)
    assert not (tmp_path / "m.aux.safetensors").exists()


@pytest.mark.slow
def test_torchrun_ddp_with_two_cpu_processes(tmp_path, tiny_dataset):
    import os
    import subprocess
    import sys
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**CONFIG, "steps": {"reg_pretrain": 2, "seg_pretrain": 2, "joint": 2}}), encoding="utf-8")
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "JointRegSegLib", "train", "--config", str(config), "--data", str(tiny_dataset),
                           "--out", str(out), "--device", "cpu"], capture_output=True, text=True, encoding="utf-8", errors="replace", env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    card = load_model(out).card
    assert card["training"]["world_size"] == 2
    # one log row per update, written by rank 0 only
    assert len((tmp_path / "ddp.log.csv").read_text(encoding="utf-8").splitlines()) == 1 + 2 + 2 + 2 + 1


def _write_case(folder, name, image, labels=None):
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(folder / f"{name}.nrrd"))
    if labels is not None:
        sitk.WriteImage(labels, str(folder / f"{name}_labels.nrrd"))


def test_finetune_records_its_parent_and_improves_dice_on_the_training_case(tmp_path, tiny_checkpoint):
    from JointRegSegLib.core.geometry import make_grid as grid_of
    from JointRegSegLib.training.finetune import finetune
    rng = np.random.default_rng(3)
    grid = grid_of((40, 40, 40), (3.0, 3.0, 3.0), np.eye(3), np.zeros(3))
    base = sample_on(grid_of((48, 48, 48), (2.0, 2.0, 2.0), np.eye(3), np.zeros(3)), phantom_array)
    base_labels = sample_on(grid_of((48, 48, 48), (2.0, 2.0, 2.0), np.eye(3), np.zeros(3)), phantom_labels)
    image, labels = synthesize(base, base_labels, grid, rng, deform=False, strength=0.3)
    _write_case(tmp_path / "labelled", "case1", image, labels)
    for i in range(2):
        _write_case(tmp_path / "unlabelled", f"u{i}", synthesize(base, None, grid, rng, strength=0.5)[0])
    out = tmp_path / "tuned.safetensors"
    config = {"steps": {"reg_pretrain": 0, "seg_pretrain": 25, "joint": 6}, "seg_every": 2,
              "lr": {"reg_pretrain": 1e-3, "seg_pretrain": 5e-3, "reg": 1e-3, "seg": 5e-3}}
    outcome = finetune(tiny_checkpoint, tmp_path / "labelled", out, unlabelled_dir=tmp_path / "unlabelled",
                       config=config, device="cpu")
    assert outcome["held_out"] == []
    card = load_model(out).card
    parent = load_model(tiny_checkpoint).card
    assert card["parent"]["weights_sha256"] == parent["weights_sha256"]
    assert card["finetune"]["labelled_cases"] == ["case1"] and card["finetune"]["unlabelled_cases"] == ["u0", "u1"]
    before = card["finetune"]["metrics_before"]["segmentation_dice_mean"]
    after = card["finetune"]["metrics_after"]["segmentation_dice_mean"]
    assert after > before + 0.2, (before, after)
    assert card["finetune"]["improved"] is True


def test_finetune_folder_errors_are_named(tmp_path, tiny_checkpoint):
    from JointRegSegLib.core.errors import JointRegSegError
    from JointRegSegLib.training.finetune import finetune
    grid = make_grid((16, 16, 16), (3.0, 3.0, 3.0), np.eye(3), np.zeros(3))
    image = sample_on(grid, phantom_array)
    _write_case(tmp_path / "labelled", "case1", image)
    with pytest.raises(JointRegSegError, match="no labelled case"):
        finetune(tiny_checkpoint, tmp_path / "labelled", tmp_path / "o.safetensors")
    _write_case(tmp_path / "labelled", "case1", image, sitk.Cast(sample_on(grid, phantom_labels), sitk.sitkUInt8))
    with pytest.raises(JointRegSegError, match="at least two training images"):
        finetune(tiny_checkpoint, tmp_path / "labelled", tmp_path / "o.safetensors")
    bad = sample_on(grid, phantom_labels) * 3
    _write_case(tmp_path / "labelled", "case1", image, sitk.Cast(bad, sitk.sitkUInt8))
    _write_case(tmp_path / "unlabelled", "u0", image)
    with pytest.raises(JointRegSegError, match=r"values \[3, 6\] are not in the label table of the model"):
        finetune(tiny_checkpoint, tmp_path / "labelled", tmp_path / "o.safetensors", tmp_path / "unlabelled")
    assert not (tmp_path / "o.safetensors").exists()


def test_validation_note_says_when_validation_shares_an_anatomy_with_training():
    from types import SimpleNamespace
    from JointRegSegLib.evaluation.validation import validation_note
    table = [{"value": 0}, {"value": 1}, {"value": 2}, {"value": 3}]
    items = [{"name": "a0", "source": "colin27"}, {"name": "b0", "source": "mni2009c"},
             {"name": "v0", "source": "colin27"}, {"name": "v1", "source": "kmeans"}]
    shared = SimpleNamespace(manifest={"items": items, "validation_pairs": [{"moving": "v0", "fixed": "v1"}]},
                             train=["a0", "b0"])
    note = validation_note(shared, table)
    assert "3 structures" in note and "colin27" in note and "do not measure generalisation" in note
    unseen = SimpleNamespace(manifest={"items": items, "validation_pairs": [{"moving": "v1", "fixed": "v1"}]},
                             train=["a0", "b0"])
    assert "held out of training" in validation_note(unseen, table)
