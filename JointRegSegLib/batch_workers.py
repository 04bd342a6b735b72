"""`jointregseg batch --workers N`: pairs computed by N worker processes side by side.

Each worker is a fresh (spawned) process that imports the engine, takes its threads, loads the model once
and then takes the next pair from a shared queue until none is left, so a slow pair never holds back the
others. The parent only plans, shows progress and keeps the summary; it never imports torch. A worker that
dies (killed, out of memory) fails only the pair it was computing and is replaced; a model that cannot
be loaded stops the batch with the loader's message. Ctrl-C stops every worker: a pair being written is
left as before (outputs are written all or nothing) and its row says `cancelled`.
"""
from __future__ import annotations

import argparse
import multiprocessing
import queue
import signal

from .errors import JointRegSegError

_POLL_S = 0.5
_STOP_GRACE_S = 10.0


def _portable(namespace: argparse.Namespace) -> argparse.Namespace:
    """A pair's arguments without what cannot cross to another process (the command's function and
    argparse's actions)."""
    return argparse.Namespace(**{k: v for k, v in vars(namespace).items() if k not in ("func", "row_options")})


def _stop_on_sigterm(_signum, _frame):
    raise SystemExit(143)   # unwinds like Ctrl-C, so staged outputs are removed


def _worker(worker_id: int, model_path: str, trust_unsigned: bool, device: str, placement: tuple, threads: int,
            tasks, results):
    """Worker process: load the model, then compute pairs from `tasks` until a None arrives."""
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        from .cli import quiet_known_warnings
        quiet_known_warnings()
        from . import import_monai_lean
        import_monai_lean()
        from .threads import apply_threads
        apply_threads(threads)
        from .batch import rank_device, run_pair
        from .checkpoint import load_model
        from .cli import read_run_inputs
        from .device import resolve_device
        device = rank_device(device, *placement)
        model = load_model(model_path, resolve_device(device), trust_unsigned=trust_unsigned)
    except Exception as err:  # noqa: BLE001  reported to the parent, which stops the batch with it
        results.put(("fatal", worker_id, None, str(err) if isinstance(err, JointRegSegError)
                     else f"{type(err).__name__}: {err}"))
        return
    results.put(("ready", worker_id, None, None))
    try:
        while True:
            task = tasks.get()
            if task is None:
                return
            index, pair_args, wanted, state = task
            pair_args.device = device
            results.put(("start", worker_id, index, None))
            row = run_pair(pair_args, wanted, state, model, lambda a=pair_args: read_run_inputs(a), None)
            results.put(("done", worker_id, index, row))
    except KeyboardInterrupt:
        return


def run_in_workers(todo: list, plan: dict, args, placement: tuple, started, finished) -> None:
    """Compute `todo` [(pair, pair_args, wanted, state)] in plan["workers"] processes of plan["threads"]
    threads each. In this process, `started(pair)` is called when a worker takes a pair and
    `finished(pair, row_update)` when it ends (see batch.run_pair). `placement`: (local rank, world size)
    for the device choice under torchrun."""
    context = multiprocessing.get_context("spawn")   # never fork a process that may hold OpenMP threads
    tasks, results = context.Queue(), context.Queue()
    for index, (_pair, pair_args, wanted, state) in enumerate(todo):
        tasks.put((index, _portable(pair_args), wanted, state))
    trust = bool(getattr(args, "trust_unsigned", False))

    def start(worker_id):
        process = context.Process(target=_worker, name=f"jointregseg-worker-{worker_id}", daemon=True,
                                  args=(worker_id, str(args.model), trust, args.device, placement,
                                        plan["threads"], tasks, results))
        process.start()
        return process

    workers = {worker_id: start(worker_id) for worker_id in range(plan["workers"])}
    for _ in workers:
        tasks.put(None)      # one end mark per worker; a replacement takes over the mark of the one it replaces
    ready, computing = set(), {}   # workers that loaded the model; worker id -> index of the pair it computes
    left, next_id, completed = len(todo), len(workers), False
    try:
        while left:
            try:
                kind, worker_id, index, payload = results.get(timeout=_POLL_S)
            except queue.Empty:
                left, next_id = _replace_dead(workers, ready, computing, todo, finished, start, left, next_id)
                continue
            if kind == "fatal":
                raise JointRegSegError(f"a batch worker could not start: {payload}")
            if kind == "ready":
                ready.add(worker_id)
            elif kind == "start":
                computing[worker_id] = index
                started(todo[index][0])
            else:
                computing.pop(worker_id, None)
                left -= 1
                finished(todo[index][0], payload)
        completed = True
    finally:
        _stop(workers.values(), graceful=completed)


def _replace_dead(workers, ready, computing, todo, finished, start, left, next_id):
    """A worker that died fails the pair it had; a new one takes its place while pairs are queued. A
    worker that dies before it has loaded the model stops the batch (a replacement would die the same way)."""
    for worker_id, process in list(workers.items()):
        if process.is_alive() or process.exitcode == 0:
            continue
        del workers[worker_id]
        if worker_id not in ready:
            raise JointRegSegError(f"a batch worker process exited while starting (exit code {process.exitcode})")
        index = computing.pop(worker_id, None)
        if index is not None:
            left -= 1
            finished(todo[index][0], {"status": "failed", "seconds": "",
                                      "error": f"the worker process computing this pair died (exit code "
                                               f"{process.exitcode}: killed, or out of memory?)"})
        if left > len(computing):
            workers[next_id] = start(next_id)
            next_id += 1
    return left, next_id


def _stop(processes, graceful: bool) -> None:
    """Workers that were told to end are waited for; after an error or Ctrl-C they are stopped (SIGTERM
    unwinds them, so a pair being written leaves nothing behind)."""
    processes = list(processes)
    if graceful:
        for process in processes:
            process.join(timeout=_STOP_GRACE_S)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=_STOP_GRACE_S)
        if process.is_alive():
            process.kill()
            process.join()
