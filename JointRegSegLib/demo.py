"""The README's main job: Register & Segment the bundled sample pair with the embedded default model."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .io.imageio import check_output_dir, read_image
from .models.installed import REPO_ROOT, default_model_path

SAMPLES = REPO_ROOT / "Resources" / "SampleData"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_output")
    parser.add_argument("--refine", type=int, default=30)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="intra-op threads (default: $JOINTREGSEG_THREADS, else the free cores, as `jointregseg run`)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*native grid_sample.*")
    warnings.filterwarnings("ignore", message=".*non-tuple sequence for multidimensional indexing.*")
    # the demo replaces its own earlier outputs (never other files in the folder)
    check_output_dir(args.out, overwrite=True)
    # `run`'s thread decision: the cores other programs leave free, measured while torch and MONAI import
    # (on a busy machine more threads than free cores make the refinement several times slower)
    from . import import_monai_lean
    from .core.threads import configure_threads, describe
    choice = configure_threads(args.threads, warmup=import_monai_lean)
    print(f"threads: {describe(choice)}", file=sys.stderr)
    from .io.outputs import write_result
    from .inference.pipeline import register_and_segment
    from .core.progress import stderr_progress
    moving = read_image(SAMPLES / "colin27_t1_brain_2mm.nii.gz", "moving")
    # the fixed image as the scanner wrote it (a head with skull and scalp): the default model finds the brains
    fixed = read_image(SAMPLES / "itk_brain_t1.nii.gz", "fixed")
    model = default_model_path()
    print(f"model {model.name}: registering Colin27's brain (moving) onto the ITK subject's head (fixed)",
          file=sys.stderr)
    result = register_and_segment(moving, fixed, model, device=args.device, refine_iterations=args.refine,
                                  progress=stderr_progress)
    out = Path(args.out)
    written = write_result(result, out, extra_qc={"inputs": {"moving": "colin27_t1_brain_2mm.nii.gz",
                                                             "fixed": "itk_brain_t1.nii.gz",
                                                             "model": model.name}},
                           report_fixed=fixed, replace=True)
    for key, path in written.items():
        print(f"{key:28s} {path}")
    qc = result.qc
    print(f"folding {qc['folding_percent']:.4f} %, total {qc['timing_s']['total']:.1f} s on {qc['device']}")
    print(f"registration self-check: {qc.get('registration_status')} (mean agreement {qc.get('agreement_mean')})")
    for flag in qc.get("volume_flags", []):
        print(f"warning: {flag}")
    for warning in qc.get("warnings", []):
        print(f"WARNING: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
