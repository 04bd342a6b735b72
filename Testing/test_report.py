"""The QC report: a picture and a markdown table a person can open."""
from conftest import grid_for, phantom_array, sample_on

from JointRegSegLib import register_and_segment
from JointRegSegLib.io.report import write_report


def test_report_has_picture_and_table(tmp_path, tiny_model):
    fixed = sample_on(grid_for("lps-oblique"), phantom_array)
    moving = sample_on(grid_for("axis-aligned", center=(2, 1, 0)), phantom_array)
    result = register_and_segment(moving, fixed, tiny_model, affine=False)
    md = write_report(result, fixed, tmp_path)
    png = tmp_path / "qc_overview.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    text = md.read_text(encoding="utf-8")
    assert "folding (det J <= 0)" in text and "| core |" in text and "qc_overview.png" in text


# issue 14, item 5: a QC picture a radiologist can read ---------------------------------------------------

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from JointRegSegLib.io.report import DPI, build_figure, display_plane, display_slice  # noqa: E402


def _marked_head(grid):
    """A head phantom with a bright blob at the patient's superior-left-anterior (LPS: +x, -y, +z)."""
    def fn(points):
        image = phantom_array(points)
        blob = np.exp(-((points - np.array([20.0, -20.0, 22.0])) ** 2).sum(-1) / (2 * 5.0 ** 2))
        return (image + 400.0 * blob).astype(np.float32)
    return sample_on(grid, fn)


@pytest.mark.parametrize("storage", ["as-is", "permuted-flipped"])
def test_display_slices_put_superior_up_and_patient_right_on_the_left(storage):
    image = _marked_head(grid_for("axis-aligned"))
    if storage == "permuted-flipped":  # same physical image, other voxel order
        image = sitk.Flip(sitk.PermuteAxes(image, [2, 0, 1]), [True, False, True])
    # planes through the blob; rows/columns where it must show up
    for view, center, (row_half, col_half) in [("coronal", (0, -20, 0), ("top", "right")),
                                               ("sagittal", (20, 0, 0), ("top", "left")),
                                               ("axial", (0, 0, 22), ("top", "right"))]:
        plane = display_plane(image, view, np.array(center, dtype=float), 1.0, (96, 96))
        shown = display_slice(image, plane)
        row, col = np.unravel_index(np.argmax(shown), shown.shape)
        # coronal/sagittal: superior (blob 20 mm above the centre) in the top half; axial: anterior on top;
        # radiological: the patient's left (+x) on the image's right; sagittal: anterior on the left
        assert (row < 48) == (row_half == "top"), (view, row, col)
        assert (col >= 48) == (col_half == "right"), (view, row, col)


def test_figure_states_convention_rows_legend_and_dpi(tmp_path, tiny_model):
    fixed = sample_on(grid_for("lps-oblique"), phantom_array)
    moving = sample_on(grid_for("axis-aligned", center=(2, 1, 0)), phantom_array)
    result = register_and_segment(moving, fixed, tiny_model, affine=False)
    fig = build_figure(result, fixed)
    texts = [t.get_text() for t in fig.texts] + [fig._suptitle.get_text()]
    assert any("radiological convention" in t and "superior" in t for t in texts)
    row_titles = [ax.get_ylabel() for ax in fig.axes[::6][:3]]
    assert row_titles == ["axial", "coronal", "sagittal"]
    letters = {t.get_text() for ax in fig.axes for t in ax.texts}
    assert {"R", "L", "A", "P", "S", "I"} <= letters
    legend = [t.get_text().split(" (")[0] for t in fig.legends[0].get_texts()]
    present = set(np.unique(sitk.GetArrayViewFromImage(result.fixed_segmentation))) - {0}
    assert legend and set(legend) <= {"core", "shell"} and len(legend) >= len(present) > 0
    shapes = {ax.images[0].get_array().shape for ax in fig.axes[:6]}
    assert len(shapes) == 1  # every panel of a row the same size
    colorbar = [ax for ax in fig.axes if ax.get_label() == "<colorbar>" or "det J" in ax.get_ylabel()]
    assert colorbar and "max" in colorbar[0].get_ylabel()
    write_report(result, fixed, tmp_path)
    from PIL import Image
    with Image.open(tmp_path / "qc_overview.png") as png:
        assert round(png.info["dpi"][0]) >= 150 and DPI >= 150


def test_jacobian_colour_range_is_honest_and_edges_adapt(tmp_path, tiny_model):
    fixed = sample_on(grid_for("axis-aligned"), phantom_array)
    moving = sample_on(grid_for("axis-aligned", center=(2, 1, 0)), phantom_array)
    result = register_and_segment(moving, fixed, tiny_model, affine=False)
    det = sitk.GetArrayFromImage(result.jacobian_determinant)
    det[10:20, 10:20, 10:20] = 4.7  # a maximum well above the old fixed colour limit of 2
    changed = sitk.GetImageFromArray(det)
    changed.CopyInformation(result.jacobian_determinant)
    result.jacobian_determinant = changed
    result.qc["jacobian_max"] = 4.7
    fig = build_figure(result, fixed)
    jac = fig.axes[5].images[-1]
    assert jac.norm.vmax >= 4.7
    # the colour bar shows the range: a colour ramp, 1.00 at its middle, its ends at its ends (matplotlib's
    # own bar for this norm came out empty with every tick at its foot)
    bar = fig.axes[-1]
    assert bar.images and bar.images[0].get_array().size >= 256
    positions = {label.get_text(): tick for label, tick in zip(bar.get_yticklabels(), bar.get_yticks())}
    assert positions["1.00"] == 0.5 and positions["4.70"] == 1.0 and 0.5 < positions["2.85"] < 1.0
    # the edge panel finds edges at any intensity scale (fixed thresholds found none on a 0-1 image)
    scaled = sitk.Cast(fixed, sitk.sitkFloat32) / 1000.0
    fig = build_figure(result, scaled)
    edge_layer = fig.axes[4].images[-1].get_array()
    assert np.count_nonzero(~np.ma.getmaskarray(edge_layer)) > 50
