"""`jointregseg batch --workers N`: pairs computed by N worker processes side by side.

Each worker is a child process (`python -m JointRegSegLib.cohort.workers ...`) that imports the engine, takes
its threads and loads the model once, then computes the pairs the parent sends it, one at a time, until its
stdin closes. Parent and worker talk in JSON lines over the worker's own pipes (the worker's stdout is kept
for them; whatever libraries print goes to stderr), so a worker that dies can hold no lock or message of
another, and the caller's `__main__` is never imported again (as multiprocessing's spawn would).

The parent hands each pair to the next idle worker, so it always knows which pair a worker holds: a worker
that dies (killed, out of memory) fails that pair only, its half-staged outputs are removed, and a new worker
takes its place. A model that cannot be loaded stops the batch with the loader's message; workers that keep
dying while starting fail the pairs that are left. Ctrl-C or an error stops every worker (SIGTERM unwinds
them: a pair being written is left as before, outputs are written all or nothing).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from ..core.errors import JointRegSegError

_STOP_GRACE_S = 10.0
_UNWIND_S = 1.0
_PARENT_POLL_S = 1.0
_START_FAILURES_TOLERATED = 3
# run options that do not cross to a worker (argparse's own objects)
_LOCAL_ONLY = ("func", "row_options")


class _Worker:
    def __init__(self, number: int, process: subprocess.Popen):
        self.number, self.process = number, process
        self.ready = False
        self.index = None        # the pair (position in todo) this worker computes, None when idle


def run_in_workers(todo: list, plan: dict, args, placement: tuple, started, finished) -> None:
    """Compute `todo` [(pair, pair_args, wanted, state)] in plan["workers"] processes of plan["threads"]
    threads each. In this process, `started(pair)` is called when a worker is given a pair and
    `finished(pair, row_update)` when it ends (see pair.run_pair). `placement`: (local rank, world size)
    for the device choice under torchrun."""
    from ..core.processes import child_environment
    events = queue.Queue()
    command = [sys.executable, "-m", "JointRegSegLib.cohort.workers", "--model", str(args.model),
               "--device", args.device, "--local-rank", str(placement[0]), "--world", str(placement[1]),
               "--threads", str(plan["threads"])] + (["--trust-unsigned"] if getattr(args, "trust_unsigned", False)
                                                    else [])
    environment = child_environment()
    workers: dict[int, _Worker] = {}
    waiting = collections.deque(range(len(todo)))     # pairs not yet given to a worker
    unfinished = len(todo)
    start_failures, anyone_ready, counter = 0, False, 0

    def start():
        nonlocal counter
        counter += 1
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=environment,
                                   text=True, encoding="utf-8", bufsize=1)
        worker = workers[counter] = _Worker(counter, process)
        threading.Thread(target=_read_events, args=(worker, events), daemon=True,
                         name=f"jointregseg-batch-worker-{counter}").start()

    def give_work(worker):
        if not waiting:
            _close_stdin(worker)          # nothing left: the worker ends
            return
        index = waiting.popleft()
        _pair, pair_args, wanted, state = todo[index]
        message = {"index": index, "args": _portable(pair_args), "wanted": wanted, "state": state}
        try:
            worker.process.stdin.write(json.dumps(message) + "\n")
            worker.process.stdin.flush()
        except OSError:                   # it died meanwhile: its exit event comes next
            waiting.appendleft(index)
            return
        worker.index = index
        started(todo[index][0])

    def fail(index, error):
        nonlocal unfinished
        unfinished -= 1
        finished(todo[index][0], {"status": "failed", "seconds": "", "error": error})

    completed = False
    try:
        for _ in range(plan["workers"]):
            start()
        while unfinished:
            try:
                number, event = events.get(timeout=1.0)
            except queue.Empty:
                continue
            worker = workers.get(number)
            if worker is None:
                continue
            kind = event.get("event")
            if kind == "ready":
                worker.ready = anyone_ready = True
                give_work(worker)
            elif kind == "done" and worker.index == event.get("index"):
                index, worker.index = worker.index, None
                unfinished -= 1
                finished(todo[index][0], event["row"])
                give_work(worker)
            elif kind == "fatal":
                if not anyone_ready:   # the model cannot be loaded: every worker would say the same
                    raise JointRegSegError(f"a batch worker could not start: {event.get('error')}")
                sys.stderr.write(f"jointregseg batch: a new worker could not start: {event.get('error')}\n")
            elif kind == "exit":
                del workers[number]
                code = event.get("code")
                if worker.index is not None:
                    _remove_staging(todo[worker.index][1])
                    fail(worker.index, f"the worker process computing this pair died (exit code {code}: "
                                       "killed, or out of memory?)")
                if not worker.ready:
                    if not anyone_ready and not workers:
                        raise JointRegSegError(f"the batch worker processes exited while starting (exit code "
                                               f"{code}); see the messages above")
                    start_failures += 1
                if waiting and len(workers) < plan["workers"]:
                    if start_failures < _START_FAILURES_TOLERATED:
                        start()
                    elif not workers:
                        while waiting:
                            fail(waiting.popleft(), f"no batch worker process could be started ({start_failures} "
                                                    f"exited while starting, the last with exit code {code})")
        completed = True
    finally:
        _stop(list(workers.values()), graceful=completed)
        for worker in workers.values():     # stopped while computing (a kill may have left its staging)
            if worker.index is not None:
                _remove_staging(todo[worker.index][1])


def _portable(pair_args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(pair_args).items() if k not in _LOCAL_ONLY}


def _read_events(worker: _Worker, events: queue.Queue) -> None:
    """The worker's protocol lines as events, then its exit; anything else it printed is passed on."""
    for line in worker.process.stdout:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            event = None
        if not isinstance(event, dict):     # something printed before the protocol took the stdout
            sys.stderr.write(line)
            continue
        events.put((worker.number, event))
    events.put((worker.number, {"event": "exit", "code": worker.process.wait()}))


def _close_stdin(worker: _Worker) -> None:
    try:
        worker.process.stdin.close()
    except OSError:
        pass


def _remove_staging(pair_args) -> None:
    """What a killed worker left half staged for this pair (`imageio.staged_output_dir`'s folder)."""
    out = Path(pair_args.out)
    prefix = f".{out.name}.partial-"       # compared as text: a pair's name may hold glob characters
    for leftover in out.parent.iterdir() if out.parent.is_dir() else ():
        if leftover.name.startswith(prefix) and leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def _stop(workers: list, graceful: bool) -> None:
    """Workers that were told to end (stdin closed) are waited for; after an error or Ctrl-C they are
    stopped (SIGTERM unwinds them, so a pair being written leaves nothing behind)."""
    for worker in workers:
        _close_stdin(worker)
    # told to end: they finish; interrupted: a Ctrl-C from the terminal reached them too and they are
    # unwinding already, so they get a moment before SIGTERM
    wait_s = _STOP_GRACE_S if graceful else _UNWIND_S
    for worker in workers:
        try:
            worker.process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            pass
    for worker in workers:
        if worker.process.poll() is None:
            worker.process.terminate()
    for worker in workers:
        try:
            worker.process.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()


# --- the worker's side ------------------------------------------------------------------------------------

def _stop_on_sigterm(_signum, _frame):
    raise SystemExit(143)   # unwinds like Ctrl-C, so staged outputs are removed


def _watch_parent() -> None:
    """SIGTERM to this worker once the batch process that started it is gone (killed mid-pair, a worker
    would otherwise compute on, holding memory and the batch's stderr, until it next reads its stdin)."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            threading.Event().wait(_PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, daemon=True, name="jointregseg-parent-watch").start()


def serve(argv=None) -> int:
    """A worker: load the model, then compute the pairs that arrive on stdin (JSON lines) until it closes;
    events go as JSON lines to the original stdout."""
    parser = argparse.ArgumentParser(prog="python -m JointRegSegLib.cohort.workers")
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--local-rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trust-unsigned", action="store_true")
    options = parser.parse_args(argv)
    from ..core.processes import events_on_stdout
    events = events_on_stdout()
    signal.signal(signal.SIGTERM, _stop_on_sigterm)

    def send(event: dict) -> None:
        try:
            events.write(json.dumps(event) + "\n")
        except OSError:                    # the parent is gone: nobody to tell
            raise SystemExit(1) from None

    _watch_parent()

    try:
        from ..core.known_warnings import quiet_known_warnings
        quiet_known_warnings()
        from .. import import_monai_lean
        import_monai_lean()
        from ..core.threads import apply_threads
        apply_threads(options.threads)
        from .pair import rank_device, run_pair
        from ..models.checkpoint import load_model
        from ..inference.job import read_run_inputs
        from ..core.device import resolve_device
        device = rank_device(options.device, options.local_rank, options.world)
        model = load_model(options.model, resolve_device(device), trust_unsigned=options.trust_unsigned)
    except Exception as err:  # noqa: BLE001  reported to the parent, which stops the batch with it
        send({"event": "fatal", "error": str(err) if isinstance(err, JointRegSegError)
              else f"{type(err).__name__}: {err}"})
        return 1
    send({"event": "ready"})
    try:
        for line in sys.stdin:
            task = json.loads(line)
            pair_args = argparse.Namespace(**{**task["args"], "device": device})
            row = run_pair(pair_args, task["wanted"], task["state"], model, lambda a=pair_args: read_run_inputs(a),
                           None)
            send({"event": "done", "index": task["index"], "row": row})
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(serve())
