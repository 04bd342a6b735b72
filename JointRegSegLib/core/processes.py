"""Child processes of the engine (the Slicer module's workers, `batch`'s workers): which Python, the
environment that finds this package, a process group of their own, stopping them with everything they
started, and a stdout kept for protocol events."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

LIB_PARENT = Path(__file__).resolve().parents[2]


def python_executable() -> str:
    """Slicer's own interpreter inside Slicer (PythonSlicer), else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


def child_environment(env: dict | None = None) -> dict:
    environment = dict(os.environ if env is None else env)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(LIB_PARENT), environment.get("PYTHONPATH")]))
    environment.setdefault("PYTHONUNBUFFERED", "1")
    # The child's messages may hold non-ASCII (file names, units); don't let a C locale garble or crash them.
    environment["PYTHONIOENCODING"] = "utf-8"
    return environment


def popen_options() -> dict:
    """Own process group (so cancel reaches the children too) and, on Windows, no console window:
    the same hidden-window start-up flags as slicer.util.launchConsoleProcess."""
    if os.name == "posix":
        return {"start_new_session": True}
    startupinfo = subprocess.STARTUPINFO()
    startupinfo.dwFlags |= subprocess.STARTF_USESHOWWINDOW
    startupinfo.wShowWindow = subprocess.SW_HIDE
    return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW,
            "startupinfo": startupinfo}


def kill_process_tree(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the process group, then SIGKILL; returns once the process is gone."""
    if process.poll() is not None:
        return
    if os.name == "posix":
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    else:
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True,
                       creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
        process.wait(timeout=30)


def signal_process_tree(process: subprocess.Popen, sig) -> None:
    """Send `sig` to the process and everything it started, without waiting for them (posix: its process
    group; Windows: `taskkill /F /T`, started and not awaited, whatever `sig`)."""
    if process.poll() is not None:
        return
    if os.name == "posix":
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    else:
        subprocess.Popen(["taskkill", "/F", "/T", "/PID", str(process.pid)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))


def events_on_stdout():
    """The process's original stdout as a line-buffered text file for protocol events (JSON lines); file
    descriptor 1 and sys.stdout then go to stderr, so whatever libraries print never enters the protocol."""
    events = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return events
