"""Issue 28, "every run checks itself": the self-check and the brain masks reach the user's files and screen.

Brain masks are written with the other outputs (all or nothing), `run` warns on stderr when the registration
needs checking, report.md opens with the self-check, batch's summary.csv carries the status. Results are built
by hand on tiny grids (no network): these tests are about what the outputs say, not about the engine.
"""
import csv
import io
import json

import numpy as np
import pytest
import SimpleITK as sitk

from JointRegSegLib.cohort import batch
from JointRegSegLib import cli
from JointRegSegLib.io import outputs, report
from JointRegSegLib.io.outputs import OUTPUT_FILES, write_result
from JointRegSegLib.inference.pipeline import Result
from JointRegSegLib.io.report import write_report

# the masks' file names (outputs.MASK_FILES, spelled out so that each test fails on its own without them)
MASK_FILES = {"fixed_brain_mask": "fixed_brain_mask.nii.gz", "moving_brain_mask": "moving_brain_mask.nii.gz"}

LABELS = [{"value": 0, "name": "background", "color": [0, 0, 0]},
          {"value": 1, "name": "core", "color": [1.0, 0.2, 0.2]},
          {"value": 2, "name": "shell", "color": [0.2, 0.2, 1.0]}]

CHECK_QC = {
    "registration_status": "check", "agreement_mean": 0.4123, "agreement_threshold": 0.5,
    "agreement_dice": {"core": 0.52, "shell": 0.3046},
    "registration_attempts": [{"affine_method": "torch", "agreement_mean": 0.4123, "segmentation_mode": "network"},
                              {"affine_method": "classical", "agreement_mean": 0.38,
                               "segmentation_mode": "network"}],
    "warnings": ["the moving image looks like a label map (3 distinct values), not an MR image",
                 # the engine's own sentence for the failed check: said once, by the CLI's own words
                 "the registration needs checking: the fixed image's own segmentation ... agree only 0.4123"],
}


@pytest.fixture(autouse=True)
def _one_thread():
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _image(array, spacing=(2.0, 2.0, 2.0), origin=(-9.0, -10.0, 8.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection([0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0])   # oblique to the storage axes
    return image


def _result(qc_extra=None, masks=True) -> Result:
    """A Result on a 10^3 grid (2 mm voxels): moving grid = fixed grid, identity transform."""
    zz, yy, xx = np.mgrid[:10, :10, :10]
    inside = ((zz - 4.5) ** 2 + (yy - 4.5) ** 2 + (xx - 4.5) ** 2) < 16
    labels = np.where(inside, 1, 0).astype(np.uint8) + ((xx > 6) & inside).astype(np.uint8)
    intensity = _image((100.0 * inside + xx).astype(np.float32))
    seg = _image(labels)
    qc = {"folding_percent": 0.0, "jacobian_min": 1.0, "jacobian_p1": 1.0, "jacobian_median": 1.0,
          "jacobian_p99": 1.0, "jacobian_max": 1.0, "device": "cpu", "refine_iterations": 0, "model": "hand-made",
          "fixed_volumes_ml": {"core": 1.0, "shell": 0.5}, "moving_volumes_ml": {"core": 1.0, "shell": 0.5},
          "volume_flags": [], "timing_s": {"total": 1.25}, **(qc_extra or {})}
    result = Result(affine=None, warped=intensity, fixed_segmentation=seg, moving_segmentation=_image(labels),
                    warped_moving_segmentation=_image(labels), jacobian_determinant=_image(np.ones((10,) * 3)),
                    label_table=LABELS, qc=qc)
    fixed_mask = moving_mask = None
    if masks:
        brain = np.zeros((10, 10, 10), dtype=np.uint8)
        brain[:5] = 1                                                   # 500 voxels of 8 mm3: 4.0 ml
        fixed_mask = _image(brain)
        moving_mask = _image(brain[:, :, ::-1].astype(np.float32) * 7)  # not UInt8: written as 0/1 UInt8
        moving_mask.SetOrigin((3.0, 4.0, 5.0))                          # the moving grid is its own
    # the two fields the pipeline adds to Result (set by hand while an older Result lacks them)
    result.fixed_brain_mask, result.moving_brain_mask = fixed_mask, moving_mask
    return result


# --- brain masks on disk ---------------------------------------------------------------------------------------

def test_write_result_writes_both_brain_masks_as_uint8_on_their_grids(tmp_path):
    assert outputs.MASK_FILES == MASK_FILES
    result = _result()
    out = tmp_path / "out"
    written = write_result(result, out)
    for key, source in (("fixed_brain_mask", result.fixed_brain_mask),
                        ("moving_brain_mask", result.moving_brain_mask)):
        path = out / MASK_FILES[key]
        assert written[key] == path and path.is_file()
        mask = sitk.ReadImage(str(path))
        assert mask.GetPixelID() == sitk.sitkUInt8
        assert mask.GetOrigin() == pytest.approx(source.GetOrigin())
        assert mask.GetDirection() == pytest.approx(source.GetDirection())
        assert np.array_equal(sitk.GetArrayFromImage(mask), (sitk.GetArrayFromImage(source) != 0).astype(np.uint8))
    qc = json.loads((out / OUTPUT_FILES["qc"]).read_text())
    assert qc["brain_mask_files"] == ["fixed_brain_mask.nii.gz", "moving_brain_mask.nii.gz"]
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]   # the staging folder is gone


def test_results_without_masks_write_none_and_overwrite_removes_old_masks(tmp_path):
    out = tmp_path / "out"
    write_result(_result(), out)
    assert all((out / name).is_file() for name in MASK_FILES.values())
    written = write_result(_result(masks=False), out, replace=True)        # an older model, same folder
    assert not any((out / name).exists() for name in MASK_FILES.values())  # old and new never mix
    assert not set(MASK_FILES) & set(written)
    assert json.loads((out / OUTPUT_FILES["qc"]).read_text())["brain_mask_files"] == []


def test_a_failed_write_leaves_no_mask_behind(tmp_path, monkeypatch):
    out = tmp_path / "out"

    def broken(*_args, **_kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(outputs, "write_slicer_segmentation", broken)
    with pytest.raises(OSError):
        write_result(_result(), out)
    assert not out.exists() or not any(out.iterdir())


# --- the CLI's words -------------------------------------------------------------------------------------------

def _printed(qc_extra, written=None):
    out, err = io.StringIO(), io.StringIO()
    cli.print_run_outcome(_result(qc_extra).qc, written or {"qc": "OUT/qc.json"}, out=out, err=err)
    return out.getvalue(), err.getvalue()


def test_run_warns_on_stderr_when_the_registration_needs_checking():
    out, err = _printed(CHECK_QC)
    lines = err.strip().splitlines()
    assert lines[0].startswith("WARNING: registration needs checking: the fixed image's own segmentation and the "
                               "moving segmentation carried by the registration agree only 0.41 (mean Dice; "
                               "'ok' needs >= 0.50). Tried: torch affine (0.41), classical affine (0.38).")
    assert "--report" in lines[0] and "before using the transform" in lines[0]   # no picture was written
    assert "WARNING: the moving image looks like a label map (3 distinct values), not an MR image" in lines
    assert err.lower().count("registration needs checking") == 1    # the engine's own sentence is not repeated
    assert all(line.startswith("WARNING: ") for line in lines) and len(lines) == 2
    assert "registration NEEDS CHECKING (agreement 0.41)" in out and "WARNING" not in out
    assert "qc: OUT/qc.json" in out and out.startswith("folding 0.0000%")
    # with --report the warning points at the picture
    _, err = _printed(CHECK_QC, {"qc": "q", "picture": "OUT/qc_overview.png"})
    assert "Look at qc_overview.png before using the transform." in err


def test_run_prints_no_warning_for_a_good_or_an_unchecked_registration():
    out, err = _printed({"registration_status": "ok", "agreement_mean": 0.781, "warnings": []})
    assert err == "" and "registration ok (agreement 0.78)" in out
    out, err = _printed({})                      # an older engine: no self-check keys at all
    assert err == "" and "registration" not in out
    out, err = _printed({"registration_status": "ok", "warnings": ["the fixed image has 5 mm slices"]})
    assert err == "WARNING: the fixed image has 5 mm slices\n"


def test_cli_run_exits_0_and_warns_when_the_check_fails(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    from JointRegSegLib.inference import pipeline
    image = _result().warped
    for name in ("moving", "fixed"):
        sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
    monkeypatch.setattr(pipeline, "register_and_segment", lambda *a, **k: _result(CHECK_QC))
    code = cli.main(["run", "--moving", str(tmp_path / "moving.nii.gz"), "--fixed", str(tmp_path / "fixed.nii.gz"),
                     "--model", str(tiny_checkpoint), "--out", str(tmp_path / "out"), "--threads", "1"])
    captured = capsys.readouterr()
    assert code == 0
    assert "WARNING: registration needs checking" in captured.err and "agree only 0.41" in captured.err
    assert (tmp_path / "out" / "fixed_brain_mask.nii.gz").is_file()
    assert f"fixed_brain_mask: {tmp_path / 'out' / 'fixed_brain_mask.nii.gz'}" in captured.out


# --- report.md -------------------------------------------------------------------------------------------------

def test_report_opens_with_the_self_check_and_the_brain_mask_volumes():
    text = report.report_markdown(_result(CHECK_QC))
    section = text.index("## Registration self-check")
    assert section < text.index("![overview]") and section < text.index("| measure | value |")
    part = text[section:text.index("## Overview")]
    assert "**CHECK" in part and "**0.41**" in part and "'ok' needs >= 0.50" in part
    assert "| core | 0.52 |" in part and "| shell | 0.30 |" in part
    assert "1. torch affine (0.41; segmentation mode network)" in part and "2. classical affine (0.38;" in part
    assert "- the moving image looks like a label map" in part
    assert part.lower().count("registration needs checking") == 1
    assert "| fixed | 4.0 | fixed_brain_mask.nii.gz |" in part and "| moving | 4.0 |" in part
    ok = report.report_markdown(_result({"registration_status": "ok", "agreement_mean": 0.8, "agreement_dice": {}},
                                 masks=False))
    assert "Status: **ok**" in ok and "brain mask" not in ok and "Warning" not in ok
    old = report.report_markdown(_result(masks=False))
    assert "## Registration self-check" in old and "**not reported**" in old


def test_write_report_puts_the_status_in_the_file_and_the_picture_title(tmp_path, monkeypatch):
    import matplotlib.figure
    titles = []
    original = matplotlib.figure.Figure.suptitle

    def spy(self, text, *args, **kwargs):
        titles.append(text)
        return original(self, text, *args, **kwargs)
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle", spy)
    result = _result(CHECK_QC)
    md = write_report(result, result.warped, tmp_path)
    assert "## Registration self-check" in md.read_text(encoding="utf-8")
    assert titles and "registration NEEDS CHECKING (agreement 0.41)" in titles[-1]


# --- batch summary.csv -----------------------------------------------------------------------------------------

OLD_FIELDS = ["name", "status", "error", "seconds", "engine_seconds", "folding_percent", "jacobian_min",
              "jacobian_max", "device", "refine_iterations", "out"]


def test_summary_appends_status_and_agreement_columns(tmp_path):
    assert batch.SUMMARY_FIELDS == OLD_FIELDS + ["registration_status", "agreement_mean"]
    rows = [{"name": "bad", "status": "done", "seconds": 1.0, "out": "o/bad", **batch.qc_fields(_result(CHECK_QC).qc)},
            {"name": "old", "status": "done", "seconds": 1.0, "out": "o/old", **batch.qc_fields(_result().qc)},
            {"name": "broken", "status": "failed", "error": "cannot read", "seconds": 0.1}]
    path = tmp_path / "summary.csv"
    batch.write_summary(path, rows)
    with open(path, newline="", encoding="utf-8") as handle:
        assert next(csv.reader(handle)) == batch.SUMMARY_FIELDS
    summary = {row["name"]: row for row in batch.read_summary(path)}
    assert (summary["bad"]["registration_status"], summary["bad"]["agreement_mean"]) == ("check", "0.4123")
    assert (summary["old"]["registration_status"], summary["old"]["agreement_mean"]) == ("", "")
    assert (summary["broken"]["registration_status"], summary["broken"]["agreement_mean"]) == ("", "")
    lines = []
    batch.report_pair("bad", {"status": "done", **summary["bad"], "seconds": 1.0}, lines.append)
    assert "REGISTRATION NEEDS CHECKING (agreement 0.4123" in lines[0]


def test_resume_knows_complete_pairs_with_masks_and_redoes_a_missing_mask(tmp_path):
    wanted = {"moving": "m", "fixed": "f", "report": False}
    out = tmp_path / "pair"
    write_result(_result(CHECK_QC), out, extra_qc={"batch": wanted})
    state, qc = batch.previous_outputs(out, wanted)
    assert state == "complete"
    skipped = batch.qc_fields(qc)   # a skipped pair's row is filled from its qc.json
    assert skipped["registration_status"] == "check" and skipped["agreement_mean"] == 0.4123
    (out / MASK_FILES["moving_brain_mask"]).unlink()
    assert batch.previous_outputs(out, wanted) == ("partial", None)   # recomputed, not "other"
    (out / OUTPUT_FILES["qc"]).unlink()
    assert batch.previous_outputs(out, wanted) == ("partial", None)   # our masks are known outputs
    old = tmp_path / "old"                                            # a model without masks: complete as before
    write_result(_result(masks=False), old, extra_qc={"batch": wanted})
    assert batch.previous_outputs(old, wanted)[0] == "complete"
