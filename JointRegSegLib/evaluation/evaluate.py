"""Evaluate registration methods over labelled file pairs in physical space (`jointregseg evaluate` and the
benchmarks): each pair scored by the one scoring core (scoring.py: Dice and HD95 per structure, folding, det J,
segmentation Dice) plus time and memory; then a CSV, a markdown summary and plots."""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..core.errors import JointRegSegError
from ..io.imageio import read_image, staged_output_dir
from ..core.progress import Reporter
from .methods import displacement_array, warp_labels
from .scoring import nanmean, score_pair


@dataclass
class Pair:
    name: str
    moving: Path
    fixed: Path
    moving_labels: Path
    fixed_labels: Path


def read_pairs(csv_path) -> list[Pair]:
    """PAIRS.csv: columns moving, fixed, moving_labels, fixed_labels (paths relative to the CSV), name optional."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise JointRegSegError(f"pairs file not found: {csv_path}")
    with open(csv_path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    needed = {"moving", "fixed", "moving_labels", "fixed_labels"}
    if not rows or not needed <= set(rows[0]):
        raise JointRegSegError(f"{csv_path}: needs a header with columns {sorted(needed)} and at least one row")
    pairs = []
    for number, row in enumerate(rows, start=2):
        paths = {key: (csv_path.parent / row[key]).resolve() for key in needed}
        missing = [f"{key}={paths[key]}" for key in sorted(needed) if not paths[key].exists()]
        if missing:
            raise JointRegSegError(f"{csv_path} line {number}: files not found: {', '.join(missing)}")
        pairs.append(Pair(row.get("name") or f"pair{number - 1}", **paths))
    return pairs


def evaluate(pairs: list[Pair], methods: list, label_table: list, progress=None, cancel=None,
             hd95: bool = True) -> list[dict]:
    """One row per (pair, method); `hd95=False` skips the (slow) Hausdorff distances (NaN in the rows)."""
    reporter = Reporter(progress, cancel)
    rows = []
    total = len(pairs) * len(methods)
    for p_index, pair in enumerate(pairs):
        moving, fixed = read_image(pair.moving, "moving"), read_image(pair.fixed, "fixed")
        moving_labels = sitk.ReadImage(str(pair.moving_labels))
        fixed_labels = sitk.ReadImage(str(pair.fixed_labels))
        if fixed_labels.GetSize() != fixed.GetSize():
            raise JointRegSegError(f"{pair.name}: fixed labels {fixed_labels.GetSize()} are not on the fixed image's "
                                   f"grid {fixed.GetSize()}")
        truth = sitk.GetArrayFromImage(fixed_labels)
        spacing_zyx = fixed.GetSpacing()[::-1]
        for m_index, method in enumerate(methods):
            reporter.update(f"{pair.name}: {method.name}", (p_index * len(methods) + m_index) / total)
            outcome = method.run(moving, fixed)
            warped = sitk.GetArrayFromImage(warp_labels(moving_labels, outcome.displacement))
            predicted = (sitk.GetArrayFromImage(outcome.fixed_segmentation)
                         if outcome.fixed_segmentation is not None else None)
            scores = score_pair(warped, truth, label_table, predicted=predicted,
                                displacement_mm=displacement_array(outcome.displacement), grid=fixed,
                                hd95_spacing_zyx=spacing_zyx if hd95 else None)
            stats = scores.deformation
            row = {"pair": pair.name, "method": method.name,
                   "registration_dice": scores.registration_dice, "hd95_mm": scores.hd95_mean_mm,
                   "folding_percent": stats["folding_percent"], "jacobian_min": stats["jacobian_min"],
                   "jacobian_p1": stats["jacobian_p1"], "jacobian_p99": stats["jacobian_p99"],
                   "jacobian_max": stats["jacobian_max"], "segmentation_dice": scores.segmentation_dice,
                   "seconds": outcome.seconds, "peak_memory_mb": outcome.peak_memory_mb}
            row.update({f"dice_{name}": value for name, value in scores.dice.items()})
            row.update({f"hd95_{name}": value for name, value in scores.hd95_mm.items()})
            rows.append(row)
    reporter.update("done", 1.0)
    return rows


def summarize(rows: list[dict], reference: str | None = None) -> list[dict]:
    """Per method: means (and sd of Dice) over pairs; time ratio to `reference` (e.g. ANTs SyN)."""
    methods = list(dict.fromkeys(row["method"] for row in rows))
    ref_time = None
    if reference and any(r["method"] == reference for r in rows):
        ref_time = np.mean([r["seconds"] for r in rows if r["method"] == reference])
    summary = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        dice = np.array([r["registration_dice"] for r in mine])
        entry = {"method": method, "pairs": len(mine), "registration_dice": float(np.mean(dice)),
                 "registration_dice_sd": float(np.std(dice)),
                 **{key: nanmean(r[key] for r in mine) for key in
                    ("hd95_mm", "segmentation_dice", "folding_percent", "jacobian_min", "jacobian_max", "seconds",
                     "peak_memory_mb")}}
        entry["speedup_vs_reference"] = float(ref_time / entry["seconds"]) if ref_time and entry["seconds"] > 0 \
            else float("nan")
        summary.append(entry)
    return summary


def _fmt(value, digits=3):
    return "–" if isinstance(value, float) and math.isnan(value) else f"{value:.{digits}f}"


def summary_markdown(summary: list[dict], reference: str | None = None) -> str:
    ratio = f"speed-up vs {reference}" if reference else "speed-up"
    lines = [f"| method | pairs | registration Dice (mean ± sd) | HD95 mm | segmentation Dice | folding % | "
             f"det J min | time s | {ratio} | peak memory MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in summary:
        lines.append(f"| {e['method']} | {e['pairs']} | {_fmt(e['registration_dice'])} ± "
                     f"{_fmt(e['registration_dice_sd'])} | {_fmt(e['hd95_mm'], 2)} | {_fmt(e['segmentation_dice'])} | "
                     f"{_fmt(e['folding_percent'], 4)} | {_fmt(e['jacobian_min'], 3)} | {_fmt(e['seconds'], 1)} | "
                     f"{_fmt(e['speedup_vs_reference'], 1)} | {_fmt(e['peak_memory_mb'], 0)} |")
    return "\n".join(lines) + "\n"


def write_plots(rows: list[dict], label_table: list, folder: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = list(dict.fromkeys(row["method"] for row in rows))
    structures = [e["name"] for e in label_table if e["value"] != 0]
    fig, ax = plt.subplots(figsize=(min(16, max(8, 0.25 * len(structures) * len(methods))), 4.5))
    width = 0.8 / len(methods)
    for m, method in enumerate(methods):
        data = [[r[f"dice_{s}"] for r in rows if r["method"] == method and not math.isnan(r[f"dice_{s}"])]
                for s in structures]
        positions = np.arange(len(structures)) + (m - (len(methods) - 1) / 2) * width
        box = ax.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True, showfliers=False)
        for patch in box["boxes"]:
            patch.set_facecolor(plt.cm.tab10(m % 10))
        ax.plot([], [], color=plt.cm.tab10(m % 10), lw=6, label=method)
    ax.set_xticks(np.arange(len(structures)), structures, rotation=30, ha="right")
    ax.set_ylabel("registration Dice")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(folder / "dice_per_structure.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m, method in enumerate(methods):
        mine = [r for r in rows if r["method"] == method]
        ax.scatter([max(r["seconds"], 1e-2) for r in mine], [r["registration_dice"] for r in mine],
                   color=plt.cm.tab10(m % 10), label=method, alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("time per pair (s, log scale)")
    ax.set_ylabel("mean registration Dice")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "time_vs_dice.png", dpi=110)
    plt.close(fig)


def write_evaluation(rows: list[dict], label_table: list, out_dir, reference: str | None = None,
                     header: str = "") -> dict:
    """results.csv, summary.md and the two plots, written all together (staging folder)."""
    out_dir = Path(out_dir)
    summary = summarize(rows, reference)
    with staged_output_dir(out_dir) as staging:
        with open(staging / "results.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (staging / "summary.md").write_text(header + summary_markdown(summary, reference), encoding="utf-8")
        write_plots(rows, label_table, staging)
    return {"csv": out_dir / "results.csv", "summary": out_dir / "summary.md",
            "plots": [out_dir / "dice_per_structure.png", out_dir / "time_vs_dice.png"], "table": summary}


def environment_lines() -> str:
    import platform
    lines = [f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
             f"- Python {platform.python_version()}"]
    for module in ("torch", "monai", "SimpleITK"):
        try:
            lines.append(f"- {module} {__import__(module).__version__}")
        except ImportError:
            pass
    return "\n".join(lines) + "\n"
