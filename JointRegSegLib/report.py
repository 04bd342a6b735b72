"""A QC report a person can open: overlay pictures (PNG) and a markdown summary of the QC numbers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk


def _slices(array: np.ndarray):
    z, y, x = (n // 2 for n in array.shape)
    return [array[z], array[:, y], array[:, :, x]]


def _overlay_rgb(labels: np.ndarray, label_table: list) -> np.ndarray:
    lut = np.zeros((max(e["value"] for e in label_table) + 1, 4))
    for entry in label_table:
        if entry["value"]:
            lut[entry["value"]] = [*entry["color"], 0.45]
    return lut[labels]


def write_report(result, fixed: sitk.Image, out_dir) -> Path:
    """qc_overview.png (fixed, warped, overlays, det J) and report.md in `out_dir`; returns the .md path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    # Show everything in a canonical orientation (LPS-aligned 1 voxel = 1 mm view of the fixed grid)
    orient = sitk.DICOMOrientImageFilter()
    orient.SetDesiredCoordinateOrientation("RAI")

    def arr(image):
        return sitk.GetArrayFromImage(orient.Execute(image))

    fixed_a, warped_a = arr(sitk.Cast(fixed, sitk.sitkFloat32)), arr(result.warped)
    fixed_seg, warped_seg = arr(result.fixed_segmentation), arr(result.warped_moving_segmentation)
    det = arr(result.jacobian_determinant)
    aspect = [orient.Execute(fixed).GetSpacing()[i] for i in (1, 2, 2)], [orient.Execute(fixed).GetSpacing()[i]
                                                                           for i in (0, 0, 1)]
    columns = [("fixed", fixed_a, None), ("warped moving", warped_a, None),
               ("fixed + predicted seg", fixed_a, fixed_seg), ("warped + warped moving seg", warped_a, warped_seg),
               ("fixed (edges) vs warped", None, None), ("Jacobian determinant", det, "jac")]
    fig, axes = plt.subplots(3, len(columns), figsize=(3.2 * len(columns), 9.5))
    vmax = np.percentile(fixed_a, 99.5)
    for col, (title, image, extra) in enumerate(columns):
        for row, view in enumerate(range(3)):
            ax = axes[row, col]
            ax.axis("off")
            ratio = aspect[0][row] / aspect[1][row]
            if title.startswith("fixed (edges)"):
                base = _slices(warped_a)[view]
                edges = _slices(sitk.GetArrayFromImage(sitk.CannyEdgeDetection(
                    sitk.Cast(orient.Execute(fixed), sitk.sitkFloat32), 20, 60, [1.0] * 3)))[view]
                ax.imshow(base, cmap="gray", vmax=np.percentile(warped_a, 99.5), origin="lower", aspect=ratio)
                ax.imshow(np.ma.masked_equal(edges, 0), cmap="autumn", origin="lower", aspect=ratio)
            elif isinstance(extra, str):
                shown = ax.imshow(_slices(image)[view], cmap="RdBu_r", vmin=0, vmax=2, origin="lower", aspect=ratio)
                if row == 2:
                    fig.colorbar(shown, ax=axes[:, col], shrink=0.6)
            else:
                ax.imshow(_slices(image)[view], cmap="gray", vmax=vmax, origin="lower", aspect=ratio)
                if extra is not None:
                    ax.imshow(_overlay_rgb(_slices(extra)[view], result.label_table), origin="lower", aspect=ratio)
            if row == 0:
                ax.set_title(title, fontsize=10)
    qc = result.qc
    fig.suptitle(f"JointRegSeg QC — model {qc['model']} — folding {qc['folding_percent']:.4f}% — "
                 f"det J [{qc['jacobian_min']:.2f}, {qc['jacobian_max']:.2f}] — {qc['timing_s']['total']:.1f} s on "
                 f"{qc['device']}", fontsize=11)
    png = out_dir / "qc_overview.png"
    fig.savefig(png, dpi=80)
    plt.close(fig)

    lines = ["# JointRegSeg QC report", "", f"![overview]({png.name})", "",
             "| measure | value |", "|---|---|",
             f"| folding (det J <= 0) | {qc['folding_percent']:.4f} % |",
             f"| det J min / p1 / median / p99 / max | {qc['jacobian_min']:.3f} / {qc['jacobian_p1']:.3f} / "
             f"{qc['jacobian_median']:.3f} / {qc['jacobian_p99']:.3f} / {qc['jacobian_max']:.3f} |",
             f"| device | {qc['device']} |", f"| refinement iterations | {qc['refine_iterations']} |", "",
             "| structure | fixed volume (ml) | moving volume (ml) |", "|---|---|---|"]
    for name, volume in qc["fixed_volumes_ml"].items():
        lines.append(f"| {name} | {volume:.2f} | {qc['moving_volumes_ml'].get(name, float('nan')):.2f} |")
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.2f} |" for stage, seconds in qc["timing_s"].items()]
    md = out_dir / "report.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md
