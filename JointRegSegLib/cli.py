"""Command line: `jointregseg run | info` (training and data commands register themselves here too)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from .core.arguments import number
from .core.errors import Cancelled, JointRegSegError
from .core.known_warnings import quiet_known_warnings
from .inference.job import (check_overlap, check_run_resources, read_run_inputs, run_and_write,
                            validate_run_options)

DESCRIPTION = """\
JointRegSeg: deep joint registration and segmentation of 3D medical volumes.

Register a moving volume onto a fixed one and segment both with a trained model (the embedded
brain T1 model unless --model says otherwise); outputs are one ITK transform, the warped volume,
segmentations, a Jacobian map and QC numbers, all written at once (a failed run writes nothing).

  jointregseg run --moving M.nii.gz --fixed F.nrrd --out DIR [--report]
  jointregseg info MODEL.safetensors

Run `jointregseg COMMAND --help` for a command's options and their defaults. Exit codes:
0 done, 2 bad input or options (the message names the problem), 130 cancelled (Ctrl-C, SIGTERM)."""

RUN_EPILOG = """\
outputs in DIR: warped_moving.nii.gz, transform.h5 (ITK composite: the affine and the displacement on
the model's working grid; SimpleITK, ANTs and Slicer read it), displacement_field.nii.gz (the same on
the fixed grid, float32 mm), fixed/moving/warped segmentations (.nii.gz, .seg.nrrd),
jacobian_determinant.nii.gz, qc.json; with --report also report.md and qc_overview.png."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Show each option's default (options without one say what happens instead); keep line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" not in text and "default:" not in text and action.default is not None and action.default is not False \
                and action.default is not argparse.SUPPRESS and action.option_strings:
            text += " (default: %(default)s)"
        return text


_non_negative_int = number(int, what="a whole number of iterations", minimum=0)
_positive_float = number(float, above=0)


def _cmd_run(args) -> int:
    from . import import_monai_lean
    from .core.progress import stderr_progress
    from .core.threads import configure_threads
    validate_run_options(args)
    check_run_resources(args)
    configure_threads(args.threads, warmup=import_monai_lean)  # before anything imports MONAI (checkpoint)
    if not hasattr(args.model, "card"):
        from .models.checkpoint import load_model
        args.model = _Loaded(load_model(args.model, "cpu", trust_unsigned=args.trust_unsigned), args.model)
    moving, fixed, guide = read_run_inputs(args)
    if args.no_affine:
        check_overlap(moving, fixed)
    result, written = run_and_write(args, moving, fixed, guide, model=args.model.model, progress=stderr_progress)
    print_run_outcome(result.qc, written)
    return 0


def print_run_outcome(qc: dict, written: dict, out=None, err=None) -> None:
    """What `run` says when it has finished: the QC numbers and the files on `out` (stdout); when the
    registration's self-check says "check", a plain-words warning, and every warning of the run, on `err`
    (stderr), last, so they are what a terminal shows at the end. The exit code stays 0: the outputs are
    written; the warning says to look before using them. Results without a self-check print as before."""
    from .io.report import registration_check_sentence, registration_warnings, status_summary
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    print(f"folding {qc['folding_percent']:.4f}%  det J [{qc['jacobian_min']:.3f}, {qc['jacobian_max']:.3f}]  "
          f"time {qc['timing_s']['total']:.1f} s on {qc['device']}", file=out)
    verdict = status_summary(qc)
    if verdict:
        print(verdict, file=out)
    for flag in qc.get("volume_flags", []):
        print(f"warning: {flag}", file=out)
    for key, path in written.items():
        print(f"{key}: {path}", file=out)
    out.flush()
    sentence = registration_check_sentence(qc, picture="picture" in written)
    for warning in ([sentence] if sentence else []) + registration_warnings(qc):
        print(f"WARNING: {warning}", file=err)


class _Loaded:
    """A model loaded once by `run` (after the checksum check), printed as its path."""

    def __init__(self, model, path):
        self.model, self.card, self.path = model, model.card, path

    def __str__(self):
        return str(self.path)


def _cmd_info(args) -> int:
    from .models.card import read_card, summary_lines
    card = read_card(args.checkpoint)
    if args.json:
        print(json.dumps(card, indent=2))
        return 0
    print("\n".join(summary_lines(card)))
    return 0


def _version() -> str:
    from . import __version__
    return f"jointregseg {__version__}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jointregseg", description=DESCRIPTION, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="register moving onto fixed and segment both", formatter_class=_HelpFormatter,
                         description="Register the moving volume onto the fixed one and segment both.",
                         epilog=RUN_EPILOG)
    run.add_argument("--moving", required=True, help="moving volume (any SimpleITK format or a DICOM folder)")
    run.add_argument("--fixed", required=True, help="fixed volume (the outputs live on its grid)")
    run.add_argument("--model", default=None, help="checkpoint (.safetensors) (default: the embedded brain T1 model)")
    run.add_argument("--out", required=True, help="output folder (must be empty or new unless --overwrite)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace an earlier run's outputs in --out (every known output file is removed or "
                          "rewritten; other files are left alone)")
    run.add_argument("--refine", type=_non_negative_int, default=0, metavar="N",
                     help="test-time refinement iterations (0: network only; 50 with guide labels)")
    run.add_argument("--similarity", choices=["lncc", "mi"], default=None,
                     help="refinement similarity, needs --refine N > 0 (default: the model card's, lncc)")
    run.add_argument("--no-affine", action="store_true", help="skip the affine pre-alignment")
    run.add_argument("--affine-method", choices=["torch", "classical"], default=None,
                     help="affine pre-alignment: torch (what the model card asks for: its learned affine and a "
                          "short MI polish, or MI on the working grid) or classical (SimpleITK Mattes MI on the "
                          "images, slower) (default: torch for cards that ask for it)")
    run.add_argument("--no-scale-search", action="store_true",
                     help="use the network's velocity as it is, without choosing its length among the model "
                          "card's `inference.scales` by image similarity")
    run.add_argument("--guide-moving-labels", default=None, metavar="LABELS",
                     help="corrected label map of the moving image: refinement also aligns it (with the next)")
    run.add_argument("--guide-fixed-labels", default=None, metavar="LABELS",
                     help="corrected label map of the fixed image (values from the model's label table)")
    run.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    run.add_argument("--report", action="store_true", help="also write a QC report (report.md, qc_overview.png)")
    run.add_argument("--trust-unsigned", action="store_true",
                     help="load a checkpoint whose model card has no weights checksum (only from a trusted source)")
    run.add_argument("--max-memory", type=_positive_float, default=None, metavar="GB",
                     help="refuse up front if the run is estimated to need more (default: the memory available now)")
    run.add_argument("--threads", type=int, default=None, metavar="N",
                     help="intra-op threads (default: $JOINTREGSEG_THREADS, else the free cores; README: Cohorts)")
    run.set_defaults(func=_cmd_run)
    info = sub.add_parser("info", help="print a checkpoint's model card", formatter_class=_HelpFormatter,
                          description="Print a summary of a checkpoint's model card (without loading its weights); "
                                      "--json prints the whole card.")
    info.add_argument("checkpoint", help="a .safetensors checkpoint")
    info.add_argument("--json", action="store_true", help="print the whole card as JSON")
    info.set_defaults(func=_cmd_info)
    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Sub-commands living in their own modules (training, data), added when present."""
    registrars = []
    for module_name in ("training.cli", "data.cli", "evaluation.cli", "cohort.batch"):
        try:
            module = __import__(f"{__package__}.{module_name}", fromlist=["register"])
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith(__package__):
                continue
            raise
        registrars.append(module.register)
    return registrars


class _Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: unwind (staged outputs are removed on the way) and exit 130."""


_STOP = {"signal": None}


def _on_signal(signum, _frame):
    _STOP["signal"] = signum
    raise _Interrupted(signal.Signals(signum).name)


def _install_signal_handlers() -> dict:
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, _on_signal)
        except (ValueError, OSError):  # not the main thread (e.g. called from a test runner thread)
            pass
    return previous


def _say_cancelled(args) -> None:
    if getattr(args, "pairs", None):   # batch: what is done stays done
        print(f"jointregseg: cancelled; pairs finished before are kept and listed in {Path(args.out) / 'summary.csv'}, "
              "the pairs being computed left nothing", file=sys.stderr)
    else:
        print("jointregseg: cancelled; the output folder holds all of this run's outputs or none of them",
              file=sys.stderr)


def main(argv=None) -> int:
    _STOP["signal"] = None
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = _install_signal_handlers()
    quiet_known_warnings()
    try:
        if getattr(args, "model", "unset") is None:
            from .models.installed import default_model_path
            args.model = default_model_path()
        return args.func(args)
    except (KeyboardInterrupt, Cancelled):
        _say_cancelled(args)
        return 130
    except JointRegSegError as err:
        print(f"jointregseg: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError:
        # a signal raised inside a SimpleITK callback comes back wrapped in a RuntimeError
        if _STOP["signal"] is not None:
            _say_cancelled(args)
            return 130
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def console_main() -> None:
    """The `jointregseg` command (and `python -m JointRegSegLib`): `main`, then exit without the
    interpreter's teardown. Unloading torch and MONAI took 0.40-0.48 s after every command had finished
    (about a tenth of a cold `run`); by then every output is written, closed and moved into place, so the
    process leaves at once with main's status. An exception still ends the normal way, with its traceback."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # whoever read stdout stopped reading (`jointregseg info MODEL | head`): nothing more to say, no
        # traceback; the status is a broken pipe's, as for commands that SIGPIPE ends (128 + 13)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)


if __name__ == "__main__":
    console_main()
