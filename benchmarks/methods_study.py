"""The five seed methods side by side: same few-shot data (1 and 5 labelled images), same step budget,
same validation pairs.

    python benchmarks/methods_study.py --data DATA_FEWSHOT [--labelled 1 5] [--steps 300 150 300]
                                       [--jobs 2] [--out DIR]

For each labelled count a view of the dataset is made (the same images; only the first N labelled
candidates, in the builder's order, may supervise), each method trains from its committed config in
configs/ with the step budget replaced by --steps (registration pretraining, segmentation pretraining,
joint), one `jointregseg train` process per model (`--jobs` at a time, threads split between them), and
every model is evaluated in physical space on the validation pairs with `jointregseg evaluate`'s code.
Finished models are reused, so a stopped study continues. Writes DIR/METHODS.md and DIR/results.csv.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from JointRegSegLib.evaluation.evaluate import _fmt  # noqa: E402  (the tables share one number format)

METHODS = {"deepatlas": "configs/brain-t1-deepatlas.json", "deeprs": "configs/brain-t1-deeprs.json",
           "brbs": "configs/brain-t1-brbs.json", "pcreg-rt": "configs/brain-t1-pcreg-rt.json",
           "uresnet": "configs/brain-t1-uresnet.json"}


def dataset_view(data: Path, labelled: int, folder: Path) -> Path:
    """The dataset with only its first `labelled` label candidates usable for training."""
    manifest = json.loads((data / "dataset.json").read_text(encoding="utf-8"))
    candidates = [item for item in manifest["items"] if item["split"] == "train" and item["labels"]]
    if labelled > len(candidates):
        raise SystemExit(f"{data} has only {len(candidates)} training images with labels; cannot use {labelled}")
    for k, item in enumerate(candidates):
        item["labelled"] = k < labelled
    manifest["n_labelled"] = labelled
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("images", "labels"):
        link = folder / sub
        if not link.exists():
            link.symlink_to((data / sub).resolve(), target_is_directory=True)
    (folder / "dataset.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return folder


def train_one(method: str, view: Path, steps: list[int], out: Path, threads: int) -> dict:
    model = out / f"{method}.safetensors"
    if not model.is_file():
        config = json.loads((ROOT / METHODS[method]).read_text(encoding="utf-8"))
        config["steps"] = dict(zip(("reg_pretrain", "seg_pretrain", "joint"), steps))
        config["name"] = f"{method}-{view.name}"
        config_path = out / f"{method}.config.json"
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "PYTHONPATH": str(ROOT)}
        with open(out / f"{method}.train.log", "a", encoding="utf-8") as log:
            done = subprocess.run([sys.executable, "-m", "JointRegSegLib", "train", "--config", str(config_path),
                                   "--data", str(view), "--out", str(model), "--device", "cpu"],
                                  stdout=log, stderr=subprocess.STDOUT, env=env)
        if done.returncode:
            raise RuntimeError(f"training {method} on {view.name} failed; see {out / (method + '.train.log')}")
    from JointRegSegLib.card import read_card
    card = read_card(model)
    return {"model": model, "train_seconds": card["training"]["seconds_this_run"],
            "parameters": card["parameter_count"]}


def evaluate_models(pairs_csv: Path, trained: dict, out: Path) -> list[dict]:
    import torch
    torch.set_num_threads(2)
    from JointRegSegLib.evaluation.evaluate import evaluate, read_pairs, summarize, write_evaluation
    from JointRegSegLib.evaluation.methods import AffineOnly, Identity, JointRegSegMethod
    methods = [Identity(), AffineOnly()] + [JointRegSegMethod(info["model"], 0, "cpu", name=name)
                                            for name, info in trained.items()]
    label_table = methods[2].model.card["labels"]
    rows = evaluate(read_pairs(pairs_csv), methods, label_table)
    write_evaluation(rows, label_table, out)
    return summarize(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--labelled", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, nargs=3, default=[300, 150, 300],
                        metavar=("REG_PRETRAIN", "SEG_PRETRAIN", "JOINT"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "work" / "methods"))
    args = parser.parse_args(argv)
    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    views = {n: dataset_view(data, n, out / f"labelled_{n}" / "data") for n in args.labelled}
    jobs = [(n, method) for n in args.labelled for method in args.methods]
    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {job: pool.submit(train_one, job[1], views[job[0]], args.steps, out / f"labelled_{job[0]}",
                                    threads) for job in jobs}
        trained = {job: future.result() for job, future in futures.items()}
    print(f"trained {len(trained)} models in {time.perf_counter() - began:.0f} s", flush=True)
    sys.path.insert(0, str(HERE))
    from fewshot_pairs import main as write_pairs
    table = []
    for n in args.labelled:
        pairs_csv = out / f"labelled_{n}" / "pairs.csv"
        write_pairs(str(views[n]), str(pairs_csv))
        mine = {method: trained[(n, method)] for method in args.methods}
        for entry in evaluate_models(pairs_csv, mine, out / f"labelled_{n}" / "eval"):
            info = mine.get(entry["method"], {})
            table.append({"labelled": n, **entry, "train_seconds": info.get("train_seconds", float("nan")),
                          "parameters": info.get("parameters", 0)})
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    lines = [f"`python benchmarks/methods_study.py --data {args.data} --labelled {' '.join(map(str, args.labelled))} "
             f"--steps {' '.join(map(str, args.steps))} --jobs {args.jobs}`; {threads} thread(s) per training job, "
             f"evaluation on 2 threads, CPU.", "",
             "| labelled | method | registration Dice | segmentation Dice | HD95 mm | folding % | train s | "
             "inference s/pair | parameters |", "|---|---|---|---|---|---|---|---|---|"]
    for e in table:
        params = f"{e['parameters']:,}" if e["parameters"] else "–"
        lines.append(f"| {e['labelled']} | {e['method']} | {e['registration_dice']:.3f} ± {e['registration_dice_sd']:.3f}"
                     f" | {_fmt(e['segmentation_dice'])} | {e['hd95_mm']:.2f} | {e['folding_percent']:.4f} | {_fmt(e['train_seconds'], 0)} | "
                     f"{e['seconds']:.1f} | {params} |")
    text = "\n".join(lines) + "\n"
    (out / "METHODS.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
