"""Command line: `jointregseg run | info` (training and data commands register themselves here too)."""
from __future__ import annotations

import argparse
import json
import sys
import warnings

from .errors import JointRegSegError


def _cmd_run(args) -> int:
    from .imageio import read_image
    from .outputs import write_result
    from .pipeline import register_and_segment
    from .progress import stderr_progress
    moving = read_image(args.moving, "moving")
    fixed = read_image(args.fixed, "fixed")
    guide = None
    if bool(args.guide_moving_labels) != bool(args.guide_fixed_labels):
        raise JointRegSegError("label guidance needs both --guide-moving-labels and --guide-fixed-labels")
    if args.guide_moving_labels:
        guide = (read_image(args.guide_moving_labels, "moving guidance labels"),
                 read_image(args.guide_fixed_labels, "fixed guidance labels"))
    result = register_and_segment(moving, fixed, args.model, device=args.device, affine=not args.no_affine,
                                  refine_iterations=args.refine, refine_similarity=args.similarity,
                                  guide_labels=guide, progress=stderr_progress)
    written = write_result(result, args.out, extra_qc={"inputs": {"moving": str(args.moving),
                                                                  "fixed": str(args.fixed),
                                                                  "model": str(args.model)}})
    if args.report:
        from .report import write_report
        written["report"] = write_report(result, fixed, args.out)
    qc = result.qc
    print(f"folding {qc['folding_percent']:.4f}%  det J [{qc['jacobian_min']:.3f}, {qc['jacobian_max']:.3f}]  "
          f"time {qc['timing_s']['total']:.1f} s on {qc['device']}")
    for key, path in written.items():
        print(f"{key}: {path}")
    return 0


def _cmd_info(args) -> int:
    from .card import read_card
    card = read_card(args.checkpoint)
    if args.json:
        print(json.dumps(card, indent=2))
        return 0
    print(f"{card.get('name', 'unnamed')} — {card.get('description', '')}")
    print(f"  architecture: {card['architecture'].get('name')}  parameters: {card.get('parameter_count', '?')}")
    print(f"  modality: {card.get('modality', '?')}  intensity: {card['intensity']}")
    grid = card["working_grid"]
    print(f"  working grid: {grid['size']} voxels at {grid['spacing']} mm")
    print("  labels: " + ", ".join(f"{e['value']}={e['name']}" for e in card["labels"] if e["value"]))
    for key in ("training", "data", "metrics"):
        if key in card:
            print(f"  {key}: {json.dumps(card[key])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jointregseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="register moving onto fixed and segment both")
    run.add_argument("--moving", required=True, help="moving volume (any SimpleITK format or a DICOM folder)")
    run.add_argument("--fixed", required=True, help="fixed volume")
    run.add_argument("--model", default=None, help="checkpoint (.safetensors); default: the embedded model")
    run.add_argument("--out", required=True, help="output folder")
    run.add_argument("--refine", type=int, default=0, metavar="N", help="test-time refinement iterations")
    run.add_argument("--similarity", choices=["lncc", "mi"], default=None, help="refinement similarity")
    run.add_argument("--no-affine", action="store_true", help="skip the affine pre-alignment")
    run.add_argument("--guide-moving-labels", default=None, metavar="LABELS",
                     help="corrected label map of the moving image: refinement also aligns it (with the next)")
    run.add_argument("--guide-fixed-labels", default=None, metavar="LABELS",
                     help="corrected label map of the fixed image (values from the model's label table)")
    run.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    run.add_argument("--report", action="store_true", help="also write a QC report with overlay pictures")
    run.set_defaults(func=_cmd_run)
    info = sub.add_parser("info", help="print a checkpoint's model card")
    info.add_argument("checkpoint")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_cmd_info)
    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Sub-commands living in their own modules (training, data), added when present."""
    registrars = []
    for module_name in ("training.cli", "data.cli", "evaluation.cli"):
        try:
            module = __import__(f"{__package__}.{module_name}", fromlist=["register"])
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith(__package__):
                continue
            raise
        registrars.append(module.register)
    return registrars


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "model", "unset") is None:
        from .models import default_model_path
        args.model = default_model_path()
    warnings.filterwarnings("ignore", message=".*native grid_sample.*")
    warnings.filterwarnings("ignore", message=".*non-tuple sequence for multidimensional indexing.*")
    try:
        return args.func(args)
    except JointRegSegError as err:
        print(f"jointregseg: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jointregseg: cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
