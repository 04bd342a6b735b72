"""`jointregseg data build` and `jointregseg data import` sub-commands."""
from __future__ import annotations

import argparse

from ..core.arguments import number

IMPORT_DESCRIPTION = """\
Turn your own scans and label maps into a training data set folder for `jointregseg train --data`.

Every file SimpleITK reads in --images (and every sub-folder with one DICOM series) is an image, in any
orientation. A label map is named like its image (case01.nii.gz), in --labels, or with a suffix
_labels, _label, _seg, -labels, -label or -seg (case01_seg.nrrd), beside the images when --labels is not
given; it must lie on its image's voxel grid and hold values from the label table. Images without one
train as unlabelled images. The label table CSV has columns value,name[,color] (color #rrggbb or
three numbers); value 0 is background and is added if missing.

The first labelled image by name is the reference: every other image is affinely pre-aligned to it and
all are resampled onto one axis-aligned working grid centred on it. Every input is checked before any
alignment, and the output folder appears complete or not at all."""


_grid_side = number(int, what="a whole number of voxels", minimum=8, multiple_of=8)
_positive_mm = number(float, what="a number of mm", above=0)
_count = number(int, what="a whole number", minimum=0)


def _cmd_build(args) -> int:
    from ..core.progress import stderr_progress
    from ..core.threads import configure_command_threads
    # `run`'s thread decision (--threads, else the free cores), measured while the builder's modules import
    configure_command_threads(args.threads, modules=(f"{__package__}.build_heldout" if args.held_out
                                                     else f"{__package__}.build",))
    if args.held_out:
        from .build_heldout import build_heldout_dataset
        out = build_heldout_dataset(args.out, seed=args.seed, n_train=args.train, n_val=args.val,
                                    n_labelled=args.labelled, spacing=args.spacing, progress=stderr_progress)
    else:
        from .build import build_dataset
        out = build_dataset(args.out, seed=args.seed, n_train=args.train, n_val=args.val, n_labelled=args.labelled,
                            progress=stderr_progress)
    print(f"dataset written to {out}")
    return 0


def _cmd_import(args) -> int:
    from ..core.progress import stderr_progress
    from ..core.threads import configure_command_threads
    configure_command_threads(args.threads, modules=(f"{__package__}.importer",))
    from .importer import import_dataset
    out = import_dataset(args.images, args.labels, args.label_table, args.out, spacing_mm=args.spacing,
                         size=args.size, val=args.val, labelled=args.labelled, seed=args.seed,
                         modality=args.modality, progress=stderr_progress)
    from .dataset_format import load_manifest
    manifest = load_manifest(out)
    splits = [e["split"] for e in manifest["items"]]
    grid = manifest["working_grid"]
    print(f"dataset written to {out}: {splits.count('train')} training images ({manifest['n_labelled']} "
          f"supervising), {splits.count('val')} held out, working grid {grid['size']} x {grid['spacing'][0]} mm, "
          f"reference {manifest['import']['reference']}")
    return 0


def register(sub) -> None:
    data = sub.add_parser("data", help="make a training data set folder (your own scans, or the offline set)")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    build = data_sub.add_parser("build", help="templates + synthetic subjects -> a dataset folder")
    build.add_argument("--out", required=True)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--train", type=int, default=36, help="synthetic training subjects")
    build.add_argument("--val", type=int, default=8, help="synthetic validation subjects (labelled)")
    build.add_argument("--labelled", type=int, default=2, help="training images whose labels may be used")
    build.add_argument("--held-out", choices=["colin27"], default=None,
                       help="synthesise training subjects from every offline source except this anatomy and "
                            "validate on it (the generalisation protocol of benchmarks/methods_study.py)")
    build.add_argument("--spacing", type=float, default=2.5, help="working-grid spacing in mm (with --held-out)")
    build.add_argument("--threads", type=int, default=None, metavar="N",
                       help="intra-op threads (default: $JOINTREGSEG_THREADS, else the free cores, as `run`)")
    build.set_defaults(func=_cmd_build)
    imported = data_sub.add_parser("import", help="your own labelled scans -> a dataset folder",
                                   description=IMPORT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    imported.add_argument("--images", required=True, metavar="DIR",
                          help="folder of images (any SimpleITK format, or sub-folders with one DICOM series each)")
    imported.add_argument("--labels", default=None, metavar="DIR",
                          help="folder of label maps named like their images (default: label maps beside the "
                               "images, named NAME_labels, NAME_seg, ...)")
    imported.add_argument("--label-table", required=True, metavar="CSV",
                          help="CSV with columns value,name[,color]: the structures the label maps hold")
    imported.add_argument("--out", required=True, metavar="DATA",
                          help="new data set folder (must not exist or be empty)")
    imported.add_argument("--spacing", type=_positive_mm, default=None, metavar="MM",
                          help="working-grid spacing in mm (default: 2, coarser when the reference's field of "
                               "view needs more than 128 voxels a side; with --size: what fits the field of view)")
    imported.add_argument("--size", type=_grid_side, nargs=3, default=None, metavar=("X", "Y", "Z"),
                          help="working-grid size in voxels, multiples of 8 (default: the reference's field of "
                               "view at --spacing, at most 128 a side)")
    imported.add_argument("--val", type=_count, default=None, metavar="N",
                          help="labelled images held out for validation (their labels only measure the model; "
                               "default: 1 when two or more images have labels, else 0)")
    imported.add_argument("--labelled", type=_count, default=None, metavar="K",
                          help="how many labelled training images may supervise training, the first K by name "
                               "(default: all)")
    imported.add_argument("--seed", type=int, default=0, help="seed for choosing the held-out images (default: 0)")
    imported.add_argument("--modality", default="unspecified",
                          help="the kind of image, in words (e.g. 'CT abdomen'); goes into the model card "
                               "(default: unspecified)")
    imported.add_argument("--threads", type=int, default=None, metavar="N",
                          help="threads (default: $JOINTREGSEG_THREADS, else the free cores, as `run`)")
    imported.set_defaults(func=_cmd_import)
