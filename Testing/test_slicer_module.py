"""The Slicer module on the real MRML runtime (slicer-core): its Logic end to end on scene nodes,
cancel and failure leaving the scene as it was, bad inputs named, and static checks of the Widget.

slicer-core is required: without it these tests fail at collection (CI must not pass with them skipped)."""
import os
import re
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import TINY_CARD, grid_for, phantom_array, sample_on

try:
    import slicer
except ImportError as err:   # a failure, not a skip: `pip install -e .[test]` installs slicer-core
    raise ImportError(f"slicer-core is not installed ({err}); the Slicer module tests need it: "
                      "pip install 'slicer-core==5.13.31053.0' (or pip install -e .[test])") from err
from slicer_runtime import MODULE_FILE, UI_FILE, boot, import_module_file  # noqa: E402

from JointRegSegLib import Cancelled, CheckpointError, InputImageError, JointRegSegError  # noqa: E402
from JointRegSegLib.slicer.mrml import ijk_to_ras  # noqa: E402


@pytest.fixture
def ctx():
    return boot()


@pytest.fixture
def module(monkeypatch, ctx):
    return import_module_file(monkeypatch)


@pytest.fixture(scope="module", autouse=True)
def _stop_workers():
    yield
    from JointRegSegLib.slicer.worker import stop_shared_workers
    stop_shared_workers()


def add_volume(image: sitk.Image, name: str, node_class="vtkMRMLScalarVolumeNode"):
    return slicer.util.addVolumeFromArray(sitk.GetArrayFromImage(image), ijk_to_ras(image), name,
                                          nodeClassName=node_class)


@pytest.fixture
def pair_nodes(ctx):
    """An oblique anisotropic moving phantom and a fixed phantom shifted 2-3 mm, as scene volumes."""
    moving = sample_on(grid_for("lps-oblique"), phantom_array)
    fixed = sample_on(grid_for("axis-aligned"), phantom_array, lambda p: p + np.array([2.0, -3.0, 1.5]))
    return add_volume(moving, "phantom moving"), add_volume(fixed, "phantom fixed")


def node_ids(scene):
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def test_logic_creates_named_results_and_the_transform_reproduces_the_warped_volume(module, ctx, pair_nodes,
                                                                                      tiny_checkpoint):
    moving, fixed = pair_nodes
    seen = []
    results = module.JointRegSegLogic().process(moving, fixed, str(tiny_checkpoint), device="cpu", jacobian=True,
                                                progress=lambda stage, fraction: seen.append(stage))
    assert any("affine" in stage for stage in seen)
    assert results.transform.GetClassName() == "vtkMRMLTransformNode"        # the compact composite (issue 24)
    assert results.transform.GetTransformFromParent().IsA("vtkGeneralTransform")
    assert results.transform.GetName() == "phantom moving to phantom fixed"
    assert results.warped.GetName() == "phantom moving warped to phantom fixed"
    assert results.jacobian is not None and results.qc["folding_percent"] >= 0.0
    assert results.warped_moving_segmentation.GetName() == "phantom moving segmentation warped to phantom fixed"
    # the Jacobian map: the module's colour map over det J in [0, 2] (not grey)
    display = results.jacobian.GetDisplayNode()
    assert display.GetColorNode().GetName() == "JointRegSeg Jacobian determinant"
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 2.0)

    # the warped volume lies on the fixed grid
    fixed_matrix, warped_matrix = (slicer.util.arrayFromVTKMatrix(_ijk_to_ras(n)) for n in (fixed, results.warped))
    assert np.allclose(fixed_matrix, warped_matrix, atol=1e-4)
    # the transform, applied to the moving volume and resampled onto the fixed grid, gives the warped volume
    moving.SetAndObserveTransformNodeID(results.transform.GetID())
    resampled = slicer.vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume(moving, fixed)
    resampled.SetAndObserveTransformNodeID(None)
    ours, theirs = slicer.util.arrayFromVolume(results.warped), slicer.util.arrayFromVolume(resampled)
    inside = slicer.util.arrayFromVolume(fixed) > 0
    assert np.abs(ours - theirs)[inside].mean() < 0.02 * np.abs(ours[inside]).mean()
    # and it aligns the moving phantom with the fixed one better than doing nothing
    moving.SetAndObserveTransformNodeID(None)
    unaligned = slicer.util.arrayFromVolume(slicer.vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume(moving, fixed))
    fixed_array = slicer.util.arrayFromVolume(fixed)
    assert np.abs(ours - fixed_array).mean() < 0.8 * np.abs(unaligned - fixed_array).mean()

    for role, reference in (("fixed_segmentation", fixed), ("moving_segmentation", moving),
                            ("warped_moving_segmentation", fixed)):
        segmentation_node = getattr(results, role)
        segmentation = segmentation_node.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        assert names == [e["name"] for e in TINY_CARD["labels"] if e["value"]]
        core = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("core"))
        assert np.allclose(core.GetColor(), TINY_CARD["labels"][1]["color"], atol=1 / 255)
        assert not core.GetNameAutoGenerated() and not core.GetColorAutoGenerated()
        assert segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole()) \
            .GetID() == reference.GetID()
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segmentation.GetNthSegmentID(0),
                                                          reference)
        assert mask.shape == slicer.util.arrayFromVolume(reference).shape


def _ijk_to_ras(node):
    matrix = slicer.vtkMatrix4x4() if hasattr(slicer, "vtkMatrix4x4") else __import__("vtk").vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix


def test_existing_output_nodes_are_filled_instead_of_new_ones(module, ctx, pair_nodes, tiny_checkpoint):
    moving, fixed = pair_nodes
    transform = ctx.scene.AddNewNodeByClass("vtkMRMLTransformNode", "my transform")
    segmentation = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my fixed labels")
    before = ctx.scene.GetNumberOfNodesByClass("vtkMRMLTransformNode")
    results = module.JointRegSegLogic().process(moving, fixed, str(tiny_checkpoint), device="cpu",
                                                outputs={"transform": transform, "fixed_segmentation": segmentation})
    assert results.transform is transform and results.fixed_segmentation is segmentation
    assert ctx.scene.GetNumberOfNodesByClass("vtkMRMLTransformNode") == before
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 2
    point = [10.0, -5.0, 3.0]
    assert not np.allclose(transform.GetTransformFromParent().TransformPoint(point), point)


def test_cancel_mid_run_leaves_the_scene_unchanged_and_stops_the_worker(module, ctx, pair_nodes, tiny_checkpoint):
    moving, fixed = pair_nodes
    before = node_ids(ctx.scene)
    logic = module.JointRegSegLogic(warm=False)       # a child process per job (the warm worker: test_slicer_worker)
    job = logic.start(moving, fixed, str(tiny_checkpoint), refineIterations=5000, device="cpu")
    deadline = time.time() + 120
    while "refine" not in job.run.progress[0] and time.time() < deadline:
        assert job.run.state == "running", job.run.error
        time.sleep(0.1)
    assert "refine" in job.run.progress[0]
    job.run.cancel()
    assert job.run.state == "cancelled"
    with pytest.raises(ProcessLookupError):
        os.killpg(job.run.process.pid, 0)          # the whole process group is gone
    with pytest.raises(Cancelled):
        logic.finish(job)
    assert node_ids(ctx.scene) == before
    assert not job.workdir.exists()


def test_cancel_through_the_blocking_call(module, ctx, pair_nodes, tiny_checkpoint):
    moving, fixed = pair_nodes
    before = node_ids(ctx.scene)
    started = time.time()
    with pytest.raises(Cancelled):
        module.JointRegSegLogic().process(moving, fixed, str(tiny_checkpoint), refineIterations=5000, device="cpu",
                                          cancel=lambda: time.time() - started > 3.0)
    assert node_ids(ctx.scene) == before


def test_a_failing_run_reports_the_workers_error_and_changes_nothing(module, ctx, pair_nodes, tiny_checkpoint):
    moving, fixed = pair_nodes
    before = node_ids(ctx.scene)
    with pytest.raises(JointRegSegError, match="CUDA is not available"):
        module.JointRegSegLogic().process(moving, fixed, str(tiny_checkpoint), device="cuda")
    assert node_ids(ctx.scene) == before


def test_a_failure_while_importing_results_removes_what_was_added(ctx, pair_nodes, tiny_checkpoint, tmp_path,
                                                                  monkeypatch):
    from JointRegSegLib.cli import main
    from JointRegSegLib.slicer.mrml import export_volume, load_results
    moving, fixed = pair_nodes
    export_volume(moving, tmp_path / "m.nrrd"), export_volume(fixed, tmp_path / "f.nrrd")
    assert main(["run", "--moving", str(tmp_path / "m.nrrd"), "--fixed", str(tmp_path / "f.nrrd"), "--model",
                 str(tiny_checkpoint), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    (tmp_path / "out" / "moving_segmentation.nii.gz").write_bytes(b"not an image")
    before = node_ids(ctx.scene)
    with pytest.raises(RuntimeError):
        load_results(ctx.scene, tmp_path / "out", moving, fixed)
    assert node_ids(ctx.scene) == before
    # a failure after some nodes were added (fault injected into the second segmentation): all removed
    import JointRegSegLib.slicer.mrml as mrml
    out = tmp_path / "out"
    sitk.WriteImage(sitk.ReadImage(str(out / "fixed_segmentation.nii.gz")), str(out / "moving_segmentation.nii.gz"))
    fill = mrml._fill_segmentation

    def fail_for_moving(node, labels, table, reference):
        if reference is moving:          # after the transform, warped and fixed segmentation were added
            raise MemoryError("injected")
        fill(node, labels, table, reference)

    monkeypatch.setattr(mrml, "_fill_segmentation", fail_for_moving)
    with pytest.raises(MemoryError):
        load_results(ctx.scene, out, moving, fixed)
    assert node_ids(ctx.scene) == before


def _volume_with_dims(dims, components=1, name="bad"):
    array = np.random.default_rng(0).random(tuple(reversed(dims)) + ((components,) if components > 1 else ()))
    node_class = "vtkMRMLVectorVolumeNode" if components > 1 else "vtkMRMLScalarVolumeNode"
    return slicer.util.addVolumeFromArray(array.astype(np.float32), np.eye(4), name, nodeClassName=node_class)


@pytest.mark.parametrize("case, message", [
    ("none", "no moving volume selected"),
    ("2d", "is 2D"),
    ("4d", "4D, vector or colour volume"),
    ("labelmap", "is a label map"),
    ("transformed", "under transform"),
    ("3 slices", "only 3 slices thick"),
    ("same as fixed", "same volume"),
])
def test_bad_inputs_are_named_and_change_nothing(module, ctx, pair_nodes, tiny_checkpoint, case, message):
    _, fixed = pair_nodes
    moving = {"none": lambda: None,
              "2d": lambda: _volume_with_dims((40, 40, 1)),
              "4d": lambda: _volume_with_dims((20, 20, 20), components=4),
              "labelmap": lambda: slicer.util.addVolumeFromArray(np.ones((20, 20, 20), np.uint8), np.eye(4), "lab",
                                                                 nodeClassName="vtkMRMLLabelMapVolumeNode"),
              "transformed": lambda: _transformed(pair_nodes[0], ctx),
              "3 slices": lambda: _volume_with_dims((40, 40, 3)),
              "same as fixed": lambda: fixed}[case]()
    before = node_ids(ctx.scene)
    with pytest.raises(InputImageError, match=message):
        module.JointRegSegLogic().process(moving, fixed, str(tiny_checkpoint), device="cpu")
    assert node_ids(ctx.scene) == before


def _transformed(node, ctx):
    transform = ctx.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "earlier alignment")
    node.SetAndObserveTransformNodeID(transform.GetID())
    return node


def test_a_broken_checkpoint_is_named_and_changes_nothing(module, ctx, pair_nodes, tiny_checkpoint, tmp_path):
    moving, fixed = pair_nodes
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    before = node_ids(ctx.scene)
    with pytest.raises(CheckpointError, match="truncated"):
        module.JointRegSegLogic().process(moving, fixed, str(broken), device="cpu")
    assert node_ids(ctx.scene) == before
    assert "Cannot use this file" in module.JointRegSegLogic.describeModel(broken)


def test_four_slices_are_enough(ctx):
    """3 slices fail in the engine's affine pyramid (ITK needs 4 voxels per axis); 4 run (measured with the
    CLI on the sample brain: 4 slices at 3, 1 and 0.5 mm all succeed)."""
    from JointRegSegLib.slicer.mrml import MIN_SLICES, check_volume_node
    assert MIN_SLICES == 4
    check_volume_node(_volume_with_dims((40, 40, 4)), "moving")        # does not raise


def test_model_description_and_qc_text(module, tiny_checkpoint):
    text = module.JointRegSegLogic.describeModel(tiny_checkpoint)
    assert "tiny-test-model" in text and "core, shell" in text
    assert "reports no validation figures" in text
    from JointRegSegLib.models.installed import default_model_path
    from JointRegSegLib import read_card
    embedded = module.JointRegSegLogic.describeModel(default_model_path())
    metrics = read_card(default_model_path())["metrics"]
    # a card without the few-shot figures shows its own headline numbers, with their note
    assert "Validation" in embedded and f"reg_dice_head {metrics['reg_dice_head']:.3f}" in embedded
    assert "Colin27" in embedded
    previous = module.JointRegSegLogic.describeModel(default_model_path().parent / "brain-synth.safetensors")
    old_metrics = read_card(default_model_path().parent / "brain-synth.safetensors")["metrics"]
    assert f"registration Dice {old_metrics['registration_dice_mean']:.3f}" in previous
    assert f"Validation ({old_metrics['heldout_synthetic_pairs']} pairs)" in previous
    qc = {"folding_percent": 0.01, "jacobian_min": 0.5, "jacobian_max": 1.7, "timing_s": {"total": 3.2},
          "device": "cpu", "fixed_volumes_ml": {"core": 12.5}}
    assert "core" in module.JointRegSegLogic.describeQc(qc) and "0.0100 %" in module.JointRegSegLogic.describeQc(qc)
    assert "For research use only" in module.JointRegSegLogic.describeQc(qc)
    # plausibility flags: missing, out of the card's range, far from the moving image's volume
    qc.update(fixed_volumes_ml={"core": 12.5, "shell": 0.0, "rim": 30.0, "disc": 9.0},
              moving_volumes_ml={"core": 12.0, "shell": 40.0, "rim": 10.0, "disc": 9.5},
              label_table=[{"value": 4, "name": "disc", "color": [0, 0, 1], "volume_ml": [1.0, 5.0]}])
    flags = module.JointRegSegLogic.volumeFlags(qc)
    assert flags["core"] == "" and flags["shell"] == "not found"
    assert flags["rim"].startswith("3.0×") and "outside the expected 1–5 ml" == flags["disc"]
    assert "&#9888; not found" in module.JointRegSegLogic.describeQc(qc)


def test_module_metadata_and_sample_data(module, monkeypatch):
    import sys
    import types
    hooks = []
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(connect=lambda signal, slot: hooks.append((signal, slot))),
                        raising=False)
    parent = type("Parent", (), {})()
    module.JointRegSeg(parent)
    assert parent.categories == ["Registration"]
    assert "DeepAtlas" in parent.helpText and parent.contributors == ["JointRegSeg developers"]
    assert "For research use only" in parent.helpText
    # the sample pair is registered with SampleData once Slicer has started
    assert hooks == [("startupCompleted()", module.registerSampleData), ("startupCompleted()", module.loadTerminology)]
    registered = []
    fake = types.ModuleType("SampleData")
    fake.SampleDataLogic = types.SimpleNamespace(registerCustomSampleDataSource=lambda **kw: registered.append(kw))
    monkeypatch.setitem(sys.modules, "SampleData", fake)
    hooks[0][1]()
    (source,) = registered
    assert source["category"] == "JointRegSeg" and len(source["uris"]) == len(source["fileNames"]) == 2
    from urllib.request import url2pathname
    for uri in source["uris"]:
        assert uri.startswith("file://")           # local files: the sample loads offline
        image = sitk.ReadImage(url2pathname(uri[len("file://"):]))
        assert image.GetDimension() == 3 and min(image.GetSize()) >= 8
    assert os.path.isfile(source["thumbnailFileName"])


def test_every_widget_the_module_uses_exists_in_the_ui():
    tree = ET.parse(UI_FILE)
    widgets = {w.get("name") for w in tree.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    assert used and used <= widgets, f"missing in the .ui: {sorted(used - widgets)}"


def test_parameter_names_in_the_ui_match_the_parameter_node(module):
    tree = ET.parse(UI_FILE)
    bound = {prop.find("string").text for prop in tree.iter("property") if prop.get("name") == "SlicerParameterName"}
    fields = set(module.JointRegSegParameterNode.__annotations__) - {"modelPath", "device"}   # filled by code
    assert bound == fields
    assert (MODULE_FILE.parent / "Resources" / "Icons" / "JointRegSeg.png").is_file()
    cmake = (MODULE_FILE.parent / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "WITH_GENERIC_TESTS" in cmake and "Resources/UI/${MODULE_NAME}.ui" in cmake
    # the self-test is a CTest test, and its class exists in the module file
    assert re.search(r"if\(BUILD_TESTING\)\s*(#[^\n]*\n\s*)*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", cmake)
    assert hasattr(module, "JointRegSegTest")
    # Extensions Index metadata: licence, contributors, no invented screenshot, requirements installed
    root = MODULE_FILE.parent.parent
    top = (root / "CMakeLists.txt").read_text(encoding="utf-8")
    licence = (root / "LICENSE.txt").read_text(encoding="utf-8")
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert "Copyright 2026 JointRegSeg developers" in licence
    assert 'set(EXTENSION_CONTRIBUTORS "JointRegSeg developers")' in top
    assert 'set(EXTENSION_SCREENSHOTURLS "")' in top and "Resources/requirements.txt" in top


def test_output_transform_selector_offers_general_and_grid_transforms_only(ctx, pair_nodes):
    tree = ET.parse(UI_FILE)
    selector = next(w for w in tree.iter("widget") if w.get("name") == "outputTransformSelector")
    types_ = [s.text for p in selector.iter("property") if p.get("name") == "nodeTypes" for s in p.iter("string")]
    assert types_ == ["vtkMRMLTransformNode", "vtkMRMLGridTransformNode"]      # no linear or B-spline nodes
    assert any(p.get("name") == "showChildNodeTypes" and p.find("bool").text == "false" for p in selector.iter("property"))
    from JointRegSegLib.slicer.mrml import check_outputs
    linear = ctx.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "rigid")
    with pytest.raises(JointRegSegError, match="displacement field"):
        check_outputs({"transform": linear})
    with pytest.raises(JointRegSegError, match="vtkMRMLSegmentationNode"):
        check_outputs({"fixed_segmentation": pair_nodes[0]})
    grid = ctx.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "grid")
    assert check_outputs({"transform": grid, "warped": None}) == {"transform": grid}


def test_a_corrected_case_round_trips_through_the_training_folder(ctx, pair_nodes, tmp_path):
    from JointRegSegLib.slicer.mrml import save_training_case
    from JointRegSegLib.training.finetune import list_cases
    _, fixed = pair_nodes
    truth = sample_on(grid_for("axis-aligned"), phantom_labels_shifted)
    array = sitk.GetArrayFromImage(truth)
    segmentation = segmentation_from(ctx, fixed, array, "corrected")
    written = save_training_case(tmp_path / "project", fixed, segmentation, TINY_CARD["labels"], name="case 1")
    cases = list_cases(tmp_path / "project", need_labels=True)
    assert list(cases) == ["case 1"]
    image_path, label_path = next(iter(cases.values()))
    labels = sitk.ReadImage(str(label_path))
    assert np.array_equal(sitk.GetArrayFromImage(labels), array)
    assert np.allclose(labels.GetOrigin(), truth.GetOrigin(), atol=1e-4)
    assert np.allclose(labels.GetDirection(), truth.GetDirection(), atol=1e-6)
    loaded = ctx.segmentations.LoadSegmentationFromFile(str(written["segmentation"]), False, "reloaded")
    reloaded = loaded.GetSegmentation()
    assert sorted(reloaded.GetNthSegment(i).GetName() for i in range(reloaded.GetNumberOfSegments())) == \
        ["core", "shell"]
    # the same name again: refused, files unchanged; replaced only when asked
    stamp = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "project").iterdir()}
    with pytest.raises(JointRegSegError, match="already has a case 'case 1'"):
        save_training_case(tmp_path / "project", fixed, segmentation, TINY_CARD["labels"], name="case 1")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "project").iterdir()} == stamp
    save_training_case(tmp_path / "project", fixed, None, TINY_CARD["labels"], name="case 1", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "project").iterdir()) == ["case 1.nrrd"]   # now an unlabelled image
    # a segment the model does not know is refused, and nothing is written
    segmentation.GetSegmentation().AddEmptySegment("", "tumour", [1, 0, 0])
    with pytest.raises(InputImageError, match="tumour"):
        save_training_case(tmp_path / "other", fixed, segmentation, TINY_CARD["labels"])
    assert not (tmp_path / "other").exists()


def phantom_labels_shifted(points):
    from conftest import phantom_labels
    return phantom_labels(points + np.array([2.0, -3.0, 1.5]))


@pytest.mark.slow
def test_logic_finetunes_in_a_child_process_and_never_touches_the_original(module, ctx, pair_nodes, tmp_path,
                                                                           tiny_checkpoint):
    import hashlib
    moving, fixed = pair_nodes
    logic = module.JointRegSegLogic()
    segmentation = segmentation_from(ctx, fixed, sitk.GetArrayFromImage(sample_on(grid_for("axis-aligned"),
                                                                                 phantom_labels_shifted)), "corrected")
    folder = tmp_path / "project"
    logic.addTrainingCase(folder, fixed, segmentation, str(tiny_checkpoint))
    logic.addTrainingCase(folder, moving, None, str(tiny_checkpoint))          # an unlabelled image
    assert logic.trainingCases(folder) == ["phantom_fixed", "phantom_moving"]
    original = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    output = tmp_path / "models" / "tuned.safetensors"
    stages = []
    text, improved = logic.finetune(str(tiny_checkpoint), folder, output, steps=20, device="cpu",
                                    progress=lambda stage, fraction: stages.append(stage))
    assert any(stage.startswith("train") for stage in stages)
    assert "Segmentation Dice on the training cases" in text
    from JointRegSegLib import read_card
    card = read_card(output)
    assert card["parent"]["path"] == str(tiny_checkpoint)
    assert card["finetune"]["labelled_cases"] == ["phantom_fixed"]
    assert card["finetune"]["unlabelled_cases"] == ["phantom_moving"]
    assert hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest() == original


def segmentation_from(ctx, volume, array, name):
    """A segmentation node on `volume` with one segment per tiny-model label present in `array`."""
    segmentation = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for entry in TINY_CARD["labels"][1:]:
        sid = segmentation.GetSegmentation().AddEmptySegment("", entry["name"], entry["color"])
        slicer.util.updateSegmentBinaryLabelmapFromArray((array == entry["value"]).astype(np.uint8), segmentation,
                                                         sid, volume)
    return segmentation


def test_corrected_segmentations_guide_the_registration_through_the_logic(module, ctx, pair_nodes, tiny_checkpoint):
    from conftest import phantom_labels
    moving, fixed = pair_nodes
    moving_seg = segmentation_from(ctx, moving, sitk.GetArrayFromImage(sample_on(grid_for("lps-oblique"),
                                                                                 phantom_labels)), "moving corrected")
    fixed_seg = segmentation_from(ctx, fixed, sitk.GetArrayFromImage(sample_on(grid_for("axis-aligned"),
                                                                               phantom_labels_shifted)), "fixed corrected")
    logic = module.JointRegSegLogic()
    before = node_ids(ctx.scene)
    with pytest.raises(InputImageError, match="both images"):
        logic.process(moving, fixed, str(tiny_checkpoint), device="cpu", guide=(moving_seg, None))
    assert node_ids(ctx.scene) == before
    stages = []
    results = logic.process(moving, fixed, str(tiny_checkpoint), device="cpu", guide=(moving_seg, fixed_seg),
                            progress=lambda stage, fraction: stages.append(stage))
    assert "test-time refinement" in stages        # guidance turns refinement on
    assert results.transform is not None
