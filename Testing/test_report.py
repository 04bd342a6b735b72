"""The QC report: a picture and a markdown table a person can open."""
from conftest import grid_for, phantom_array, sample_on

from JointRegSegLib import register_and_segment
from JointRegSegLib.report import write_report


def test_report_has_picture_and_table(tmp_path, tiny_model):
    fixed = sample_on(grid_for("lps-oblique"), phantom_array)
    moving = sample_on(grid_for("axis-aligned", center=(2, 1, 0)), phantom_array)
    result = register_and_segment(moving, fixed, tiny_model, affine=False)
    md = write_report(result, fixed, tmp_path)
    png = tmp_path / "qc_overview.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    text = md.read_text(encoding="utf-8")
    assert "folding (det J <= 0)" in text and "| core |" in text and "qc_overview.png" in text
