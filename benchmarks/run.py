"""Regenerate benchmarks/RESULTS.md: JointRegSeg against ANTs SyN, elastix and SimpleITK on the same
pairs, in one run, with the same threads.

    python benchmarks/run.py [--threads 2] [--synthetic 2] [--refine 50] [--work benchmarks/work]

Pairs (built offline from the installed atlases, see JointRegSegLib.data.sources):
- real cross-template pairs at 1 mm: MNI ICBM 2009c -> Colin27 and Colin27 -> MNI ICBM 2009c, each
  in its own native space and field of view, scored on the 8 structures both AAL versions define;
- synthetic subjects (random affine + smooth deformation + bias/contrast/noise of Colin27, 1.5 mm)
  registered to Colin27 (1 mm).
Peers run in their own processes (benchmarks/peers.py) with the interpreter named by $JRS_ANTS_PYTHON /
$JRS_ELASTIX_PYTHON (default: this one); a peer that is not installed is listed as not run.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from JointRegSegLib.data import sources  # noqa: E402
from JointRegSegLib.data.generator import synthesize  # noqa: E402
from JointRegSegLib.evaluation.evaluate import (environment_lines, evaluate, read_pairs,  # noqa: E402
                                                write_evaluation)
from JointRegSegLib.evaluation.methods import AffineOnly, ExternalMethod, Identity, JointRegSegMethod  # noqa: E402
from JointRegSegLib.core.geometry import center_of_mass, make_grid  # noqa: E402
from JointRegSegLib.models.installed import default_model_path  # noqa: E402
from JointRegSegLib.core.progress import stderr_progress  # noqa: E402

sys.path.insert(0, str(HERE))
from heldout import use_threads  # noqa: E402

PEERS = {"ants-syn": "JRS_ANTS_PYTHON", "ants-synquick": "JRS_ANTS_PYTHON", "elastix": "JRS_ELASTIX_PYTHON",
         "sitk-demons": None}
PEER_MODULE = {"JRS_ANTS_PYTHON": ("ants", "antspyx"), "JRS_ELASTIX_PYTHON": ("itk", "itk-elastix"), None: (None, None)}


def build_pairs(folder: Path, n_synthetic: int, seed: int = 11) -> Path:
    csv_path = folder / "pairs.csv"
    if csv_path.is_file():
        return csv_path
    folder.mkdir(parents=True, exist_ok=True)
    colin, mni = sources.colin27(), sources.mni2009c()
    for subject in (colin, mni):
        sitk.WriteImage(subject.image, str(folder / f"{subject.name}.nii.gz"), True)
        sitk.WriteImage(subject.labels, str(folder / f"{subject.name}_labels.nii.gz"), True)
    rows = ["name,moving,fixed,moving_labels,fixed_labels",
            "mni2009c_to_colin27,mni2009c.nii.gz,colin27.nii.gz,mni2009c_labels.nii.gz,colin27_labels.nii.gz",
            "colin27_to_mni2009c,colin27.nii.gz,mni2009c.nii.gz,colin27_labels.nii.gz,mni2009c_labels.nii.gz"]
    rng = np.random.default_rng(seed)
    grid = make_grid((120, 144, 120), (1.5, 1.5, 1.5), np.eye(3), center_of_mass(colin.image))
    for i in range(n_synthetic):
        image, labels = synthesize(colin.image, colin.labels, grid, rng, deform=True, strength=1.0)
        name = f"synthetic_{i}"
        sitk.WriteImage(image, str(folder / f"{name}.nii.gz"), True)
        sitk.WriteImage(labels, str(folder / f"{name}_labels.nii.gz"), True)
        rows.append(f"{name}_to_colin27,{name}.nii.gz,colin27.nii.gz,{name}_labels.nii.gz,colin27_labels.nii.gz")
    csv_path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return csv_path


def tool_version(python: str, module: str, package: str) -> str | None:
    code = (f"import importlib.metadata as m, {module}; print(m.version({package!r}))")
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace")
    return done.stdout.strip() if done.returncode == 0 else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--synthetic", type=int, default=2, help="number of synthetic pairs")
    parser.add_argument("--refine", type=int, default=50)
    parser.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of " + ",".join(PEERS))
    parser.add_argument("--work", default=str(HERE / "work"))
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args(argv)

    threads = use_threads(args.threads)
    import torch

    work = Path(args.work)
    pairs = read_pairs(build_pairs(work / "pairs", args.synthetic))
    model = args.model or str(default_model_path())
    methods = [Identity(), AffineOnly(), JointRegSegMethod(model, 0, "cpu", name="JointRegSeg"),
               JointRegSegMethod(model, args.refine, "cpu", name=f"JointRegSeg + refine {args.refine}")]
    versions, not_run = {}, []
    for peer in [p for p in args.peers.split(",") if p]:
        variable = PEERS[peer]
        python = os.environ.get(variable, sys.executable) if variable else sys.executable
        module, package = PEER_MODULE[variable]
        if module:
            version = tool_version(python, module, package)
            if version is None:
                not_run.append(f"{peer} ({package} not importable by {python})")
                continue
            versions[package] = version
        methods.append(ExternalMethod(peer, [python, str(HERE / "peers.py"), peer]))
    gpu = torch.cuda.is_available()
    if gpu:
        methods.append(JointRegSegMethod(model, 0, "cuda", name="JointRegSeg (GPU)"))

    rows = evaluate(pairs, methods, _labels(model), progress=stderr_progress)
    reference = "ants-syn" if any(r["method"] == "ants-syn" for r in rows) else None
    header = (f"# Benchmark: JointRegSeg vs ANTs, elastix, SimpleITK\n\n"
              f"Generated {datetime.date.today()} by `python benchmarks/run.py --threads {threads} --synthetic "
              f"{args.synthetic} --refine {args.refine}`; every method ran on the same pairs in this one run with "
              f"{threads} threads.\n\n{environment_lines()}"
              + "".join(f"- {name} {version}\n" for name, version in versions.items())
              + f"- model: {Path(model).name}\n"
              + (f"- not run: {'; '.join(not_run)}\n" if not_run else "")
              + ("" if gpu else "- GPU: not measured (no CUDA device on this machine)\n")
              + f"\nPairs: {', '.join(p.name for p in pairs)}. Time: registration only (inside each tool, "
                "excluding interpreter start and file IO); speed-up = ANTs SyN time / method time. Peak memory: "
                "resident memory of the process doing the work.\n\n")
    written = write_evaluation(rows, _labels(model), work / "evaluation", reference=reference, header=header)
    text = Path(written["summary"]).read_text(encoding="utf-8")
    text += ("\n![Dice per structure](dice_per_structure.png)\n\n![Time vs Dice](time_vs_dice.png)\n\n"
             "Per-pair, per-structure numbers: `results.csv`.\n")
    Path(args.results).write_text(text, encoding="utf-8")
    for name in ("dice_per_structure.png", "time_vs_dice.png", "results.csv"):
        shutil.copy(work / "evaluation" / name, Path(args.results).parent / name)
    print(text)
    return 0


def _labels(model):
    from JointRegSegLib.models.card import read_card
    return read_card(model)["labels"]


if __name__ == "__main__":
    sys.exit(main())
