"""`jointregseg batch`: one model load for a cohort, resumable, failing pairs isolated, sharded by torchrun;
lean start-up (MONAI's extras not imported) gives the same results; thread choice."""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from JointRegSegLib import register_and_segment
from JointRegSegLib.core import threads
from JointRegSegLib.cli import main
from JointRegSegLib.core.errors import JointRegSegError
from JointRegSegLib.io.outputs import OUTPUT_FILES

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def cohort(tmp_path, phantom_pair, tiny_checkpoint):
    """A folder with images, the tiny model and a function writing a pairs CSV into it."""
    moving, fixed = phantom_pair
    folder = tmp_path / "cohort"
    (folder / "images").mkdir(parents=True)
    sitk.WriteImage(moving, str(folder / "images" / "m.nrrd"))
    sitk.WriteImage(fixed, str(folder / "images" / "f.nii.gz"))

    def write_csv(rows, header=("name", "moving", "fixed")):
        path = folder / "pairs.csv"
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
        return path
    return folder, write_csv, tiny_checkpoint


def _summary(out):
    with open(out / "summary.csv", newline="", encoding="utf-8") as handle:
        return {row["name"]: row for row in csv.DictReader(handle)}


def _batch(csv_path, out, model, *extra):
    return main(["batch", "--pairs", str(csv_path), "--out", str(out), "--model", str(model), "--no-affine", *extra])


def test_batch_writes_run_outputs_and_resumes(cohort, capsys):
    folder, write_csv, model = cohort
    pairs = write_csv([("one", "images/m.nrrd", "images/f.nii.gz", ""),
                       ("two", "images/f.nii.gz", "images/m.nrrd", "2")], header=("name", "moving", "fixed", "refine"))
    out = folder / "out"
    assert _batch(pairs, out, model, "--threads", "1", "--workers", "1") == 0
    assert torch.get_num_threads() == 1   # one worker: the pairs are computed in this process
    summary = _summary(out)
    assert [summary[n]["status"] for n in ("one", "two")] == ["done", "done"]
    for name in ("one", "two"):
        for file in OUTPUT_FILES.values():
            assert (out / name / file).is_file(), (name, file)
    qc_one = json.loads((out / "one" / "qc.json").read_text(encoding="utf-8"))
    qc_two = json.loads((out / "two" / "qc.json").read_text(encoding="utf-8"))
    assert qc_one["refine_iterations"] == 0 and qc_two["refine_iterations"] == 2  # the per-row option
    assert qc_one["inputs"]["moving"] == str(folder / "images" / "m.nrrd")  # paths relative to the CSV
    assert float(summary["two"]["folding_percent"]) == pytest.approx(qc_two["folding_percent"], abs=1e-5)
    stamps = {n: (out / n / "qc.json").stat().st_mtime_ns for n in ("one", "two")}

    capsys.readouterr()
    assert _batch(pairs, out, model) == 0  # second call: nothing to do
    summary = _summary(out)
    assert [summary[n]["status"] for n in ("one", "two")] == ["skipped", "skipped"]
    assert summary["two"]["refine_iterations"] == "2" and summary["two"]["folding_percent"] != ""
    assert {n: (out / n / "qc.json").stat().st_mtime_ns for n in ("one", "two")} == stamps
    assert "0 done, 2 skipped" in capsys.readouterr().out

    # other options for one pair: its outputs are not current any more; replaced only with --overwrite
    pairs = write_csv([("one", "images/m.nrrd", "images/f.nii.gz", "1"),
                       ("two", "images/f.nii.gz", "images/m.nrrd", "2")], header=("name", "moving", "fixed", "refine"))
    assert _batch(pairs, out, model) == 1
    summary = _summary(out)
    assert summary["one"]["status"] == "failed" and "pass --overwrite" in summary["one"]["error"]
    assert summary["two"]["status"] == "skipped"
    assert (out / "one" / "qc.json").stat().st_mtime_ns == stamps["one"]  # left as it was
    assert _batch(pairs, out, model, "--overwrite") == 0
    summary = _summary(out)
    assert summary["one"]["status"] == "done" and summary["two"]["status"] == "skipped"
    assert json.loads((out / "one" / "qc.json").read_text(encoding="utf-8"))["refine_iterations"] == 1


def test_batch_isolates_a_failing_pair(cohort, capsys):
    folder, write_csv, model = cohort
    (folder / "images" / "junk.nii.gz").write_bytes(b"this is not an image")
    pairs = write_csv([("junk", "images/junk.nii.gz", "images/f.nii.gz"),
                       ("good", "images/m.nrrd", "images/f.nii.gz"),
                       ("gone", "images/m.nrrd", "images/nowhere.nii.gz")])
    out = folder / "out"
    assert _batch(pairs, out, model) == 1  # documented: 1 when any pair failed
    summary = _summary(out)
    assert list(summary) == ["junk", "good", "gone"]  # the CSV's order
    assert summary["good"]["status"] == "done"
    assert summary["junk"]["status"] == "failed" and "moving: cannot read" in summary["junk"]["error"]
    assert summary["gone"]["status"] == "failed" and "fixed: file not found" in summary["gone"]["error"]
    assert not (out / "junk").exists() and not (out / "gone").exists()
    assert "2 pair(s) failed" in capsys.readouterr().err
    # asked to tolerate failures: exit code 0; the done pair is not computed again
    assert _batch(pairs, out, model, "--allow-failures") == 0
    assert _summary(out)["good"]["status"] == "skipped"


@pytest.mark.parametrize("header, rows, message", [
    (("name", "moving"), [("a", "images/m.nrrd")], "missing column\\(s\\) fixed"),
    (("name", "moving", "fixed"), [("a", "images/m.nrrd", "images/f.nii.gz"), ("a", "x", "y")], "also used on row 1"),
    (("name", "moving", "fixed", "colour"), [("a", "x", "y", "red")], "unknown column\\(s\\) colour"),
    (("name", "moving", "fixed", "refine"), [("a", "x", "y", "many")], "column 'refine'.*'many'"),
    (("name", "moving", "fixed", "similarity"), [("a", "x", "y", "ssd")], "must be one of lncc, mi"),
    (("name", "moving", "fixed", "affine_method"), [("a", "x", "y", "sift")], "must be one of torch, classical"),
    (("name", "moving", "fixed"), [("../up", "x", "y")], "cannot be a folder name"),
    (("name", "moving", "fixed", "moving_labels"), [("a", "x", "y", "l.nrrd")], "needs both moving_labels"),
])
def test_bad_pairs_file_is_named_before_any_work(cohort, capsys, header, rows, message):
    folder, write_csv, model = cohort
    pairs = write_csv(rows, header=header)
    out = folder / "out"
    assert _batch(pairs, out, model) == 2
    err = capsys.readouterr().err
    assert "jointregseg: error:" in err
    assert re.search(message, err), err
    assert not out.exists()


def _pid_holding(path: Path) -> int | None:
    """The process (not this one) with `path` open, from /proc."""
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        if int(fd_dir.parent.name) == os.getpid():
            continue
        try:
            if any(os.readlink(link) == str(path) for link in fd_dir.iterdir()):
                return int(fd_dir.parent.name)
        except OSError:
            continue
    return None


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir() or not hasattr(os, "mkfifo"), reason="needs /proc and FIFOs")
def test_batch_workers_match_one_process_and_a_killed_worker_fails_only_its_pair(cohort):
    """Two worker processes give the outputs of one process; a worker killed while it reads a pair (a hung
    file: a FIFO nobody writes) fails that pair only, a new worker takes the rest; a rerun resumes."""
    import signal
    import threading
    import time
    folder, write_csv, model = cohort
    stuck = folder / "images" / "stuck.nii.gz"
    os.mkfifo(stuck)
    killed = []

    def kill_the_reader():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:   # succeeds once a worker opens the FIFO to read it
                fd = os.open(stuck, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                time.sleep(0.05)
        else:
            return
        try:
            while (pid := _pid_holding(stuck)) is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        finally:
            os.close(fd)

    rows = [("a", "images/m.nrrd", "images/f.nii.gz"), ("stuck", "images/stuck.nii.gz", "images/f.nii.gz"),
            ("b", "images/f.nii.gz", "images/m.nrrd"), ("c", "images/m.nrrd", "images/f.nii.gz")]
    pairs = write_csv(rows)
    killer = threading.Thread(target=kill_the_reader, daemon=True)
    killer.start()
    out = folder / "out"
    assert _batch(pairs, out, model, "--workers", "2", "--threads", "1") == 1
    killer.join(timeout=5)
    assert killed, "no worker opened the stuck file"
    summary = _summary(out)
    assert list(summary) == ["a", "stuck", "b", "c"]
    assert [summary[n]["status"] for n in ("a", "b", "c")] == ["done"] * 3
    assert summary["stuck"]["status"] == "failed" and "worker process computing this pair died" in \
        summary["stuck"]["error"]
    assert not (out / "stuck").exists()

    single = folder / "single"
    assert _batch(write_csv([rows[0], rows[2]]), single, model, "--workers", "1", "--threads", "1") == 0
    for name in ("a", "b"):
        for file in ("displacement_field.nii.gz", "fixed_segmentation.nii.gz", "warped_moving.nii.gz"):
            two = sitk.GetArrayFromImage(sitk.ReadImage(str(out / name / file)))
            one = sitk.GetArrayFromImage(sitk.ReadImage(str(single / name / file)))
            assert np.array_equal(two, one), (name, file)

    stuck.unlink()   # the file is back: the rerun computes only that pair
    stuck.write_bytes((folder / "images" / "f.nii.gz").read_bytes())
    stamp = (out / "a" / "qc.json").stat().st_mtime_ns
    assert _batch(write_csv(rows), out, model, "--workers", "2", "--threads", "1") == 0
    summary = _summary(out)
    assert summary["stuck"]["status"] == "done" and summary["a"]["status"] == "skipped"
    assert (out / "a" / "qc.json").stat().st_mtime_ns == stamp


def _stuck_batch(cohort):
    """A 2-worker batch (its own process group) whose pair "a" is done and whose pair "stuck" is being read
    from a FIFO nobody writes: (process, out folder)."""
    import time
    folder, write_csv, model = cohort
    os.mkfifo(folder / "images" / "stuck.nii.gz")
    pairs = write_csv([("a", "images/m.nrrd", "images/f.nii.gz"), ("stuck", "images/stuck.nii.gz", "images/f.nii.gz")])
    out = folder / "out"
    command = [sys.executable, "-m", "JointRegSegLib", "batch", "--pairs", str(pairs), "--out", str(out), "--model",
               str(model), "--no-affine", "--workers", "2", "--threads", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=folder,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "summary.csv").is_file() and _summary(out).get("a", {}).get("status") == "done":
            break
        time.sleep(0.1)
    time.sleep(1.0)   # the other worker is inside the stuck read by now
    return process, out


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "mkfifo") or not hasattr(os, "killpg"), reason="needs FIFOs and process groups")
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm-to-batch-only"])
def test_stopping_a_batch_stops_every_worker_and_keeps_finished_pairs(cohort, how):
    """Ctrl-C (SIGINT to the terminal's process group) or SIGTERM to the batch process alone (a scheduler's
    kill: then only the batch can stop its workers): exit code 130, the finished pair stays done, the pair
    being computed is `cancelled` and left nothing, no process of the batch is left."""
    import signal
    import time
    process, out = _stuck_batch(cohort)
    try:
        if how == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
        else:
            os.kill(process.pid, signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, err[-3000:]
    assert "pairs finished before are kept" in err
    summary = _summary(out)
    assert summary["a"]["status"] == "done" and summary["stuck"]["status"] == "cancelled"
    assert sorted(p.name for p in out.iterdir()) == ["a", "summary.csv"]
    deadline = time.monotonic() + 10
    while _live_in_group(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _live_in_group(process.pid), "a batch process outlived the batch"


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "mkfifo") or not hasattr(os, "killpg"), reason="needs FIFOs and process groups")
def test_workers_stop_by_themselves_when_the_batch_process_is_killed(cohort):
    """SIGKILL to the batch process (nothing of it can clean up): its workers notice and stop within seconds
    instead of computing on."""
    import signal
    import time
    process, _out = _stuck_batch(cohort)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    deadline = time.monotonic() + 15
    while _live_in_group(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _live_in_group(process.pid)
    for pid in left:   # a failing run must not leave them behind
        os.kill(pid, signal.SIGKILL)
    assert not left, "a worker outlived its batch process"


def test_a_dead_workers_leftovers_are_found_by_name_not_by_pattern(tmp_path):
    """A pair named with glob characters: only its own half-staged folder is removed."""
    from JointRegSegLib.cohort.workers import _remove_staging
    for name in (".sub[1].partial-x1", ".sub1.partial-y2", ".s*.partial-z3", ".sa.partial-w4"):
        (tmp_path / name).mkdir()
    _remove_staging(__import__("argparse").Namespace(out=str(tmp_path / "sub[1]")))
    _remove_staging(__import__("argparse").Namespace(out=str(tmp_path / "s*")))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".sa.partial-w4", ".sub1.partial-y2"]


def _live_in_group(pgid: int) -> list[int]:
    """Processes of process group `pgid` still running (zombies that a container's init may never reap do
    not count)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text(encoding="ascii", errors="replace").rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            live.append(int(stat.parent.name))
    return live


def test_batch_plans_workers_from_free_cores_memory_and_device(cohort, monkeypatch):
    from JointRegSegLib.cohort import batch
    from JointRegSegLib.io import imageio
    from JointRegSegLib.models.card import read_card
    folder, write_csv, model = cohort
    card = read_card(model)
    job = (None, batch.argparse.Namespace(moving=str(folder / "images" / "m.nrrd"),
                                          fixed=str(folder / "images" / "f.nii.gz"), model=str(model)), {}, "missing")
    cores = lambda n, busy=0.0: {"threads": n, "source": "auto", "cores": n, "busy_cores": busy, "workers": 1}  # noqa: E731
    monkeypatch.setattr(imageio, "available_memory_bytes", lambda: 64 * 1024 ** 3)
    monkeypatch.setattr(batch, "_gpu_present", lambda: False)
    plan = batch.plan_workers("auto", cores(2), [job] * 6, card, "auto")
    assert (plan["workers"], plan["threads"]) == (2, 1)          # a core each
    plan = batch.plan_workers("auto", cores(8), [job] * 3, card, "cpu")
    assert (plan["workers"], plan["threads"]) == (3, 2)          # no more workers than pairs; cores split
    one = {**cores(8), "source": "--threads", "threads": 1}        # --threads limits the whole batch
    assert (batch.plan_workers("auto", one, [job] * 6, card, "cpu")["workers"]) == 1
    assert batch.plan_workers("auto", cores(8), [job] * 6, card, "cuda")["workers"] == 1  # one process per GPU
    assert batch.plan_workers(4, cores(8), [job] * 6, card, "cpu")["threads"] == 2
    needed = batch._memory_or_none(job[1], card)
    monkeypatch.setattr(imageio, "available_memory_bytes", lambda: int(needed * 2.5))
    plan = batch.plan_workers("auto", cores(8), [job] * 6, card, "cpu")
    assert (plan["workers"], plan["threads"]) == (2, 4) and "GB free" in batch.describe_plan(plan)
    with pytest.raises(SystemExit):
        main(["batch", "--pairs", "p.csv", "--out", "o", "--workers", "0"])


def test_a_model_the_workers_cannot_load_stops_the_batch_with_its_message(cohort, capsys):
    """The card reads, the weights do not match its checksum: every worker says so; exit code 2, the
    pairs stay `pending`, no worker process is left."""
    folder, write_csv, model = cohort
    data = bytearray(Path(model).read_bytes())
    data[-5] ^= 0xFF                         # a weight byte, past the header with the card
    broken = folder / "broken.safetensors"
    broken.write_bytes(bytes(data))
    pairs = write_csv([("a", "images/m.nrrd", "images/f.nii.gz"), ("b", "images/f.nii.gz", "images/m.nrrd")])
    out = folder / "out"
    assert _batch(pairs, out, broken, "--workers", "2", "--threads", "2") == 2
    err = capsys.readouterr().err
    assert "a batch worker could not start" in err and "checksum" in err, err[-2000:]
    assert [row["status"] for row in _summary(out).values()] == ["pending", "pending"]
    assert not [p for p in Path("/proc").glob("[0-9]*/cmdline") if _is_worker_of(p, broken)]


def _is_worker_of(cmdline: Path, model: Path) -> bool:
    """A live batch worker process started for `model` (this test's own file)."""
    try:
        text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        stat = (cmdline.parent / "stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    return ("JointRegSegLib.cohort.workers" in text and str(model) in text
            and stat.rsplit(")", 1)[1].split()[0] != "Z")


@pytest.mark.slow
def test_batch_shards_over_two_torchrun_processes(cohort):
    folder, write_csv, model = cohort
    pairs = write_csv([(f"p{i}", *(("images/m.nrrd", "images/f.nii.gz") if i % 2 else
                                   ("images/f.nii.gz", "images/m.nrrd"))) for i in range(4)]
                      + [("broken", "images/missing.nrrd", "images/f.nii.gz")])
    out = folder / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JOINTREGSEG_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "JointRegSegLib", "batch", "--pairs", str(pairs), "--out", str(out), "--model", str(model),
               "--no-affine", "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240, cwd=folder)
    assert done.returncode != 0, "a failed pair makes every rank exit 1"
    assert "rank 0/2: 3 of 5 pairs" in done.stderr and "rank 1/2: 2 of 5 pairs" in done.stderr, done.stderr[-3000:]
    summary = _summary(out)
    assert list(summary) == ["p0", "p1", "p2", "p3", "broken"]  # merged by rank 0 in the CSV's order
    assert [summary[f"p{i}"]["status"] for i in range(4)] == ["done"] * 4
    assert summary["broken"]["status"] == "failed" and "file not found" in summary["broken"]["error"]
    assert not list(out.glob(".summary.rank*")), "rank summaries are merged and removed"
    for i in range(4):
        assert (out / f"p{i}" / "warped_moving.nii.gz").is_file()
    # resumed under torchrun: nothing left to do but the broken pair, which is tolerated now
    done = subprocess.run(command + ["--allow-failures"], capture_output=True, text=True, env=env, timeout=240,
                          cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["status"] for r in _summary(out).values()] == ["skipped"] * 4 + ["failed"]


@pytest.mark.slow
def test_cold_run_imports_only_what_it_needs_and_matches_full_imports(tmp_path, phantom_pair, tiny_checkpoint):
    """`run` skips MONAI's extras (matplotlib, pandas, scipy, scikit-learn, requests); the results equal those
    with a full MONAI."""
    moving, fixed = phantom_pair
    sitk.WriteImage(moving, str(tmp_path / "m.nrrd"))
    sitk.WriteImage(fixed, str(tmp_path / "f.nii.gz"))
    script = ("import sys; from JointRegSegLib.cli import main\n"
              f"code = main(['run', '--moving', 'm.nrrd', '--fixed', 'f.nii.gz', '--model', {str(tiny_checkpoint)!r}, "
              "'--out', 'out', '--refine', '3', '--no-affine', '--threads', '1'])\n"
              "print('LOADED', sorted(m for m in ('matplotlib', 'pandas', 'scipy', 'sklearn', 'requests', "
              "'monai') if m in sys.modules))\n"
              "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=240,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LOADED ['monai']" in done.stdout
    # here (pytest) MONAI was imported in full
    result = register_and_segment(moving, fixed, tiny_checkpoint, affine=False, refine_iterations=3)
    for key, image in (("warped", result.warped), ("displacement", result.displacement),
                       ("fixed_segmentation", result.fixed_segmentation)):
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / OUTPUT_FILES[key])))
        np.testing.assert_allclose(written, sitk.GetArrayFromImage(image), atol=1e-4, err_msg=key)


def test_thread_choice_precedence_and_split(monkeypatch):
    monkeypatch.setattr(threads, "allowed_cpus", lambda: list(range(8)))
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    monkeypatch.delenv(threads.ENV_VAR, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert threads.choose_threads()["threads"] == 8
    assert threads.choose_threads(busy_cores=2.5)["threads"] == 5  # 2.5 busy cores take 3 away
    assert threads.choose_threads(busy_cores=0.3)["threads"] == 8  # a blip does not cost a thread
    assert threads.choose_threads(busy_cores=8)["threads"] == 1  # never below one
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # three torchrun ranks on this machine share the cores
    assert threads.choose_threads()["threads"] == 2
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 4.0)  # a container quota of 4 CPUs
    assert threads.choose_threads(workers=2)["threads"] == 2
    monkeypatch.setenv(threads.ENV_VAR, "3")
    assert threads.choose_threads() == {**threads.choose_threads(), "threads": 3, "source": threads.ENV_VAR}
    assert threads.choose_threads(requested=5)["source"] == "--threads"
    assert "oversubscribed" in threads.describe(threads.choose_threads(requested=5))
    monkeypatch.setenv(threads.ENV_VAR, "lots")
    with pytest.raises(JointRegSegError, match="JOINTREGSEG_THREADS must be a positive whole number"):
        threads.choose_threads()
    with pytest.raises(JointRegSegError, match="--threads must be a positive"):
        threads.choose_threads(requested=0)


def test_load_probe_counts_other_programs_not_this_one(monkeypatch):
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"])
    try:
        probe = threads.LoadProbe().start()
        end = __import__("time").time() + 0.8
        while __import__("time").time() < end:  # this process is busy too: that must not count
            pass
        busy = probe.stop()
    finally:
        spinner.wait()
    assert busy >= 0.3, "another program spinning on a core is busy work"
    # the arithmetic: CPU ticks of this process are taken out of the busy ticks of its CPUs
    cpu = iter([(1000, 4000), (1300, 4400)])  # 300 busy ticks of 400 (2 CPUs x 200 ticks)
    job = iter([{os.getpid(): 50}, {os.getpid(): 250}])  # 200 of them were this process's
    monkeypatch.setattr(threads, "_cpu_ticks", lambda cpus: next(cpu))
    monkeypatch.setattr(threads, "_job_ticks", lambda pids: next(job))
    probe = threads.LoadProbe(cpus=[0, 1]).start()
    probe._start = (probe._start[0] - 1.0, *probe._start[1:])
    assert probe.stop() == pytest.approx((300 - 200) / 400 * 2)  # half a core busy with other work
