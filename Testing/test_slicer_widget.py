"""The module as a user drives it (issue 13), on real MRML (slicer-core): the Widget's slots on stand-in Qt
widgets over a real scene, terminology, guide-name matching, dependency handling, nodes left in the scene,
scene close between and during runs. slicer-core is required (no skip)."""
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import TINY_CARD, grid_for, phantom_array, phantom_labels, sample_on

import slicer  # noqa: E402  (slicer-core; a missing one fails collection)
from slicer_runtime import (add_pair, add_volume, ctx, drive, make_widget, module,  # noqa: E402,F401
                            stop_workers_after_module)

from JointRegSegLib import InputImageError, JointRegSegError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    folder = tmp_path / "user models"
    monkeypatch.setenv("JOINTREGSEG_USER_MODELS", str(folder))
    return folder


def census(scene) -> dict:
    counts = {}
    for index in range(scene.GetNumberOfNodes()):
        name = scene.GetNthNode(index).GetClassName()
        counts[name] = counts.get(name, 0) + 1
    return counts


def difference(after: dict, before: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before) if after.get(k, 0) != before.get(k, 0)}


def segmentation_of(ctx, volume, array, names, name="guide"):
    node = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for value, segment_name in names.items():
        sid = node.GetSegmentation().AddEmptySegment("", segment_name, [0.5, 0.5, 0.5])
        slicer.util.updateSegmentBinaryLabelmapFromArray((array == value).astype(np.uint8), node, sid, volume)
    return node


# --- terminology and names ------------------------------------------------------------------------

BRAIN_LABELS = [{"value": 0, "name": "background", "color": [0, 0, 0]},
                {"value": 1, "name": "caudate", "color": [0.4, 0.7, 0.9]},
                {"value": 2, "name": "pallidum", "color": [0.1, 0.2, 1.0]},
                {"value": 3, "name": "left caudate", "color": [0.5, 0.5, 0.1],
                 "terminology": {"category": ["SCT", "123037004", "Anatomical Structure"],
                                 "type": ["SCT", "11000004", "Caudate nucleus"], "modifier": ["SCT", "7771000", "Left"]}},
                {"value": 4, "name": "lesion", "color": [1, 0, 0]}]


def test_terminology_from_the_card_or_by_name(ctx):
    from JointRegSegLib.slicer.mrml import label_terminology, terminology_entry
    assert label_terminology(BRAIN_LABELS[3])["modifier"] == ("SCT", "7771000", "Left")
    assert label_terminology(BRAIN_LABELS[1])["type"] == ("SCT", "11000004", "Caudate nucleus")
    assert label_terminology(BRAIN_LABELS[2])["type"] == ("SCT", "14738005", "Globus pallidus")
    assert label_terminology({"name": "Right Hippocampus"}) == {
        "category": ("SCT", "123037004", "Anatomical Structure"), "type": ("SCT", "5366008", "Hippocampus"),
        "modifier": ("SCT", "24028007", "Right")}
    assert label_terminology(BRAIN_LABELS[4])["type"][2] == "Tissue"          # unknown: generic, still valid
    entry = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(terminology_entry(BRAIN_LABELS[3]), entry)
    assert entry.GetCategoryObject().GetCodeValue() == "123037004"
    assert entry.GetTypeObject().GetCodeMeaning() == "Caudate nucleus"
    assert entry.GetTypeModifierObject().GetCodeValue() == "7771000"
    # every structure of the embedded model has a specific SNOMED CT code (none falls back to "Tissue")
    from JointRegSegLib import read_card
    from JointRegSegLib.models.installed import EMBEDDED_MODELS, default_model_path
    default_labels = [e for e in read_card(default_model_path())["labels"] if e["value"]]
    assert all(tuple(label_terminology(e)["type"]) == tuple(e["terminology"]["type"]) for e in default_labels)
    sided = [e for e in default_labels if e["name"].startswith(("left ", "right "))]
    assert {label_terminology(e)["modifier"][2] for e in sided} == {"Left", "Right"}
    assert all(label_terminology(e).get("modifier") is None for e in default_labels if e not in sided)
    # the earlier embedded model has no terminology in its card: codes come from the names
    old = read_card(EMBEDDED_MODELS / "brain-t1-deepatlas.safetensors")["labels"]
    codes = {e["name"]: label_terminology(e)["type"][1] for e in old if e["value"]}
    assert codes == {"caudate": "11000004", "putamen": "89278009", "pallidum": "14738005", "thalamus": "119406000",
                     "hippocampus": "5366008", "amygdala": "4958002", "cerebellum": "113305005",
                     "cerebral cortex": "40146001"}


def test_guide_segments_match_by_terminology_case_or_synonym(ctx):
    from JointRegSegLib.slicer.mrml import match_segments_to_labels, terminology_entry
    volume = add_volume(sample_on(grid_for("axis-aligned"), phantom_array), "image")
    array = sitk.GetArrayFromImage(sample_on(grid_for("axis-aligned"), phantom_labels))
    node = segmentation_of(ctx, volume, array, {1: "Caudate nucleus", 2: "GLOBUS  Pallidus"})
    segmentation = node.GetSegmentation()
    # a segment whose name means nothing but whose terminology says left caudate nucleus
    coded = segmentation.AddEmptySegment("", "Segment_7", [1, 1, 0])
    segmentation.GetSegment(coded).SetTag(segmentation.GetSegment(coded).GetTerminologyEntryTagName(),
                                          terminology_entry(BRAIN_LABELS[3]))
    lesion = segmentation.AddEmptySegment("", "LESION", [1, 0, 0])
    matched = match_segments_to_labels(node, BRAIN_LABELS)
    by_name = {segmentation.GetSegment(sid).GetName(): value for sid, value in matched.items()}
    assert by_name == {"Caudate nucleus": 1, "GLOBUS  Pallidus": 2, "Segment_7": 3, "LESION": 4}
    segmentation.GetSegment(lesion).SetName("tumour")
    with pytest.raises(InputImageError, match=r"\['tumour'\].*caudate, pallidum"):
        match_segments_to_labels(node, BRAIN_LABELS)


# --- nodes left in the scene ------------------------------------------------------------------------

@pytest.mark.slow
def test_runs_guide_export_and_add_case_leave_no_orphan_nodes(module, ctx, tiny_checkpoint, tmp_path):
    moving, fixed = add_pair()
    labels_m = sitk.GetArrayFromImage(sample_on(grid_for("lps-oblique"), phantom_labels))
    labels_f = sitk.GetArrayFromImage(sample_on(grid_for("axis-aligned"), phantom_labels,
                                                lambda p: p + np.array([2.0, -3.0, 1.5])))
    guide = (segmentation_of(ctx, moving, labels_m, {1: "Core", 2: "shell"}, "moving guide"),
             segmentation_of(ctx, fixed, labels_f, {1: "core", 2: "SHELL"}, "fixed guide"))
    logic = module.JointRegSegLogic()
    before = census(ctx.scene)
    first = logic.process(moving, fixed, str(tiny_checkpoint), device="cpu")
    once = difference(census(ctx.scene), before)
    # one run: transform, warped, 3 segmentations, Jacobian, their display nodes, one shared colour table
    assert once == {"vtkMRMLTransformNode": 1, "vtkMRMLTransformDisplayNode": 1, "vtkMRMLScalarVolumeNode": 2,
                    "vtkMRMLScalarVolumeDisplayNode": 2, "vtkMRMLSegmentationNode": 3,
                    "vtkMRMLSegmentationDisplayNode": 3, "vtkMRMLColorTableNode": 1}
    for node in first.nodes().values():
        for i in range(node.GetNumberOfDisplayNodes()):
            assert node.GetNthDisplayNode(i).GetScene() is ctx.scene
    # a guided run exports both guides (segments matched by name, any case) without temporary nodes
    mid = census(ctx.scene)
    logic.process(moving, fixed, str(tiny_checkpoint), device="cpu", guide=guide, refineIterations=2)
    assert difference(census(ctx.scene), mid) == {k: v for k, v in once.items() if k != "vtkMRMLColorTableNode"}
    # adding corrected cases adds nothing to the scene
    mid = census(ctx.scene)
    logic.addTrainingCase(tmp_path / "cases", fixed, guide[1], str(tiny_checkpoint))
    logic.addTrainingCase(tmp_path / "cases", moving, None, str(tiny_checkpoint))
    assert census(ctx.scene) == mid
    # the label map written for the case holds the guide's labels on the image grid
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cases" / "fixed_labels.nrrd")))
    assert np.array_equal(written, labels_f)


# --- the Widget on the real scene ---------------------------------------------------------------------

def test_scene_close_keeps_a_model_and_a_run_after_it_works(module, ctx, tiny_checkpoint, user_models):
    probe = module.JointRegSegLogic().getParameterNode()
    probe.modelPath = str(tiny_checkpoint)
    ctx.scene.Clear(0)
    assert module.JointRegSegLogic().getParameterNode().modelPath == ""     # closing the scene resets the node
    widget = make_widget(module, ctx)
    node = widget._parameterNode
    assert node.modelPath == str(module.default_model_path())
    assert widget.ui.deviceComboBox.texts() == ["auto", "cpu"]          # no "cuda" on this CPU-only machine
    moving, fixed = add_pair(" 1")
    assert node.movingVolume is None and node.fixedVolume is None       # nothing picked silently
    node.movingVolume, node.fixedVolume, node.modelPath = fixed, moving, str(tiny_checkpoint)
    widget.ui.swapButton.click()
    assert (node.movingVolume.GetID(), node.fixedVolume.GetID()) == (moving.GetID(), fixed.GetID())
    node.device = "cpu"
    drive(widget)
    assert widget.results.transform is not None and "Folding" in widget.ui.resultsLabel.text

    ctx.scene.Clear(0)                          # File > Close Scene
    node = widget._parameterNode
    assert node.modelPath == str(module.default_model_path())          # the model list still shows it: usable
    assert widget.ui.modelComboBox.itemData(widget.ui.modelComboBox.currentIndex) == node.modelPath
    assert not widget.ui.applyButton.enabled and "Select a moving" in widget.ui.applyButton.toolTip
    moving, fixed = add_pair(" 2")
    node.movingVolume, node.fixedVolume, node.modelPath, node.device = moving, fixed, str(tiny_checkpoint), "cpu"
    assert widget.ui.applyButton.enabled
    drive(widget)
    names = sorted(ctx.scene.GetNthNode(i).GetName() for i in range(ctx.scene.GetNumberOfNodes())
                   if ctx.scene.GetNthNode(i).IsA("vtkMRMLSegmentationNode"))
    assert names == ["fixed 2 segmentation", "moving 2 segmentation", "moving 2 segmentation warped to fixed 2"]


def test_scene_close_mid_run_cancels_it_and_removes_its_folder(module, ctx, tiny_checkpoint):
    widget = make_widget(module, ctx)
    moving, fixed = add_pair()
    node = widget._parameterNode
    node.movingVolume, node.fixedVolume, node.modelPath, node.device = moving, fixed, str(tiny_checkpoint), "cpu"
    node.refineIterations = 1000
    widget.ui.applyButton.click()
    job = widget.job
    deadline = time.time() + 900
    while "refine" not in job.run.progress[0]:
        assert time.time() < deadline and job.run.state == "running", job.run.error
        time.sleep(0.1)
    ctx.scene.Clear(0)
    assert widget.job is None and widget.stopping == [job] and widget.stopTimer.active   # sent, not awaited
    assert not widget.ui.progressBar.visible and not widget.ui.cancelButton.enabled
    reap_all(widget)
    assert job.run.state == "cancelled" and not job.workdir.exists()
    assert ctx.scene.GetNumberOfNodesByClass("vtkMRMLTransformNode") == 0
    widget.onPoll()                                        # a late timer tick does nothing
    assert not widget.errors


def reap_all(widget, timeout_s=600):
    """Let the stop timer run until every cancelled run has ended."""
    deadline = time.time() + timeout_s
    while widget.stopping:
        assert time.time() < deadline, "a cancelled run did not end"
        widget.stopTimer.fire()
        time.sleep(0.05)
    assert not widget.stopTimer.active


FAKE_ENGINE = """#!{python}
# A warm worker that takes a request, reports one stage and then ignores everything (a network pass that
# does not check for cancels): only killing it stops it.
import json, os, sys, time
print(json.dumps({{"event": "ready", "pid": os.getpid(), "cuda": False}}), flush=True)
for line in sys.stdin:
    message = json.loads(line)
    if message.get("command") == "run":
        print(json.dumps({{"event": "progress", "id": message["id"], "stage": "network inference",
                          "fraction": 0.5}}), flush=True)
        time.sleep(600)
"""


def test_cancel_scene_close_and_cleanup_never_wait_for_the_engine(module, ctx, tiny_checkpoint, tmp_path,
                                                                   monkeypatch):
    """Issue 24, item 1: the GUI thread sends the cancel and returns at once (< 0.2 s) even when the engine
    does not answer; the stop timer kills the process tree after the grace period."""
    from JointRegSegLib.slicer.worker import WarmWorker
    engine = tmp_path / "fake-engine"
    engine.write_text(FAKE_ENGINE.format(python=sys.executable), encoding="utf-8")
    engine.chmod(0o755)
    worker = WarmWorker(python=str(engine))
    widget = make_widget(module, ctx)
    monkeypatch.setattr(widget.logic, "worker", lambda: worker)
    widget.cancelGraceSeconds = 1.0

    def start_run(tag):
        moving, fixed = add_pair(tag)
        node = widget._parameterNode
        node.movingVolume, node.fixedVolume, node.modelPath, node.device = moving, fixed, str(tiny_checkpoint), "cpu"
        widget.ui.applyButton.click()
        job = widget.job
        deadline = time.time() + 60
        while job.run.progress[0] != "network inference":
            assert time.time() < deadline, job.run.error
            time.sleep(0.02)
        return job, worker.pid

    def gone(pid):
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        return False

    try:
        for how in ("cancel", "close scene"):
            job, pid = start_run(f" {how}")
            started = time.perf_counter()
            if how == "cancel":
                widget.ui.cancelButton.click()
            else:
                ctx.scene.Clear(0)
            assert time.perf_counter() - started < 0.2
            assert widget.job is None and widget.stopping == [job] and widget.stopTimer.active
            assert not widget.ui.progressBar.visible and not widget.ui.cancelButton.enabled
            assert "Cancelled" in widget.ui.resultsLabel.text
            assert not gone(pid) and job.workdir.exists()              # nothing waited for it
            if how == "cancel":
                assert not widget.ui.applyButton.enabled and "Stopping" in widget.ui.applyButton.toolTip
            widget.stopTimer.fire()
            assert not gone(pid)                                        # within the grace period: left alone
            reap_all(widget, timeout_s=60)
            assert gone(pid) and not job.workdir.exists() and job.run.state == "cancelled"
            assert ctx.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
            if how == "cancel":
                assert widget.ui.applyButton.enabled                    # ready for the next run
        # the module closing (Slicer quits, or the module is reloaded) mid-run
        job, pid = start_run(" cleanup")
        started = time.perf_counter()
        widget.cleanup()
        assert time.perf_counter() - started < 0.2 and not gone(pid)
        deadline = time.time() + 60
        while not gone(pid) or job.workdir.exists():
            assert time.time() < deadline, "the worker outlived the module"
            time.sleep(0.05)
        assert not widget.errors
    finally:
        worker.stop(timeout_s=1.0)


def test_same_volume_twice_is_refused_and_changes_nothing(module, ctx, tiny_checkpoint):
    widget = make_widget(module, ctx)
    volume, _ = add_pair()
    node = widget._parameterNode
    node.movingVolume = node.fixedVolume = volume
    assert not widget.ui.applyButton.enabled and "same volume" in widget.ui.applyButton.toolTip
    before = census(ctx.scene)
    with pytest.raises(InputImageError, match="same volume"):
        widget.logic.start(volume, volume, str(tiny_checkpoint))
    assert census(ctx.scene) == before


def test_errors_in_slots_are_reported_not_raised(module, ctx, tiny_checkpoint, monkeypatch):
    widget = make_widget(module, ctx)
    moving, fixed = add_pair()
    node = widget._parameterNode
    node.movingVolume, node.fixedVolume, node.modelPath = moving, fixed, str(tiny_checkpoint)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(widget.logic, "start", broken)        # not a JointRegSegError
    widget.ui.applyButton.click()
    assert widget.job is None and "disk full" in widget.errors[-1]
    assert widget.ui.applyButton.enabled                      # ready for another try
    # a poll that fails (e.g. the job's state cannot be read) stops the timer and reports it
    widget.job = types.SimpleNamespace(run=types.SimpleNamespace(progress=None), cancel=lambda: None)
    widget.onPoll()
    assert widget.job is None and "Register & Segment failed" in widget.errors[-1]
    # the training-folder slot: an unreadable folder is reported, not raised
    monkeypatch.setattr(widget.logic, "trainingCases", broken)
    node.trainingFolder = Path("/somewhere")
    widget.updateCaseList()
    assert "training folder" in widget.errors[-1]


def test_new_nodes_each_run_or_overwrite(module, ctx, tiny_checkpoint):
    widget = make_widget(module, ctx)
    moving, fixed = add_pair()
    node = widget._parameterNode
    node.movingVolume, node.fixedVolume, node.modelPath, node.device = moving, fixed, str(tiny_checkpoint), "cpu"
    assert node.newNodesEachRun
    drive(widget)
    first = widget.results.transform
    drive(widget)
    second = widget.results.transform
    assert first.GetID() != second.GetID() and ctx.scene.GetNodeByID(first.GetID()) is first   # both kept
    node.newNodesEachRun = False
    drive(widget)
    assert widget.results.transform is second and ctx.scene.GetNumberOfNodesByClass("vtkMRMLTransformNode") == 2
    assert ctx.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 6
    assert "vtkMRMLLabelMapVolumeDisplayNode" not in census(ctx.scene)


def test_jacobian_map_shown_over_the_fixed_volume_on_request(module, ctx, tiny_checkpoint):
    widget = make_widget(module, ctx)
    moving, fixed = add_pair()
    views = [ctx.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode", f"view {n}") for n in ("Red", "Green", "Yellow")]
    node = widget._parameterNode
    node.movingVolume, node.fixedVolume, node.modelPath, node.device = moving, fixed, str(tiny_checkpoint), "cpu"
    assert node.outputJacobian and not widget.ui.showJacobianButton.enabled
    drive(widget)
    jacobian = widget.results.jacobian
    assert [v.GetForegroundVolumeID() for v in views] == [widget.results.warped.GetID()] * 3   # after a run
    widget.ui.showJacobianButton.click()
    assert [(v.GetBackgroundVolumeID(), v.GetForegroundVolumeID()) for v in views] == \
        [(fixed.GetID(), jacobian.GetID())] * 3
    assert jacobian.GetDisplayNode().GetColorNode().GetName() == "JointRegSeg Jacobian determinant"
    colours = jacobian.GetDisplayNode().GetColorNode()
    rgba = [0.0] * 4
    colours.GetColor(0, rgba)
    assert rgba[:3] == [0.0, 0.0, 0.0]                           # folding: black
    colours.GetColor(10, rgba)
    assert rgba[2] > rgba[0]                                    # compression: blue
    colours.GetColor(250, rgba)
    assert rgba[0] > rgba[2]                                    # expansion: red


def test_progress_words_are_for_users(module):
    describe = module.JointRegSegLogic.describeStage
    for stage in ("affine pre-alignment", "test-time refinement", "resample to working grid", "network inference"):
        assert describe(stage) == module.STAGE_WORDS[stage] and describe(stage)[0].isupper()
    assert describe("load model") == "Loading the model…"
    assert describe("something new") == "Something new…"
    # every stage the engine reports has words written for users
    import re
    from pathlib import Path
    import JointRegSegLib.inference.pipeline as pipeline
    stages = set(re.findall(r'reporter\.stage\("([^"]+)"\)', Path(pipeline.__file__).read_text(encoding="utf-8")))
    assert "velocity scale" in stages and not stages - set(module.STAGE_WORDS)


def test_finetuning_and_registration_do_not_share_controls(module, ctx, tiny_checkpoint):
    widget = make_widget(module, ctx)
    moving, fixed = add_pair()
    node = widget._parameterNode
    node.movingVolume, node.fixedVolume, node.modelPath, node.device = moving, fixed, str(tiny_checkpoint), "cpu"
    assert widget.ui.applyButton.enabled
    fake = types.SimpleNamespace(state="running", progress=("train", 0.3), cancelled=False)
    fake.request_cancel = lambda grace_s: setattr(fake, "cancelled", True)
    fake.reap = lambda: False
    widget.finetuneRun = (fake, "/tmp/none.safetensors")
    widget.ui.finetuneProgressBar.show()
    widget.ui.finetuneCancelButton.enabled = True
    widget.updateButtons()
    assert not widget.ui.applyButton.enabled and "fine-tuning" in widget.ui.applyButton.toolTip
    widget.onFinetunePoll()
    assert widget.ui.finetuneProgressBar.value == 30 and widget.ui.finetuneProgressBar.visible
    # a registration that finishes meanwhile leaves the fine-tuning's progress and cancel alone
    widget.finetuneRun = None
    widget.updateButtons()
    widget.ui.applyButton.click()
    assert widget.job is not None and not widget.ui.finetuneButton.enabled
    widget.finetuneRun = (fake, "/tmp/none.safetensors")
    while widget.job is not None:
        widget.onPoll()
        time.sleep(0.05)
    assert widget.results is not None and not widget.errors
    assert widget.ui.finetuneProgressBar.visible and widget.ui.finetuneCancelButton.enabled
    assert not widget.ui.progressBar.visible and not widget.ui.cancelButton.enabled
    widget.ui.cancelButton.enabled = True
    widget.onCancel()                                        # the registration's Cancel: not the fine-tuning
    assert not fake.cancelled
    widget.ui.finetuneCancelButton.click()
    assert fake.cancelled


def test_add_case_with_an_existing_name_asks_before_replacing(module, ctx, tiny_checkpoint, tmp_path):
    widget = make_widget(module, ctx)
    moving, fixed = add_pair()
    node = widget._parameterNode
    node.modelPath, node.trainingFolder, node.annotatedVolume = str(tiny_checkpoint), tmp_path / "cases", fixed
    widget.ui.addCaseButton.click()
    assert widget.ui.casesListWidget.texts() == ["fixed"] and not widget.answers
    first = (tmp_path / "cases" / "fixed.nrrd").stat().st_mtime_ns
    widget.confirm_answer = False
    time.sleep(0.01)
    widget.ui.addCaseButton.click()
    assert "already has a case named 'fixed'" in widget.answers[-1]
    assert (tmp_path / "cases" / "fixed.nrrd").stat().st_mtime_ns == first      # declined: untouched
    widget.confirm_answer = True
    widget.ui.addCaseButton.click()
    assert (tmp_path / "cases" / "fixed.nrrd").stat().st_mtime_ns != first and not widget.errors


def test_finetuned_models_are_listed_after_a_restart(module, ctx, tiny_checkpoint, user_models):
    import shutil
    logic = module.JointRegSegLogic()
    output = Path(logic.newModelPath(str(tiny_checkpoint)))
    assert output.parent == user_models and output.name == "tiny-ft1.safetensors"
    shutil.copy(tiny_checkpoint, output)                       # what a fine-tuning run writes
    assert module.JointRegSegLogic().models()["tiny-test-model"] == output      # a new session sees it
    widget = make_widget(module, ctx)
    assert "tiny-test-model" in widget.ui.modelComboBox.texts()


def test_annotate_and_refine_never_imports_torch_in_slicers_process(tmp_path):
    """Listing and adding cases runs in Slicer's process: it must work without torch (and not pay for it)."""
    script = f"""
import sys, importlib.abc
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch.") or name == "monai":
            raise ImportError("torch is not installed in this Slicer")
sys.meta_path.insert(0, NoTorch())
sys.path[:0] = [{str(ROOT / 'Testing')!r}, {str(ROOT)!r}]
import numpy as np, slicer
from slicer_runtime import boot, import_module_file
class MP:
    def setitem(self, d, k, v): d[k] = v
    def setattr(self, o, n, v, raising=True): setattr(o, n, v)
ctx = boot()
module = import_module_file(MP())
logic = module.JointRegSegLogic()
volume = slicer.util.addVolumeFromArray(np.random.rand(20, 20, 20).astype(np.float32), np.eye(4), "case a")
logic.addTrainingCase({str(tmp_path)!r}, volume, None)
print(logic.trainingCases({str(tmp_path)!r}), "torch" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "['case_a'] False"


def test_case_listing_matches_the_finetuning_command(tmp_path):
    from JointRegSegLib.slicer.mrml import CASE_SUFFIXES, LABEL_SUFFIX, list_training_cases
    from JointRegSegLib.training import finetune
    assert LABEL_SUFFIX == finetune.LABEL_SUFFIX and set(CASE_SUFFIXES) == set(finetune.IMAGE_SUFFIXES)
    for name in ("a.nrrd", "a_labels.nrrd", "a.seg.nrrd", "b.nii.gz", "c.mha", "c_labels.mha", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert list_training_cases(tmp_path) == sorted(finetune.list_cases(tmp_path, need_labels=False)) == ["a", "b", "c"]


# --- dependencies ----------------------------------------------------------------------------------------

def test_requirements_match_the_engine_and_keep_slicers_torch(module, monkeypatch):
    import importlib.metadata
    import tomllib
    from packaging.requirements import Requirement
    logic = module.JointRegSegLogic()
    engine = {Requirement(r).name.lower(): str(Requirement(r).specifier) for r in
              tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]}
    ours = {Requirement(r).name.lower(): str(Requirement(r).specifier) for r in logic.requirements()}
    assert ours and all(engine[name] == spec for name, spec in ours.items())      # monai==1.6.1, not >=1.3
    assert set(engine) - set(ours) <= {"numpy", "simpleitk", "scipy", "matplotlib"}   # Slicer's own / report only
    assert "torch" not in ours
    constraints = logic.constraints().splitlines()
    assert f"torch=={importlib.metadata.version('torch')}" in constraints
    assert f"numpy=={importlib.metadata.version('numpy')}" in constraints

    calls = []
    fake = types.ModuleType("slicer.packaging")
    fake.pip_ensure = lambda requirements, **kw: calls.append(
        (list(requirements), Path(kw["constraints"]).read_text(encoding="utf-8"), kw))
    monkeypatch.setattr(slicer, "packaging", fake, raising=False)
    logic.installDependencies(askConfirmation=False)
    assert calls == []                                          # all there: nothing to install
    # an old MONAI does not pass for the one the engine needs (a version check, not find_spec)
    monkeypatch.setattr(module.JointRegSegLogic, "requirements", staticmethod(lambda: ["monai==0.9.1", "tqdm>=4.60"]))
    assert logic.missingDependencies() == ["monai==0.9.1"]
    with pytest.raises(JointRegSegError, match="monai==0.9.1"):   # pip_ensure skipped it (testing): an error
        logic.installDependencies(askConfirmation=True)
    (requirements, constraints_text, options), = calls
    assert requirements == ["monai==0.9.1"] and f"torch=={importlib.metadata.version('torch')}" in constraints_text
    assert options["skip_in_testing"] is True and options["prompt_install"] is True
    assert options["requester"] == "JointRegSeg"


def fake_torch_version(monkeypatch, module, version):
    """importlib.metadata as the module sees it, with torch at `version` (None: not installed)."""
    import importlib.metadata
    real = importlib.metadata.version

    def fake(name):
        if name == "torch":
            if version is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return version
        return real(name)

    monkeypatch.setattr(module.importlib.metadata, "version", fake)


def fake_pytorch_extension(monkeypatch, install):
    calls = []
    extension = types.ModuleType("PyTorchUtils")

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None):
            calls.append({"askConfirmation": askConfirmation, "torchVersionRequirement": torchVersionRequirement})
            return install()

    extension.PyTorchUtilsLogic = PyTorchUtilsLogic
    monkeypatch.setitem(sys.modules, "PyTorchUtils", extension)
    return calls


def test_torch_is_asked_for_at_the_version_monai_needs(module, monkeypatch):
    """Issue 24, item 3: MONAI 1.6 needs torch >= 2.8; the PyTorch extension is asked for that version, and an
    older torch is named with what to do (never a pip failure on the constraints file)."""
    logic = module.JointRegSegLogic()
    assert module.MIN_TORCH_VERSION == "2.8"
    fake_torch_version(monkeypatch, module, "2.4.1+cpu")
    assert logic.missingDependencies()[0] == "torch>=2.8"
    calls = fake_pytorch_extension(monkeypatch, lambda: None)
    with pytest.raises(JointRegSegError) as raised:
        logic.installDependencies(askConfirmation=False)
    message = str(raised.value)
    assert "2.8 or newer" in message and "2.4.1+cpu" in message and "PyTorch Utils" in message
    assert calls == []                                    # the old torch is not replaced behind the user's back
    # no torch at all: the extension installs one at the version needed
    fake_torch_version(monkeypatch, module, None)
    with pytest.raises(JointRegSegError, match="PyTorch is not installed"):      # the user declined
        logic.installDependencies(askConfirmation=True)
    assert calls == [{"askConfirmation": True, "torchVersionRequirement": ">=2.8"}]


def test_a_failed_or_offline_install_says_so_plainly(module, monkeypatch, tmp_path):
    """Issue 24, item 4: pip's or the PyTorch installer's CalledProcessError becomes a plain message (no pip
    command line); the old-Slicer pip_install fallback runs under a wait cursor."""
    logic = module.JointRegSegLogic()
    monkeypatch.setattr(module.JointRegSegLogic, "requirements", staticmethod(lambda: ["monai==0.9.1"]))
    command = [sys.executable, "-m", "pip", "install", "-c", "/tmp/c.txt", "monai==0.9.1"]

    def offline(*args, **kwargs):
        raise subprocess.CalledProcessError(1, command, output="ERROR: Could not find a version (offline)")

    fake = types.ModuleType("slicer.packaging")
    fake.pip_ensure = offline
    monkeypatch.setattr(slicer, "packaging", fake, raising=False)
    with pytest.raises(JointRegSegError) as raised:
        logic.installDependencies(askConfirmation=False)
    message = str(raised.value)
    assert "monai==0.9.1" in message and "internet connection" in message
    assert "pip" not in message and "-c" not in message and "CalledProcessError" not in message

    # a Slicer before slicer.packaging: pip_install by hand, under a wait cursor
    monkeypatch.setattr(module.JointRegSegLogic, "_pipEnsure", staticmethod(lambda: None))
    cursor = []

    class WaitCursor:
        def __enter__(self):
            cursor.append("wait")

        def __exit__(self, *exc):
            cursor.append("restored")

    monkeypatch.setattr(slicer.util, "WaitCursor", WaitCursor, raising=False)
    installed = []
    monkeypatch.setattr(slicer.util, "pip_install", lambda args: installed.append((list(args), list(cursor))),
                        raising=False)
    with pytest.raises(JointRegSegError, match="missing Python packages: monai==0.9.1"):   # "installed", not really
        logic.installDependencies(askConfirmation=False)
    assert installed[0][0][-1] == "monai==0.9.1" and installed[0][1] == ["wait"] and cursor == ["wait", "restored"]
    monkeypatch.setattr(slicer.util, "pip_install", offline, raising=False)
    with pytest.raises(JointRegSegError) as raised:
        logic.installDependencies(askConfirmation=False)
    assert "internet connection" in str(raised.value) and "pip" not in str(raised.value)
    assert cursor[-1] == "restored"
    # the PyTorch extension's installer failing (light-the-torch offline)
    fake_torch_version(monkeypatch, module, None)
    fake_pytorch_extension(monkeypatch, lambda: offline())
    with pytest.raises(JointRegSegError) as raised:
        logic.installDependencies(askConfirmation=False)
    assert "Could not install PyTorch" in str(raised.value) and "pip" not in str(raised.value)


# --- the child process ---------------------------------------------------------------------------------

def test_worker_processes_start_without_a_console_window(monkeypatch):
    from JointRegSegLib.slicer import worker
    assert worker.popen_options() == {"start_new_session": True}
    for name, value in (("STARTF_USESHOWWINDOW", 1), ("SW_HIDE", 0), ("CREATE_NO_WINDOW", 0x08000000),
                        ("CREATE_NEW_PROCESS_GROUP", 0x200)):
        monkeypatch.setattr(worker.subprocess, name, value, raising=False)
    monkeypatch.setattr(worker.subprocess, "STARTUPINFO", lambda: types.SimpleNamespace(dwFlags=0, wShowWindow=5),
                        raising=False)
    monkeypatch.setattr(worker.os, "name", "nt")
    options = worker.popen_options()
    assert options["creationflags"] == 0x08000000 | 0x200
    assert options["startupinfo"].dwFlags & 1 and options["startupinfo"].wShowWindow == 0


# --- the module's self-test and CI ---------------------------------------------------------------------

def test_the_modules_self_test_runs_offline_on_the_sample_pair(module, ctx):
    suite = __import__("unittest").TestLoader().loadTestsFromTestCase(module.JointRegSegTest)
    outcome = __import__("unittest").TextTestRunner(verbosity=0).run(suite)
    assert outcome.wasSuccessful(), outcome.failures + outcome.errors


def test_the_self_test_passes_where_torch_and_monai_are_absent():
    """Issue 24, item 2: on the Extensions build machines the PyTorch extension is there but torch and MONAI
    are not (and nothing is installed while testing): the self-test checks the data and the Logic's contract
    and passes, without importing torch."""
    script = f"""
import sys, importlib.abc, importlib.metadata, unittest
ABSENT = ("torch", "monai")
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ABSENT:
            raise ImportError(f"No module named {{name!r}}")
sys.meta_path.insert(0, Absent())
real_version = importlib.metadata.version
def version(name):
    if name.lower() in ABSENT:
        raise importlib.metadata.PackageNotFoundError(name)
    return real_version(name)
importlib.metadata.version = version
sys.path[:0] = [{str(ROOT / 'Testing')!r}, {str(ROOT)!r}]
from slicer_runtime import boot, import_module_file
class MP:
    def setitem(self, d, k, v): d[k] = v
    def setattr(self, o, n, v, raising=True): setattr(o, n, v)
ctx = boot()
module = import_module_file(MP())
outcome = unittest.TextTestRunner(verbosity=2).run(unittest.TestLoader().loadTestsFromTestCase(module.JointRegSegTest))
print("RESULT", outcome.wasSuccessful(), outcome.testsRun, "torch" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "RESULT True 2 False", done.stdout[-2000:] + done.stderr[-3000:]
    assert "Inference not tested: torch" in done.stdout


@pytest.mark.slow
def test_module_tests_fail_without_slicer_core(tmp_path):
    """CI must fail, not skip, when slicer-core is missing."""
    script = f"""
import sys, importlib.abc
class NoSlicer(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "slicer" or name.startswith("slicer."):
            raise ImportError("No module named 'slicer'")
sys.meta_path.insert(0, NoSlicer())
import pytest
sys.exit(pytest.main(["-q", "--collect-only", "-p", "no:cacheprovider", {str(ROOT / 'Testing' / 'test_slicer_module.py')!r},
                      {str(ROOT / 'Testing' / 'test_slicer_widget.py')!r}, {str(ROOT / 'Testing' / 'test_slicer_worker.py')!r}]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0, done.stdout[-2000:]
    assert "3 errors" in done.stdout and "skipped" not in done.stdout
    assert "slicer-core is not installed" in done.stdout
