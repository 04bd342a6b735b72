"""Bad inputs get a message naming the problem and leave nothing on disk; the CLI writes all outputs."""
import json
import threading

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import grid_for, phantom_array, sample_on

from JointRegSegLib import Cancelled, InputImageError, read_image, register_and_segment
from JointRegSegLib.cli import main
from JointRegSegLib.io.outputs import OUTPUT_FILES


def _image(array, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.float32), isVector=False)
    image.SetSpacing(spacing[: image.GetDimension()])
    return image


@pytest.mark.parametrize("bad, message", [
    (lambda: _image(np.random.rand(32, 32)), "expected a 3D volume, got a 2D image"),
    (lambda: _image(np.random.rand(3, 8, 8, 8), (1, 1, 1, 1)), "expected a 3D volume, got a 4D image"),
    (lambda: _image(np.zeros((8, 8, 8))), "volume is empty"),
    (lambda: _image(np.where(np.random.rand(8, 8, 8) > 0.5, np.nan, 1.0)), "NaN or infinite"),
    (lambda: sitk.Compose([_image(np.random.rand(8, 8, 8))] * 3), "scalar volume"),
])
def test_bad_volume_is_named(tiny_model, phantom_pair, bad, message):
    moving, fixed = phantom_pair
    with pytest.raises(InputImageError, match=message) as info:
        register_and_segment(bad(), fixed, tiny_model)
    assert str(info.value).startswith("moving:")
    with pytest.raises(InputImageError, match="fixed:"):
        register_and_segment(moving, bad(), tiny_model)


def test_unreadable_files(tmp_path):
    with pytest.raises(InputImageError, match="file not found"):
        read_image(tmp_path / "missing.nii.gz", "moving")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(InputImageError, match="cannot read"):
        read_image(junk, "fixed")


def test_cancel_stops_refinement(tiny_model, phantom_pair):
    moving, fixed = phantom_pair
    stop = threading.Event()
    seen = []

    def progress(stage, fraction):
        seen.append(stage)
        if stage == "test-time refinement" and fraction > 0.2:
            stop.set()

    with pytest.raises(Cancelled):
        register_and_segment(moving, fixed, tiny_model, refine_iterations=50, progress=progress, cancel=stop)
    assert "compose transform" not in seen


@pytest.fixture
def pair_files(tmp_path, phantom_pair):
    moving, fixed = phantom_pair
    paths = tmp_path / "moving.nrrd", tmp_path / "fixed.nii.gz"
    sitk.WriteImage(moving, str(paths[0]))
    sitk.WriteImage(fixed, str(paths[1]))
    return paths


def test_cli_run_writes_every_output(tmp_path, pair_files, tiny_checkpoint, capsys):
    out = tmp_path / "result"
    code = main(["run", "--moving", str(pair_files[0]), "--fixed", str(pair_files[1]),
                 "--model", str(tiny_checkpoint), "--out", str(out), "--refine", "3", "--report"])
    assert code == 0
    for name in OUTPUT_FILES.values():
        assert (out / name).is_file(), name
    qc = json.loads((out / "qc.json").read_text(encoding="utf-8"))
    assert {"folding_percent", "jacobian_min", "fixed_volumes_ml", "timing_s", "device"} <= set(qc)
    assert qc["device"] == "cpu" and qc["refine_iterations"] == 3
    captured = capsys.readouterr()
    assert "PROGRESS" in captured.err
    # issue 14, item 13: --report says where the picture is
    assert f"picture: {out / 'qc_overview.png'}" in captured.out and (out / "qc_overview.png").is_file()
    # issue 14, item 11: the affine centre is stored, and matrix + translation + centre rebuild the affine
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(qc["affine_matrix"])
    affine.SetTranslation(qc["affine_translation_mm"])
    affine.SetCenter(qc["affine_center_mm"])
    composite = sitk.ReadTransform(str(out / "transform.h5"))
    stored = sitk.CompositeTransform(composite).GetNthTransform(0)
    for point in [(0.0, 0.0, 0.0), (30.0, -20.0, 10.0), (-40.0, 25.0, -15.0)]:
        np.testing.assert_allclose(affine.TransformPoint(point), stored.TransformPoint(point), atol=1e-6)
    assert np.linalg.norm(np.array(qc["affine_center_mm"])) > 1.0  # a real centre, not the origin
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_cli_affine_method_is_chosen_and_recorded(tmp_path, pair_files, tiny_checkpoint, capsys):
    base = ["run", "--moving", str(pair_files[0]), "--fixed", str(pair_files[1]), "--model", str(tiny_checkpoint)]
    matrices = {}
    for method in ("torch", "classical"):
        out = tmp_path / method
        assert main(base + ["--out", str(out), "--affine-method", method]) == 0
        qc = json.loads((out / "qc.json").read_text(encoding="utf-8"))
        assert qc["affine_method"] == method
        matrices[method] = qc["affine_matrix"]
    assert matrices["torch"] != matrices["classical"]   # two different optimisers actually ran
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "both"), "--no-affine", "--affine-method", "torch"]) == 2
    assert "--affine-method torch chooses the affine pre-alignment that --no-affine skips" in capsys.readouterr().err
    assert not (tmp_path / "both").exists()


def test_cli_failure_leaves_no_files(tmp_path, pair_files, capsys):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x80\x04garbage-pickle-bytes")
    out = tmp_path / "result"
    code = main(["run", "--moving", str(pair_files[0]), "--fixed", str(pair_files[1]),
                 "--model", str(broken), "--out", str(out)])
    assert code == 2
    assert "never unpickles" in capsys.readouterr().err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["broken.safetensors", "moving.nrrd",
                                                                 "fixed.nii.gz"])


def test_cli_info_prints_the_card(tiny_checkpoint, capsys):
    assert main(["info", str(tiny_checkpoint)]) == 0
    printed = capsys.readouterr().out
    assert "tiny-test-model" in printed and "1=core" in printed and "working grid: [48, 48, 48]" in printed


def test_dicom_folder_input(tmp_path):
    image = sitk.Cast(sample_on(grid_for("axis-aligned"), phantom_array), sitk.sitkInt16)
    folder = tmp_path / "dicom"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        slice_.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1")
        slice_.SetMetaData("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))))
        slice_.SetMetaData("0020|0013", str(k))
        slice_.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(slice_)
    volume = read_image(folder, "moving")
    assert volume.GetSize() == image.GetSize()
    np.testing.assert_allclose(volume.GetSpacing(), image.GetSpacing(), atol=1e-4)


def test_the_command_exits_with_the_status_of_its_work(tmp_path):
    """`python -m JointRegSegLib` (as the `jointregseg` script) leaves without the interpreter's teardown,
    yet with the status and the message of what it did: 2 and the named problem for a missing input."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "JointRegSegLib", "run", "--moving", str(tmp_path / "nope.nii.gz"),
                           "--fixed", str(tmp_path / "nope.nii.gz"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "nope.nii.gz" in done.stderr and "error" in done.stderr
    assert not (tmp_path / "out").exists()
    done = subprocess.run([sys.executable, "-m", "JointRegSegLib", "--help"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "run" in done.stdout


def test_cli_no_scale_search_keeps_the_network_velocity(tmp_path, pair_files, tiny_model):
    from JointRegSegLib.models.checkpoint import save_model
    tiny_model.card["inference"] = {"scales": [2.0, 1.0]}   # an untrained network: every scale ties, 2.0 wins
    checkpoint = save_model(tiny_model, tmp_path / "scaled.safetensors")
    base = ["run", "--moving", str(pair_files[0]), "--fixed", str(pair_files[1]), "--model", str(checkpoint)]
    scales = {}
    for name, extra in (("search", []), ("plain", ["--no-scale-search"])):
        assert main(base + ["--out", str(tmp_path / name), *extra]) == 0
        scales[name] = json.loads((tmp_path / name / "qc.json").read_text(encoding="utf-8"))["velocity_scale"]
    assert scales == {"search": 2.0, "plain": 1.0}
