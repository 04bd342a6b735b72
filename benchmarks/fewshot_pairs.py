"""Write a `jointregseg evaluate` pairs CSV from a few-shot dataset's validation pairs (their labels were
never used in training): python benchmarks/fewshot_pairs.py DATASET_DIR OUT.csv"""
import csv
import json
import os
import sys
from pathlib import Path


def main(dataset: str, out_csv: str) -> int:
    dataset, out_csv = Path(dataset).resolve(), Path(out_csv).resolve()
    manifest = json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))
    items = {item["name"]: item for item in manifest["items"]}
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(out_csv, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "moving", "fixed", "moving_labels", "fixed_labels"])
        for pair in manifest["validation_pairs"]:
            moving, fixed = items[pair["moving"]], items[pair["fixed"]]
            relative = lambda p: os.path.relpath(dataset / p, out_csv.parent)  # noqa: E731
            writer.writerow([f"{moving['name']}_to_{fixed['name']}", relative(moving["image"]), relative(fixed["image"]),
                             relative(moving["labels"]), relative(fixed["labels"])])
    print(f"{len(manifest['validation_pairs'])} pairs written to {out_csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
