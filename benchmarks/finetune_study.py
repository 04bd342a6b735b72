"""Annotator loop study: does fine-tuning on 1, 3 and 5 corrected cases fix an appearance the default
model handles poorly?

    python benchmarks/finetune_study.py --data DATA_FEWSHOT [--counts 1 3 5] [--steps 300] [--out DIR]

The poorly handled appearance: T2-like contrast, made by inverting the T1 intensities inside the brain
(CSF bright, white matter dark) of the few-shot dataset's subjects. Corrected cases are inverted
training subjects with their (oracle) labels, as an annotator's corrections would be; the held-out
cases are the inverted validation subjects, never used for training. Writes DIR/FINETUNE.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from JointRegSegLib.models.installed import default_model_path  # noqa: E402
from JointRegSegLib.training.finetune import finetune  # noqa: E402


def inverted(image: sitk.Image) -> sitk.Image:
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    brain = array > 0
    top = np.percentile(array[brain], 99.5)
    out = sitk.GetImageFromArray(np.where(brain, np.clip(top - array, 0, None) + 0.05 * top, 0).astype(np.float32))
    out.CopyInformation(image)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--unlabelled", type=int, default=6)
    parser.add_argument("--out", default=str(HERE / "work" / "finetune"))
    args = parser.parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    manifest = json.loads((data / "dataset.json").read_text(encoding="utf-8"))
    train = [i for i in manifest["items"] if i["split"] == "train" and i["synthetic"] and i["labels"]]
    unlabelled_items = [i for i in manifest["items"] if i["split"] == "train" and i["synthetic"] and not i["labels"]]
    val = [i for i in manifest["items"] if i["split"] == "val"][:4]
    rows = []
    for count in args.counts:
        folder = out / f"cases_{count}"
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "labelled").mkdir(parents=True)
        (folder / "unlabelled").mkdir()
        # corrected cases sort before the held-out ones, which finetune(holdout=...) takes from the end
        for k, item in enumerate(train[:count]):
            sitk.WriteImage(inverted(sitk.ReadImage(str(data / item["image"]))), str(folder / "labelled" / f"case{k}.nrrd"))
            shutil.copy(data / item["labels"], folder / "labelled" / f"case{k}_labels.nii.gz")
        for k, item in enumerate(val):
            sitk.WriteImage(inverted(sitk.ReadImage(str(data / item["image"]))), str(folder / "labelled" / f"val{k}.nrrd"))
            shutil.copy(data / item["labels"], folder / "labelled" / f"val{k}_labels.nii.gz")
        for k, item in enumerate(unlabelled_items[:args.unlabelled]):
            sitk.WriteImage(inverted(sitk.ReadImage(str(data / item["image"]))), str(folder / "unlabelled" / f"u{k}.nrrd"))
        started = time.perf_counter()
        outcome = finetune(default_model_path(), folder / "labelled", out / f"finetuned_{count}.safetensors",
                           unlabelled_dir=folder / "unlabelled", holdout=len(val), device="cpu",
                           config={"steps": {"reg_pretrain": 0, "seg_pretrain": args.steps // 2,
                                             "joint": args.steps - args.steps // 2}})
        seconds = time.perf_counter() - started
        rows.append((count, outcome, seconds))
        print(count, outcome["before"]["segmentation_dice_mean"], outcome["after"]["segmentation_dice_mean"], seconds)
    lines = ["| corrected cases | seg Dice before | seg Dice after | reg Dice before | reg Dice after | time (s) |",
             "|---|---|---|---|---|---|"]
    for count, outcome, seconds in rows:
        b, a = outcome["before"], outcome["after"]
        lines.append(f"| {count} | {b['segmentation_dice_mean']:.3f} | {a['segmentation_dice_mean']:.3f} | "
                     f"{b['registration_dice_mean']:.3f} | {a['registration_dice_mean']:.3f} | {seconds:.0f} |")
    text = (f"# Fine-tuning from corrected cases (T2-like inverted contrast)\n\n"
            f"`python benchmarks/finetune_study.py --data {args.data} --counts {' '.join(map(str, args.counts))} "
            f"--steps {args.steps}`; {len(val)} held-out cases, {args.unlabelled} unlabelled images, CPU.\n\n"
            + "\n".join(lines) + "\n")
    (out / "FINETUNE.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
