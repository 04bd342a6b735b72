"""Issue 14: the CLI keeps every promise a careful user relies on (one test or more per numbered item)."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import TINY_CARD, grid_for, phantom_array, sample_on
from safetensors.torch import save_file

from JointRegSegLib import InputImageError, load_model, read_image
from JointRegSegLib.models.checkpoint import CARD_KEY, CheckpointError
from JointRegSegLib.cli import main
from JointRegSegLib.io.imageio import estimate_run_memory_bytes

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def pair(tmp_path):
    moving = sample_on(grid_for("axis-aligned"), phantom_array)
    fixed = sample_on(grid_for("axis-aligned"), phantom_array, lambda p: p + np.array([2.0, -1.0, 1.5]))
    paths = tmp_path / "moving.nrrd", tmp_path / "fixed.nii.gz"
    sitk.WriteImage(moving, str(paths[0]))
    sitk.WriteImage(fixed, str(paths[1]), True)
    return paths


def _run(pair, model, out, *extra):
    return main(["run", "--moving", str(pair[0]), "--fixed", str(pair[1]), "--model", str(model),
                 "--out", str(out), *extra])


# 1. truncated files of every format --------------------------------------------------------------------

FORMATS = [(".nii.gz", True), (".nii", False), (".hdr", False), (".vtk", False), (".gipl", False),
           (".nrrd", True), (".nrrd", False), (".mha", True), (".mha", False)]


def _data_file(path: Path) -> Path:
    return path.with_suffix(".img") if path.suffix == ".hdr" else path


@pytest.mark.parametrize("ext, compress", FORMATS, ids=[f"{e}{'-z' if c else ''}" for e, c in FORMATS])
def test_truncated_image_is_refused(tmp_path, ext, compress):
    image = sitk.GetImageFromArray((np.random.default_rng(0).random((20, 30, 40)) * 100 + 1).astype(np.float32))
    path = tmp_path / f"image{ext}"
    sitk.WriteImage(image, str(path), compress)
    assert read_image(path, "moving").GetSize() == (40, 30, 20)
    data = _data_file(path).read_bytes()
    _data_file(path).write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(InputImageError, match="truncated") as info:
        read_image(path, "moving")
    assert str(info.value).startswith("moving:")


def test_truncated_nifti_exits_2_from_the_cli(tmp_path, pair, tiny_checkpoint, capsys):
    data = pair[1].read_bytes()
    pair[1].write_bytes(data[: int(len(data) * 0.6)])
    assert _run(pair, tiny_checkpoint, tmp_path / "out") == 2
    assert "fixed: cannot read" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# 9. NaN inside NIfTI (SimpleITK reads it as 0) -----------------------------------------------------------

@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".hdr", ".nrrd", ".mha"])
def test_nan_voxels_are_refused_for_every_format(tmp_path, pair, tiny_checkpoint, capsys, ext):
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(pair[0])))
    array[10, 10, 10] = np.nan
    image = sitk.GetImageFromArray(array)
    path = tmp_path / f"nan{ext}"
    sitk.WriteImage(image, str(path), ext.endswith(".gz"))
    code = main(["run", "--moving", str(path), "--fixed", str(pair[1]), "--model", str(tiny_checkpoint),
                 "--out", str(tmp_path / "out")])
    assert code == 2
    assert "NaN or infinite" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# 2. unusable --out, checked before any work ------------------------------------------------------------

@pytest.mark.parametrize("where", ["under-a-file", "is-a-file", "read-only-filesystem"])
def test_unusable_out_is_refused_before_any_work(tmp_path, pair, tiny_checkpoint, capsys, where):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = {"under-a-file": blocker / "result", "is-a-file": blocker,
           "read-only-filesystem": Path("/proc/jointregseg-test-out")}[where]
    assert _run(pair, tiny_checkpoint, out) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "Traceback" not in err
    assert "PROGRESS" not in err  # nothing was computed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "fixed.nii.gz", "moving.nrrd", "tiny.safetensors"]


# 3. non-empty --out refused; --overwrite replaces every known output --------------------------------

def test_non_empty_out_is_refused_without_overwrite(tmp_path, pair, tiny_checkpoint, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("an earlier run")
    assert _run(pair, tiny_checkpoint, out) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert (out / "report.md").read_text() == "an earlier run"


def test_overwrite_replaces_known_outputs_and_keeps_other_files(tmp_path, pair, tiny_checkpoint, capsys):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("report.md", "qc_overview.png", "qc.json", "transform.h5"):
        (out / name).write_text("from an earlier run")
    (out / "my_notes.txt").write_text("mine")
    assert _run(pair, tiny_checkpoint, out, "--overwrite") == 0
    assert not (out / "report.md").exists() and not (out / "qc_overview.png").exists()  # no --report this time
    assert json.loads((out / "qc.json").read_text(encoding="utf-8"))["refine_iterations"] == 0
    assert sitk.ReadTransform(str(out / "transform.h5")) is not None
    assert (out / "my_notes.txt").read_text() == "mine"


# 4. memory estimated up front; compact transform --------------------------------------------------------

def test_memory_estimate_refuses_up_front(tmp_path, pair, tiny_checkpoint, capsys):
    assert _run(pair, tiny_checkpoint, tmp_path / "out", "--max-memory", "0.05") == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "GB" in err and "PROGRESS" not in err
    # the estimate grows with the fixed volume: 512x512x300 stays under the 4 GB promised
    assert estimate_run_memory_bytes(512 * 512 * 300, 91 * 109 * 91, 64 * 80 * 64, 9) < 4 * 1024 ** 3
    assert estimate_run_memory_bytes(1024 * 1024 * 600, 10 ** 6, 64 * 80 * 64, 9) > 4 * 1024 ** 3


def test_transform_file_does_not_grow_with_the_fixed_image(tmp_path, tiny_model):
    from JointRegSegLib import register_and_segment
    from JointRegSegLib.core.geometry import make_grid
    from JointRegSegLib.io.outputs import write_result
    fixed = sample_on(make_grid((96, 96, 80), (1.2, 1.2, 1.4), np.eye(3), np.zeros(3)), phantom_array)
    moving = sample_on(grid_for("axis-aligned", center=(2, 1, 0)), phantom_array)
    result = register_and_segment(moving, fixed, tiny_model, affine=True)
    written = write_result(result, tmp_path / "out")
    working_bytes = 48 ** 3 * 3 * 8
    assert written["transform"].stat().st_size < 1.2 * working_bytes + 200_000  # old: 96x96x80 float64, 18 MB
    read = sitk.ReadTransform(str(written["transform"]))
    background = float(sitk.GetArrayViewFromImage(moving).min())
    warped = sitk.Resample(moving, fixed, read, sitk.sitkLinear, background, sitk.sitkFloat32)
    difference = np.abs(sitk.GetArrayViewFromImage(warped) - sitk.GetArrayViewFromImage(result.warped))
    assert difference.max() < 1e-3 * float(np.ptp(sitk.GetArrayViewFromImage(result.warped)))
    field = sitk.ReadImage(str(written["displacement"]))
    assert field.GetPixelID() == sitk.sitkVectorFloat32 and field.GetSize() == fixed.GetSize()


@pytest.mark.slow
def test_512x512x300_fixed_volume_in_under_4_gb(tmp_path):
    """The issue's case: a 512x512x300 fixed volume with the default model, peak RSS and transform size."""
    source = sitk.ReadImage(str(REPO / "Resources" / "SampleData" / "itk_subject_t1_brain.nii.gz"), sitk.sitkFloat32)
    reference = sitk.Image((512, 512, 300), sitk.sitkInt16)
    reference.SetSpacing((0.5, 0.5, 0.65))
    reference.SetDirection(source.GetDirection())
    reference.SetOrigin(source.GetOrigin())
    fixed = sitk.Cast(sitk.Resample(source, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32),
                      sitk.sitkInt16)
    sitk.WriteImage(fixed, str(tmp_path / "fixed.nii.gz"), True)
    del fixed, source
    script = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
              "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", script, sys.executable, "-m", "JointRegSegLib", "run",
                           "--moving", str(REPO / "Resources" / "SampleData" / "colin27_t1_brain_2mm.nii.gz"),
                           "--fixed", str(tmp_path / "fixed.nii.gz"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    peak_gb = int(done.stdout.split("PEAK_KB")[1].split()[0]) / 1024 ** 2
    size_mb = (tmp_path / "out" / "transform.h5").stat().st_size / 1024 ** 2
    print(f"512x512x300: peak {peak_gb:.2f} GB, transform.h5 {size_mb:.1f} MB")
    assert peak_gb < 4.0
    assert size_mb < 300
    assert sitk.ReadTransform(str(tmp_path / "out" / "transform.h5")).GetName() == "CompositeTransform"


# 7. checkpoints without a checksum ---------------------------------------------------------------------

@pytest.fixture
def unsigned_checkpoint(tmp_path, tiny_model):
    card = copy.deepcopy(TINY_CARD)
    card["format"], card["format_version"] = "jointregseg-checkpoint", 1
    tensors = {k: v.contiguous().clone() for k, v in tiny_model.network.state_dict().items()}
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1.0  # "edited" weights, checksum deleted
    path = tmp_path / "unsigned.safetensors"
    save_file(tensors, str(path), metadata={CARD_KEY: json.dumps(card)})
    return path


def test_unsigned_checkpoint_is_refused_unless_trusted(tmp_path, pair, unsigned_checkpoint, capsys):
    with pytest.raises(CheckpointError, match="no weights checksum"):
        load_model(unsigned_checkpoint)
    assert load_model(unsigned_checkpoint, trust_unsigned=True).card["name"] == "tiny-test-model"
    assert _run(pair, unsigned_checkpoint, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "no weights checksum" in err and "--trust-unsigned" in err and "PROGRESS" not in err
    assert main(["info", str(unsigned_checkpoint)]) == 0
    assert "weights checksum: MISSING" in capsys.readouterr().out


def test_info_names_the_checksum_of_a_signed_checkpoint(tiny_checkpoint, capsys):
    assert main(["info", str(tiny_checkpoint)]) == 0
    assert "weights checksum: sha256" in capsys.readouterr().out


# 8. SIGINT / SIGTERM at any stage: exit 130, no traceback, nothing left --------------------------------

def _start(pair, model, out, refine):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "JointRegSegLib", "run", "--moving", str(pair[0]), "--fixed",
                             str(pair[1]), "--model", str(model), "--out", str(out), "--refine", refine, "--report"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)


@pytest.mark.parametrize("sig, stage", [
    (signal.SIGTERM, "affine pre-alignment"),
    pytest.param(signal.SIGINT, "affine pre-alignment", marks=pytest.mark.slow),
    pytest.param(signal.SIGTERM, "test-time refinement", marks=pytest.mark.slow),
    pytest.param(signal.SIGTERM, "write outputs", marks=pytest.mark.slow)])
def test_signal_exits_130_and_leaves_nothing(tmp_path, pair, tiny_checkpoint, sig, stage):
    out = tmp_path / "out"
    process = _start(pair, tiny_checkpoint, out, "20" if stage == "test-time refinement" else "0")
    lines = []
    deadline = time.monotonic() + 900
    for line in process.stderr:
        lines.append(line)
        if f" {stage}" in line and line.startswith("PROGRESS") and float(line.split()[1]) < 100:
            process.send_signal(sig)
            break
        assert time.monotonic() < deadline
    rest = process.stderr.read()
    code = process.wait(timeout=120)
    err = "".join(lines) + rest
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and "cancelled" in err
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or p.name.startswith(".")]
    if out.exists():  # the signal came while files were moving in: then the run is complete, never half
        from JointRegSegLib.io.outputs import OUTPUT_FILES
        assert {p.name for p in out.iterdir()} >= set(OUTPUT_FILES.values())


# 10. options validated ---------------------------------------------------------------------------------

def test_negative_refine_is_refused(tmp_path, pair, tiny_checkpoint, capsys):
    with pytest.raises(SystemExit) as info:
        _run(pair, tiny_checkpoint, tmp_path / "out", "--refine", "-5")
    assert info.value.code == 2
    assert "--refine: must be 0 or more" in capsys.readouterr().err


def test_similarity_without_refinement_is_refused(tmp_path, pair, tiny_checkpoint, capsys):
    assert _run(pair, tiny_checkpoint, tmp_path / "out", "--similarity", "mi") == 2
    assert "--similarity mi only applies" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_no_affine_without_overlap_is_refused(tmp_path, pair, tiny_checkpoint, capsys):
    far = sitk.ReadImage(str(pair[0]))
    far.SetOrigin([o + 500.0 for o in far.GetOrigin()])
    sitk.WriteImage(far, str(pair[0]))
    assert _run(pair, tiny_checkpoint, tmp_path / "out", "--no-affine") == 2
    assert "do not overlap" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# 13. help, version --------------------------------------------------------------------------------------

def test_help_shows_defaults_and_version(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    assert "(default: 0)" in text and "(default: auto)" in text and "--overwrite" in text
    assert "transform.h5" in text  # what the outputs are
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "Exit codes" in top and "registration and segmentation" in top
    assert "register themselves" not in top  # not the developer docstring
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    from JointRegSegLib import __version__
    assert capsys.readouterr().out.strip() == f"jointregseg {__version__}"


# 14-15. make demo without test extras, CPU torch explicit, slow tests marked and run by CI -------------

def _make_dry_run(target):
    done = subprocess.run(["make", "-n", "-B", target, "VENV=/nonexistent-venv"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_demo_installs_no_test_extras_and_torch_cpu_explicitly():
    demo = _make_dry_run("demo")
    assert "[test]" not in demo and "slicer-core" not in demo
    assert "torch==2.13.0+cpu" in demo and "download.pytorch.org/whl/cpu" in demo
    assert "version_info" in demo  # the Python version is checked, not assumed
    test = _make_dry_run("test")
    assert "[test]" in test and "-m pytest" in test


def test_default_suite_skips_slow_tests_and_ci_runs_them():
    import tomllib
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["pytest"]["ini_options"]
    assert any(m.startswith("slow") for m in config["markers"])
    assert "not slow" in config["addopts"]
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "make test-all" in ci
    assert "slow or not slow" in (REPO / "Makefile").read_text(encoding="utf-8")


def test_signals_during_the_final_moves_are_delivered_after_them_each_one():
    """SIGINT and SIGTERM arriving while outputs move into place wait for the moves, then each reaches its
    handler, even when the first handler raises; the handlers are put back."""
    from JointRegSegLib.io.imageio import _signals_held
    seen = []

    def interrupt(number, _frame):
        seen.append(number)
        raise KeyboardInterrupt

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, interrupt),
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda number, _frame: seen.append(number))}
    try:
        with pytest.raises(KeyboardInterrupt):
            with _signals_held():
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGTERM)
                assert seen == []                      # held while the block runs
        assert seen == [signal.SIGINT, signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is interrupt
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@pytest.mark.skipif(os.name != "posix", reason="SIGTERM's default action")
def test_a_sigterm_during_the_final_moves_leaves_all_outputs_and_no_staging(tmp_path):
    """The default SIGTERM (a process killed by a scheduler) arriving in the middle of the moves: the moves
    finish, the staging folder goes, then the process ends."""
    script = ("import os, signal\n"
              "from pathlib import Path\n"
              "from JointRegSegLib.io import imageio\n"
              "real = os.replace\n"
              "def replace(a, b):\n"
              "    real(a, b)\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "os.replace = replace\n"
              "with imageio.staged_output_dir(Path('out')) as staging:\n"
              "    for name in ('a.txt', 'b.txt', 'c.txt'):\n"
              "        (staging / name).write_text(name)\n"
              "print('NOT REACHED')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == -signal.SIGTERM, done.stderr[-2000:]
    assert "NOT REACHED" not in done.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt", "b.txt", "c.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
