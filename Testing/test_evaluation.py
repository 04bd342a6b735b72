"""`jointregseg evaluate`: per-pair metrics for several methods, a peer tool run as a child process,
files a user opens (CSV, markdown, plots), and a named error for a bad pairs file."""
import csv
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import grid_for, phantom_array, phantom_labels, sample_on

from JointRegSegLib.cli import main

SHIFT = np.array([4.0, -3.0, 2.0])

# a stand-in peer with the peers.py interface: translates by the known shift, reports its stats
PEER = """
import json, sys, pathlib, numpy as np, SimpleITK as sitk
moving, fixed, out = sys.argv[1:4]
out = pathlib.Path(out); out.mkdir(parents=True)
grid = sitk.ReadImage(fixed)
field = np.broadcast_to(np.array([4.0, -3.0, 2.0]), sitk.GetArrayFromImage(grid).shape + (3,)).copy()
image = sitk.GetImageFromArray(field, isVector=True); image.CopyInformation(grid)
sitk.WriteImage(image, str(out / "displacement.nii.gz"))
(out / "stats.json").write_text(json.dumps({"seconds": 0.5, "peak_memory_mb": 100.0}), encoding="utf-8")
"""


@pytest.fixture
def pairs_csv(tmp_path):
    grid = grid_for("axis-aligned")
    shifted = lambda p: p + SHIFT  # noqa: E731  fixed(x) = moving(x + shift)
    sitk.WriteImage(sample_on(grid, phantom_array), str(tmp_path / "m.nii.gz"))
    sitk.WriteImage(sample_on(grid, phantom_labels), str(tmp_path / "m_lab.nii.gz"))
    sitk.WriteImage(sample_on(grid, phantom_array, shifted), str(tmp_path / "f.nii.gz"))
    sitk.WriteImage(sample_on(grid, phantom_labels, shifted), str(tmp_path / "f_lab.nii.gz"))
    path = tmp_path / "pairs.csv"
    path.write_text("name,moving,fixed,moving_labels,fixed_labels\nshifted,m.nii.gz,f.nii.gz,m_lab.nii.gz,f_lab.nii.gz\n", encoding="utf-8")
    return path


def test_evaluate_scores_every_method_and_writes_tables_and_plots(tmp_path, pairs_csv, tiny_checkpoint):
    peer = tmp_path / "peer.py"
    peer.write_text(PEER, encoding="utf-8")
    out = tmp_path / "eval"
    assert main(["evaluate", "--pairs", str(pairs_csv), "--model", str(tiny_checkpoint), "--baseline", "identity",
                 "--baseline", "affine", "--external", f"known-shift={sys.executable} {peer}",
                 "--reference", "known-shift", "--device", "cpu", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in csv.DictReader(open(out / "results.csv", encoding="utf-8"))}
    assert set(rows) == {"identity", "affine", "tiny-test-model", "known-shift"}
    dice = {m: float(r["registration_dice"]) for m, r in rows.items()}
    assert dice["known-shift"] > 0.97                      # the exact answer scores (almost) perfectly
    assert dice["affine"] > dice["identity"] + 0.05
    assert float(rows["known-shift"]["hd95_mm"]) < float(rows["identity"]["hd95_mm"])
    assert float(rows["known-shift"]["folding_percent"]) == 0.0
    assert float(rows["known-shift"]["seconds"]) == 0.5
    assert rows["identity"]["segmentation_dice"] == "nan" and rows["tiny-test-model"]["segmentation_dice"] != "nan"
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "| known-shift | 1 |" in summary and "speed-up vs known-shift" in summary
    for name in ("dice_per_structure.png", "time_vs_dice.png"):
        assert (out / name).stat().st_size > 5000


def test_bad_pairs_file_is_named(tmp_path, capsys):
    bad = tmp_path / "pairs.csv"
    bad.write_text("moving,fixed\na.nii.gz,b.nii.gz\n", encoding="utf-8")
    assert main(["evaluate", "--pairs", str(bad), "--baseline", "identity", "--out", str(tmp_path / "o")]) == 2
    assert "needs a header with columns" in capsys.readouterr().err
    bad.write_text("moving,fixed,moving_labels,fixed_labels\nnope.nii.gz,b.nii.gz,c.nii.gz,d.nii.gz\n", encoding="utf-8")
    assert main(["evaluate", "--pairs", str(bad), "--baseline", "identity", "--out", str(tmp_path / "o")]) == 2
    assert "files not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
