"""Progress reporting and cooperative cancellation shared by every long operation."""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from .errors import Cancelled

ProgressCallback = Callable[[str, float], None]


@dataclass
class Reporter:
    """Forwards (stage, fraction in [0, 1]) to a callback and checks a cancel flag.

    `cancel` is a threading.Event or any zero-argument callable returning True to stop.
    """

    callback: Optional[ProgressCallback] = None
    cancel: object = None
    timings: dict = field(default_factory=dict)

    def cancelled(self) -> bool:
        if self.cancel is None:
            return False
        if isinstance(self.cancel, threading.Event):
            return self.cancel.is_set()
        return bool(self.cancel())

    def check(self) -> None:
        if self.cancelled():
            raise Cancelled("cancelled by the user")

    def update(self, stage: str, fraction: float) -> None:
        self.check()
        if self.callback is not None:
            self.callback(stage, float(min(max(fraction, 0.0), 1.0)))

    def stage(self, name: str) -> "_Stage":
        return _Stage(self, name)


class _Stage:
    def __init__(self, reporter: Reporter, name: str):
        self.reporter, self.name = reporter, name

    def __enter__(self):
        self.reporter.update(self.name, 0.0)
        self.start = time.perf_counter()
        return self

    def __call__(self, fraction: float) -> None:
        self.reporter.update(self.name, fraction)

    def __exit__(self, exc_type, exc, tb):
        elapsed = time.perf_counter() - self.start
        self.reporter.timings[self.name] = round(self.reporter.timings.get(self.name, 0.0) + elapsed, 4)
        if exc_type is None:
            self.reporter.update(self.name, 1.0)
        return False


def stderr_progress(stage: str, fraction: float) -> None:
    """A plain line-per-update progress printer for the CLI (machine-parsable by the Slicer module)."""
    print(f"PROGRESS {fraction * 100:5.1f} {stage}", file=sys.stderr, flush=True)
