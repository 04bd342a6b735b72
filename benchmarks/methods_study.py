"""The five seed methods side by side on anatomy held out of training, over several training seeds.

    python -m JointRegSegLib data build --held-out colin27 --out DATA --train 24 --val 6 --labelled 4
    python benchmarks/methods_study.py --data DATA [--seeds 0 1 2] [--steps 200 300 200] [--jobs 2]
                                       [--refine 50] [--out benchmarks/methods] [--work benchmarks/work/methods]

Training data: `DATA` (see JointRegSegLib/data/build_heldout.py): synthetic subjects of every offline
source except Colin27; the labelled images are distinct synthetic anatomies carrying two distinct label
maps. Each method trains from its committed config in configs/, with the step budget replaced by
--steps (registration pretraining, segmentation pretraining, joint) and its seed by each of --seeds,
one `jointregseg train` process per model, --jobs at a time, one thread each. Each trained model, and
each method's untrained initialisation (seed 0), is then evaluated in physical space on the pairs of
benchmarks/heldout.py: real cross-template pairs (Colin27 against the MNI152 / ICBM 2009c templates;
Colin27 is held out, the templates' anatomy was a training source) and synthetic Colin27 subjects onto
Colin27 (both sides held out). Network only (after the fast torch affine) and refined (--refine
iterations). ANTs SyN (antspyx defaults) and the classical affine run on the same pairs in the same
run. Finished models and evaluations are reused, so a stopped study continues.
Writes OUT/TABLE.md (mean +- sd over seeds) and OUT/results.csv (one row per model and pair). Segmentation
is scored apart on the pairs whose fixed image is Colin27 (held out) and on those whose fixed image is a
training template; beside it, label propagation: the registration Dice of the same model on the same
Colin27 pairs (the moving image's labels carried by the model's own registration), the bar a network
segmentation must clear to be worth having. `--table-from RESULTS_CSV` rewrites TABLE.md from a
results.csv alone. With
--previous RESULTS_CSV, the models of methods left out of --methods (and the peers, if not run here) are
taken from an earlier run's results.csv, so one method can be retrained without retraining the others.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

METHODS = {"deepatlas": "configs/brain-t1-deepatlas.json", "deeprs": "configs/brain-t1-deeprs.json",
           "brbs": "configs/brain-t1-brbs.json", "pcreg-rt": "configs/brain-t1-pcreg-rt.json",
           "uresnet": "configs/brain-t1-uresnet.json"}
STEP_KEYS = ("reg_pretrain", "seg_pretrain", "joint")


def _one_thread_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1",
            "PYTHONPATH": str(ROOT)}


def train_one(method: str, seed: int, steps: list[int], data: Path, folder: Path) -> Path:
    """Train (or reuse) one model; steps all 0 writes the method's initialisation."""
    model = folder / f"{method}_seed{seed}.safetensors"
    if model.is_file():
        return model
    config = json.loads((ROOT / METHODS[method]).read_text(encoding="utf-8"))
    config["steps"] = dict(zip(STEP_KEYS, steps))
    config["seed"] = seed
    config["name"] = f"{method}-seed{seed}-{'-'.join(map(str, steps))}"
    config_path = folder / f"{method}_seed{seed}.config.json"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    with open(folder / f"{method}_seed{seed}.train.log", "a", encoding="utf-8") as log:
        done = subprocess.run([sys.executable, "-m", "JointRegSegLib", "train", "--config", str(config_path),
                               "--data", str(data), "--out", str(model), "--device", "cpu"],
                              stdout=log, stderr=subprocess.STDOUT, env=_one_thread_env())
    if done.returncode:
        raise RuntimeError(f"training {method} seed {seed} failed; see {folder / (model.stem + '.train.log')}")
    return model


def evaluate_one(model: Path, pairs_csv: Path, refine: int, out_csv: Path) -> Path:
    """Evaluate one model on the held-out pairs in a one-thread child process (reused if done)."""
    if not out_csv.is_file():
        done = subprocess.run([sys.executable, str(Path(__file__)), "--evaluate-model", str(model), "--pairs",
                               str(pairs_csv), "--refine", str(refine), "--evaluation-out", str(out_csv)],
                              env=_one_thread_env(), capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"evaluating {model.name} failed:\n{done.stderr[-3000:]}")
    return out_csv


def _evaluate_model_main(model: str, pairs_csv: str, refine: int, out_csv: str) -> int:
    import torch
    torch.set_num_threads(1)
    from JointRegSegLib.evaluation.evaluate import evaluate, read_pairs
    from JointRegSegLib.evaluation.methods import JointRegSegMethod
    methods = [JointRegSegMethod(model, 0, "cpu", name="network", affine_method="torch",
                                 segmentation_mode="network")]
    if refine:
        methods.append(JointRegSegMethod(model, refine, "cpu", name="refined", affine_method="torch",
                                         segmentation_mode="network"))
    rows = evaluate(read_pairs(pairs_csv), methods, methods[0].model.card["labels"], hd95=False)
    _write_rows(rows, Path(out_csv))
    return 0


def _write_rows(rows: list[dict], path: Path) -> None:
    keys = ["pair", "method", "registration_dice", "segmentation_dice", "hd95_mm", "folding_percent", "seconds"]
    partial = path.with_suffix(".partial")
    with open(partial, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    partial.replace(path)


def _read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key in ("registration_dice", "segmentation_dice", "hd95_mm", "folding_percent", "seconds"):
            row[key] = float(row[key])
    return rows


def peers(pairs_csv: Path, out_csv: Path) -> list[dict]:
    """ANTs SyN and the affine steps on the same pairs, two threads, one after the other."""
    if out_csv.is_file():
        return _read_rows(out_csv)
    import torch
    torch.set_num_threads(2)
    from JointRegSegLib.data.label_table import LABEL_TABLE
    from JointRegSegLib.evaluation.evaluate import evaluate, read_pairs
    from JointRegSegLib.evaluation.methods import AffineOnly, ExternalMethod, Identity
    methods = [Identity(), AffineOnly(), ExternalMethod("ants-syn", [sys.executable, str(HERE / "peers.py"),
                                                                      "ants-syn"])]
    rows = evaluate(read_pairs(pairs_csv), methods, LABEL_TABLE)
    _write_rows(rows, out_csv)
    return rows


def _group(pair: str) -> str:
    return "synthetic" if pair.startswith("synthetic") else "real"


def _held_out_fixed(pair: str) -> bool:
    """The fixed image is Colin27 (no training image contains its anatomy); the other pairs' fixed image is a
    template whose anatomy, with its label map, was a training source."""
    return pair.endswith("_to_colin27")


GROUPS = {"real": lambda pair: _group(pair) == "real", "synthetic": lambda pair: _group(pair) == "synthetic",
          "colin27": _held_out_fixed, "template": lambda pair: not _held_out_fixed(pair)}


def _per_seed(rows: list[dict], key: str, group: str | None = None) -> float:
    values = [r[key] for r in rows if group is None or GROUPS[group](r["pair"])]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def previous_results(path: Path, skip: set[str]) -> tuple[dict, list[dict]]:
    """An earlier run's rows, {(method, seed): (rows, training)} for the methods not in `skip`, and its peer
    rows; training = {"seconds", "steps"}, nan where that run did not record them."""
    results, peer_rows = {}, []
    for row in _read_rows(path):
        if row["strategy"] == "peer":
            peer_rows.append(row)
            continue
        if row["strategy"] in skip:
            continue
        seed = row["seed"] if row["seed"] == "init" else int(row["seed"])
        training = {"seconds": float(row.get("train_seconds") or "nan"),
                    "steps": float(row.get("train_steps") or "nan")}
        results.setdefault((row["strategy"], seed), ([], training))[0].append(row)
    return results, peer_rows


def _spread(values: list[float]) -> str:
    values = [v for v in values if not np.isnan(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def summary_table(results: dict, peer_rows: list[dict], seeds: list[int]) -> list[str]:
    """results[(method, seed)] = (rows of that model: methods 'network', 'refined'; {"seconds", "steps"} of its
    training);
    seed 'init' = the method's untrained initialisation, shown in brackets."""
    lines = ["| method | seeds | reg. Dice real, network (untrained) | reg. Dice synthetic, network (untrained) | "
             "**seg. Dice, fixed = Colin27**, network (untrained) | **label propagation, fixed = Colin27**, network "
             "(untrained) | seg. Dice, fixed = a training template | reg. Dice real, refined | "
             "reg. Dice synthetic, refined | folding %, network | train steps | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    pick = lambda rows, name: [r for r in rows if r["method"] == name]  # noqa: E731
    for method in METHODS:
        trained = [results[(method, s)] for s in seeds if (method, s) in results]
        if not trained:
            continue
        column = lambda name, key, group=None: _spread([_per_seed(pick(rows, name), key, group)  # noqa: E731
                                                        for rows, _ in trained])
        init = results.get((method, "init"), ([], 0.0))[0]
        untrained = lambda key, group=None: f"({_per_seed(pick(init, 'network'), key, group):.3f})"  # noqa: E731
        seconds = [t["seconds"] for _, t in trained if not np.isnan(t["seconds"])]
        seconds_text = f"{np.mean(seconds):.0f} ± {np.std(seconds):.0f}" if seconds else "–"
        steps = sorted({int(t["steps"]) for _, t in trained if not np.isnan(t["steps"])})
        steps_text = "/".join(map(str, steps)) or "–"
        cells = [method, str(len(trained))]
        for key, group in (("registration_dice", "real"), ("registration_dice", "synthetic"),
                           ("segmentation_dice", "colin27"), ("registration_dice", "colin27")):
            cells.append(f"{column('network', key, group)} {untrained(key, group)}")
        cells += [column("network", "segmentation_dice", "template"), column("refined", "registration_dice", "real"),
                  column("refined", "registration_dice", "synthetic"), column("network", "folding_percent"),
                  steps_text, seconds_text]
        lines.append("| " + " | ".join(cells) + " |")
    for name in dict.fromkeys(r["method"] for r in peer_rows):
        mine = [r for r in peer_rows if r["method"] == name]
        lines.append(f"| {name} (no training) | – | {_per_seed(mine, 'registration_dice', 'real'):.3f} | "
                     f"{_per_seed(mine, 'registration_dice', 'synthetic'):.3f} | – | "
                     f"{_per_seed(mine, 'registration_dice', 'colin27'):.3f} | – | – | – | "
                     f"{_per_seed(mine, 'folding_percent'):.4f} | – | – |")
    return lines


def table_from(results_csv: Path, out: Path, seeds: list[int]) -> int:
    """TABLE.md from a results.csv alone (no training, no evaluation)."""
    results, peer_rows = previous_results(results_csv, set())
    lines = [f"Generated {datetime.date.today()} by `python benchmarks/methods_study.py --table-from {results_csv}"
             f" --seeds {' '.join(map(str, seeds))}` from the rows of that file (no model trained or evaluated).", "",
             *summary_table(results, peer_rows, seeds)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "TABLE.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, nargs=3, default=[200, 300, 200], metavar=("REG", "SEG", "JOINT"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--refine", type=int, default=50)
    parser.add_argument("--synthetic", type=int, default=2, help="synthetic Colin27 pairs")
    parser.add_argument("--work", default=str(HERE / "work" / "methods"))
    parser.add_argument("--out", default=str(HERE / "methods"))
    parser.add_argument("--previous", help="an earlier run's results.csv: methods not in --methods, and the "
                        "peers, are taken from it")
    parser.add_argument("--summary-only", action="store_true",
                        help="train and evaluate nothing: tabulate the models already evaluated in --work")
    parser.add_argument("--table-from", metavar="RESULTS_CSV",
                        help="train and evaluate nothing: write OUT/TABLE.md from a committed results.csv")
    parser.add_argument("--evaluate-model", help=argparse.SUPPRESS)
    parser.add_argument("--pairs", help=argparse.SUPPRESS)
    parser.add_argument("--evaluation-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.evaluate_model:
        return _evaluate_model_main(args.evaluate_model, args.pairs, args.refine, args.evaluation_out)
    if args.table_from:
        return table_from(Path(args.table_from), Path(args.out), args.seeds)
    if not args.data:
        parser.error("--data is required (build it with `jointregseg data build --held-out colin27`)")
    data, work, out = Path(args.data).resolve(), Path(args.work).resolve(), Path(args.out).resolve()
    if json.loads((data / "dataset.json").read_text(encoding="utf-8")).get("held_out") != ["colin27"]:
        raise SystemExit(f"{data} was not built with --held-out colin27: its validation anatomy may be a training one")
    from heldout import build_pairs
    pairs_csv = build_pairs(HERE / "work" / "heldout" / "pairs", args.synthetic)
    models, evaluations = work / "models", work / "evaluations"
    models.mkdir(parents=True, exist_ok=True)
    evaluations.mkdir(parents=True, exist_ok=True)

    def job(method, seed):
        steps = [0, 0, 0] if seed == "init" else args.steps
        began = time.perf_counter()
        model = train_one(method, 0 if seed == "init" else seed, steps, data,
                          models / ("init" if seed == "init" else "."))
        trained_s = time.perf_counter() - began
        rows = _read_rows(evaluate_one(model, pairs_csv, 0 if seed == "init" else args.refine,
                                       evaluations / f"{method}_{seed}.csv"))
        from JointRegSegLib.models.card import read_card
        card = read_card(model)
        training = {"seconds": card.get("training", {}).get("seconds_this_run", trained_s),
                    "steps": sum(card.get("training", {}).get("config", {}).get("steps", {}).values())}
        print(f"{method} seed {seed}: trained and evaluated", flush=True)
        return rows, training

    (models / "init").mkdir(exist_ok=True)
    # the costliest methods first, so the two lanes finish together
    jobs = [(m, s) for s in args.seeds for m in sorted(args.methods, key=lambda m: m != "brbs")]
    jobs += [(m, "init") for m in args.methods]
    if args.summary_only:
        def done(method, seed):
            model = models / ("init" if seed == "init" else ".") / f"{method}_seed{0 if seed == 'init' else seed}.safetensors"
            return (evaluations / f"{method}_{seed}.csv").is_file() and model.is_file()
        jobs = [key for key in jobs if done(*key)]
    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {key: pool.submit(job, *key) for key in jobs}
        results = {key: future.result() for key, future in futures.items()}
    print(f"trained and evaluated {len(results)} models in {time.perf_counter() - began:.0f} s", flush=True)
    carried, previous_peers = previous_results(Path(args.previous), set(args.methods)) if args.previous else ({}, [])
    results = {**carried, **results}
    peers_carried = bool(previous_peers) and not (evaluations / "peers.csv").is_file()
    peer_rows = previous_peers if peers_carried else peers(pairs_csv, evaluations / "peers.csv")

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["strategy", "seed", "method", "pair", "registration_dice", "segmentation_dice", "hd95_mm",
                         "folding_percent", "seconds", "train_seconds", "train_steps"])
        for (method, seed), (rows, training) in results.items():
            recorded = ["" if np.isnan(training[k]) else f"{training[k]:.0f}" for k in ("seconds", "steps")]
            for r in rows:
                writer.writerow([method, seed, r["method"], r["pair"], f"{r['registration_dice']:.4f}",
                                 f"{r['segmentation_dice']:.4f}", f"{r['hd95_mm']:.3f}", f"{r['folding_percent']:.5f}",
                                 f"{r['seconds']:.2f}", *recorded])
        for r in peer_rows:
            writer.writerow(["peer", "", r["method"], r["pair"], f"{r['registration_dice']:.4f}",
                             f"{r['segmentation_dice']:.4f}", f"{r['hd95_mm']:.3f}", f"{r['folding_percent']:.5f}",
                             f"{r['seconds']:.2f}", "", ""])
    command = (f"python benchmarks/methods_study.py --data {args.data} --seeds {' '.join(map(str, args.seeds))} "
               f"--steps {' '.join(map(str, args.steps))} --jobs {args.jobs} --refine {args.refine} "
               f"--methods {' '.join(args.methods)}"
               + (f" --previous {args.previous}" if args.previous else "")
               + (" --summary-only" if args.summary_only else ""))
    lines = [f"Generated {datetime.date.today()} by `{command}`: {args.jobs} training/evaluation jobs at a time, one "
             "thread each, CPU; peers afterwards on 2 threads."
             + (f" Carried over from {args.previous}: {', '.join(sorted({m for m, _ in carried}))}"
                + (" and the peers" if peers_carried else "") + "." if carried else ""), "",
             *summary_table(results, peer_rows, args.seeds)]
    (out / "TABLE.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
