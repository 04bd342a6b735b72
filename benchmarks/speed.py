"""Whole-process speed as users run it: cold `jointregseg run`, warm `jointregseg batch`, ANTs SyN, same run.

    python benchmarks/speed.py [--threads 2] [--model M.safetensors] [--out benchmarks/speed]

Every time is the wall time of a whole process, start-up, reading and writing included, started from
this script one after the other (never side by side), each with the same thread count:
- `jointregseg run --moving M --fixed F --out D --threads T` (default options: network + velocity scale, no refinement), once per pair;
- `jointregseg batch --pairs P.csv --out D --threads T` over all pairs at once (model loaded once per
  worker), with its default workers (the T threads split between worker processes: T = 2 gives 2 workers
  x 1 thread), and `--workers 1 --threads T` (one process); per pair = the command's wall time / pairs;
- ANTs SyN as a user of antspyx runs it (benchmarks/syn_user.py): read both images,
  `ants.registration(type_of_transform="SyN")` (antspyx defaults: affine + SyN), warp the moving image
  and its label map onto the fixed grid, write them and the transforms.
Peak memory: the peak resident set of each process (/usr/bin/time), for the default batch the peak of
the summed resident memory of all its processes (sampled from /proc every 0.1 s), and a cold run on a
1 mm pair.
Accuracy of the timed outputs: registration Dice of the moving labels carried by each method's own
written transform (JointRegSeg: transform.h5; SyN: its warped label map) on the default label table's 14
structures. Pairs: those of benchmarks/heldout.py (1.5 mm; Colin27 held out of training; the
MNI152 / ICBM 2009c sides were training sources).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import heldout  # noqa: E402
from JointRegSegLib.data.label_table import LABEL_TABLE  # noqa: E402
from JointRegSegLib.evaluation.evaluate import read_pairs  # noqa: E402


def timed(command: list[str], env: dict, whole_tree: bool = False, interval: float = 0.1) -> tuple[float, float, str]:
    """(wall seconds, peak MB, stderr tail) of one whole process. The peak: the process's resident set from
    /usr/bin/time (put in front of `command`), or with `whole_tree` the summed resident memory of the process
    and all its descendants, sampled every `interval` s from /proc (`batch` with several workers is several
    processes, and /usr/bin/time reports only the largest; the sampling takes a little CPU here)."""
    import threading
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, done = [0.0], threading.Event()

    def sample():
        while not done.wait(interval):
            peak[0] = max(peak[0], _tree_rss_mb(process.pid))
    sampler = threading.Thread(target=sample, daemon=True) if whole_tree else None
    if sampler is not None:
        sampler.start()
    _, stderr = process.communicate()
    wall = time.perf_counter() - started
    done.set()
    if sampler is not None:
        sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed ({process.returncode}): {stderr[-2000:]}")
    return wall, peak[0] if whole_tree else _peak_from_time(stderr), stderr[-4000:]


def _tree_rss_mb(root: int) -> float:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text(encoding="ascii", errors="replace")
            parents[int(stat.parent.name)] = int(text[text.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    tree, grew = {root}, True
    while grew:
        extra = {pid for pid, parent in parents.items() if parent in tree and pid not in tree}
        tree |= extra
        grew = bool(extra)
    total_kb = 0
    for pid in tree:
        try:
            for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii", errors="replace").splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024.0


def _peak_from_time(stderr: str) -> float:
    for line in reversed(stderr.splitlines()):
        if line.startswith("PEAK_KB "):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def dice(warped_labels: sitk.Image, fixed_labels: sitk.Image) -> float:
    a = sitk.GetArrayFromImage(warped_labels)
    b = sitk.GetArrayFromImage(fixed_labels)
    scores = []
    for row in LABEL_TABLE:
        x, y = a == row["value"], b == row["value"]
        if y.any():
            scores.append(2.0 * np.count_nonzero(x & y) / (np.count_nonzero(x) + np.count_nonzero(y)))
    return float(np.mean(scores))


def ours_dice(out_dir: Path, moving_labels: Path, fixed_labels: Path) -> float:
    fixed = sitk.ReadImage(str(fixed_labels))
    transform = sitk.ReadTransform(str(out_dir / "transform.h5"))
    warped = sitk.Resample(sitk.ReadImage(str(moving_labels)), fixed, transform, sitk.sitkNearestNeighbor, 0)
    return dice(warped, fixed)


def one_mm_pairs(work: Path, time_cmd, jointregseg, threads: str, model, env, skip_syn: bool) -> list[dict]:
    """Cold `jointregseg run` and ANTs SyN side by side on 1 mm pairs onto the 1 mm MNI152 brain: Colin27's
    brain (`ch2bet`) and Colin27's head as the scanner wrote it (`ch2`: skull, scalp), each on its own grid."""
    from JointRegSegLib.data import atlas_sources
    colin, colin_labels = atlas_sources.colin27_heldout()
    head = sitk.ReadImage(str(atlas_sources.MRICRON / "ch2.nii.gz"), sitk.sitkFloat32)
    mni, mni_labels = heldout._template("mni152")
    for name, image in (("colin27_1mm", colin), ("colin27head_1mm", head), ("mni152_1mm", mni)):
        sitk.WriteImage(image, str(work / f"{name}.nii.gz"), True)
    sitk.WriteImage(colin_labels, str(work / "colin27_1mm_labels.nii.gz"), True)
    sitk.WriteImage(mni_labels, str(work / "mni152_1mm_labels.nii.gz"), True)
    rows = []
    for moving in ("colin27_1mm", "colin27head_1mm"):
        row = {"pair": f"{moving}_to_mni152_1mm"}
        row["run_s"], row["run_peak_mb"], _ = timed(time_cmd + jointregseg + [
            "run", "--moving", str(work / f"{moving}.nii.gz"), "--fixed", str(work / "mni152_1mm.nii.gz"), "--out",
            str(work / f"run_{moving}"), "--threads", threads] + model, env)
        row["run_dice"] = ours_dice(work / f"run_{moving}", work / "colin27_1mm_labels.nii.gz",
                                    work / "mni152_1mm_labels.nii.gz")
        if not skip_syn:
            syn_out = work / f"syn_{moving}"
            row["syn_s"], row["syn_peak_mb"], _ = timed(
                time_cmd + [sys.executable, str(HERE / "syn_user.py"), str(work / f"{moving}.nii.gz"),
                            str(work / "mni152_1mm.nii.gz"), str(work / "colin27_1mm_labels.nii.gz"), str(syn_out)], env)
            row["syn_dice"] = dice(sitk.ReadImage(str(syn_out / "warped_moving_labels.nii.gz")),
                                   sitk.ReadImage(str(work / "mni152_1mm_labels.nii.gz")))
        rows.append(row)
        print(row, flush=True)
    return rows


def one_mm_lines(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        line = (f"- 1 mm pair {r['pair']} (cold run): {r['run_s']:.1f} s, peak {r['run_peak_mb']:.0f} MB, "
                f"Dice {r['run_dice']:.3f}")
        if "syn_s" in r:
            line += (f"; ANTs SyN {r['syn_s']:.1f} s, peak {r['syn_peak_mb']:.0f} MB, Dice {r['syn_dice']:.3f}: "
                     f"**{r['syn_s'] / r['run_s']:.1f}x** faster (issue 28 asks >= 5x)")
        lines.append(line)
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="checkpoint (default: the embedded default model)")
    parser.add_argument("--work", default=str(HERE / "work" / "speed"))
    parser.add_argument("--out", default=str(HERE / "speed"))
    parser.add_argument("--skip-syn", action="store_true")
    parser.add_argument("--machine-note", default="nothing else ran on the machine",
                        help="what else ran beside the benchmark, for the results header")
    parser.add_argument("--limit", type=int, default=None, help="only the first N pairs (a quick check)")
    parser.add_argument("--only-1mm", action="store_true",
                        help="only the 1 mm pairs (brain and head) against SyN, side by side")
    args = parser.parse_args(argv)
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": threads, "PYTHONPATH": str(HERE.parent)}
    time_cmd = ["/usr/bin/time", "-f", "PEAK_KB %M"] if Path("/usr/bin/time").is_file() else []
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pairs_csv = heldout.build_pairs(HERE / "work" / "heldout" / "pairs", 2)
    pairs = read_pairs(pairs_csv)[:args.limit]
    model = ["--model", args.model] if args.model else []
    script = Path(sys.executable).parent / "jointregseg"   # the console script users type
    jointregseg = [str(script)] if script.is_file() else [sys.executable, "-m", "JointRegSegLib"]
    if args.only_1mm:
        one_mm = one_mm_pairs(work, time_cmd, jointregseg, threads, model, env, args.skip_syn)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        text = (f"# 1 mm pairs, whole processes side by side\n\nGenerated {datetime.date.today()} by `python "
                f"benchmarks/speed.py --only-1mm{' --model ' + Path(args.model).name if args.model else ''}` with "
                f"{threads} threads for every process, one process at a time; {args.machine_note}.\n\n"
                + "\n".join(one_mm_lines(one_mm)) + "\n")
        (out / "ONE_MM.md").write_text(text, encoding="utf-8")
        print(text)
        return 0
    rows = []
    for pair in pairs:
        row = {"pair": pair.name}
        out = work / "run" / pair.name
        row["run_s"], row["run_peak_mb"], _ = timed(
            time_cmd + jointregseg + ["run", "--moving", str(pair.moving), "--fixed", str(pair.fixed), "--out",
                                      str(out), "--threads", threads] + model, env)
        row["run_dice"] = ours_dice(out, pair.moving_labels, pair.fixed_labels)
        if not args.skip_syn:
            syn_out = work / "syn" / pair.name
            row["syn_s"], row["syn_peak_mb"], _ = timed(
                time_cmd + [sys.executable, str(HERE / "syn_user.py"), str(pair.moving), str(pair.fixed),
                            str(pair.moving_labels), str(syn_out)], env)
            row["syn_dice"] = dice(sitk.ReadImage(str(syn_out / "warped_moving_labels.nii.gz")),
                                   sitk.ReadImage(str(pair.fixed_labels)))
        rows.append(row)
        print(row, flush=True)

    batch_csv = work / "batch_pairs.csv"
    with open(batch_csv, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "moving", "fixed"])
        for pair in pairs:
            writer.writerow([pair.name, str(pair.moving), str(pair.fixed)])
    # batch with its default workers (`--workers auto`): the same T threads as every other process, split
    # between worker processes (T = 2: 2 workers x 1 thread)
    batch_s, batch_peak, batch_err = timed(jointregseg + ["batch", "--pairs", str(batch_csv), "--out",
                                                          str(work / "batch"), "--threads", threads] + model, env,
                                           whole_tree=True)
    batch_plan = next((line.split(", device ")[-1].split(" ", 1)[-1] for line in batch_err.splitlines()
                       if "worker process" in line), "?")
    one_s, one_peak, _ = timed(time_cmd + jointregseg + ["batch", "--pairs", str(batch_csv), "--out",
                                                        str(work / "batch_one"), "--workers", "1", "--threads",
                                                        threads] + model, env)
    for row, pair in zip(rows, pairs):
        row["batch_dice"] = ours_dice(work / "batch" / pair.name, pair.moving_labels, pair.fixed_labels)
        row["batch_one_dice"] = ours_dice(work / "batch_one" / pair.name, pair.moving_labels, pair.fixed_labels)

    one_mm = one_mm_pairs(work, time_cmd, jointregseg, threads, model, env, args.skip_syn)

    n = len(rows)
    mean = lambda key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    real = [r for r in rows if not r["pair"].startswith("synthetic")]
    real_mean = lambda key: float(np.mean([r[key] for r in real]))  # noqa: E731
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cpu = platform.processor() or platform.machine()
    lines = [
        "# Whole-process speed, as users run it\n",
        f"Generated {datetime.date.today()} by `python benchmarks/speed.py{' --model ' + Path(args.model).name if args.model else ''}`"
        f" on {os.cpu_count()} CPU cores ({cpu}), {threads} threads for every process, one process at a time; "
        f"{args.machine_note}. Wall time of whole processes: start-up, "
        "reading, writing included. Dice: the moving labels carried by each tool's own written output, 14 "
        "structures.\n",
        "| pair | `jointregseg run` s | peak MB | Dice | ANTs SyN s | peak MB | Dice | SyN / run |",
        "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        syn = (f"{r['syn_s']:.1f} | {r['syn_peak_mb']:.0f} | {r['syn_dice']:.3f} | {r['syn_s'] / r['run_s']:.1f}x"
               if "syn_s" in r else "- | - | - | -")
        lines.append(f"| {r['pair']} | {r['run_s']:.1f} | {r['run_peak_mb']:.0f} | {r['run_dice']:.3f} | {syn} |")
    summary = [f"\n- cold `jointregseg run`: mean {mean('run_s'):.1f} s per pair"]
    if "syn_s" in rows[0]:
        summary[0] += (f"; ANTs SyN {mean('syn_s'):.1f} s: **{mean('syn_s') / mean('run_s'):.1f}x** faster "
                       "(issue 15 asks >= 5x)")
    summary.append(f"- `jointregseg batch` over the {n} pairs (default: {batch_plan}): {batch_s:.1f} s, "
                   f"{batch_s / n:.2f} s per pair"
                   + (f": **{mean('syn_s') / (batch_s / n):.1f}x** faster per pair than SyN (issue 15 asks >= 20x)"
                      if "syn_s" in rows[0] else "") + f"; peak {batch_peak:.0f} MB (all its processes together)")
    summary.append(f"- `jointregseg batch --workers 1 --threads {threads}` (one process): {one_s:.1f} s, "
                   f"{one_s / n:.2f} s per pair" + (f" ({mean('syn_s') / (one_s / n):.1f}x)" if "syn_s" in rows[0]
                                                   else "") + f"; peak {one_peak:.0f} MB")
    summary.append(f"- registration Dice of the batch outputs: mean {mean('batch_dice'):.3f} over all pairs, "
                   f"{real_mean('batch_dice'):.3f} on the {len(real)} real cross-template pairs"
                   + (f" (SyN: {mean('syn_dice'):.3f} and {real_mean('syn_dice'):.3f})" if "syn_s" in rows[0] else ""))
    summary += one_mm_lines(one_mm)
    text = "\n".join(lines + summary) + "\n"
    (out / "RESULTS.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
