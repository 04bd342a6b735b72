"""One pair of a cohort, run where it lands (the batch process itself or one of its workers): its device
under torchrun, and register + segment + write with the pair's failure returned as a summary row, not
raised."""
from __future__ import annotations

import argparse
import time
import traceback

from ..core.errors import JointRegSegError


def rank_device(device: str, local_rank: int, world: int) -> str:
    """Under torchrun each rank of a machine takes its own GPU (when the device is auto or bare cuda)."""
    import torch
    if world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return device


def _number(value, digits: int):
    return "" if value is None else round(float(value), digits)


def qc_fields(qc: dict) -> dict:
    """The key QC numbers of a pair for the summary."""
    return {"engine_seconds": _number((qc.get("timing_s") or {}).get("total"), 2),
            "folding_percent": _number(qc.get("folding_percent"), 5),
            "jacobian_min": _number(qc.get("jacobian_min"), 4), "jacobian_max": _number(qc.get("jacobian_max"), 4),
            "device": qc.get("device", ""), "refine_iterations": qc.get("refine_iterations", ""),
            "registration_status": qc.get("registration_status") or "",
            "agreement_mean": _number(qc.get("agreement_mean"), 4)}


def _error_text(err: BaseException) -> str:
    if isinstance(err, JointRegSegError):
        return " ".join(str(err).split())
    return f"{type(err).__name__}: {' '.join(str(err).split()) or 'no message'}"


def run_pair(pair_args: argparse.Namespace, wanted: dict, state: str, model, read, progress) -> dict:
    """Register and segment one pair and write its outputs; returns the summary row's new fields (status
    "done" or "failed", error, seconds, QC numbers, and "traceback" for an unexpected error). `read()`
    returns (moving, fixed, guide labels). A failure of this pair is returned, not raised; an interrupt is."""
    from ..inference.job import check_overlap, check_run_resources, run_and_write
    began = time.perf_counter()
    result = None
    try:
        if state == "other" and not pair_args.overwrite:
            raise JointRegSegError(f"{pair_args.out} holds outputs of other inputs or options (or other "
                                   "files); pass --overwrite to replace them")
        check_run_resources(pair_args)
        moving, fixed, guide = read()
        if pair_args.no_affine:
            check_overlap(moving, fixed)
        result, _written = run_and_write(pair_args, moving, fixed, guide, model=model, progress=progress,
                                         extra_qc={"batch": wanted})
    except Exception as err:  # noqa: BLE001  one pair's failure must not stop the cohort
        failed = {"status": "failed", "error": _error_text(err), "seconds": round(time.perf_counter() - began, 2)}
        if not isinstance(err, JointRegSegError):
            failed["traceback"] = "".join(traceback.format_exception(err)).rstrip()
        return failed
    return {"status": "done", "seconds": round(time.perf_counter() - began, 2), **qc_fields(result.qc)}
