"""A QC report a person can open: an overview picture (PNG) and a markdown summary of the QC numbers.

The picture follows the radiological convention, stated on it: patient's right on the image's left, superior
at the top of coronal and sagittal views, anterior at the top of axial views (anterior on the left of sagittal
views). Every panel is resampled from physical space onto a display plane through the fixed anatomy, so the
picture does not depend on how the files store their axes, and all panels have the same size.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..core.geometry import center_of_mass, physical_box

DPI = 150
CONVENTION = "radiological convention: patient's right (R) on the image's left; superior (S) up"
# display plane -> (physical direction of image columns, physical direction of image rows), LPS;
# rows run top to bottom, so "row direction -z" puts superior at the top.
VIEWS = {
    "axial": (np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])),      # columns R->L, rows A->P
    "coronal": (np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0])),   # columns R->L, rows S->I
    "sagittal": (np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])),  # columns A->P, rows S->I
}
# letters at (left, right, top, bottom) edges of each view
MARKERS = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("A", "P", "S", "I")}


def display_plane(image: sitk.Image, view: str, center, pixel_mm: float, shape: tuple[int, int]) -> sitk.Image:
    """An empty one-slice grid through `center` whose index axes (column, row) run along the view's display
    directions: resampling onto it gives the slice as a person reads it (array[row, column])."""
    columns, rows = VIEWS[view]
    normal = np.cross(columns, rows)
    direction = np.stack([columns, rows, normal], axis=1)  # columns of the matrix: index axes in LPS
    plane = sitk.Image([int(shape[1]), int(shape[0]), 1], sitk.sitkUInt8)
    plane.SetSpacing([float(pixel_mm)] * 3)
    plane.SetDirection([float(v) for v in direction.ravel()])
    half = np.array([(shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0, 0.0]) * pixel_mm
    plane.SetOrigin([float(v) for v in np.asarray(center, dtype=float) - direction @ half])
    return plane


def display_slice(image: sitk.Image, plane: sitk.Image, interpolator=sitk.sitkLinear, default=0.0) -> np.ndarray:
    """`image` (any orientation, any storage order) sampled on a display plane: a 2D array, row 0 at the top."""
    pixel = sitk.sitkFloat32 if image.GetNumberOfComponentsPerPixel() == 1 else sitk.sitkVectorFloat32
    if interpolator == sitk.sitkNearestNeighbor:
        pixel = image.GetPixelID()
    sampled = sitk.Resample(image, plane, sitk.Transform(), interpolator, default, pixel)
    return sitk.GetArrayFromImage(sampled)[0]


def _layout(fixed: sitk.Image, max_pixels: int = 280):
    """Pixel size and (rows, columns) per view so that every view covers the fixed field of view."""
    low, high = physical_box(fixed)
    extent = high - low
    pixel = max(min(fixed.GetSpacing()), float(extent.max()) / max_pixels)
    shapes = {}
    for view, (columns, rows) in VIEWS.items():
        width = float(np.abs(columns) @ extent)
        height = float(np.abs(rows) @ extent)
        shapes[view] = (max(int(np.ceil(height / pixel)), 2), max(int(np.ceil(width / pixel)), 2))
    return pixel, shapes


def _edges(image: np.ndarray, anatomy: np.ndarray) -> np.ndarray:
    """Canny edges whose thresholds follow this slice's gradient strengths inside the anatomy."""
    slice_image = sitk.GetImageFromArray(image.astype(np.float32))
    smoothed = sitk.SmoothingRecursiveGaussian(slice_image, 1.0)
    gradient = sitk.GetArrayViewFromImage(sitk.GradientMagnitude(smoothed))
    inside = gradient[anatomy] if anatomy.any() else gradient.ravel()
    if inside.size == 0 or float(inside.max()) <= 0:
        return np.zeros(image.shape, dtype=bool)
    lower, upper = np.percentile(inside, [70, 90])
    if upper <= 0:
        return np.zeros(image.shape, dtype=bool)
    edges = sitk.CannyEdgeDetection(slice_image, float(max(lower, 1e-6)), float(upper), [1.0, 1.0])
    return sitk.GetArrayFromImage(edges) > 0


def _large_labels(segmentation: sitk.Image, label_table: list) -> set:
    """Labels holding over a sixth of the labelled volume: drawn as outlines so they hide nothing."""
    counts = np.bincount(sitk.GetArrayViewFromImage(segmentation).ravel(),
                         minlength=max(e["value"] for e in label_table) + 1)
    counts[0] = 0
    total = counts.sum()
    return {int(v) for v in np.nonzero(counts > total / 6)[0]} if total else set()


def side_distinct_colours(label_table: list) -> list:
    """The label table with each "right X" coloured apart from "left X" when the table gives them one hue
    (older tables shade the right side darker, which a reader cannot tell apart on a picture): the right
    side's hue is turned by 0.12 of the colour circle; greys get a blue tint."""
    import colorsys
    table = [dict(e) for e in label_table]
    by_name = {e["name"]: e for e in table}
    for entry in table:
        if not entry["name"].startswith("right "):
            continue
        left = by_name.get("left " + entry["name"][len("right "):])
        if left is None:
            continue
        h_left, _, s_left = colorsys.rgb_to_hls(*left["color"])
        h, lightness, saturation = colorsys.rgb_to_hls(*entry["color"])
        if abs(h - h_left) < 0.05 or s_left < 0.15:
            if saturation < 0.15:
                entry["color"] = [round(c, 3) for c in colorsys.hls_to_rgb(0.6, lightness, 0.5)]
            else:
                entry["color"] = [round(c, 3) for c in colorsys.hls_to_rgb((h + 0.12) % 1.0, lightness, saturation)]
    return table


def _det_ticks(low: float, high: float) -> list[float]:
    """Colour-bar ticks for det J: the ends, 1, and one tick inside each side of 1."""
    ticks = {round(low, 2), 1.0, round(high, 2)}
    if low < 0.9:
        ticks.add(round((low + 1.0) / 2, 2))
    if high > 1.1:
        ticks.add(round((high + 1.0) / 2, 2))
    return sorted(ticks)


def _draw_labels(ax, labels: np.ndarray, label_table: list, large: set) -> None:
    colors = {int(e["value"]): e["color"] for e in label_table if e["value"]}
    present = [int(v) for v in np.unique(labels) if int(v) in colors]
    if not present:
        return
    fill = np.zeros(labels.shape + (4,))
    for value in present:
        mask = labels == value
        if value not in large:
            fill[mask] = [*colors[value], 0.5]
        ax.contour(mask.astype(float), levels=[0.5], colors=[colors[value]], linewidths=0.8)
    ax.imshow(fill, interpolation="nearest")


def _markers(ax, view: str, shape) -> None:
    left, right, top, bottom = MARKERS[view]
    style = {"color": "yellow", "fontsize": 8, "fontweight": "bold", "ha": "center", "va": "center"}
    height, width = shape
    ax.text(0.03 * width, height / 2, left, **style)
    ax.text(0.97 * width, height / 2, right, **style)
    ax.text(width / 2, 0.04 * height, top, **style)
    ax.text(width / 2, 0.96 * height, bottom, **style)


def _det_colour_bar(axis, norm, det_low: float, det_high: float) -> None:
    """The det J colour bar drawn as an image of the norm's 0..1 range, ticks placed through the norm
    (matplotlib's own colour bar for a TwoSlopeNorm came out empty, every tick at its foot)."""
    axis.imshow(np.linspace(0, 1, 256)[:, None], cmap="RdBu_r", aspect="auto", origin="lower", extent=(0, 1, 0, 1),
                alpha=0.75)
    ticks = _det_ticks(norm.vmin, norm.vmax)
    axis.set_xticks([])
    axis.yaxis.tick_right()
    axis.yaxis.set_label_position("right")
    axis.set_yticks([min(1.0, max(0.0, float(norm(t)))) for t in ticks], [f"{t:.2f}" for t in ticks], fontsize=7)
    axis.set_ylim(0, 1)
    axis.set_ylabel(f"det J (min {det_low:.2f}, max {det_high:.2f}; <= 0 outlined green)", fontsize=8)


def build_figure(result, fixed: sitk.Image):
    """The QC overview as a matplotlib Figure (rows: axial, coronal, sagittal; six columns)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap, TwoSlopeNorm
    from matplotlib.patches import Patch

    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    pixel, shapes = _layout(fixed)
    fixed_values = sitk.GetArrayViewFromImage(fixed)
    background = float(fixed_values.min())
    center = center_of_mass(fixed)
    qc = result.qc
    table = side_distinct_colours(result.label_table)
    large = _large_labels(result.fixed_segmentation, table) | _large_labels(result.warped_moving_segmentation,
                                                                              table)
    det_low, det_high = float(qc["jacobian_min"]), float(qc["jacobian_max"])
    norm = TwoSlopeNorm(vmin=min(det_low, 1.0 - 1e-3), vcenter=1.0, vmax=max(det_high, 1.0 + 1e-3))

    titles = ["fixed", "warped moving", "fixed + its segmentation", "warped + warped moving seg.",
              "fixed edges (red) on warped", "det J on the fixed anatomy"]
    fig, axes = plt.subplots(3, len(titles), figsize=(2.75 * len(titles), 3 * 2.75 + 1.6),
                             gridspec_kw={"hspace": 0.12, "wspace": 0.04})
    fig.subplots_adjust(left=0.04, right=0.93, top=0.88, bottom=0.1)
    slices = {}
    for row, view in enumerate(VIEWS):
        plane = display_plane(fixed, view, center, pixel, shapes[view])
        f = display_slice(fixed, plane, default=background)
        w = display_slice(result.warped, plane, default=float(np.min(sitk.GetArrayViewFromImage(result.warped))))
        fs = display_slice(result.fixed_segmentation, plane, sitk.sitkNearestNeighbor)
        ws = display_slice(result.warped_moving_segmentation, plane, sitk.sitkNearestNeighbor)
        det = display_slice(result.jacobian_determinant, plane, default=1.0)
        anatomy = f > background
        slices[view] = f
        bright = np.percentile(f[anatomy], 99.5) if anatomy.any() else float(f.max())
        bright_w = np.percentile(w[w > w.min()], 99.5) if (w > w.min()).any() else float(w.max())
        gray = {"cmap": "gray", "vmin": background, "vmax": bright, "interpolation": "bilinear"}
        panels = axes[row]
        panels[0].imshow(f, **gray)
        panels[1].imshow(w, cmap="gray", vmin=float(w.min()), vmax=bright_w, interpolation="bilinear")
        panels[2].imshow(f, **gray)
        _draw_labels(panels[2], fs, table, large)
        panels[3].imshow(w, cmap="gray", vmin=float(w.min()), vmax=bright_w, interpolation="bilinear")
        _draw_labels(panels[3], ws, table, large)
        panels[4].imshow(w, cmap="gray", vmin=float(w.min()), vmax=bright_w, interpolation="bilinear")
        edges = _edges(f, anatomy)
        panels[4].imshow(np.ma.masked_where(~edges, edges.astype(float)), cmap=ListedColormap(["red"]),
                         vmin=0, vmax=1, interpolation="nearest")
        panels[5].imshow(f, **gray)
        panels[5].imshow(np.ma.masked_where(~anatomy, det), cmap="RdBu_r", norm=norm, alpha=0.75,
                         interpolation="nearest")
        folded = anatomy & (det <= 0)
        if folded.any():
            panels[5].contour(folded.astype(float), levels=[0.5], colors=["lime"], linewidths=1.0)
        for col, ax in enumerate(panels):
            ax.set_xticks([])
            ax.set_yticks([])
            _markers(ax, view, f.shape)
            if row == 0:
                ax.set_title(titles[col], fontsize=9, wrap=True)
        panels[0].set_ylabel(view, fontsize=11, fontweight="bold")
    _det_colour_bar(fig.add_axes([0.945, 0.3, 0.012, 0.45]), norm, det_low, det_high)
    present = set(np.unique(sitk.GetArrayViewFromImage(result.fixed_segmentation))) | \
        set(np.unique(sitk.GetArrayViewFromImage(result.warped_moving_segmentation)))
    handles = [Patch(facecolor=e["color"], edgecolor=e["color"],
                     label=e["name"] + (" (outline)" if int(e["value"]) in large else ""))
               for e in table if e["value"] and int(e["value"]) in {int(v) for v in present}]
    if handles:
        columns = min(len(handles), 7)
        rows = -(-len(handles) // columns)
        # room below the images for every row of the legend and its title (28 structures: 4 rows)
        fig.subplots_adjust(bottom=max(0.1, 0.04 + 0.022 * rows))
        fig.legend(handles=handles, loc="lower center", ncol=columns, fontsize=9, frameon=False,
                   title="structures", title_fontsize=9)
    fig.suptitle(f"JointRegSeg QC - model {qc['model']} - folding {qc['folding_percent']:.4f}% - det J "
                 f"[{det_low:.2f}, {det_high:.2f}] - {qc['timing_s']['total']:.1f} s on {qc['device']}\n"
                 f"{CONVENTION}; slices through the fixed anatomy's centre"
                 + (f"\n{status_summary(qc)}" if status_summary(qc) else ""), fontsize=11)
    fig._jointregseg_slices = slices  # for tests: the fixed slice shown in each row
    return fig


# ------------------------------------------------------------------------------ the registration self-check in words
# qc["registration_status"] ("ok" / "check"), qc["agreement_dice"], qc["agreement_mean"], qc["registration_attempts"]
# and qc["warnings"] come from the pipeline's self-check; results of older engines lack them: "not reported".

def _score(value) -> str:
    """A Dice as text: two decimals, "n/a" when missing or not a number."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return f"{value:.2f}" if math.isfinite(value) else "n/a"


def registration_status(qc: dict) -> str | None:
    """The self-check's verdict ("ok", "check"), None when this result does not report one."""
    status = qc.get("registration_status")
    return str(status) if status else None


def registration_warnings(qc: dict) -> list[str]:
    """The plain-English warnings of a run (inputs that do not look like what the model knows, ...), less
    the engine's own "registration needs checking" sentence when the status is "check":
    registration_check_sentence says that, once, from the numbers."""
    warnings = qc.get("warnings") or []
    if isinstance(warnings, str):
        warnings = [warnings]
    said = registration_status(qc) == "check"
    return [" ".join(str(w).split()) for w in warnings
            if str(w).strip() and not (said and "registration needs checking" in str(w).lower())]


def _agreement_threshold(qc: dict) -> float | None:
    try:
        value = float(qc["agreement_threshold"])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def describe_attempt(attempt: dict, details: bool = False) -> str:
    """One registration attempt as words: "classical affine (0.38)"; `details`: with its other settings,
    "no affine (0.12; segmentation mode network)"."""
    if not isinstance(attempt, dict):
        return str(attempt)
    method = attempt.get("affine_method")
    text = f"{method} affine" if method else "no affine"
    extras = [f"{str(key).replace('_', ' ')} {value}" for key, value in attempt.items()
              if key not in ("affine_method", "agreement_mean", "agreement_dice", "registration_status")]
    return f"{text} ({'; '.join([_score(attempt.get('agreement_mean'))] + (extras if details else []))})"


def attempts_text(qc: dict) -> str:
    """What the self-check tried, in order: "torch affine (0.41), classical affine (0.38)"; "" when not said."""
    return ", ".join(describe_attempt(a) for a in qc.get("registration_attempts") or [])


def registration_check_sentence(qc: dict, picture: bool = True) -> str | None:
    """The warning for a run whose self-check says "check" (None otherwise): what disagreed, by how much,
    what was tried, where to look. `picture`: the run wrote qc_overview.png."""
    if registration_status(qc) != "check":
        return None
    threshold = _agreement_threshold(qc)
    needs = f"; 'ok' needs >= {threshold:.2f}" if threshold is not None else ""
    tried = attempts_text(qc)
    look = ("qc_overview.png" if picture else
            "the warped moving image over the fixed one (or rerun with --report for qc_overview.png)")
    return ("registration needs checking: the fixed image's own segmentation and the moving segmentation carried "
            f"by the registration agree only {_score(qc.get('agreement_mean'))} (mean Dice{needs})."
            + (f" Tried: {tried}." if tried else "") + f" Look at {look} before using the transform.")


def status_summary(qc: dict) -> str | None:
    """A short verdict for a title or a log line: "registration ok (agreement 0.78)"; None when not reported."""
    status = registration_status(qc)
    if status is None:
        return None
    shown = "NEEDS CHECKING" if status == "check" else status
    return f"registration {shown} (agreement {_score(qc.get('agreement_mean'))})"


def mask_volume_ml(mask: sitk.Image) -> float:
    """Volume of a brain mask's nonzero voxels in ml."""
    voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))
    return voxels * float(np.prod(mask.GetSpacing())) / 1000.0


def self_check_lines(result) -> list[str]:
    """report.md's "Registration self-check" section (and the brain masks' volumes when the result has them)."""
    qc = result.qc
    status = registration_status(qc)
    lines = ["## Registration self-check", ""]
    if status is None:
        lines += ["Status: **not reported** (this run did not check its registration).", ""]
    else:
        threshold = _agreement_threshold(qc)
        verdict = {"ok": "**ok**",
                   "check": "**CHECK — the registration may have failed**"}.get(status, f"**{status}**")
        lines += [f"Status: {verdict}", "",
                  "The fixed image's own segmentation (network only) is compared with the moving segmentation "
                  f"carried onto it by the registration: mean agreement (Dice) **{_score(qc.get('agreement_mean'))}**"
                  + (f" ('ok' needs >= {threshold:.2f})" if threshold is not None else "") + ".", ""]
        sentence = registration_check_sentence(qc)
        if sentence:
            lines += [f"**Warning:** {sentence[0].upper()}{sentence[1:]}", ""]
    dice = qc.get("agreement_dice") or {}
    if dice:
        lines += ["| structure | agreement (Dice) |", "|---|---|"]
        lines += [f"| {name} | {_score(value)} |" for name, value in dice.items()] + [""]
    attempts = qc.get("registration_attempts") or []
    if attempts:
        lines += ["Tried, in order (mean agreement first in brackets):", ""]
        lines += [f"{i}. {describe_attempt(a, details=True)}" for i, a in enumerate(attempts, start=1)] + [""]
    warnings = registration_warnings(qc)
    if warnings:
        lines += ["**Warnings:**", ""] + [f"- {w}" for w in warnings] + [""]
    contrast = qc.get("contrast") or {}
    if contrast.get("mapped"):
        lines += [f"Contrasts: the two images' tissue contrasts differ (agreement "
                  f"{_score(contrast.get('tissue_contrast_agreement'))}), so the registration saw the "
                  f"{contrast['mapped']}, built from the network's own segmentations; every output is of the "
                  "original images.", ""]
    masks = [(role, getattr(result, f"{role}_brain_mask", None)) for role in ("fixed", "moving")]
    if any(mask is not None for _, mask in masks):
        lines += ["| brain mask | volume (ml) | file |", "|---|---|---|"]
        lines += [f"| {role} | {mask_volume_ml(mask):.1f} | {role}_brain_mask.nii.gz |"
                  for role, mask in masks if mask is not None] + [""]
    return lines


def report_markdown(result, picture_name: str = "qc_overview.png") -> str:
    """report.md's text for `result` (the picture is referred to by name)."""
    qc = result.qc
    lines = ["# JointRegSeg QC report", ""] + self_check_lines(result) + [
             "## Overview", "", f"![overview]({picture_name})", "",
             f"Picture: {CONVENTION}; rows axial, coronal, sagittal through the fixed anatomy's centre.", ""]
    flags = qc.get("volume_flags") or []
    if flags:
        lines += ["**Implausible structure volumes — check these segmentations:**", ""]
        lines += [f"- {flag}" for flag in flags] + [""]
    lines += ["| measure | value |", "|---|---|",
              f"| folding (det J <= 0) | {qc['folding_percent']:.4f} % |",
              f"| det J min / p1 / median / p99 / max | {qc['jacobian_min']:.3f} / {qc['jacobian_p1']:.3f} / "
              f"{qc['jacobian_median']:.3f} / {qc['jacobian_p99']:.3f} / {qc['jacobian_max']:.3f} |",
              f"| device | {qc['device']} |", f"| refinement iterations | {qc['refine_iterations']} |", "",
              "| structure | fixed volume (ml) | moving volume (ml) |", "|---|---|---|"]
    flagged = {flag.split(":")[0] for flag in flags}
    for name, volume in qc["fixed_volumes_ml"].items():
        mark = " ⚠" if name in flagged else ""
        lines.append(f"| {name}{mark} | {volume:.2f} | {qc['moving_volumes_ml'].get(name, float('nan')):.2f} |")
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.2f} |" for stage, seconds in qc["timing_s"].items()]
    return "\n".join(lines) + "\n"


def write_report(result, fixed: sitk.Image, out_dir) -> Path:
    """qc_overview.png (fixed, warped, overlays, edges, det J) and report.md in `out_dir`; returns the .md path."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    fig = build_figure(result, fixed)
    png = out_dir / "qc_overview.png"
    fig.savefig(png, dpi=DPI)
    plt.close(fig)

    md = out_dir / "report.md"
    md.write_text(report_markdown(result, png.name), encoding="utf-8")
    return md
