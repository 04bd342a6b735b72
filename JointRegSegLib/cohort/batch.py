"""`jointregseg batch`: register and segment a cohort of pairs listed in a CSV, loading the model once.

Each pair's outputs go to OUT/<name>/ exactly as `jointregseg run` writes them (the same code writes
them). Complete pairs are skipped when the command runs again; a pair that fails is listed in
OUT/summary.csv and the others go on. The pairs are computed by worker processes (batch_workers.py; by
default one per free core) or, with one worker, in this process, where a background thread reads the
next pair while one is computed. Under torchrun each rank takes every WORLD_SIZE-th row (by row number)
and rank 0 merges the summary.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import JointRegSegError
from ..core.threads import ENV_VAR as THREADS_ENV
from .pair import qc_fields, rank_device, run_pair

SUMMARY_NAME = "summary.csv"
SUMMARY_FIELDS = ["name", "status", "error", "seconds", "engine_seconds", "folding_percent", "jacobian_min",
                  "jacobian_max", "device", "refine_iterations", "out",
                  # the registration's self-check (empty for pairs whose engine did not report it)
                  "registration_status", "agreement_mean"]
PATH_COLUMNS = ("moving", "fixed", "moving_labels", "fixed_labels")
# per-row overrides of the command line's run options (column name = option name, - or _)
ROW_OPTIONS = ("refine", "similarity", "no_affine", "affine_method", "no_scale_search", "report")
# run options that apply to the whole batch and are not copied from `run`'s parser as they are
_PAIR_ARGUMENTS = {"moving", "fixed", "out", "guide_moving_labels", "guide_fixed_labels", "help"}
REPORT_FILES = ("report.md", "qc_overview.png")  # what --report adds to a pair's folder
_TRUE, _FALSE = {"1", "true", "yes", "y", "on"}, {"0", "false", "no", "n", "off"}
# ranks wait for each other only at the very end; a slow shard may take days
_GROUP_TIMEOUT_S = 7 * 24 * 3600
# how long other programs' CPU load is measured before the threads are chosen
_PROBE_S = 0.3


@dataclass
class Pair:
    row: int                      # 1-based row number in the CSV, header excluded
    name: str
    moving: Path
    fixed: Path
    moving_labels: Path | None = None
    fixed_labels: Path | None = None
    options: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- reading the CSV

def _bool(text: str, where: str, column: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise JointRegSegError(f"{where}: column {column!r} must be yes/no (1/0, true/false), got {text!r}")


def _row_option(action: argparse.Action, text: str, where: str, column: str):
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return _bool(text, where, column)
    value = text.strip()
    if action.type is not None:
        try:
            value = action.type(value)
        except argparse.ArgumentTypeError as err:
            raise JointRegSegError(f"{where}: column {column!r}: {err}") from None
        except (TypeError, ValueError):
            raise JointRegSegError(f"{where}: column {column!r} has an invalid value {text!r}") from None
    if action.choices is not None and value not in action.choices:
        raise JointRegSegError(f"{where}: column {column!r} must be one of {', '.join(map(str, action.choices))}, "
                               f"got {text!r}")
    if action.dest == "refine" and value < 0:
        raise JointRegSegError(f"{where}: column 'refine' must be 0 or more, got {text!r}")
    return value


def _check_name(name: str, where: str) -> None:
    if not name:
        raise JointRegSegError(f"{where}: the name is empty; every pair needs a name (its output folder)")
    if name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\\0") or name == SUMMARY_NAME:
        raise JointRegSegError(f"{where}: name {name!r} cannot be a folder name inside the output folder "
                               "(no slashes, not starting with '.')")


def read_pairs(csv_path: str | os.PathLike, options: dict[str, argparse.Action] | None = None) -> list[Pair]:
    """Every pair in the CSV, validated as a whole before any work starts (paths relative to the CSV).

    `options` maps a row-option column to the argparse action that parses it (its type and choices).
    Missing or unreadable image files are not checked here: they fail their own pair only.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise JointRegSegError(f"pairs file not found: {csv_path}")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            rows = [r for r in reader if any(cell.strip() for cell in r)]
    except (UnicodeDecodeError, csv.Error) as err:
        raise JointRegSegError(f"{csv_path}: not a readable CSV file ({err})") from None
    if not header:
        raise JointRegSegError(f"{csv_path}: the file is empty; expected a header row name,moving,fixed")
    columns = [c.strip().lower().replace("-", "_") for c in header]
    missing = [c for c in ("name", "moving", "fixed") if c not in columns]
    if missing:
        raise JointRegSegError(f"{csv_path}: missing column(s) {', '.join(missing)}; the header has "
                               f"{', '.join(columns)} (needed: name, moving, fixed)")
    options = options or {}
    unknown = [c for c in columns if c not in ("name", *PATH_COLUMNS, *options)]
    if unknown:
        raise JointRegSegError(f"{csv_path}: unknown column(s) {', '.join(unknown)}; allowed: name, "
                               f"{', '.join(PATH_COLUMNS)} and the per-pair options {', '.join(options)}")
    if len(set(columns)) != len(columns):
        raise JointRegSegError(f"{csv_path}: a column appears twice in the header: {', '.join(columns)}")
    if not rows:
        raise JointRegSegError(f"{csv_path}: no pairs listed under the header")
    pairs, seen = [], {}
    for number, cells in enumerate(rows, start=1):
        if len(cells) > len(columns):
            raise JointRegSegError(f"{csv_path}, row {number}: {len(cells)} cells but {len(columns)} columns")
        values = {c: (cells[i].strip() if i < len(cells) else "") for i, c in enumerate(columns)}
        where = f"{csv_path}, row {number}" + (f" ({values['name']})" if values["name"] else "")
        _check_name(values["name"], where)
        if values["name"] in seen:
            raise JointRegSegError(f"{where}: name {values['name']!r} is also used on row {seen[values['name']]}; "
                                   "names must be unique (each is an output folder)")
        seen[values["name"]] = number
        for column in ("moving", "fixed"):
            if not values[column]:
                raise JointRegSegError(f"{where}: the {column} image is empty")
        if bool(values.get("moving_labels")) != bool(values.get("fixed_labels")):
            raise JointRegSegError(f"{where}: label guidance needs both moving_labels and fixed_labels")
        paths = {c: (csv_path.parent / values[c]).resolve() if values.get(c) else None for c in PATH_COLUMNS}
        row_options = {c: _row_option(options[c], values[c], where, c) for c in options if values.get(c)}
        pairs.append(Pair(row=number, name=values["name"], options=row_options, **paths))
    return pairs


# ------------------------------------------------------------------------------------------------- one pair

def pair_arguments(args: argparse.Namespace, pair: Pair, out_dir: Path) -> argparse.Namespace:
    """The `run` arguments for one pair: the command line's options, the row's overrides, its paths."""
    values = {**vars(args), **pair.options, "model": str(args.model), "moving": str(pair.moving), "fixed": str(pair.fixed),
              "out": str(out_dir / pair.name),
              "guide_moving_labels": str(pair.moving_labels) if pair.moving_labels else None,
              "guide_fixed_labels": str(pair.fixed_labels) if pair.fixed_labels else None}
    return argparse.Namespace(**values)


def signature(pair_args: argparse.Namespace, card: dict) -> dict:
    """What a pair's outputs depend on (`card`: the model's card); kept in its qc.json so a later call knows
    whether they are current."""
    return {"moving": pair_args.moving, "fixed": pair_args.fixed, "moving_labels": pair_args.guide_moving_labels,
            "fixed_labels": pair_args.guide_fixed_labels, "model": str(Path(pair_args.model).resolve()),
            "model_weights_sha256": card.get("weights_sha256"), "refine": int(pair_args.refine),
            "similarity": pair_args.similarity, "no_affine": bool(pair_args.no_affine),
            "affine_method": pair_args.affine_method, "no_scale_search": bool(pair_args.no_scale_search),
            "report": bool(pair_args.report)}


def previous_outputs(out: Path, wanted: dict) -> tuple[str, dict | None]:
    """What `out` holds: ('complete', qc) every output made with `wanted` (the pair is skipped); ('partial',
    None) only outputs of this same pair, some missing (recomputed); ('missing', None) nothing; ('other',
    None) outputs of other inputs or options, or other files (recomputed only with --overwrite)."""
    from ..io.outputs import MASK_FILES, OUTPUT_FILES, known_outputs
    if not out.is_dir() or not any(out.iterdir()):
        return "missing", None
    names = list(OUTPUT_FILES.values()) + (list(REPORT_FILES) if wanted["report"] else [])
    try:
        qc = json.loads((out / OUTPUT_FILES["qc"]).read_text(encoding="utf-8"))
    except FileNotFoundError:
        qc = None
    except (OSError, ValueError):
        return "other", None
    if qc is not None and (not isinstance(qc, dict) or qc.get("batch") != wanted):
        return "other", None
    if qc is not None:   # the brain masks the run wrote (models without one write none)
        masks = qc.get("brain_mask_files")
        names += [name for name in masks if name in MASK_FILES.values()] if isinstance(masks, list) else []
    if qc is not None and all((out / name).is_file() for name in names):
        return "complete", qc
    known = known_outputs() | set(REPORT_FILES)
    return ("partial" if all(p.name in known for p in out.iterdir()) else "other"), None


def report_pair(name: str, row: dict, write) -> None:
    """One line per finished pair (and the traceback of an unexpected error) through `write`."""
    if row["status"] == "failed":
        write(f"{name}: FAILED: {row['error']}")
        if row.get("traceback"):
            write(row["traceback"])
    elif row["status"] == "done":
        check = {"ok": f", registration ok (agreement {row.get('agreement_mean')})",
                 "check": f", REGISTRATION NEEDS CHECKING (agreement {row.get('agreement_mean')}; "
                          "see its qc.json)"}.get(row.get("registration_status"), "")
        write(f"{name}: done in {row['seconds']:.1f} s, folding {row['folding_percent']}%, "
              f"det J [{row['jacobian_min']}, {row['jacobian_max']}]{check}")


# ------------------------------------------------------------------------------------------------ summary

def write_summary(path: Path, rows: list[dict]) -> None:
    """Write the summary CSV atomically (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def read_summary(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _rank_summary_path(out: Path, rank: int, world: int) -> Path:
    return out / f".summary.rank{rank}-of-{world}.csv"


# ---------------------------------------------------------------------------------------------- distribution

def ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside it."""
    try:
        return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError as err:
        raise JointRegSegError(f"RANK/WORLD_SIZE/LOCAL_RANK from torchrun are not numbers: {err}") from None


def _merge_after_barrier(out: Path, rank: int, world: int, order: dict[str, int], failures: int) -> int:
    """Wait for every rank; rank 0 merges the ranks' summaries; returns the failures of all ranks."""
    import datetime

    import torch
    import torch.distributed as dist
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group(backend="gloo", timeout=datetime.timedelta(seconds=_GROUP_TIMEOUT_S))
    try:
        dist.barrier()
        if rank == 0:
            rows = []
            for other in range(world):
                part = _rank_summary_path(out, other, world)
                if not part.is_file():
                    raise JointRegSegError(f"rank {other} wrote no summary ({part}); its pairs are not listed")
                rows += read_summary(part)
            rows.sort(key=lambda r: order.get(r["name"], math.inf))
            write_summary(out / SUMMARY_NAME, rows)
            for other in range(world):
                _rank_summary_path(out, other, world).unlink(missing_ok=True)
        total = torch.tensor([failures], dtype=torch.int64)
        dist.all_reduce(total)  # also waits until rank 0 has merged, so no rank exits before that
        return int(total.item())
    finally:
        if own_group:
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- processes, threads

def _gpu_present() -> bool:
    """Whether an NVIDIA GPU is likely there, without importing torch (the parent of the workers never does):
    the Linux driver's GPU list, else the driver's nvidia-smi on the PATH (Windows, WSL2)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or shutil.which("nvidia-smi") is not None


def plan_workers(requested, threads: dict, todo: list, card: dict, device: str) -> dict:
    """{"workers", "threads", "why", "thread_source"}: worker processes for this batch (or rank) and the
    intra-op threads of each.

    `requested`: "auto" or a number; `threads`: threads.choose_threads' choice, the threads this batch may
    use in all (`--threads`, JOINTREGSEG_THREADS, else the free cores of this rank's share), split between
    the workers. Automatic: on the CPU one worker per thread (capped by the pairs to do and by the memory
    the largest pair needs): small networks use a core each better than several cores together (measured
    on 2 cores, 1.5 mm brains: 2 workers x 1 thread compute a pair every ~1.6 s once started, one process
    with 2 threads every ~2.1 s); on a GPU one.
    """
    from ..io.imageio import available_memory_bytes
    budget = threads["threads"]
    if requested != "auto":
        workers, why = int(requested), "--workers"
    elif device.startswith("cuda") or (device == "auto" and _gpu_present()):
        workers, why = 1, "auto: one process per GPU"
    else:
        workers = budget
        why = (f"auto: {threads['cores']} cores, {threads['busy_cores']:g} busy with other work"
               if threads["source"] == "auto" else
               f"auto: {budget} thread{'s' if budget != 1 else ''} from {threads['source']}")
        if threads["workers"] > 1:
            why += f", shared by {threads['workers']} ranks"
        available = available_memory_bytes()
        needed = max((n for n in (_memory_or_none(job[1], card) for job in todo[:32]) if n), default=None)
        if available and needed and available // needed < workers:
            workers = int(available // needed)
            why += f", {available / 1024 ** 3:.1f} GB free for {needed / 1024 ** 3:.1f} GB per pair"
    workers = max(1, min(workers, len(todo)))
    return {"workers": workers, "threads": max(1, budget // workers), "why": why, "thread_source": threads["source"]}


def _memory_or_none(pair_args, card):
    from ..inference.job import run_memory_bytes
    try:
        return run_memory_bytes(pair_args, card)
    except JointRegSegError:
        return None  # an unreadable header fails its own pair later, with its message


def describe_plan(plan: dict) -> str:
    return (f"{plan['workers']} worker process{'es' if plan['workers'] != 1 else ''} x {plan['threads']} "
            f"thread{'s' if plan['threads'] != 1 else ''} ({plan['why']})")


# --------------------------------------------------------------------------------------------------- command

def _progress_bar(total: int, initial: int, rank: int, world: int):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="pair", file=sys.stderr, dynamic_ncols=True, mininterval=0.5,
                desc=f"rank {rank}/{world}" if world > 1 else "batch", position=0, leave=True)


def _cmd_batch(args) -> int:
    from ..models.card import read_card
    from ..inference.job import validate_run_options
    from ..core.threads import LoadProbe, choose_threads

    rank, world, local_rank = ranks()
    pairs = read_pairs(args.pairs, args.row_options)
    out = Path(args.out)
    for pair in pairs:  # option combinations `run` refuses are refused for the whole batch, before any work
        try:
            validate_run_options(pair_arguments(args, pair, out))
        except JointRegSegError as err:
            raise JointRegSegError(f"{args.pairs}, row {pair.row} ({pair.name}): {err}") from None
    if out.exists() and not out.is_dir():
        raise JointRegSegError(f"--out {out} is a file, not a folder; choose a folder")
    order = {pair.name: i for i, pair in enumerate(pairs)}
    shard = pairs[rank::world] if world > 1 else pairs
    card = read_card(args.model)   # the card alone: the weights are loaded where the pairs are computed
    # other programs' CPU load, measured while the pairs are looked at, decides the processes and threads
    probe = LoadProbe().start() if args.threads is None and not os.environ.get(THREADS_ENV, "").strip() else None
    probe_started = time.monotonic()

    # what each pair needs and what is already there (complete pairs are not read again)
    rows, todo = {}, []
    for pair in shard:
        pair_args = pair_arguments(args, pair, out)
        wanted = signature(pair_args, card)
        state, qc = previous_outputs(Path(pair_args.out), wanted)
        rows[pair.name] = {"name": pair.name, "out": pair_args.out, "status": "pending", "error": "", "seconds": ""}
        if state == "complete":
            rows[pair.name].update(status="skipped", **qc_fields(qc))
            continue
        # our own unfinished outputs are replaced; outputs of other inputs or options only with --overwrite
        pair_args.overwrite = bool(getattr(args, "overwrite", False)) or state == "partial"
        todo.append((pair, pair_args, wanted, state))

    busy = 0.0
    if probe is not None:
        time.sleep(max(0.0, _PROBE_S - (time.monotonic() - probe_started)))
        busy = probe.stop()
    plan = plan_workers(args.workers, choose_threads(args.threads, busy), todo, card, args.device)
    out.mkdir(parents=True, exist_ok=True)
    who = f"rank {rank}/{world}: " if world > 1 else ""
    print(f"{who}{len(shard)} of {len(pairs)} pairs ({len(todo)} to compute), model {card.get('name', args.model)}, "
          f"device {args.device}, {describe_plan(plan)}", file=sys.stderr, flush=True)

    summary_path = _rank_summary_path(out, rank, world) if world > 1 else out / SUMMARY_NAME

    def save():
        write_summary(summary_path, [rows[p.name] for p in shard])

    save()
    failures = 0
    bar = _progress_bar(len(shard), len(shard) - len(todo), rank, world)

    def started(pair):
        rows[pair.name]["status"] = "running"

    def finished(pair, row_update):
        nonlocal failures
        failures += row_update["status"] == "failed"
        rows[pair.name].update({k: v for k, v in row_update.items() if k != "traceback"})
        report_pair(pair.name, row_update, lambda text: bar.write(text, file=sys.stderr))
        save()
        bar.update(1)

    try:
        if plan["workers"] > 1:
            from .workers import run_in_workers

            def show_running():
                bar.set_postfix_str(", ".join(name for name, row in rows.items() if row["status"] == "running"))

            def started_shown(pair):
                started(pair)
                show_running()

            def finished_shown(pair, row_update):
                finished(pair, row_update)
                show_running()
            run_in_workers(todo, plan, args, (local_rank, world), started_shown, finished_shown)
        else:
            _run_here(todo, plan, args, local_rank, world, bar, started, finished)
    except BaseException as err:
        # stopped by the user: the pairs being computed are cancelled; by an error (a model the workers
        # cannot load): they were not computed
        interrupted = isinstance(err, (KeyboardInterrupt, SystemExit))
        for row in rows.values():
            if row["status"] == "running":
                row["status"] = "cancelled" if interrupted else "pending"
        raise
    finally:
        bar.close()
        save()

    if world > 1:
        failures = _merge_after_barrier(out, rank, world, order, failures)
    if rank == 0:
        final = read_summary(out / SUMMARY_NAME)
        counts = {status: sum(r["status"] == status for r in final) for status in ("done", "skipped", "failed")}
        print(f"batch: {counts['done']} done, {counts['skipped']} skipped (complete before), "
              f"{counts['failed']} failed; summary: {out / SUMMARY_NAME}")
    if failures and not args.allow_failures:
        if rank == 0:
            print(f"jointregseg batch: {failures} pair(s) failed (see {out / SUMMARY_NAME}); exit code 1 "
                  "(--allow-failures makes it 0)", file=sys.stderr)
        return 1
    return 0


def _run_here(todo, plan, args, local_rank, world, bar, started, finished) -> None:
    """The pairs one after the other in this process (one model load); a background thread reads the next
    pair while the current one is computed."""
    if not todo:
        return
    from .. import import_monai_lean
    from ..inference.job import read_run_inputs
    from ..core.threads import apply_threads
    import_monai_lean()
    apply_threads(plan["threads"])
    from ..models.checkpoint import load_model
    from ..core.device import resolve_device
    device = rank_device(args.device, local_rank, world)
    model = load_model(args.model, resolve_device(device), trust_unsigned=getattr(args, "trust_unsigned", False))
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jointregseg-prefetch")
    try:
        upcoming = reader.submit(read_run_inputs, todo[0][1]) if todo else None
        for index, (pair, pair_args, wanted, state) in enumerate(todo):
            inputs = upcoming
            # start reading the next pair now: it overlaps with this pair's registration
            upcoming = reader.submit(read_run_inputs, todo[index + 1][1]) if index + 1 < len(todo) else None
            stage_seen = [None]

            def progress(stage, _fraction, name=pair.name):
                if stage != stage_seen[0]:
                    stage_seen[0] = stage
                    bar.set_postfix_str(f"{name}: {stage}")

            bar.set_postfix_str(f"{pair.name}: reading")
            started(pair)
            pair_args.device = device
            finished(pair, run_pair(pair_args, wanted, state, model, inputs.result, progress))
            inputs = None  # free this pair's images before the next one
    finally:
        reader.shutdown(wait=True, cancel_futures=True)


def _workers(text: str):
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--workers must be auto or a positive whole number, got {text!r}")
    return value


def register(sub) -> None:
    """Add `batch` with every option of `run` except the per-pair paths (they come from the CSV)."""
    batch = sub.add_parser("batch", help="run a cohort of pairs from a CSV with one model load (resumable; "
                                         "shards over torchrun ranks)",
                           description="Register and segment every pair of a CSV (columns name, moving, fixed; "
                                       "optional moving_labels, fixed_labels and per-pair "
                                       f"{', '.join(ROW_OPTIONS)}; paths relative to the CSV). Outputs: "
                                       "OUT/<name>/ as `run` writes them, and OUT/summary.csv. Exit code 0 when "
                                       "every pair is done, 1 when some failed, 2 for a bad command or CSV.")
    batch.add_argument("--pairs", required=True, metavar="PAIRS.csv", help="the pairs to run")
    batch.add_argument("--out", required=True, metavar="DIR", help="output folder: DIR/<name>/, DIR/summary.csv")
    batch.add_argument("--allow-failures", action="store_true",
                       help="exit 0 even when some pairs failed (they are listed in summary.csv)")
    batch.add_argument("--workers", default="auto", type=_workers, metavar="N|auto",
                       help="processes computing pairs side by side, each loading the model once; the batch's "
                            "threads (--threads, else the free cores) are split between them (default auto: on "
                            "the CPU one per thread, fewer when memory or the pairs left are fewer; on a GPU one)")
    run = sub.choices.get("run")
    if run is None:
        raise JointRegSegError("internal: `batch` is registered before `run`")
    row_options = {}
    for action in run._actions:  # the same options as `run`, so the two never drift apart
        if action.dest in _PAIR_ARGUMENTS:
            continue
        shared = copy.copy(action)
        batch._add_action(shared)
        if action.dest in ROW_OPTIONS:
            row_options[action.dest] = shared
    batch.set_defaults(func=_cmd_batch, row_options=row_options)
