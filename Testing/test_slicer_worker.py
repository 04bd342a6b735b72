"""The warm worker behind the Slicer module (issue 15, item 3), on real MRML (slicer-core): one engine
process kept between clicks with the model loaded once; restarted if it dies; cancel stops the work and
leaves the scene unchanged. slicer-core is required (no skip)."""
import os
import signal
import time

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import grid_for, phantom_array, sample_on

import slicer  # noqa: E402  (slicer-core; a missing one fails collection)
from slicer_runtime import ctx, module  # noqa: E402,F401

from JointRegSegLib import Cancelled, JointRegSegError  # noqa: E402
from JointRegSegLib.slicer.mrml import ijk_to_ras  # noqa: E402
from JointRegSegLib.slicer.worker import WarmWorker  # noqa: E402


@pytest.fixture
def pair(ctx):
    moving = sample_on(grid_for("lps-oblique"), phantom_array)
    fixed = sample_on(grid_for("axis-aligned"), phantom_array, lambda p: p + np.array([2.0, -3.0, 1.5]))
    return tuple(slicer.util.addVolumeFromArray(sitk.GetArrayFromImage(i), ijk_to_ras(i), n)
                 for i, n in ((moving, "moving"), (fixed, "fixed")))


@pytest.fixture
def logic(module, monkeypatch):
    """A Logic with a worker of its own (not the process-wide one), stopped afterwards."""
    worker = WarmWorker()
    logic = module.JointRegSegLogic()
    monkeypatch.setattr(logic, "worker", lambda: worker)
    yield logic
    worker.stop()
    assert not worker.alive


def node_ids(scene):
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def click(logic, moving, fixed, checkpoint, **options):
    """What one Register & Segment click does: start, wait, load. Returns (results, the worker's reply)."""
    job = logic.start(moving, fixed, str(checkpoint), device="cpu", **options)
    job.run.wait()
    reply = job.run.reply
    return logic.finish(job), reply


def wait_for_stage(job, word, timeout_s=600):
    deadline = time.time() + timeout_s
    while word not in job.run.progress[0]:
        assert time.time() < deadline and job.run.state == "running", job.run.error
        time.sleep(0.05)


@pytest.mark.slow
def test_two_clicks_and_a_cancel_share_one_warm_process(logic, ctx, pair, tiny_checkpoint):
    moving, fixed = pair
    worker = logic.worker()
    first, reply = click(logic, moving, fixed, tiny_checkpoint)
    pid = worker.pid
    assert reply["worker"] == {"pid": pid, "model_loads": 1, "requests": 1}
    second, reply = click(logic, moving, fixed, tiny_checkpoint)
    assert reply["worker"] == {"pid": pid, "model_loads": 1, "requests": 2}     # same process, model kept
    assert first.transform.GetID() != second.transform.GetID()

    # a cancel mid-refinement: the work stops, nothing enters the scene, the process stays warm
    before = node_ids(ctx.scene)
    job = logic.start(moving, fixed, str(tiny_checkpoint), device="cpu", refineIterations=5000)
    wait_for_stage(job, "refine")
    while job.run.progress[1] == 0.0:                # the refinement loop is turning
        time.sleep(0.05)
    # the worker checks between iterations (~0.1-0.5 s each on a free machine; the grace is generous
    # because this shared test machine can be many times oversubscribed)
    job.run.cancel(grace_s=300)
    job.cleanup()
    assert job.run.state == "cancelled" and not job.workdir.exists()
    with pytest.raises(Cancelled):
        logic.finish(job)
    assert node_ids(ctx.scene) == before
    assert worker.pid == pid and worker.starts == 1 and not worker.busy
    third, reply = click(logic, moving, fixed, tiny_checkpoint)                # and the next click works
    assert reply["worker"]["pid"] == pid and reply["worker"]["model_loads"] == 1
    assert third.fixed_segmentation.GetSegmentation().GetNumberOfSegments() == 2


@pytest.mark.slow
def test_a_dead_worker_is_replaced_and_a_death_mid_run_changes_nothing(logic, ctx, pair, tiny_checkpoint):
    moving, fixed = pair
    worker = logic.worker()
    click(logic, moving, fixed, tiny_checkpoint)
    first_pid = worker.pid
    os.kill(first_pid, signal.SIGKILL)                    # it died between clicks (crash, OOM killer, ...)
    deadline = time.time() + 60
    while worker.alive:
        assert time.time() < deadline
        time.sleep(0.1)
    _, reply = click(logic, moving, fixed, tiny_checkpoint)
    assert worker.starts == 2 and reply["worker"]["pid"] == worker.pid != first_pid

    # it dies during a run: the run fails with a message, the scene is unchanged, the next click works
    before = node_ids(ctx.scene)
    job = logic.start(moving, fixed, str(tiny_checkpoint), device="cpu", refineIterations=5000)
    wait_for_stage(job, "refine")
    os.kill(worker.pid, signal.SIGKILL)
    deadline = time.time() + 30
    while job.run.state == "running":
        assert time.time() < deadline
        time.sleep(0.05)
    with pytest.raises(JointRegSegError, match="stopped unexpectedly"):
        logic.finish(job)
    assert node_ids(ctx.scene) == before and not job.workdir.exists()
    _, reply = click(logic, moving, fixed, tiny_checkpoint)
    assert worker.starts == 3 and reply["worker"]["requests"] == 1


@pytest.mark.slow
def test_a_worker_that_ignores_cancel_is_stopped_the_hard_way(logic, ctx, pair, tiny_checkpoint):
    moving, fixed = pair
    worker = logic.worker()
    job = logic.start(moving, fixed, str(tiny_checkpoint), device="cpu", refineIterations=5000)
    wait_for_stage(job, "refine")
    pid = worker.pid
    os.kill(pid, signal.SIGSTOP)                         # frozen: it cannot answer the cancel request
    before = node_ids(ctx.scene)
    started = time.perf_counter()
    job.run.cancel(grace_s=1.0)
    assert time.perf_counter() - started < 10.0 and job.run.state == "cancelled"
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)                               # the whole process group is gone
    job.cleanup()
    assert node_ids(ctx.scene) == before
    click(logic, moving, fixed, tiny_checkpoint)        # a fresh worker takes the next click
    assert worker.starts == 2


def test_a_failing_request_keeps_the_worker(logic, ctx, pair, tiny_checkpoint):
    moving, fixed = pair
    before = node_ids(ctx.scene)
    with pytest.raises(JointRegSegError, match="CUDA is not available"):
        logic.process(moving, fixed, str(tiny_checkpoint), device="cuda")
    assert node_ids(ctx.scene) == before
    pid = logic.worker().pid
    assert pid is not None
    assert "cuda" not in logic.availableDevices() and logic.worker().info["cuda"] is False
    click(logic, moving, fixed, tiny_checkpoint)
    assert logic.worker().pid == pid
