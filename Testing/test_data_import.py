"""`jointregseg data import`: a user's own labelled scans, stored in mixed orientations and formats, become a
training data set on one working grid, with each structure where the reference anatomy has it; every
training strategy trains on it through the CLI; bad inputs stop the import with a sentence naming the
file, and leave no output folder."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import rotation

from JointRegSegLib.cli import main
from JointRegSegLib.core.geometry import make_grid, physical_points
from JointRegSegLib.data.dataset_format import load_manifest
from JointRegSegLib.models.card import read_card

# the anatomy: a textured body with three structures (value, centre mm, radii mm, intensity)
STRUCTURES = [(1, (-11.0, 2.0, 0.0), (8.0, 7.0, 7.0), 90.0),
              (2, (11.0, 4.0, -2.0), (7.0, 9.0, 6.0), 60.0),
              (3, (0.0, -12.0, 7.0), (6.0, 6.0, 8.0), 120.0)]
TABLE = [("1", "left blob", "#e64d1a"), ("2", "right blob", "0.1 0.6 0.9"), ("3", "lower blob", "")]
PERMUTED = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


# name: (how the file stores its axes, spacing, size, where the anatomy lies: rotation deg, centre mm, format,
#        label-map file name or None)
SCANS = {
    "case_a": (np.diag([-1.0, -1.0, 1.0]), (3.0, 3.0, 3.0), (24, 24, 24), ((0, 0, 0), (5, -3, 10)), ".nii.gz",
               "case_a.nii.gz"),                                     # RAS-like storage; the reference
    "case_b": (np.eye(3), (2.5, 2.5, 2.5), (26, 28, 24), ((4, -3, 6), (-8, 6, -4)), ".nrrd", "case_b_seg.nrrd"),
    "case_c": (rotation((10, -15, 20)), (3.0, 3.0, 3.0), (24, 24, 24), ((-6, 5, 0), (12, 0, 3)), ".mha",
               "case_c-labels.nii.gz"),                              # oblique
    "case_d": (PERMUTED, (3.0, 2.5, 3.0), (22, 26, 24), ((0, 0, 8), (0, 15, -6)), ".nii.gz", None),
    "case_e": (np.diag([1.0, -1.0, -1.0]), (3.0, 3.0, 3.0), (24, 24, 24), ((-5, 0, -4), (-10, -8, 0)), ".nrrd",
               None),
}
TINY_UNET = {"name": "unet-pair", "registration": {"channels": [4, 8, 8], "strides": [2, 2]},
             "segmentation": {"channels": [4, 8, 8], "strides": [2, 2]},
             "integration_steps": 4, "velocity_downsample": 2}
TINY_URESNET = {"name": "uresnet", "channels": [4, 8], "integration_steps": 4, "velocity_downsample": 2}
STRATEGIES = ("deepatlas", "deeprs", "brbs", "pcreg-rt", "uresnet", "unsupervised")


def anatomy(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image and label values at anatomy-space points (..., 3) mm."""
    body = np.sqrt(((points / np.array([30.0, 33.0, 26.0])) ** 2).sum(-1)) < 1.0
    image = 40.0 * body
    labels = np.zeros(points.shape[:-1], np.uint8)
    for value, centre, radii, level in STRUCTURES:
        inside = (((points - np.array(centre)) / np.array(radii)) ** 2).sum(-1) < 1.0
        image = np.where(inside, level, image)
        labels[inside] = value
    texture = np.random.default_rng(5)
    for _ in range(20):
        blob = texture.uniform(-25, 25, 3)
        image = image + texture.uniform(-12, 12) * np.exp(-((points - blob) ** 2).sum(-1) / 72.0) * body
    return image.astype(np.float32), labels


def scan(name: str, noise_seed: int = 0) -> tuple[sitk.Image, sitk.Image]:
    """The scan as its file stores it: the anatomy rotated and moved in physical space, sampled on a grid
    with the scan's own axes, spacing and origin."""
    direction, spacing, size, (degrees, centre), _, _ = SCANS[name]
    grid = make_grid(size, spacing, direction, np.array(centre) + np.array([1.0, -2.0, 1.5]))
    points = physical_points(grid)
    image, labels = anatomy((points - np.array(centre)) @ rotation(degrees))
    image = image + np.random.default_rng(noise_seed).normal(0, 2.0, image.shape).astype(np.float32)
    return _on(image, grid), _on(labels, grid)


def _on(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(grid)
    return image


def centroids(labels: sitk.Image) -> dict:
    """Physical centre (mm) of each structure of a label map."""
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(labels)
    return {value: np.array(shape.GetCentroid(value)) for value in shape.GetLabels()}


def write_table(path: Path, rows=TABLE) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["value", "name", "color"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """images/ (five scans, three formats, four storage orientations), labels/ (three label maps, three
    naming styles), table.csv."""
    root = tmp_path_factory.mktemp("scans")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for seed, (name, spec) in enumerate(SCANS.items()):
        image, labels = scan(name, seed)
        sitk.WriteImage(image, str(root / "images" / f"{name}{spec[4]}"))
        if spec[5]:
            sitk.WriteImage(labels, str(root / "labels" / spec[5]))
    write_table(root / "table.csv")
    return root


def run_import(root: Path, out: Path, *extra: str, images: Path | None = None, labels: Path | None = None) -> int:
    return main(["data", "import", "--images", str(images or root / "images"),
                 "--labels", str(labels or root / "labels"), "--label-table", str(root / "table.csv"),
                 "--out", str(out), "--threads", "1", *extra])


@pytest.fixture(scope="module")
def imported(scans, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "data"
    assert run_import(scans, out, "--spacing", "3", "--size", "24", "24", "24", "--val", "1") == 0
    return out


# ---- what the import writes -----------------------------------------------------------------------------

def test_every_scan_lands_on_one_axis_aligned_grid_with_its_label_values(imported):
    manifest = load_manifest(imported)
    assert manifest["working_grid"] == {"size": [24, 24, 24], "spacing": [3.0, 3.0, 3.0],
                                        "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
    assert sorted(e["name"] for e in manifest["items"]) == sorted(SCANS)
    grids = set()
    for item in manifest["items"]:
        image = sitk.ReadImage(str(imported / item["image"]))
        grids.add((image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()))
        if item["labels"]:
            labels = sitk.ReadImage(str(imported / item["labels"]))
            assert (labels.GetSize(), labels.GetOrigin()) == (image.GetSize(), image.GetOrigin())
            assert set(np.unique(sitk.GetArrayViewFromImage(labels))) == {0, 1, 2, 3}
    assert len(grids) == 1
    labelled = {e["name"] for e in manifest["items"] if e["labels"]}
    assert labelled == {"case_a", "case_b", "case_c"}           # three naming styles matched
    assert [e["value"] for e in manifest["label_table"]] == [0, 1, 2, 3]   # background added
    assert manifest["label_table"][1]["color"] == [0.902, 0.302, 0.102]
    assert all(len(e["color"]) == 3 for e in manifest["label_table"])


def test_the_split_holds_one_labelled_image_out_and_pairs_it_with_a_training_one(imported):
    manifest = load_manifest(imported)
    splits = {e["name"]: (e["split"], e["labelled"]) for e in manifest["items"]}
    held = [name for name, (split, _) in splits.items() if split == "val"]
    assert len(held) == 1 and held[0] in ("case_b", "case_c")   # never the reference
    assert splits["case_a"] == ("train", True)
    assert splits["case_d"] == splits["case_e"] == ("train", False)
    assert manifest["validation_pairs"] == [{"moving": "case_a", "fixed": held[0]}]


def test_each_structure_lands_where_the_reference_has_it(imported):
    """The reference keeps its physical place; every other labelled scan, whatever its storage orientation
    and position (11 to 26 mm and up to 20 degrees away), has each structure where the reference has it:
    within one working-grid voxel (3 mm; nearest-neighbour resampling alone moves a label up to 2.6 mm)."""
    _, reference_labels = scan("case_a")
    expected = centroids(reference_labels)
    manifest = load_manifest(imported)
    for item in manifest["items"]:
        if not item["labels"]:
            continue
        found = centroids(sitk.ReadImage(str(imported / item["labels"])))
        errors = [float(np.linalg.norm(found[v] - expected[v])) for v in (1, 2, 3)]
        assert max(errors) < 3.0, (item["name"], errors)
    # nothing of the reference is cut off or blown up: each structure keeps its volume
    imported_reference = sitk.ReadImage(str(imported / "labels" / "case_a.nii.gz"))
    for value in (1, 2, 3):
        before = (sitk.GetArrayViewFromImage(reference_labels) == value).sum()
        after = (sitk.GetArrayViewFromImage(imported_reference) == value).sum()
        assert abs(after / before - 1) < 0.05, (value, before, after)


# ---- training on it ------------------------------------------------------------------------------------

def tiny_config(strategy: str) -> dict:
    return {"name": f"tiny-{strategy}", "strategy": strategy, "seed": 0,
            "architecture": TINY_URESNET if strategy == "uresnet" else TINY_UNET,
            "intensity": {"kind": "percentile", "lower": 1.0, "upper": 99.5},
            "steps": {"reg_pretrain": 1, "seg_pretrain": 1, "joint": 1}, "seg_every": 1,
            "lr": {"reg_pretrain": 1e-3, "seg_pretrain": 1e-3, "reg": 5e-4, "seg": 1e-4, "disc": 2e-4, "all": 1e-3},
            "discriminator": {"channels": [4, 8], "strides": [2]}, "segment_foreground_only": True,
            "checkpoint_every": 100}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_trains_on_imported_data(imported, tmp_path, strategy):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config(strategy)), encoding="utf-8")
    model = tmp_path / "model.safetensors"
    assert main(["train", "--strategy", strategy, "--config", str(config), "--data", str(imported),
                 "--out", str(model), "--device", "cpu", "--threads", "1"]) == 0
    card = read_card(model)
    assert card["labels"] == load_manifest(imported)["label_table"]
    assert card["working_grid"]["size"] == [24, 24, 24]
    assert card["metrics"]["validation_pairs"] == 1


def test_the_synthesis_strategy_trains_on_imported_data(imported, tmp_path):
    """`--strategy synth` on a data set: each labelled training image is a source (its label map drives the
    synthesis, its image is the real one); the model has the data set's label table and grid, and its card
    the data set's validation figures."""
    config = {"name": "tiny-synth", "strategy": "synth", "seed": 0, "steps": 2, "architecture": TINY_UNET,
              "intensity": {"kind": "percentile", "lower": 1.0, "upper": 99.5}, "train_affine_schedule": [[2, 3]]}
    path = tmp_path / "synth.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    model = tmp_path / "synth.safetensors"
    assert main(["train", "--config", str(path), "--data", str(imported), "--out", str(model), "--device", "cpu",
                 "--threads", "1"]) == 0
    card = read_card(model)
    assert card["labels"] == load_manifest(imported)["label_table"]
    assert card["working_grid"]["size"] == [24, 24, 24]
    assert card["metrics"]["validation_pairs"] == 1
    assert card["training"]["strategy"] == "synth" and card["data"]["folder"] == str(imported)


def test_default_grid_and_no_validation_images(scans, tmp_path):
    """Without --spacing/--size the grid covers the reference's field of view (72 mm) at 2 mm in multiples
    of 8; with --val 0 there are no validation pairs and training still writes a model."""
    out = tmp_path / "data"
    assert run_import(scans, out, "--val", "0", "--labelled", "1") == 0
    manifest = load_manifest(out)
    assert manifest["working_grid"]["spacing"] == [2.0, 2.0, 2.0]
    assert manifest["working_grid"]["size"] == [40, 40, 40]      # 72 mm at 2 mm -> 36 -> 40
    assert manifest["validation_pairs"] == []
    assert [e["name"] for e in manifest["items"] if e["labelled"]] == ["case_a"]
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config("deepatlas")), encoding="utf-8")
    model = tmp_path / "model.safetensors"
    assert main(["train", "--config", str(config), "--data", str(out), "--out", str(model), "--device", "cpu",
                 "--threads", "1"]) == 0
    card = read_card(model)
    assert card["metrics"]["validation_pairs"] == 0 and card["training"]["labelled_images"] == ["case_a"]
    assert "no validation figures" in card["metrics"]["note"] and "registration_dice_mean" not in card["metrics"]


# ---- what a user gets wrong -----------------------------------------------------------------------------

def copy_scans(scans: Path, tmp_path: Path) -> Path:
    root = tmp_path / "scans"
    shutil.copytree(scans, root)
    return root


def assert_refused(capsys, out: Path, *phrases: str) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("PROGRESS ")]
    assert len(lines) == 1 and lines[0].startswith("jointregseg: error: "), lines   # one line, no traceback
    message = lines[0]
    for phrase in phrases:
        assert phrase in message, message
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]
    return message


def test_a_label_map_without_its_image_is_named(scans, tmp_path, capsys):
    root = copy_scans(scans, tmp_path)
    shutil.copy(root / "labels" / "case_b_seg.nrrd", root / "labels" / "case_x_seg.nrrd")
    out = tmp_path / "data"
    assert run_import(root, out) == 2
    assert_refused(capsys, out, "case_x_seg.nrrd", "no image")


def test_label_values_outside_the_table_are_listed(scans, tmp_path, capsys):
    root = copy_scans(scans, tmp_path)
    write_table(root / "table.csv", TABLE[:1])         # only value 1 (and background) known
    out = tmp_path / "data"
    assert run_import(root, out) == 2
    assert_refused(capsys, out, "case_a.nii.gz", "values [2, 3]", "table.csv")


def test_a_label_map_off_its_image_grid_is_refused(scans, tmp_path, capsys):
    root = copy_scans(scans, tmp_path)
    labels = sitk.ReadImage(str(root / "labels" / "case_b_seg.nrrd"))
    labels.SetOrigin([o + 5.0 for o in labels.GetOrigin()])
    sitk.WriteImage(labels, str(root / "labels" / "case_b_seg.nrrd"))
    out = tmp_path / "data"
    assert run_import(root, out) == 2
    assert_refused(capsys, out, "case_b_seg.nrrd", "not on the grid", "origin")


def test_images_without_any_label_map_are_refused(scans, tmp_path, capsys):
    out = tmp_path / "data"
    assert run_import(scans, out, images=scans / "images", labels=scans / "images") == 2   # no suffixed maps
    assert_refused(capsys, out, "no image has a label map")


def test_two_files_with_one_name_are_refused(scans, tmp_path, capsys):
    root = copy_scans(scans, tmp_path)
    sitk.WriteImage(sitk.ReadImage(str(root / "images" / "case_d.nii.gz")), str(root / "images" / "case_d.mha"))
    out = tmp_path / "data"
    assert run_import(root, out) == 2
    assert_refused(capsys, out, "case_d.mha", "case_d.nii.gz", "share a name")


def test_a_folder_without_images_is_refused(scans, tmp_path, capsys):
    empty = tmp_path / "notes"
    empty.mkdir()
    (empty / "readme.txt").write_text("scans come next week\n", encoding="utf-8")
    out = tmp_path / "data"
    assert run_import(scans, out, images=empty, labels=scans / "labels") == 2
    assert_refused(capsys, out, "no image SimpleITK can read", "readme.txt")


def test_a_scan_failing_halfway_leaves_no_output(scans, tmp_path, capsys):
    """The last scan is read only after the others were aligned and written: nothing may stay behind."""
    root = copy_scans(scans, tmp_path)
    whole = (root / "images" / "case_e.nrrd").read_bytes()
    (root / "images" / "case_e.nrrd").write_bytes(whole[: len(whole) - 4000])
    out = tmp_path / "data"
    assert run_import(root, out) == 2
    assert_refused(capsys, out, "case_e")


def test_beside_the_images_and_hand_written_manifests(scans, tmp_path, capsys):
    """Label maps beside their images (NAME_labels) import too; a hand-written dataset.json missing a field
    is refused by `train` with the field's name and the way to make a data set, not a KeyError."""
    root = tmp_path / "beside"
    shutil.copytree(scans / "images", root)
    shutil.copy(scans / "labels" / "case_a.nii.gz", root / "case_a_labels.nii.gz")
    shutil.copy(scans / "labels" / "case_b_seg.nrrd", root / "case_b_labels.nrrd")
    out = tmp_path / "data"
    assert main(["data", "import", "--images", str(root), "--label-table", str(scans / "table.csv"),
                 "--out", str(out), "--spacing", "4", "--size", "16", "16", "16", "--threads", "1"]) == 0
    assert {e["name"] for e in load_manifest(out)["items"] if e["labels"]} == {"case_a", "case_b"}
    capsys.readouterr()
    manifest = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    del manifest["label_table"]
    (out / "dataset.json").write_text(json.dumps(manifest), encoding="utf-8")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config("deepatlas")), encoding="utf-8")
    assert main(["train", "--config", str(config), "--data", str(out), "--out", str(tmp_path / "m.safetensors"),
                 "--threads", "1"]) == 2
    message = capsys.readouterr().err
    assert "'label_table' is missing" in message and "jointregseg data import" in message, message
