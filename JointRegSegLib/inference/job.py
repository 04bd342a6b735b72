"""One Register & Segment run as `jointregseg run`, each `batch` pair and the Slicer worker do it: read the
inputs an argparse namespace names, refuse option combinations and runs that cannot fit before any work,
run the pipeline and write every output."""
from __future__ import annotations

from ..core.errors import JointRegSegError


def read_run_inputs(args) -> tuple:
    """(moving, fixed, guide labels or None) read from the paths `run` (and each `batch` pair) names."""
    from ..io.imageio import read_image
    moving = read_image(args.moving, "moving")
    fixed = read_image(args.fixed, "fixed")
    guide = None
    if bool(args.guide_moving_labels) != bool(args.guide_fixed_labels):
        raise JointRegSegError("label guidance needs both --guide-moving-labels and --guide-fixed-labels")
    if args.guide_moving_labels:
        guide = (read_image(args.guide_moving_labels, "moving guidance labels"),
                 read_image(args.guide_fixed_labels, "fixed guidance labels"))
    return moving, fixed, guide


def run_and_write(args, moving, fixed, guide, model, progress, extra_qc=None) -> tuple:
    """`run` on images already read: register, segment, write every output to args.out; (result, written).

    `model` is a checkpoint path or a loaded model (`batch` loads it once for all pairs).
    """
    from ..io.outputs import write_result
    from .pipeline import register_and_segment
    result = register_and_segment(moving, fixed, model, device=args.device, affine=not args.no_affine,
                                  affine_method=args.affine_method,
                                  scale_search=False if getattr(args, "no_scale_search", False) else None,
                                  refine_iterations=args.refine, refine_similarity=args.similarity,
                                  guide_labels=guide, progress=progress)
    written = write_result(result, args.out, extra_qc={"inputs": {"moving": str(args.moving),
                                                                  "fixed": str(args.fixed),
                                                                  "model": str(args.model)}, **(extra_qc or {})},
                           report_fixed=fixed if args.report else None,
                           replace=bool(getattr(args, "overwrite", False)), progress=progress)
    return result, written


def validate_run_options(args) -> None:
    """Option combinations that cannot do what they say; raises JointRegSegError before any work."""
    guided = bool(args.guide_moving_labels or args.guide_fixed_labels)
    if args.affine_method and args.no_affine:
        raise JointRegSegError(f"--affine-method {args.affine_method} chooses the affine pre-alignment that "
                               "--no-affine skips; drop one of them")
    if args.similarity and args.refine == 0 and not guided:
        raise JointRegSegError(f"--similarity {args.similarity} only applies to test-time refinement; "
                               "add --refine N (N > 0) or drop --similarity")


def check_run_resources(args) -> None:
    """Before reading any voxel: the output folder is usable and the run fits in memory."""
    from ..io.imageio import check_memory, check_output_dir
    check_output_dir(args.out, overwrite=bool(getattr(args, "overwrite", False)), known=_known_outputs())
    fixed, moving = _headers(args)
    if fixed and moving:
        limit = None if args.max_memory is None else int(args.max_memory * 1024 ** 3)
        check_memory(_memory_needed(fixed, moving, _card_of(args)), limit,
                     f"registering a {'x'.join(map(str, fixed['size']))} fixed volume")


def run_memory_bytes(args, card: dict | None = None) -> int | None:
    """The estimated peak memory of `run` on args.moving / args.fixed, from the file headers (None when a
    header cannot tell, e.g. a DICOM folder)."""
    fixed, moving = _headers(args)
    if not (fixed and moving):
        return None
    return _memory_needed(fixed, moving, card if card is not None else _card_of(args))


def _headers(args) -> tuple[dict, dict]:
    from ..io.imageio import read_image_information
    return read_image_information(args.fixed, "fixed"), read_image_information(args.moving, "moving")


def _card_of(args) -> dict:
    from ..models.card import read_card
    return read_card(args.model) if not hasattr(args.model, "card") else args.model.card


def _memory_needed(fixed: dict, moving: dict, card: dict) -> int:
    from ..io.imageio import estimate_run_memory_bytes
    working = 1
    for n in card["working_grid"]["size"]:
        working *= int(n)
    classes = max(int(e["value"]) for e in card["labels"]) + 1
    voxels = [1, 1]
    for i, info in enumerate((fixed, moving)):
        for n in info["size"][:3]:
            voxels[i] *= int(n)
    return estimate_run_memory_bytes(voxels[0], voxels[1], working, classes)


def _known_outputs():
    from ..io.outputs import known_outputs
    return known_outputs()


def check_overlap(moving, fixed) -> None:
    """--no-affine: the images must share physical space, or the network sees nothing to align."""
    from ..core.geometry import field_of_view_overlap
    if field_of_view_overlap(moving, fixed) <= 0:
        raise JointRegSegError("--no-affine: the moving and fixed volumes do not overlap in physical space "
                               "(their fields of view are disjoint), so the result would be empty; drop "
                               "--no-affine (the affine pre-alignment brings them together) or fix the origins")
