"""The per-step training log (CSV) that survives a resume without duplicate steps."""
from __future__ import annotations

import csv
from pathlib import Path

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
