"""The per-step training log (CSV) that survives a resume without duplicate steps, and its loss curve."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

HEADER = ["step", "phase", "loss", "terms", "seconds"]


def open_training_log(path: Path, start: int):
    """(file, csv writer) for the log of a run that begins at step `start`.

    A fresh run (start 0) starts a new log. A resumed run keeps the rows of the steps before `start` (the
    checkpoint it resumes from) and drops the ones a stopped run logged after its last checkpoint, since
    those steps run again."""
    path = Path(path)
    kept = []
    if start > 0 and path.is_file():
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        kept = [row for row in rows[1:] if row and row[0].isdigit() and int(row[0]) < start]
    handle = open(path, "w", newline="", encoding="utf-8")
    writer = csv.writer(handle)
    writer.writerow(HEADER)
    writer.writerows(kept)
    handle.flush()
    return handle, writer


def read_log(path: Path) -> list[tuple[int, str, float, dict]]:
    """(step, phase, loss, terms) per logged update, in order; a step logged twice (a resumed run) keeps its
    last rows only."""
    rows = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            step = int(row["step"])
            entry = (step, row["phase"], float(row["loss"]), json.loads(row["terms"]))
            rows.setdefault(step, {})[row["phase"]] = entry
    return [entry for step in sorted(rows) for entry in rows[step].values()]


def running_mean(values: np.ndarray, window: int = 50) -> np.ndarray:
    window = max(1, min(window, len(values) // 5 or 1))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def write_loss_curve(log_path: Path, out_path: Path) -> Path | None:
    """The loss and each of its terms against the step (running means), one panel each; None when the log
    has no row. Written atomically next to the model."""
    entries = read_log(log_path)
    if not entries:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = ["loss"] + sorted({k for _, _, _, terms in entries for k in terms})
    figure, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    for axis, name in zip(axes[0], names):
        points = [(step, loss if name == "loss" else terms[name]) for step, _, loss, terms in entries
                  if name == "loss" or name in terms]
        steps, values = np.array(points, dtype=float).T
        smooth = running_mean(values)
        axis.plot(steps, values, color="0.8", linewidth=0.6)
        axis.plot(steps[len(steps) - len(smooth):], smooth, color="C0")
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("step")
    figure.tight_layout()
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    figure.savefig(tmp, dpi=90)
    plt.close(figure)
    tmp.replace(out_path)
    return out_path
