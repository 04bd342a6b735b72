"""Engine work outside Slicer's process, so that Slicer's GUI thread never blocks.

Two ways, both pure Python here (no torch: this file imports inside Slicer before the heavy
dependencies exist):

- `BackgroundRun`: one `python -m JointRegSegLib ARGS...` child per job (fine-tuning, scripts).
- `WarmWorker`: one long-lived `python -m JointRegSegLib.slicer.worker serve` child that imports torch and
  MONAI once, keeps loaded models, and runs Register & Segment requests one after the other
  (JSON lines on its stdin and stdout). A request is cancelled cooperatively (the engine checks
  between iterations); if the worker does not stop within a grace period, or dies, it is killed and
  the next request starts a new one.

Both report progress as (stage, fraction) and state as "running", "done", "failed" or "cancelled".
"""
from __future__ import annotations

import atexit
import collections
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from ..core.errors import Cancelled, JointRegSegError
from ..core.processes import (child_environment, events_on_stdout, kill_process_tree, popen_options,  # noqa: F401
                              python_executable, signal_process_tree)


def reap_in_background(stoppable, interval_s: float = 0.1) -> threading.Thread:
    """Call `stoppable.reap()` on a daemon thread until it returns True: for a cancel that nobody else will
    follow up (the module's widget is being destroyed)."""
    def loop():
        while True:
            try:
                if stoppable.reap():
                    return
            except Exception:          # noqa: BLE001 (nothing to report to: keep it quiet)
                return
            time.sleep(interval_s)

    thread = threading.Thread(target=loop, daemon=True, name="jointregseg-reap")
    thread.start()
    return thread


class _RunState:
    """wait / raise_for_state shared by a child-per-job run and a request to the warm worker."""

    def wait(self, progress=None, cancel=None, interval_s: float = 0.1) -> None:
        """Block until the work ends, forwarding progress; raise Cancelled or JointRegSegError."""
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

    def cancel(self, grace_s: float | None = None) -> None:
        """Stop the work; returns once it has stopped (blocking: for scripts. The module's GUI thread uses
        request_cancel and calls reap from a timer)."""
        self.request_cancel(*(() if grace_s is None else (grace_s,)))
        while not self.reap():
            time.sleep(0.05)

    def raise_for_state(self) -> None:
        state = self.state
        if state == "cancelled":
            raise Cancelled("cancelled by the user")
        if state == "failed":
            raise JointRegSegError(self.error)


class BackgroundRun(_RunState):
    """`python -m JointRegSegLib ARGS...` in its own process group.

    `state` is "running", "done", "failed" or "cancelled"; `progress` is (stage, fraction) from the
    child's `PROGRESS <percent> <stage>` lines; `error` the child's error message once it failed.
    """

    def __init__(self, args: list[str], python: str | None = None, env: dict | None = None):
        self.args = [str(a) for a in args]
        self.progress = ("starting", 0.0)
        self.output = collections.deque(maxlen=200)
        self._cancelled = self._killed = self._reaped = False
        self._kill_at = 0.0
        self.process = subprocess.Popen([python or python_executable(), "-m", "JointRegSegLib", *self.args],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=child_environment(env), text=True, encoding="utf-8", errors="replace",
                                        bufsize=1, **popen_options())
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

    def request_cancel(self, grace_s: float = 5.0) -> None:
        """Ask the child to stop (SIGTERM to its process group) and return at once; `reap()` finishes the job."""
        if self.process.poll() is not None or self._cancelled:
            return
        self._cancelled = True
        self._kill_at = time.monotonic() + grace_s
        signal_process_tree(self.process, signal.SIGTERM if os.name == "posix" else None)

    def reap(self) -> bool:
        """One non-blocking step of a cancel: True once the child has ended; once the grace period has passed,
        SIGKILL to its process group."""
        if self.process.poll() is not None:
            if self._cancelled and not self._reaped:
                self._reaped = True
                if os.name == "posix":             # whatever it started and left behind
                    try:
                        os.killpg(self.process.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                self._reader.join(timeout=1)
            return True
        if self._cancelled and not self._killed and time.monotonic() >= self._kill_at:
            self._killed = True
            signal_process_tree(self.process, signal.SIGKILL)
        return False


# --- the warm worker: the parent's side ------------------------------------------------------------

class WorkerTask(_RunState):
    """One request to a WarmWorker; same interface as BackgroundRun (progress, state, error, cancel, wait)."""

    def __init__(self, worker: "WarmWorker", request_id: str):
        self.worker, self.id = worker, request_id
        self.progress = ("starting the engine", 0.0)
        self.state = "running"
        self.error = ""
        self.reply: dict = {}
        self.process = None               # the worker process it was sent to
        self.cancelling = False
        self.killed = False
        self.kill_at = 0.0
        self._finished = threading.Event()

    def _finish(self, state: str, error: str = "", reply: dict | None = None) -> None:
        if self._finished.is_set():
            return
        self.state, self.error, self.reply = state, error, reply or {}
        self.worker.last_used = time.monotonic()     # the idle time counts from the end of the request
        self._finished.set()

    def request_cancel(self, grace_s: float = 10.0) -> None:
        """Ask the worker to stop this request and return at once (the worker stays warm if it stops within
        `grace_s`); `reap()`, called from a timer, ends it."""
        self.worker._request_cancel(self, grace_s)

    def reap(self) -> bool:
        """One non-blocking step of a cancel: True once the request has ended; once the grace period has
        passed, the worker's process tree is killed (the next request starts a new worker)."""
        return self.worker._reap(self)


class WarmWorker:
    """A long-lived engine process that keeps imports and models loaded between requests.

    `run(args)` sends one Register & Segment request (the `jointregseg run` options as a dict) and returns
    a WorkerTask. One request at a time. The process starts on the first request (or `start()`), and is
    started again if it died; `stop()` ends it.
    """

    def __init__(self, python: str | None = None, env: dict | None = None):
        self.python, self.env = python, env
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.info: dict = {}                       # the worker's "ready" message (pid, cuda, ...)
        self.stderr = collections.deque(maxlen=200)
        self.task: WorkerTask | None = None
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._ready = threading.Event()
        self._readers: dict = {}
        self.last_used = time.monotonic()          # last start, request or end of a request (idle timeout)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.alive else None

    @property
    def busy(self) -> bool:
        return self.task is not None and self.task.state == "running"

    def start(self) -> None:
        with self._lock:
            if self.alive:
                return
            self._ready.clear()
            self.info = {}
            self.stderr.clear()
            process = subprocess.Popen([self.python or python_executable(), "-m", "JointRegSegLib.slicer.worker", "serve"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       env=child_environment(self.env), text=True, encoding="utf-8",
                                       errors="replace", bufsize=1, **popen_options())
            self.process = process
            self.starts += 1
            self.last_used = time.monotonic()
            reader = threading.Thread(target=self._read_events, args=(process,), daemon=True)
            self._readers = {p: t for p, t in self._readers.items() if t.is_alive()}
            self._readers[process] = reader
            reader.start()
            threading.Thread(target=self._read_stderr, args=(process,), daemon=True).start()

    def wait_ready(self, timeout_s: float = 120.0) -> dict:
        """Start if needed and wait for the engine to be imported; returns the worker's info."""
        self.start()
        deadline = time.time() + timeout_s
        while not self._ready.wait(0.1):
            if not self.alive:
                raise JointRegSegError("the engine process stopped while starting:\n" + "\n".join(list(self.stderr)[-15:]))
            if time.time() > deadline:
                raise JointRegSegError(f"the engine process did not start within {timeout_s:.0f} s")
        return self.info

    def run(self, args: dict) -> WorkerTask:
        with self._lock:
            if self.busy:
                raise JointRegSegError("the engine is busy with another run; wait for it or cancel it")
            task = WorkerTask(self, str(next(self._ids)))
            self.task = task
            self.last_used = time.monotonic()
            message = json.dumps({"command": "run", "id": task.id, "args": args}) + "\n"
            for attempt in range(2):
                self.start()
                try:
                    self.process.stdin.write(message)
                    self.process.stdin.flush()
                    task.process = self.process
                    break
                except (BrokenPipeError, OSError, ValueError):   # it died since the last request: a new one
                    self._kill()
                    if attempt:
                        self.task = None
                        raise JointRegSegError("could not start the engine process") from None
            return task

    def _send(self, message: dict) -> None:
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError, AttributeError):
            pass

    def _request_cancel(self, task: WorkerTask, grace_s: float) -> None:
        if task.state != "running" or task.cancelling:
            return
        task.cancelling = True
        task.kill_at = time.monotonic() + grace_s
        with self._lock:
            if task.process is not None and task.process is self.process:
                self._send({"command": "cancel", "id": task.id})

    def _reap(self, task: WorkerTask) -> bool:
        if task._finished.is_set():
            return True
        process = task.process
        if process is None:                          # never reached a worker
            task._finish("cancelled")
            return True
        if process.poll() is not None and not self._reader_pending(process):
            task._finish("cancelled")
            return True
        if task.cancelling and not task.killed and time.monotonic() >= task.kill_at:
            task.killed = True                       # did not stop in time: stop it the hard way
            signal_process_tree(process, signal.SIGKILL)
        return False

    def _reader_pending(self, process) -> bool:
        """The event reader of `process` has not seen its end yet (it finishes the task then)."""
        return process in self._readers and self._readers[process].is_alive()

    def _kill(self) -> None:
        process = self.process
        if process is not None:
            kill_process_tree(process, grace_s=2.0)

    def idle_for(self) -> float:
        """Seconds since the worker was last started or used (0 while a request runs)."""
        if self.busy:
            return 0.0
        return time.monotonic() - self.last_used

    def stop_if_idle(self, idle_s: float) -> bool:
        """End the process (its memory, CPU and GPU, freed) when nothing used it for `idle_s` seconds; returns
        at once; True if it was ended. The next request starts a new one."""
        with self._lock:
            if not self.alive or self.busy or self.idle_for() < idle_s:
                return False
        self.stop(wait=False)
        return True

    def stop(self, timeout_s: float = 5.0, wait: bool = True) -> None:
        """End the worker (cancelling a running request). `wait=False`: ask it to quit and return at once; a
        background thread kills its process tree if it is still there after `timeout_s`."""
        with self._lock:
            process = self.process
            if process is None:
                return
            if self.task is not None and self.task.state == "running":
                self.task.cancelling = True
                self._send({"command": "cancel", "id": self.task.id})
            self._send({"command": "quit"})
            try:
                process.stdin.close()
            except OSError:
                pass
            self.process = None                      # the next request starts a new worker
            task = self.task

        def finish():
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                kill_process_tree(process, grace_s=2.0)
            if task is not None:
                task._finish("cancelled")

        if wait:
            finish()
        else:
            threading.Thread(target=finish, daemon=True, name="jointregseg-stop").start()

    # reader threads (one pair per started process)
    def _read_stderr(self, process) -> None:
        for line in process.stderr:
            self.stderr.append(line.rstrip("\n"))

    def _read_events(self, process) -> None:
        for line in process.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                self.stderr.append(line.rstrip("\n"))
                continue
            kind, task = event.get("event"), self.task
            if kind == "ready":
                self.info = event
                self._ready.set()
                continue
            if task is None or event.get("id") != task.id:
                continue
            if kind == "progress":
                task.progress = (event.get("stage", ""), float(event.get("fraction", 0.0)))
            elif kind == "done":
                task._finish("done", reply=event)
            elif kind == "cancelled":
                task._finish("cancelled", reply=event)
            elif kind == "failed":
                task._finish("failed", error=event.get("error", "the engine failed"), reply=event)
        process.wait()
        task = self.task
        if task is not None and task.state == "running" and task.process is process:
            if task.cancelling:
                task._finish("cancelled")
                return
            time.sleep(0.2)   # let the stderr reader catch the last words
            last = "\n".join(list(self.stderr)[-15:])
            task._finish("failed", error=f"the engine process stopped unexpectedly (exit code {process.returncode})"
                                         + (f":\n{last}" if last else ""))


_SHARED: dict = {}
_SHARED_LOCK = threading.Lock()


def shared_worker(python: str | None = None) -> WarmWorker:
    """The warm worker of this process for `python` (one per interpreter, kept between clicks)."""
    key = python or python_executable()
    with _SHARED_LOCK:
        worker = _SHARED.get(key)
        if worker is None:
            worker = _SHARED[key] = WarmWorker(python)
        return worker


def stop_shared_workers() -> None:
    with _SHARED_LOCK:
        workers = list(_SHARED.values())
    for worker in workers:
        worker.stop()


atexit.register(stop_shared_workers)


# --- the warm worker: the child's side -------------------------------------------------------------

class _ModelCache:
    """Checkpoints loaded once per (file, contents on disk)."""

    def __init__(self):
        self.models: dict = {}
        self.loads = 0
        self.requests = 0

    def get(self, path: str, device):
        from ..models.checkpoint import load_model
        path = Path(path).resolve()
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if key not in self.models:
            self.models = {key: load_model(path, device)}     # keep one: models are a few MB, grids are not
            self.loads += 1
        return self.models[key]


def _handle_run(request: dict, cancel: threading.Event, cache: _ModelCache, send) -> None:
    from ..core.device import resolve_device
    from ..io.imageio import read_image
    from ..io.outputs import write_result
    from ..inference.pipeline import register_and_segment
    request_id, args = request["id"], request["args"]

    def progress(stage, fraction):
        send({"event": "progress", "id": request_id, "stage": stage, "fraction": float(fraction)})

    model_path = args.get("model")
    if model_path is None:
        from ..models.installed import default_model_path
        model_path = default_model_path()
    started = time.perf_counter()
    moving = read_image(args["moving"], "moving")
    fixed = read_image(args["fixed"], "fixed")
    guide = None
    if args.get("guide_moving_labels") or args.get("guide_fixed_labels"):
        if not (args.get("guide_moving_labels") and args.get("guide_fixed_labels")):
            raise JointRegSegError("label guidance needs both a moving and a fixed label map")
        guide = (read_image(args["guide_moving_labels"], "moving guidance labels"),
                 read_image(args["guide_fixed_labels"], "fixed guidance labels"))
    device = args.get("device", "auto")
    model = cache.get(model_path, resolve_device(device))
    result = register_and_segment(moving, fixed, model, device=device, affine=bool(args.get("affine", True)),
                                  refine_iterations=int(args.get("refine", 0)),
                                  refine_similarity=args.get("similarity"), guide_labels=guide,
                                  progress=progress, cancel=cancel)
    progress("save results", 0.0)
    if cancel.is_set():
        raise Cancelled("cancelled by the user")
    write_result(result, args["out"], extra_qc={"inputs": {"moving": str(args["moving"]), "fixed": str(args["fixed"]),
                                                           "model": str(model_path)}},
                 compress=bool(args.get("compress", True)))
    _write_brain_masks(result, Path(args["out"]))
    progress("save results", 1.0)
    send({"event": "done", "id": request_id, "seconds": round(time.perf_counter() - started, 3),
          "worker": {"pid": os.getpid(), "model_loads": cache.loads, "requests": cache.requests}})


def _write_brain_masks(result, out_dir: Path) -> None:
    """The result's brain masks (models that give them) as fixed_brain_mask.nii.gz / moving_brain_mask.nii.gz
    (UInt8, 1 = brain), unless write_result wrote them already; results without masks: nothing."""
    import SimpleITK as sitk
    for key in ("fixed_brain_mask", "moving_brain_mask"):
        mask = getattr(result, key, None)
        path = out_dir / f"{key}.nii.gz"
        if mask is not None and not path.exists():
            sitk.WriteImage(sitk.Cast(mask != 0, sitk.sitkUInt8), str(path), True)


def release_gpu_memory(torch_module=None) -> bool:
    """Give the CUDA caching allocator's unused blocks back to the driver (other extensions in the same Slicer
    can then use them); True if there was a CUDA context to release."""
    torch = torch_module or sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    if cuda is None or not cuda.is_available() or not cuda.is_initialized():
        return False
    cuda.empty_cache()
    return True


def serve(stdin=None) -> int:
    """The warm worker's loop: JSON requests on stdin, JSON events on the original stdout.

    Requests: {"command": "run", "id": ID, "args": {moving, fixed, out, model, device, affine, refine,
    similarity, guide_moving_labels, guide_fixed_labels, compress (false: outputs that are read back at once
    and deleted)}}, {"command": "cancel", "id": ID}, {"command": "quit"}.
    Events: ready, progress, done, cancelled, failed (with "error").
    """
    from ..core.known_warnings import quiet_known_warnings
    stdin = stdin or sys.stdin
    events = events_on_stdout()
    send_lock = threading.Lock()

    def send(message: dict) -> None:
        with send_lock:
            events.write(json.dumps(message) + "\n")
            events.flush()

    quiet_known_warnings()
    from ..core.threads import configure_command_threads
    # the expensive imports, once, while `run`'s thread decision measures the load of other programs
    choice = configure_command_threads(modules=("JointRegSegLib.inference.pipeline",))
    import torch
    requests: queue.Queue = queue.Queue()
    cancels: dict[str, threading.Event] = {}

    def read_requests():
        for line in stdin:
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue
            command = message.get("command")
            if command == "cancel":
                cancels.setdefault(str(message.get("id")), threading.Event()).set()
            elif command == "quit":
                break
            elif command == "run":
                cancels.setdefault(str(message["id"]), threading.Event())
                requests.put(message)
        for event in list(cancels.values()):    # quit, or the parent is gone: stop what is running
            event.set()
        requests.put(None)

    threading.Thread(target=read_requests, daemon=True).start()
    send({"event": "ready", "pid": os.getpid(), "cuda": bool(torch.cuda.is_available()),
          "python": sys.executable, "threads": choice["threads"], "thread_source": choice["source"]})
    cache = _ModelCache()
    while True:
        request = requests.get()
        if request is None:
            return 0
        request_id = str(request["id"])
        cancel = cancels[request_id]
        cache.requests += 1
        try:
            if cancel.is_set():
                raise Cancelled("cancelled by the user")
            _handle_run(request, cancel, cache, send)
        except Cancelled:
            send({"event": "cancelled", "id": request_id})
        except JointRegSegError as err:
            send({"event": "failed", "id": request_id, "error": str(err)})
        except Exception as err:           # report it, stay alive for the next request
            traceback.print_exc()
            send({"event": "failed", "id": request_id, "error": f"{type(err).__name__}: {err}"})
        finally:
            cancels.pop(request_id, None)
            release_gpu_memory(torch)       # after a GPU run: the cached blocks go back to the driver


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        sys.exit(serve())
    sys.exit("usage: python -m JointRegSegLib.slicer.worker serve")
