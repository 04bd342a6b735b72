"""Slicer: Register & Segment click to result, on real MRML (slicer-core, headless), as the module runs it.

    python benchmarks/slicer_click.py [--clicks 3] [--threads 2] [--out benchmarks/speed]

What is timed, wall clock in the Slicer process: the module is entered (`enter()` starts the warm engine
worker in the background, as when a user opens the module), then each click = `logic.process(moving,
fixed)` on volumes already in the scene (default model and options) until the transform, warped volume,
both segmentations and the Jacobian are nodes in the scene. Click 1 comes right after entering the
module, so it includes whatever is left of the worker's start-up; the later clicks hit the warm worker
(torch, MONAI and the model already loaded). Pair: Colin27 (oblique, 1.5 x 1.5 x 2.5 mm) onto the FSL
MNI152 template (1.5 mm), the first pair of benchmarks/heldout.py. The full Slicer application is not
installable here; its GUI is stubbed (Testing/slicer_runtime.py), the scene and nodes are Slicer's.
ANTs SyN on the same pair is timed by benchmarks/speed.py; this script writes SLICER.md beside its
RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "Testing"))
sys.path.insert(0, str(HERE))


class _Patch:
    """The two monkeypatch methods `slicer_runtime.import_module_file` uses, applied for good."""

    @staticmethod
    def setitem(mapping, key, value):
        mapping[key] = value

    @staticmethod
    def setattr(target, name, value, raising=True):
        setattr(target, name, value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clicks", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "speed"))
    args = parser.parse_args(argv)
    threads = str(args.threads)
    os.environ.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                       "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": threads})
    import SimpleITK as sitk
    import slicer
    import heldout
    from slicer_runtime import boot, import_module_file
    from JointRegSegLib.evaluation.evaluate import read_pairs
    from JointRegSegLib.slicer.mrml import ijk_to_ras

    pair = read_pairs(heldout.build_pairs(HERE / "work" / "heldout" / "pairs", 2))[0]
    boot()
    module = import_module_file(_Patch())
    volumes = []
    for path, name in ((pair.moving, "moving"), (pair.fixed, "fixed")):
        image = sitk.ReadImage(str(path), sitk.sitkFloat32)
        volumes.append(slicer.util.addVolumeFromArray(sitk.GetArrayFromImage(image), ijk_to_ras(image), name))
    logic = module.JointRegSegLogic()
    entered = time.perf_counter()
    logic.warmUp()                          # what the Widget's `enter()` does when the module opens
    clicks = []
    try:
        for _ in range(args.clicks):
            began = time.perf_counter()
            results = logic.process(*volumes, device="cpu")
            clicks.append(time.perf_counter() - began)
            assert results.transform is not None and results.fixed_segmentation is not None
            print(f"click {len(clicks)}: {clicks[-1]:.2f} s ({began - entered:.1f} s after entering the module)",
                  flush=True)
    finally:
        logic.stopWorker()
    warm = clicks[1:] or clicks
    text = "\n".join([
        "# Slicer: click to result\n",
        f"Generated {datetime.date.today()} by `python benchmarks/slicer_click.py` on {os.cpu_count()} CPU cores, "
        f"{threads} threads, real MRML (slicer-core, headless; Slicer's GUI stubbed). Pair {pair.name} (1.5 mm "
        "fixed). A click = `logic.process` until every result node is in the scene; the module was entered "
        "(warm worker started) just before click 1.\n",
        "| click | wall s |", "|---|---|",
        *[f"| {i + 1} | {s:.2f} |" for i, s in enumerate(clicks)],
        f"\n- warm click (mean of clicks 2..{len(clicks)}): **{sum(warm) / len(warm):.2f} s**; first click right "
        f"after entering the module: {clicks[0]:.2f} s",
    ]) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "SLICER.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
