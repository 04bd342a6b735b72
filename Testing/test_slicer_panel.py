"""The Slicer module's panel and process hygiene (issue 24, items 8-16), on real MRML (slicer-core) with the
stand-in Qt widgets: output selectors honoured, a clean panel after File > Close Scene, "cuda" offered once the
engine reports it, the warm engine ended when idle or on request, QC and model words from the run and the card,
fine-tuning switching only on held-out evidence, work folders in Slicer's temporary folder, and the smaller items.
slicer-core is required (no skip)."""
import ast
import os
import re
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

import slicer  # noqa: E402  (slicer-core; a missing one fails collection)
from slicer_runtime import (MODULE_FILE, add_pair, ctx, drive, import_module_file, make_widget,  # noqa: E402,F401
                            module, stop_workers_after_module)

from JointRegSegLib import InputImageError, read_card  # noqa: E402
from JointRegSegLib.models.card import licence_text  # noqa: E402
from JointRegSegLib.models.installed import default_model_path, installed_models  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class FakeWorker:
    def __init__(self, info=None):
        self.info, self.alive, self.starts, self.stops, self.idle_asks = dict(info or {}), True, 0, [], []

    def start(self):
        self.starts += 1

    def stop(self, timeout_s=5.0, wait=True):
        self.stops.append(wait)

    def stop_if_idle(self, idle_s):
        self.idle_asks.append(idle_s)
        return False


# --- item 8: "New nodes each run" honours the nodes the user picks -----------------------------------------

def test_new_nodes_each_run_fills_the_nodes_the_user_chose(module, ctx, tiny_checkpoint):
    widget = make_widget(module, ctx)
    moving, fixed = add_pair()
    node = widget._parameterNode
    node.movingVolume, node.fixedVolume, node.modelPath, node.device = moving, fixed, str(tiny_checkpoint), "cpu"
    assert node.newNodesEachRun
    chosen = ctx.scene.AddNewNodeByClass("vtkMRMLTransformNode", "my transform")
    chosen_segmentation = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my fixed segmentation")
    node.outputTransform, node.outputFixedSegmentation = chosen, chosen_segmentation
    drive(widget)
    assert widget.results.transform is chosen and widget.results.fixed_segmentation is chosen_segmentation
    assert chosen.GetTransformFromParent() is not None
    assert chosen_segmentation.GetSegmentation().GetNumberOfSegments() > 0
    # the next run keeps that result and makes new nodes (the selectors show what the last run made)
    drive(widget)
    assert widget.results.transform is not chosen and ctx.scene.GetNodeByID(chosen.GetID()) is chosen
    assert widget.results.fixed_segmentation is not chosen_segmentation
    assert ctx.scene.GetNumberOfNodesByClass("vtkMRMLTransformNode") == 2


# --- item 9: File > Close Scene leaves a clean panel --------------------------------------------------------

def test_scene_close_clears_the_results_panel(module, ctx):
    widget = make_widget(module, ctx)
    jacobian = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "det J")
    widget.results = types.SimpleNamespace(jacobian=jacobian)
    widget.ui.resultsLabel.text = "Folding: 0.0000 % ..."
    widget.ui.showJacobianButton.enabled = True
    ctx.scene.Clear(0)
    assert widget.results is None and widget.ui.resultsLabel.text == ""
    assert not widget.ui.showJacobianButton.enabled
    # a result whose Jacobian node is gone: not "re-run with 'Jacobian map' checked"
    widget.results = types.SimpleNamespace(jacobian=jacobian)
    widget.onShowJacobian()
    assert "no Jacobian map in this scene" in widget.errors[-1] and not widget.ui.showJacobianButton.enabled


# --- item 10: "cuda" offered once the engine has said so ---------------------------------------------------

def test_cuda_is_offered_once_the_engine_reports_it(module, ctx, monkeypatch):
    worker = FakeWorker()
    monkeypatch.setattr(module.JointRegSegLogic, "worker", lambda self: worker)
    widget = make_widget(module, ctx)
    widget.enter()
    assert widget.ui.deviceComboBox.texts() == ["auto", "cpu"] and widget.deviceTimer.active
    widget.deviceTimer.fire()
    assert widget.deviceTimer.active                      # not reported yet: keeps watching
    worker.info["cuda"] = True                            # the engine's "ready" message
    widget.deviceTimer.fire()
    assert widget.ui.deviceComboBox.texts() == ["auto", "cpu", "cuda"] and not widget.deviceTimer.active
    # an engine that never starts (no torch) does not keep the timer running
    worker.info, worker.alive = {}, False
    widget.enter()
    widget.deviceTimer.fire()
    assert not widget.deviceTimer.active


# --- item 11: the warm engine ends when idle or on request; GPU cache released -----------------------------

READY_ONLY = """#!{python}
import json, os, sys, time
print(json.dumps({{"event": "ready", "pid": os.getpid(), "cuda": False}}), flush=True)
for line in sys.stdin:
    message = json.loads(line)
    if message.get("command") == "quit":
        break
    if message.get("command") == "run":
        print(json.dumps({{"event": "progress", "id": message["id"], "stage": "network inference",
                          "fraction": 0.5}}), flush=True)
"""


def test_an_idle_engine_is_ended_and_a_busy_one_is_not(tmp_path):
    from JointRegSegLib.slicer.worker import WarmWorker
    engine = tmp_path / "engine"
    engine.write_text(READY_ONLY.format(python=sys.executable), encoding="utf-8")
    engine.chmod(0o755)
    worker = WarmWorker(python=str(engine))
    try:
        worker.wait_ready(60)
        process = worker.process
        assert not worker.stop_if_idle(3600)             # used just now
        task = worker.run({"moving": "m", "fixed": "f"})
        time.sleep(0.2)
        assert worker.busy and not worker.stop_if_idle(0.0)
        task._finish("done")
        assert worker.stop_if_idle(0.0) and not worker.alive
        process.wait(timeout=30)
        assert process.returncode is not None
        assert not worker.stop_if_idle(0.0)              # nothing left to stop
    finally:
        worker.stop(timeout_s=1.0)


def test_the_panel_ends_an_idle_engine_and_frees_it_on_request(module, ctx, monkeypatch):
    worker = FakeWorker({"cuda": False})
    monkeypatch.setattr(module.JointRegSegLogic, "worker", lambda self: worker)
    widget = make_widget(module, ctx)
    widget.enter()
    assert widget.idleTimer.active
    widget.idleTimer.fire()
    assert worker.idle_asks == [module.IDLE_MINUTES * 60]
    widget.job = object()                                # a run going on: never ended for idleness
    widget.idleTimer.fire()
    assert len(worker.idle_asks) == 1
    widget.ui.releaseEngineButton.click()
    assert worker.stops == [] and "Wait for the registration" in widget.errors[-1]
    widget.job = None
    widget.ui.releaseEngineButton.click()
    assert worker.stops == [False]                       # returns at once


def test_gpu_cache_is_released_after_a_gpu_run():
    from JointRegSegLib.slicer import worker as worker_module
    calls = []

    def fake_torch(available, initialized):
        cuda = types.SimpleNamespace(is_available=lambda: available, is_initialized=lambda: initialized,
                                     empty_cache=lambda: calls.append("empty_cache"))
        return types.SimpleNamespace(cuda=cuda)

    assert not worker_module.release_gpu_memory(fake_torch(False, False)) and calls == []
    assert not worker_module.release_gpu_memory(fake_torch(True, False)) and calls == []   # never used: no context
    assert worker_module.release_gpu_memory(fake_torch(True, True)) and calls == ["empty_cache"]
    # the warm worker does it after every request
    import inspect
    source = inspect.getsource(worker_module.serve)
    assert re.search(r"finally:\s*\n\s*cancels\.pop\(request_id, None\)\s*\n\s*release_gpu_memory\(torch\)", source)


# --- item 12: QC words and the expected input ----------------------------------------------------------------

def test_volume_words_do_not_say_ok_when_the_registration_needs_checking(module):
    qc = {"folding_percent": 0.0, "jacobian_min": 0.8, "jacobian_max": 1.2,
          "fixed_volumes_ml": {"left caudate": 3.0, "right caudate": 3.4},
          "moving_volumes_ml": {"left caudate": 3.5, "right caudate": 3.5},
          "registration_status": "check", "agreement_mean": 0.41,
          "warnings": ["the fixed image looks like a head with skull"],
          "volume_flags": ["right caudate: 3.40 ml in the fixed image is outside the expected 4-7 ml range",
                           "the moving image is only 20x20x20 voxels: too small for structure volumes"]}
    text = module.JointRegSegLogic.describeQc(qc)
    cells = re.findall(r"<td>([^<]*)</td></tr>", text)
    assert cells and not any(cell.strip() == "ok" for cell in cells)
    assert "unverified: the registration needs checking" in text
    assert "&#9888; 3.40 ml in the fixed image is outside the expected 4-7 ml range" in text   # the engine's flag
    assert "too small for structure volumes" in text and "head with skull" in text
    assert "Registration: check" in text and "0.41" in text
    qc["registration_status"] = "ok"
    assert "plausible" in module.JointRegSegLogic.describeQc(qc)


def test_the_models_expected_input_is_shown_next_to_the_selectors(module, ctx, tiny_checkpoint):
    widget = make_widget(module, ctx)
    for path in [*installed_models().values(), tiny_checkpoint]:
        widget._parameterNode.modelPath = str(path)
        widget.populateModels()
        modality = read_card(path)["modality"]
        assert widget.ui.expectedInputLabel.text == f"This model expects: {modality}"


# --- item 13: fine-tuning switches only on held-out evidence -------------------------------------------------

def finetune_card(held_out, before, after):
    return {"finetune": {"held_out": held_out, "metrics_before": {"segmentation_dice_mean": before},
                         "metrics_after": {"segmentation_dice_mean": after},
                         "measured_on": "held-out corrected cases" if held_out else
                         "the training cases (none held out)", "improved": after >= before}}


def test_finetuning_switches_the_model_only_on_a_held_out_improvement(module, ctx, monkeypatch, tiny_checkpoint):
    cards = {}
    real_read_card = module.read_card
    monkeypatch.setattr(module, "read_card", lambda path: cards.get(str(path)) or real_read_card(path))
    describe = module.JointRegSegLogic.describeFinetune
    cards["tie"] = finetune_card([], 0.80, 0.80)
    cards["trained-only"] = finetune_card([], 0.80, 0.90)
    cards["held-tie"] = finetune_card(["case3"], 0.80, 0.80)
    cards["held-better"] = finetune_card(["case3"], 0.80, 0.83)
    assert [describe(k)[1] for k in ("tie", "trained-only", "held-tie", "held-better")] == [False, False, False, True]
    assert "none held out" in describe("trained-only")[0] and "does not show" in describe("trained-only")[0]

    widget = make_widget(module, ctx)
    node = widget._parameterNode
    node.modelPath = str(tiny_checkpoint)

    def finish(key, answer):
        run = types.SimpleNamespace(state="done", progress=("done", 1.0), error="")
        widget.finetuneRun = (run, key)
        widget.confirm_answer = answer
        asked = len(widget.answers)
        widget.onFinetunePoll()
        return len(widget.answers) > asked

    assert finish("trained-only", False) and node.modelPath == str(tiny_checkpoint)    # asked, declined: kept
    assert finish("tie", True) and node.modelPath == "tie"                              # asked, accepted
    node.modelPath = str(tiny_checkpoint)
    assert not finish("held-tie", True) and node.modelPath == str(tiny_checkpoint)     # held out, not better
    assert not finish("held-better", False) and node.modelPath == "held-better"        # evidence: switched


# --- item 14: acknowledgement and licence from the model card ------------------------------------------------

def test_acknowledgement_and_licence_come_from_the_model_card(module, monkeypatch):
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(connect=lambda signal, slot: None), raising=False)
    parent = type("Parent", (), {})()
    module.JointRegSeg(parent)
    assert parent.acknowledgementText == module.acknowledgementText()
    assert "trained on the Colin27 and MNI ICBM 2009c" not in parent.acknowledgementText
    for path in [default_model_path(), *installed_models().values()]:
        card = read_card(path)
        text = module.acknowledgementText(path)
        assert card["name"] in text
        for source in card.get("data", {}).get("sources", []):
            assert (source.get("name") or source.get("source")) in text
            if source.get("licence"):
                assert source["licence"] in text
        held = card.get("data", {}).get("held_out")
        if held:
            assert str(held if isinstance(held, str) else held[0]) in text
        licence = licence_text(card) or "not stated in the model card"
        assert f"Licence of the model weights: {licence}" in text
        assert f"Licence of the model weights:</b> {licence}" in module.JointRegSegLogic.describeModel(path)


def test_restrictive_model_licences_are_named_in_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## In 3D Slicer", 1)[1].split("\n## ", 1)[0]
    assert "Apache" in section and "licence" in section.lower()
    for path in installed_models().values():
        card = read_card(path)
        licence = card.get("licence")
        weights = licence.get("weights") if isinstance(licence, dict) else licence
        if weights and "NC" in weights:
            assert weights in section and card["name"] in section, (card["name"], weights)


# --- item 15: work folders in Slicer's temporary folder, stale ones removed ----------------------------------

def test_work_folders_are_in_slicers_temporary_folder_and_a_crashed_sessions_are_removed(ctx, monkeypatch, tmp_path,
                                                                                          tiny_checkpoint):
    from JointRegSegLib.slicer import mrml
    slicer_temp = tmp_path / "Slicer temp"
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(temporaryPath=str(slicer_temp)), raising=False)
    dead = subprocess_pid_that_ended()
    stale = slicer_temp / f"JointRegSeg-{dead}-abc123"
    live = slicer_temp / f"JointRegSeg-{os.getppid()}-def456"
    for folder in (stale, live):
        folder.mkdir(parents=True)
        (folder / "moving.nrrd").write_bytes(b"patient voxels")
    moving, fixed = add_pair()
    requests = []
    worker = types.SimpleNamespace(run=lambda request: requests.append(request) or types.SimpleNamespace())
    job = mrml.Job(moving, fixed, str(tiny_checkpoint), worker=worker)
    assert job.workdir.parent == slicer_temp and job.workdir.name.startswith(f"JointRegSeg-{os.getpid()}-")
    assert Path(requests[0]["moving"]).parent == job.workdir
    assert not stale.exists() and live.exists()
    job.cleanup()
    assert not job.workdir.exists()


def subprocess_pid_that_ended() -> int:
    import subprocess
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# --- item 16: the smaller items -------------------------------------------------------------------------

def test_an_output_selector_naming_an_input_is_refused(module, ctx, tiny_checkpoint):
    moving, fixed = add_pair()
    before = ctx.scene.GetNumberOfNodes()
    original = slicer.util.arrayFromVolume(fixed).copy()
    for role, node in (("warped", fixed), ("jacobian", moving)):
        with pytest.raises(InputImageError, match="is an input of this run"):
            module.JointRegSegLogic().start(moving, fixed, str(tiny_checkpoint), outputs={role: node})
    assert ctx.scene.GetNumberOfNodes() == before and np.array_equal(slicer.util.arrayFromVolume(fixed), original)


def test_help_text_links_the_documentation(module, monkeypatch):
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(connect=lambda signal, slot: None), raising=False)
    parent = type("Parent", (), {})()
    module.JointRegSeg(parent)
    assert f'<a href="{module.DOCUMENTATION_URL}">' in parent.helpText
    assert module.DOCUMENTATION_URL.startswith("https://") and module.DOCUMENTATION_URL.endswith("#in-3d-slicer")


def test_translation_calls_take_literal_strings_only():
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
             and node.func.id == "_"]
    assert calls
    bad = [ast.unparse(call) for call in calls
           if len(call.args) != 1 or call.keywords or not (isinstance(call.args[0], ast.Constant)
                                                             and isinstance(call.args[0].value, str))]
    assert not bad, bad


def test_the_self_test_loads_the_pair_through_sample_data(module, ctx):
    import unittest
    import SampleData
    test = module.JointRegSegTest("test_sample_pair_and_the_logic_contract")
    outcome = unittest.TextTestRunner(verbosity=0).run(test)
    assert outcome.wasSuccessful(), outcome.failures + outcome.errors
    assert SampleData.SampleDataLogic.loads == ["JointRegSegBrainPair"]
    source = SampleData.SampleDataLogic.sources["JointRegSegBrainPair"]
    assert source["category"] == "JointRegSeg" and os.path.isfile(source["thumbnailFileName"])
    assert "AddArchetypeVolume" not in MODULE_FILE.read_text(encoding="utf-8")        # never by path


def test_the_fixed_segmentation_is_shown_as_outlines(module, ctx):
    moving, fixed = add_pair()
    nodes = {}
    for role in ("fixed_segmentation", "moving_segmentation", "warped_moving_segmentation"):
        nodes[role] = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", role)
        nodes[role].CreateDefaultDisplayNodes()
    results = types.SimpleNamespace(warped=moving, fixed_brain_mask=None, moving_brain_mask=None, **nodes)
    module.JointRegSegLogic.showResults(results, fixed)
    display = nodes["fixed_segmentation"].GetDisplayNode()
    assert display.GetVisibility() and display.GetVisibility2DOutline() and not display.GetVisibility2DFill()
    assert not nodes["moving_segmentation"].GetDisplayNode().GetVisibility()


def test_cleanup_stops_every_timer(module, ctx, monkeypatch):
    monkeypatch.setattr(module.JointRegSegLogic, "worker", lambda self: FakeWorker({"cuda": False}))
    widget = make_widget(module, ctx)
    timers = widget.timers()
    assert widget.finetuneTimer in timers and widget.idleTimer in timers and widget.deviceTimer in timers
    for timer in timers:
        timer.start()
    widget.cleanup()
    assert not any(timer.active for timer in timers)


def test_the_engine_folder_goes_last_on_sys_path(monkeypatch, ctx):
    candidates = {str(ROOT), str(ROOT / "JointRegSeg")}
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in candidates])
    first = sys.path[0]
    import_module_file(monkeypatch)
    assert sys.path[0] == first and sys.path[-1] in candidates


def test_slot_errors_show_under_a_wait_cursor_and_are_reported(module, ctx, monkeypatch):
    cursor = []

    class WaitCursor:
        def __enter__(self):
            cursor.append("wait")

        def __exit__(self, *exc):
            cursor.append("restored")

    monkeypatch.setattr(slicer.util, "WaitCursor", WaitCursor, raising=False)
    widget = make_widget(module, ctx)
    with widget.reportErrors("Could not do it."):
        assert cursor == ["wait"]
        raise RuntimeError("disk full")
    assert cursor == ["wait", "restored"] and widget.errors[-1] == "Could not do it.\n\ndisk full"


def test_extension_description_is_short_and_plain():
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    description = re.search(r'set\(EXTENSION_DESCRIPTION "([^"]*)"\)', top).group(1)
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", description.strip()) if s]
    assert 1 <= len(sentences) <= 2 and len(description) <= 300
    assert not re.search(r"DeepAtlas|DeepRS|few-shot|Jacobian", description)
