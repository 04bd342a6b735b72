"""Issue 27: the CLI as a newcomer meets it. One test or more per numbered item of the issue."""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import grid_for, phantom_array, sample_on

from JointRegSegLib import InputImageError, read_image
from JointRegSegLib.core import threads
from JointRegSegLib.cli import main
from JointRegSegLib.models.installed import default_model_path

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "Resources" / "SampleData"


# 1. every computing entry point takes `run`'s thread decision -----------------------------------------

class _ThreadsChosen(Exception):
    """Raised where the threads are applied: the command has taken its decision, nothing else need run."""


@pytest.fixture
def one_core_busy(monkeypatch):
    """2 cores, another program keeping one of them busy (what the load probe would measure), no
    --threads / JOINTREGSEG_THREADS; returns the threads each command applies."""
    applied = []
    monkeypatch.setattr(threads, "allowed_cpus", lambda: [0, 1])
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    monkeypatch.setattr(threads.LoadProbe, "stop", lambda self: 1.0)
    monkeypatch.delenv(threads.ENV_VAR, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)

    def apply(count):
        applied.append(count)
        raise _ThreadsChosen

    monkeypatch.setattr(threads, "apply_threads", apply)

    def not_reached(*args, **kwargs):
        raise AssertionError("the work began before the threads were chosen")

    import JointRegSegLib.demo
    import JointRegSegLib.inference.pipeline
    monkeypatch.setattr(JointRegSegLib.inference.pipeline, "register_and_segment", not_reached)
    monkeypatch.setattr(JointRegSegLib.demo, "register_and_segment", not_reached, raising=False)
    return applied


def _commands(tmp_path, pair_files, checkpoint):
    moving, fixed = pair_files
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    return {
        "run": lambda extra: main(["run", "--moving", str(moving), "--fixed", str(fixed), "--model", str(checkpoint),
                                   "--out", str(tmp_path / "run"), *extra]),
        "demo": lambda extra: __import__("JointRegSegLib.demo", fromlist=["main"]).main(
            ["--out", str(tmp_path / "demo"), *extra]),
        "evaluate": lambda extra: main(["evaluate", "--pairs", str(tmp_path / "pairs.csv"), "--out",
                                        str(tmp_path / "ev"), *extra]),
        "train": lambda extra: main(["train", "--config", str(REPO / "configs" / "brain-t1-deepatlas.json"),
                                     "--data", str(tmp_path / "data"), "--out", str(tmp_path / "m.safetensors"),
                                     *extra]),
        "finetune": lambda extra: main(["finetune", "--init", str(checkpoint), "--labelled", str(labelled),
                                        "--out", str(tmp_path / "f.safetensors"), *extra]),
        "data build": lambda extra: main(["data", "build", "--out", str(tmp_path / "built"), *extra]),
    }


@pytest.fixture
def pair_files(tmp_path, phantom_pair):
    moving, fixed = phantom_pair
    paths = tmp_path / "moving.nrrd", tmp_path / "fixed.nii.gz"
    sitk.WriteImage(moving, str(paths[0]))
    sitk.WriteImage(fixed, str(paths[1]))
    return paths


@pytest.mark.parametrize("command", ["run", "demo", "evaluate", "train", "finetune", "data build"])
def test_every_computing_command_takes_runs_thread_decision(tmp_path, pair_files, tiny_checkpoint, one_core_busy,
                                                            command):
    """With one of two cores busy, `run` takes 1 thread (2 would oversubscribe the busy core: the issue's
    175 s demo against 20 s); the demo and the other computing commands take the same, before any work,
    and --threads N overrides it for each."""
    expected = threads.choose_threads(None, busy_cores=1.0)["threads"]
    assert expected == 1
    run_command = _commands(tmp_path, pair_files, tiny_checkpoint)[command]
    with pytest.raises(_ThreadsChosen):
        run_command([])
    assert one_core_busy == [expected]
    with pytest.raises(_ThreadsChosen):
        run_command(["--threads", "3"])
    assert one_core_busy[-1] == 3


def test_demo_says_how_many_threads_it_took(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(threads.ENV_VAR, "1")
    monkeypatch.setattr(threads, "apply_threads", lambda count: None)

    def stop(*args, **kwargs):
        raise _ThreadsChosen

    import JointRegSegLib.inference.pipeline
    monkeypatch.setattr(JointRegSegLib.inference.pipeline, "register_and_segment", stop)
    from JointRegSegLib import demo
    with pytest.raises(_ThreadsChosen):
        demo.main(["--out", str(tmp_path / "demo")])
    assert "threads: 1 thread (JOINTREGSEG_THREADS" in capsys.readouterr().err


def test_the_slicer_warm_worker_takes_the_same_thread_decision():
    """The module's warm worker (`python -m JointRegSegLib.slicer.worker serve`) chooses its threads as `run` does
    and says so when it is ready (JOINTREGSEG_THREADS here, so that the answer does not depend on the load)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), threads.ENV_VAR: "1"}
    done = subprocess.run([sys.executable, "-m", "JointRegSegLib.slicer.worker", "serve"], input='{"command": "quit"}\n',
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    ready = json.loads(done.stdout.splitlines()[0])
    assert ready["event"] == "ready"
    assert (ready["threads"], ready["thread_source"]) == (1, threads.ENV_VAR)


# 2. `evaluate` without --model evaluates the embedded default model ------------------------------------

def test_evaluate_without_model_uses_the_default_model(tmp_path, monkeypatch):
    labels = tmp_path / "labels.nii.gz"
    sitk.WriteImage(sitk.Image(8, 8, 8, sitk.sitkUInt8), str(labels))
    (tmp_path / "pairs.csv").write_text(
        "moving,fixed,moving_labels,fixed_labels\n"
        f"{SAMPLES / 'colin27_t1_brain_2mm.nii.gz'},{SAMPLES / 'itk_subject_t1_brain.nii.gz'},{labels},{labels}\n")
    monkeypatch.setattr(threads, "apply_threads", lambda count: None)
    seen = {}

    def evaluate(pairs, methods, label_table, progress=None):
        seen["methods"], seen["labels"] = methods, label_table
        raise _ThreadsChosen

    import JointRegSegLib.evaluation.evaluate as evaluation
    monkeypatch.setattr(evaluation, "evaluate", evaluate)
    with pytest.raises(_ThreadsChosen):   # today: TypeError: 'PosixPath' object is not iterable
        main(["evaluate", "--pairs", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "ev")])
    from JointRegSegLib.models.card import read_card
    default = read_card(default_model_path())
    assert [m.name for m in seen["methods"]] == [default["name"]]
    assert seen["labels"] == default["labels"]


# 3. a 2D picture is "a 2D image", not "truncated" --------------------------------------------------------

def test_a_2d_png_is_refused_as_2d_not_as_truncated(tmp_path, pair_files, tiny_checkpoint, capsys):
    y, x = np.mgrid[0:300, 0:400]
    rgba = np.stack([(x % 256), (y % 256), ((x + y) % 256), np.full_like(x, 255)], axis=-1).astype(np.uint8)
    png = tmp_path / "screenshot.png"
    sitk.WriteImage(sitk.GetImageFromArray(rgba, isVector=True), str(png))
    assert png.stat().st_size < rgba.nbytes          # compressed: its size says nothing about truncation
    image = read_image(png, "moving")                # today: "the file is truncated (... bytes cannot hold ...)"
    assert image.GetDimension() == 2
    code = main(["run", "--moving", str(png), "--fixed", str(pair_files[1]), "--model", str(tiny_checkpoint),
                 "--out", str(tmp_path / "out"), "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "moving: expected a 3D volume, got a 2D image" in err and "truncated" not in err
    # a 2D grey PNG too, and a truncated 3D file of a raw format is still refused as truncated
    grey = tmp_path / "grey.png"
    sitk.WriteImage(sitk.GetImageFromArray(rgba[..., 0].copy()), str(grey))
    assert read_image(grey, "fixed").GetDimension() == 2
    volume = tmp_path / "volume.vtk"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).random((10, 12, 14)).astype(np.float32)),
                    str(volume))
    volume.write_bytes(volume.read_bytes()[:-2000])
    with pytest.raises(InputImageError, match="truncated"):
        read_image(volume, "moving")


# 4. the transform's size in the README is the one written ----------------------------------------------

def test_readme_states_the_transform_size_that_is_written(tmp_path):
    """ITK writes the composite's displacement field as float64 (SimpleITK offers no float32 or compressed
    transform writing), so transform.h5 is 24 bytes per working-grid voxel: the README says so in MB."""
    from JointRegSegLib.models.card import read_card
    grid = read_card(default_model_path())["working_grid"]
    field = sitk.Image([int(n) for n in grid["size"]], sitk.sitkVectorFloat64, 3)
    field.SetSpacing([float(s) for s in grid["spacing"]])
    composite = sitk.CompositeTransform([sitk.AffineTransform(3), sitk.DisplacementFieldTransform(field)])
    sitk.WriteTransform(composite, str(tmp_path / "transform.h5"))
    written_mb = (tmp_path / "transform.h5").stat().st_size / 1e6
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    stated = re.search(r"`transform\.h5` \(ITK composite transform:[^)]*?([\d.]+) MB", readme, re.S)
    assert stated, "README must state transform.h5's size (it said 'a few MB')"
    assert float(stated.group(1)) == pytest.approx(written_mb, rel=0.02)


# 6. `info`: not a checkpoint, a broken pipe, a readable summary and --json --------------------------------

@pytest.mark.parametrize("name, content, reason", [
    ("image.nii.gz", None, "gzip"),
    ("notes.txt", b"x" * 25, "not a safetensors file"),
    ("picture.png", None, "PNG"),
])
def test_info_on_a_file_that_is_not_a_model(tmp_path, capsys, name, content, reason):
    path = tmp_path / name
    if name.endswith(".nii.gz"):
        sitk.WriteImage(sitk.Image(8, 8, 3, sitk.sitkUInt8), str(path))
    elif name.endswith(".png"):
        sitk.WriteImage(sitk.Image(8, 8, sitk.sitkUInt8), str(path))
    else:
        path.write_bytes(content)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: not a JointRegSeg checkpoint (" in err and reason in err
    assert "header length" not in err


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_info_into_a_closed_pipe_prints_no_traceback(extra):
    """`jointregseg info MODEL | head`: the reader is gone before the card is printed."""
    process = subprocess.Popen([sys.executable, "-m", "JointRegSegLib", "info", str(default_model_path()), *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    process.stdout.close()
    err = process.stderr.read().decode()
    process.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert process.returncode == 141


def test_info_prints_a_readable_summary_and_json_the_whole_card(capsys):
    from JointRegSegLib.models.card import read_card
    model = default_model_path()
    card = read_card(model)
    card["licence"] = "CC BY 4.0 (weights)"
    assert main(["info", str(model)]) == 0
    summary = capsys.readouterr().out
    assert len(summary) < 4000 and max(len(line) for line in summary.splitlines()) <= 110
    assert summary.startswith(f"{card['name']}: ")
    structures = [e for e in card["labels"] if e["value"]]
    assert f"labels ({len(structures)} structures)" in summary
    assert all(f"{e['value']}={e['name']}" in summary for e in structures)
    assert f"working grid: {card['working_grid']['size']}" in summary
    assert f"strategy {card['training']['strategy']}" in summary
    assert all(source["name"] in summary for source in card["data"]["sources"])
    headline = next(key for key, value in card["metrics"].items() if isinstance(value, (int, float)))
    assert headline in summary and "--json" in summary
    assert "{" not in summary   # no JSON dumped into the summary
    from JointRegSegLib.models.card import summary_lines
    assert "  licence: CC BY 4.0 (weights)" in summary_lines(card)
    assert main(["info", str(model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == read_card(model)


# 7. set-up without deprecation warnings, models 0644, the sample data's table, .seg.nrrd terminology ------

def test_pyproject_license_is_an_spdx_expression_without_deprecation():
    import warnings

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert config["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in config["build-system"]["requires"]   # the first to take an SPDX `license`
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distribution = apply_configuration(Distribution(), str(REPO / "pyproject.toml"))
    assert not [w for w in caught if "license" in str(w.message).lower()], [str(w.message) for w in caught]
    assert distribution.metadata.license_expression == "Apache-2.0"


def test_saved_models_are_readable_by_others_like_other_outputs(tmp_path, tiny_model):
    from JointRegSegLib.models.checkpoint import save_model
    previous = os.umask(0o022)
    try:
        path = save_model(tiny_model, tmp_path / "model.safetensors")   # finetune and train write through it
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_sample_data_readme_has_one_table_and_says_what_was_modified():
    text = (REPO / "Resources" / "SampleData" / "README.md").read_text(encoding="utf-8")
    blocks, previous = [], False
    for line in text.splitlines():
        is_row = line.startswith("|")
        if is_row and not previous:
            blocks.append([])
        if is_row:
            blocks[-1].append(line)
        previous = is_row
    assert len(blocks) == 1, "one table, not split by a paragraph"
    rows = blocks[0][2:]
    files = sorted(p.name for p in (REPO / "Resources" / "SampleData").glob("*.nii.gz"))
    assert sorted(re.search(r"`([^`]+\.nii\.gz)`", row).group(1) for row in rows) == files
    for row in rows:
        modified = re.search(r"resampl|smooth|mask", row, re.I)
        assert not (modified and re.search(r"unmodified", row, re.I)), row
    assert "unmodified" not in text.split(blocks[0][-1])[-1].lower()


def test_seg_nrrd_segments_carry_slicers_terminology(tmp_path):
    from JointRegSegLib.models.card import read_card
    from JointRegSegLib.io.outputs import segment_tags, write_slicer_segmentation
    table = read_card(default_model_path())["labels"]
    coded = [e for e in table if e.get("terminology")]
    assert coded, "the default model's label table has terminology entries"
    labels = sitk.Image(6, 6, 6, sitk.sitkUInt8)
    labels[1, 1, 1] = int(coded[0]["value"])
    path = tmp_path / "labels.seg.nrrd"
    write_slicer_segmentation(labels, table, path)
    header = sitk.ImageFileReader()
    header.SetFileName(str(path))
    header.ReadImageInformation()
    tags = {key: header.GetMetaData(key) for key in header.GetMetaDataKeys() if key.endswith("_Tags")}
    entry = coded[0]["terminology"]
    first = next(value for key, value in tags.items()
                 if header.GetMetaData(key.replace("_Tags", "_LabelValue")) == str(coded[0]["value"]))
    assert first.startswith("TerminologyEntry:") and first.endswith("|")   # today: "|"
    assert "~" + "^".join(entry["type"]) + "~" in first
    if entry.get("modifier"):
        assert "~" + "^".join(entry["modifier"]) + "~" in first
    assert segment_tags({"value": 9, "name": "x", "color": [1, 1, 1]}) == "|"


def test_seg_nrrd_terminology_is_what_slicer_writes_and_reads(tmp_path):
    """The tag is byte for byte what the module gives its segments (Slicer's own serialization, in the
    extension's terminology context), and Slicer reads it back as the structure."""
    pytest.importorskip("slicer")
    import slicer
    from slicer_runtime import boot

    from JointRegSegLib.slicer import mrml
    from JointRegSegLib.io import outputs
    from JointRegSegLib.models.card import read_card
    from JointRegSegLib.io.outputs import segment_tags, write_slicer_segmentation
    boot()
    table = read_card(default_model_path())["labels"]
    assert outputs.TERMINOLOGY_CONTEXT == mrml.TERMINOLOGY_CONTEXT      # the module's segments and the files'
    assert outputs.ANATOMIC_CONTEXT == mrml.ANATOMIC_CONTEXT
    for entry in (e for e in table if e.get("terminology")):
        assert segment_tags(entry) == f"TerminologyEntry:{mrml.terminology_entry(entry)}|", entry["name"]
    coded = next(e for e in table if e.get("terminology", {}).get("modifier"))
    labels = sitk.Image(6, 6, 6, sitk.sitkUInt8)
    labels[2, 2, 2] = int(coded["value"])
    path = tmp_path / "labels.seg.nrrd"
    write_slicer_segmentation(labels, table, path)
    scene = slicer.mrmlScene
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    segment = next(segmentation.GetSegment(segmentation.GetNthSegmentID(i))
                   for i in range(segmentation.GetNumberOfSegments())
                   if segmentation.GetNthSegment(i).GetName() == coded["name"])
    entry = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(segment.GetTerminology(), entry)
    assert entry.GetTypeObject().GetCodeValue() == coded["terminology"]["type"][1]
    assert entry.GetTypeModifierObject().GetCodeValue() == coded["terminology"]["modifier"][1]


# 8. README: `make test`'s time is a quiet-machine figure --------------------------------------------------

def test_readme_says_make_tests_time_is_a_quiet_machine_figure():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith("| `make test`"))
    assert "quiet machine" in row


# 5. input sanity: a label map as the image, the same image twice ----------------------------------------

def _parcellation(values, shape=(60, 72, 60), seed=0) -> np.ndarray:
    """A label map like an atlas (AAL): Voronoi parcels with the given values inside an ellipsoid of brain."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    centre = np.array(shape) / 2
    inside = ((z - centre[0]) / (0.42 * shape[0])) ** 2 + ((y - centre[1]) / (0.42 * shape[1])) ** 2 + \
        ((x - centre[2]) / (0.42 * shape[2])) ** 2 < 1
    seeds = rng.uniform(0.1, 0.9, (len(values), 3)) * np.array(shape)
    points = np.stack([z, y, x], axis=-1)[inside].astype(np.float32)
    nearest = np.argmin(((points[:, None, :] - seeds[None]) ** 2).sum(-1), axis=1)
    labels = np.zeros(shape, np.uint16)
    labels[inside] = np.asarray(values)[nearest]
    return labels


def _t1_like(shape=(60, 72, 60), dtype=np.int16, seed=1) -> np.ndarray:
    """A brain-like intensity image: smooth tissue contrast, smooth bias, noise, zero background."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    centre = np.array(shape) / 2
    radius = np.sqrt(((z - centre[0]) / (0.42 * shape[0])) ** 2 + ((y - centre[1]) / (0.42 * shape[1])) ** 2 +
                     ((x - centre[2]) / (0.42 * shape[2])) ** 2)
    tissue = 300 + 200 * np.cos(x / 4.0) * np.sin(y / 5.0) + 150 * np.cos(z / 6.0)
    image = sitk.GetImageFromArray((tissue * (1 + 0.1 * x / shape[2])).astype(np.float32))
    image = sitk.SmoothingRecursiveGaussian(image, 2.0)
    values = sitk.GetArrayFromImage(image) + rng.normal(0, 12, shape)
    values[radius >= 1] = 0
    return values.astype(dtype)


def test_a_label_map_given_as_the_image_is_named():
    from JointRegSegLib.io.input_checks import input_warnings
    aal_values = [2001, 2002, 2101, 2102, 2111, 2112, 2201, 2202, 2211, 2212, 2301, 2302, 2311, 2312, 2321, 2322,
                  2331, 2332, 2401, 2402, 2501, 2502, 2601, 2602, 2611, 2612, 2701, 2702, 3001, 3002, 4001, 4002,
                  4011, 4012, 4021, 4022, 4101, 4102, 4111, 4112, 4201, 4202, 5001, 5002, 5011, 5012, 5021, 5022,
                  5101, 5102, 5201, 5202, 5301, 5302, 5401, 5402, 6001, 6002, 6101, 6102, 6201, 6202, 6211, 6212,
                  6221, 6222, 6301, 6302, 6401, 6402, 7001, 7002, 7011, 7012, 7021, 7022, 7101, 7102, 8101, 8102,
                  8111, 8112, 8121, 8122, 8201, 8202, 8211, 8212, 8301, 8302, 9001, 9002, 9011, 9012, 9021, 9022]
    atlas = sitk.GetImageFromArray(_parcellation(aal_values))          # 96 parcels: more than 64 values
    t1 = sitk.GetImageFromArray(_t1_like())
    said = input_warnings(atlas, t1, "aal.nii.gz", "subject_T1.nii.gz")
    assert len(said) == 1
    assert said[0].startswith("the moving image (aal.nii.gz) looks like a label map")
    assert int(re.search(r"(\d+) distinct values", said[0]).group(1)) > 64
    # the same as float32 (a label map resampled or saved as float), as the fixed image
    said = input_warnings(t1, sitk.Cast(atlas, sitk.sitkFloat32))
    assert len(said) == 1 and said[0].startswith("the fixed image looks like a label map")
    # a few labels (a tissue classification) and a binary brain mask
    tissue = sitk.GetImageFromArray(_parcellation([1, 2, 3], seed=4).astype(np.uint8))
    mask = sitk.GetImageFromArray((_parcellation([1], seed=5) > 0).astype(np.uint8))
    assert len(input_warnings(tissue, mask)) == 2


def test_real_and_t1_like_images_are_not_label_maps():
    from JointRegSegLib.io.input_checks import input_warnings, label_map_evidence
    for dtype in (np.int16, np.uint8, np.float32):
        assert label_map_evidence(sitk.GetImageFromArray(_t1_like(dtype=dtype))) is None, dtype
    moving = read_image(SAMPLES / "colin27_t1_brain_2mm.nii.gz")      # uint8, smoothed: 124 values
    fixed = read_image(SAMPLES / "itk_subject_t1_brain.nii.gz")       # uint8, masked
    assert input_warnings(moving, fixed, SAMPLES / "colin27_t1_brain_2mm.nii.gz",
                          SAMPLES / "itk_subject_t1_brain.nii.gz") == []
    assert input_warnings(read_image(SAMPLES / "itk_brain_t1.nii.gz"), fixed) == []
    phantom = sample_on(grid_for("axis-aligned"), phantom_array)
    assert label_map_evidence(phantom) is None
    # not a 3D scalar image: left to the validation that refuses it
    assert input_warnings(sitk.Image(8, 8, sitk.sitkUInt8), sitk.Image(9, 7, sitk.sitkUInt8)) == []


def test_the_same_image_twice_is_named(tmp_path):
    from JointRegSegLib.io.input_checks import input_warnings
    path = SAMPLES / "itk_subject_t1_brain.nii.gz"
    image = read_image(path)
    said = input_warnings(image, read_image(path), path, path)
    assert len(said) == 1 and said[0].startswith("moving and fixed are the same file (itk_subject_t1_brain.nii.gz)")
    link = tmp_path / "link.nii.gz"
    link.symlink_to(path)
    assert "same file" in input_warnings(image, image, path, link)[0]
    copy = tmp_path / "copy.nrrd"
    sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32), str(copy))      # another file, another type: same voxels
    said = input_warnings(image, read_image(copy), path, copy)
    assert len(said) == 1 and said[0].startswith("moving and fixed are the same image")
    # the same voxels placed elsewhere (a header-only motion) or one voxel changed: two images
    moved = read_image(copy)
    moved.SetOrigin([o + 5 for o in moved.GetOrigin()])
    assert input_warnings(image, moved) == []
    changed = sitk.Image(image)
    changed[10, 10, 10] = int(changed[10, 10, 10]) + 1
    assert input_warnings(image, changed) == []
