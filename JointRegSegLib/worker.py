"""Run a `jointregseg` command in a child process: progress from its stderr, cancel that kills the whole
process tree. Used by the Slicer module so that long work never blocks Slicer's GUI thread; pure Python
(no torch) so that it imports inside Slicer before the heavy dependencies exist."""
from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .errors import Cancelled, JointRegSegError

LIB_PARENT = Path(__file__).resolve().parent.parent


def python_executable() -> str:
    """Slicer's own interpreter inside Slicer (PythonSlicer), else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


class BackgroundRun:
    """`python -m JointRegSegLib ARGS...` in its own process group.

    `state` is "running", "done", "failed" or "cancelled"; `progress` is (stage, fraction) from the
    child's `PROGRESS <percent> <stage>` lines; `error` the child's error message once it failed.
    """

    def __init__(self, args: list[str], python: str | None = None, env: dict | None = None):
        self.args = [str(a) for a in args]
        environment = dict(os.environ if env is None else env)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(LIB_PARENT), environment.get("PYTHONPATH")]))
        environment.setdefault("PYTHONUNBUFFERED", "1")
        # The child's messages may hold non-ASCII (file names, units); don't let a C locale garble or crash them.
        environment["PYTHONIOENCODING"] = "utf-8"
        self.progress = ("starting", 0.0)
        self.output = collections.deque(maxlen=200)
        self._cancelled = False
        options = {"start_new_session": True} if os.name == "posix" else \
            {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        self.process = subprocess.Popen([python or python_executable(), "-m", "JointRegSegLib", *self.args],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=environment, text=True, encoding="utf-8", errors="replace",
                                        bufsize=1, **options)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            line = line.rstrip("\n")
            parts = line.split(maxsplit=2)
            if len(parts) >= 2 and parts[0] == "PROGRESS":
                try:
                    self.progress = (parts[2] if len(parts) > 2 else "", float(parts[1]) / 100.0)
                    continue
                except ValueError:
                    pass
            self.output.append(line)

    @property
    def state(self) -> str:
        code = self.process.poll()
        if code is None:
            return "running"
        if self._cancelled:
            return "cancelled"
        return "done" if code == 0 else "failed"

    @property
    def error(self) -> str:
        self._reader.join(timeout=5)
        lines = list(self.output)
        for line in reversed(lines):
            if line.startswith("jointregseg: error: "):
                return line.removeprefix("jointregseg: error: ")
        return "\n".join(lines[-15:]) or f"the worker process exited with code {self.process.returncode}"

    def cancel(self, grace_s: float = 5.0) -> None:
        """Stop the child and everything it started; returns once they are gone."""
        if self.process.poll() is not None:
            return
        self._cancelled = True
        if os.name == "posix":
            for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
                try:
                    os.killpg(self.process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)], capture_output=True)
            self.process.wait(timeout=30)
        self._reader.join(timeout=5)

    def wait(self, progress=None, cancel=None, interval_s: float = 0.1) -> None:
        """Block until the child ends, forwarding progress; raise Cancelled or JointRegSegError."""
        last = None
        while self.state == "running":
            if cancel is not None and (cancel.is_set() if hasattr(cancel, "is_set") else cancel()):
                self.cancel()
                break
            if progress is not None and self.progress != last:
                last = self.progress
                progress(*last)
            time.sleep(interval_s)
        self.raise_for_state()

    def raise_for_state(self) -> None:
        state = self.state
        if state == "cancelled":
            raise Cancelled("cancelled by the user")
        if state == "failed":
            raise JointRegSegError(self.error)
