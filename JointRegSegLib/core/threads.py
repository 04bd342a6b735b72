"""How many intra-op threads a computing process uses: never more than the cores that are free for it.

Order of precedence: `--threads N`, then the environment variable JOINTREGSEG_THREADS, then automatic:
the cores this process may run on (`os.sched_getaffinity`, capped by a cgroup CPU quota), minus the
cores other programs kept busy while this process was starting, shared between the processes of one
job on this machine (torchrun's LOCAL_WORLD_SIZE ranks). torch's intra-op pool and SimpleITK's filters
both get that number. Oversubscribing (more busy threads than cores) slows torch's OpenMP kernels
down several times, so the automatic choice rounds down and never goes below 1.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

from .errors import JointRegSegError

ENV_VAR = "JOINTREGSEG_THREADS"


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask), or all of them where there is no mask."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cgroup_cpu_limit() -> float | None:
    """The container's CPU quota in cores (cgroup v2 cpu.max or v1 cfs quota), None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text(encoding="ascii").split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text(encoding="ascii"))
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text(encoding="ascii"))
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def local_workers() -> int:
    """Processes of this job sharing the machine: torchrun's LOCAL_WORLD_SIZE, else 1."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _cpu_ticks(cpus: list[int]) -> tuple[int, int] | None:
    """(busy, total) clock ticks summed over `cpus` from /proc/stat; None where /proc/stat is missing."""
    try:
        lines = Path("/proc/stat").read_text(encoding="ascii").splitlines()
    except OSError:
        return None
    wanted = {f"cpu{c}" for c in cpus}
    busy = total = 0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in wanted:
            values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
            total += sum(values)
            busy += sum(values) - values[3] - values[4]
    return busy, total


def _job_pids() -> list[int]:
    """This process and, under torchrun, its sibling ranks (children of the same launcher)."""
    pids = [os.getpid()]
    if local_workers() > 1:
        parent = os.getppid()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text(encoding="ascii", errors="replace")
                ppid = int(text[text.rindex(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == parent and int(stat.parent.name) != os.getpid():
                pids.append(int(stat.parent.name))
    return pids


def _job_ticks(pids: list[int]) -> dict[int, int]:
    """utime + stime (clock ticks) of each process in `pids` that still exists."""
    ticks = {}
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
            fields = text[text.rindex(")") + 2:].split()
            ticks[pid] = int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            continue
    return ticks


class LoadProbe:
    """Measures how many of this process's CPUs other programs keep busy between start() and stop().

    The work of this process itself (and of its sibling torchrun ranks) in that window does not count.
    """

    def __init__(self, cpus: list[int] | None = None):
        self.cpus = cpus if cpus is not None else allowed_cpus()
        self._start = None

    def start(self) -> "LoadProbe":
        self._pids = _job_pids()
        self._start = (time.monotonic(), _cpu_ticks(self.cpus), _job_ticks(self._pids))
        return self

    def stop(self) -> float:
        """Cores busy with other work, averaged over the window (0 where it cannot be measured)."""
        if self._start is None:
            return 0.0
        began, cpu_before, job_before = self._start
        cpu_after, job_after = _cpu_ticks(self.cpus), _job_ticks(self._pids)
        if cpu_before is None or cpu_after is None or time.monotonic() - began < 0.05:
            return 0.0
        total = cpu_after[1] - cpu_before[1]
        if total <= 0:
            return 0.0
        ours = sum(job_after[pid] - job_before[pid] for pid in job_after if pid in job_before)
        others = max(0, cpu_after[0] - cpu_before[0] - ours)
        return min(len(self.cpus), others / total * len(self.cpus))


def _positive(value, source: str) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        number = 0
    if number < 1:
        raise JointRegSegError(f"{source} must be a positive whole number of threads, got {value!r}")
    return number


def choose_threads(requested: int | None = None, busy_cores: float = 0.0, workers: int | None = None) -> dict:
    """The thread count and how it was chosen: {"threads", "source", "cores", "busy_cores", "workers"}."""
    cpus = allowed_cpus()
    limit = cgroup_cpu_limit()
    cores = len(cpus) if limit is None else max(1, min(len(cpus), math.floor(limit)))
    workers = workers or local_workers()
    info = {"cores": cores, "busy_cores": round(float(busy_cores), 2), "workers": workers}
    if requested is not None:
        return {"threads": _positive(requested, "--threads"), "source": "--threads", **info}
    if os.environ.get(ENV_VAR, "").strip():
        return {"threads": _positive(os.environ[ENV_VAR], ENV_VAR), "source": ENV_VAR, **info}
    # a core counts as busy once others use more than 40% of it (a thread sharing it would hold back
    # every parallel region); short blips below that do not cost a thread
    free = cores - math.floor(busy_cores + 0.6)
    return {"threads": max(1, free // workers), "source": "auto", **info}


def apply_threads(threads: int) -> None:
    """Give torch's intra-op pool and SimpleITK's filters `threads` threads."""
    import SimpleITK as sitk
    import torch
    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def configure_threads(requested: int | None = None, warmup=None, workers: int | None = None) -> dict:
    """Choose and apply the thread count; returns how it was chosen (see choose_threads).

    `warmup` (e.g. importing torch and MONAI) runs while the load of other programs is measured, so
    the measurement costs no extra time. Without it, or with an explicit count, nothing is measured.
    """
    busy = 0.0
    explicit = requested is not None or os.environ.get(ENV_VAR, "").strip()
    if warmup is not None:
        probe = LoadProbe().start() if not explicit else None
        warmup()
        busy = probe.stop() if probe is not None else 0.0
    choice = choose_threads(requested, busy, workers)
    apply_threads(choice["threads"])
    return choice


def configure_command_threads(requested: int | None = None, modules: tuple[str, ...] = ("monai",)) -> dict:
    """`run`'s thread decision for the other computing commands (evaluate, train, finetune, data build, the
    Slicer warm worker): `--threads`, else JOINTREGSEG_THREADS, else the free cores, with the load of other
    programs measured while torch and `modules` import (full imports: these commands may need MONAI's
    optional parts, which `run`'s lean import leaves out)."""
    import importlib

    def warmup():
        import torch  # noqa: F401
        for name in modules:
            importlib.import_module(name)

    return configure_threads(requested, warmup=warmup)


def describe(choice: dict) -> str:
    text = f"{choice['threads']} thread{'s' if choice['threads'] != 1 else ''} ({choice['source']}"
    if choice["source"] == "auto":
        text += (f": {choice['cores']} cores, {choice['busy_cores']:g} busy with other work, "
                 f"{choice['workers']} process{'es' if choice['workers'] != 1 else ''} of this job")
    elif choice["threads"] * choice["workers"] > choice["cores"]:
        text += f"; more than the {choice['cores']} cores here: oversubscribed"
    return text + ")"
