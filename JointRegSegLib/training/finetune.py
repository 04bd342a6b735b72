"""Few-shot fine-tuning from an annotator's corrected cases (DeepAtlas losses, `train()` loop).

Folder format (what the Slicer module's "Annotate & refine" writes): for each case `NAME`, an image
`NAME.nrrd` (or .nii.gz / .nii / .mha) and its corrected labels `NAME_labels.nrrd` on the image's grid,
values from the model's label table. Images without a label file (in either folder) are unlabelled:
they take part in the registration pairs only.

All images are affinely aligned to the first labelled case and resampled onto the model's working grid
around it (what inference does per pair), written as a temporary few-shot dataset; `holdout` labelled
cases are kept out of training and measure the model before and after.
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path


from ..models.card import read_card
from ..core.errors import JointRegSegError
from ..core.geometry import working_grid

IMAGE_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha")
LABEL_SUFFIX = "_labels"

DEFAULT_FINETUNE = {
    "strategy": "deepatlas", "seed": 0,
    "steps": {"reg_pretrain": 0, "seg_pretrain": 150, "joint": 150}, "seg_every": 3,
    "weights": {"similarity": 1.0, "smooth": 1.0, "anatomy": 1.0, "supervised": 1.0},
    "lr": {"reg_pretrain": 2e-4, "seg_pretrain": 5e-4, "reg": 2e-4, "seg": 2e-4}, "checkpoint_every": 50,
}


def _stem(path: Path) -> str | None:
    for suffix in IMAGE_SUFFIXES:
        if path.name.endswith(suffix) and not path.name.endswith(".seg.nrrd"):
            return path.name[: -len(suffix)]
    return None


def list_cases(folder, need_labels: bool) -> dict[str, tuple[Path, Path | None]]:
    """name -> (image, labels or None), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise JointRegSegError(f"folder not found: {folder}")
    files = {}
    for path in sorted(folder.iterdir()):
        stem = _stem(path)
        if stem is not None:
            files[stem] = path
    cases = {}
    for stem, path in files.items():
        if stem.endswith(LABEL_SUFFIX):
            continue
        cases[stem] = (path, files.get(stem + LABEL_SUFFIX))
    if need_labels and not any(labels for _, labels in cases.values()):
        raise JointRegSegError(f"{folder}: no labelled case (NAME.nrrd + NAME{LABEL_SUFFIX}.nrrd)")
    return cases


def prepare_dataset(card: dict, labelled: dict, unlabelled: dict, holdout: int, out_dir: Path) -> dict:
    """Write the cases as a data set (data/dataset_format.py) on the model's working grid, as `data import`
    writes one (its label-map checks, its alignment to the first labelled case); returns the manifest."""
    from ..core.geometry import canonical_storage
    from ..data.dataset_format import IDENTITY, load_manifest, write_manifest
    from ..data.importer import Scan, check_label_map, import_scan
    from ..io.imageio import read_image
    names = list(labelled)
    held = names[len(names) - holdout:] if holdout else []
    scans = [Scan(name, image, labels) for name, (image, labels) in {**labelled, **unlabelled}.items()]
    values = {int(e["value"]) for e in card["labels"]}
    for scan in scans:
        if scan.labels is not None:
            check_label_map(scan, values, "of the model")
    reference = canonical_storage(read_image(labelled[names[0]][0], f"image {names[0]}"))
    grid = working_grid(reference, card)
    spec = card["working_grid"]
    out_dir.mkdir(parents=True)
    (out_dir / "images").mkdir()
    (out_dir / "labels").mkdir()
    items = [import_scan(scan, names[0], reference, grid, out_dir, "val" if scan.name in held else "train")
             for scan in scans]
    train_labelled = [n for n in names if n not in held]
    # validation: each held-out case as the fixed image of a pair from a training case; without a
    # held-out case, the training cases themselves (then the numbers say how well it fits them)
    targets = held or train_labelled
    pairs = []
    for i, target in enumerate(targets):
        others = [n for n in train_labelled if n != target] or [target]
        pairs.append({"moving": others[i % len(others)], "fixed": target})
    write_manifest(out_dir, items, len(train_labelled), validation_pairs=pairs, seed=0,
                   working_grid={"size": spec["size"], "spacing": spec["spacing"],
                                 "direction": spec.get("direction", list(IDENTITY))},
                   label_table=card["labels"], modality=card.get("modality", "unknown"), held_out=held,
                   sources=[{"name": "annotator corrections", "labelled": names, "unlabelled": list(unlabelled)}],
                   notes="fine-tuning set from corrected segmentations")
    return load_manifest(out_dir)


def finetune(init, labelled_dir, out_path, unlabelled_dir=None, holdout: int | None = None, config: dict | None = None,
             device="auto", progress=None, cancel=None) -> dict:
    """Fine-tune `init` on the corrected cases; write `out_path`; return {"before", "after", "improved"}.

    `holdout` defaults to 1 when there are at least 2 labelled cases, else 0.
    """
    from ..models.checkpoint import load_model, save_model
    from .dataset import load_fewshot
    from ..evaluation.validation import evaluate_pairs
    from .train import train
    card = read_card(init)
    cases = list_cases(labelled_dir, need_labels=True)
    if unlabelled_dir:
        cases.update({k: (image, None) for k, (image, _) in list_cases(unlabelled_dir, need_labels=False).items()
                      if k not in cases})
    labelled = {k: v for k, v in cases.items() if v[1] is not None}
    unlabelled = {k: v for k, v in cases.items() if v[1] is None}
    holdout = (1 if len(labelled) >= 2 else 0) if holdout is None else int(holdout)
    if holdout >= len(labelled):
        raise JointRegSegError(f"cannot hold out {holdout} of {len(labelled)} labelled cases; at least one must train")
    if len(labelled) - holdout + len(unlabelled) < 2:
        raise JointRegSegError(f"fine-tuning needs at least two training images (labelled or unlabelled) to pair; "
                               f"{labelled_dir} has {len(labelled)} labelled ({holdout} held out) and "
                               f"{len(unlabelled)} unlabelled: add corrected cases or images without labels")
    config = {**copy.deepcopy(DEFAULT_FINETUNE), **(config or {})}
    config.setdefault("name", f"{card.get('name', 'model')}-finetuned")
    config.setdefault("description", f"{card.get('description', '')} — fine-tuned on {len(labelled)} corrected cases")
    config.update({"architecture": card["architecture"], "intensity": card["intensity"],
                   "segment_foreground_only": card.get("segment_foreground_only", False),
                   "refinement": card.get("refinement", {"similarity": "lncc", "smoothness": 1.0,
                                                         "learning_rate": 0.05})})
    with tempfile.TemporaryDirectory(prefix="jrs-finetune-") as work:
        work = Path(work)
        manifest = prepare_dataset(card, labelled, unlabelled, holdout, work / "data")
        data = load_fewshot(work / "data", card["intensity"])
        before = evaluate_pairs(load_model(init), data)
        train(config, work / "data", out_path, init=init, device=device, progress=progress, cancel=cancel)
        model = load_model(out_path)
        after = model.card["metrics"]
    improved = after["segmentation_dice_mean"] >= before["segmentation_dice_mean"]
    model.card["finetune"] = {
        "parent": model.card.get("parent"), "labelled_cases": list(labelled), "held_out": manifest["held_out"],
        "unlabelled_cases": list(unlabelled), "metrics_before": before, "metrics_after": after,
        "improved": bool(improved),
        "measured_on": "held-out corrected cases" if manifest["held_out"] else "the training cases (none held out)"}
    model.card["data"]["folder"] = str(labelled_dir)
    save_model(model, out_path)
    return {"before": before, "after": after, "improved": improved, "held_out": manifest["held_out"]}
