"""The training data set folder: the one on-disk format `jointregseg train --data DATA` reads.

`jointregseg data import` writes it from a user's own labelled scans, `jointregseg data build` from the
offline brain sources; anything else that writes this layout trains the same way.

Layout::

    DATA/dataset.json           the manifest (below)
    DATA/images/NAME.nii.gz     one image per item (any SimpleITK format works; .nii.gz is what we write)
    DATA/labels/NAME.nii.gz     its integer label map, for items that have one

Every image and label map in the folder lies on ONE working grid: the same size, spacing and direction
(the writers here give them one origin too; training never reads the origin). The training code stacks
them as tensors and registers pairs voxel by voxel on that grid, with no affine of its own, so the writer
pre-aligns every subject affinely to one reference anatomy first.

dataset.json, a JSON object (required fields first):

- ``format``: the string ``"jointregseg-dataset"``.
- ``version``: ``1``.
- ``items``: a non-empty list, one object per image:
    - ``name``: a unique identifier (the files are usually named after it).
    - ``image``: path of the image, relative to the folder.
    - ``labels``: path of its label map relative to the folder, or ``null`` (optional, default null).
      Label maps hold integer values from ``label_table``.
    - ``split``: ``"train"`` (used for training) or ``"val"`` (held out: validation only; optional,
      default ``"train"``).
    - ``labelled``: whether its labels may supervise training (only ``"train"`` items with labels; optional,
      default: true for a training item with labels). Training labels with ``labelled: false`` stay on disk for
      studies but the training code never reads them as supervision; ``"val"`` labels are for evaluation only.
    - ``source``: where the image came from, in words (optional, default: its name). Validation items
      whose source no training item shares count as held-out anatomy in the model card's metrics note.
    - ``synthetic``: whether the image was synthesised (optional, default false).
- ``working_grid``: ``{"size": [x, y, z], "spacing": [x, y, z] mm, "direction": 9 numbers, row-major}``;
  the direction is optional (default identity). Every file must have this size, spacing and direction.
  The trained model keeps it: `run` places the grid, this size and spacing, on the centre of mass of each
  new fixed image. Sizes must be divisible by the network's total downsampling (8 for the configs/ networks).
- ``label_table``: a list of ``{"value": int, "name": str, "color": [r, g, b] in 0..1}`` with unique
  values, the first entry ``{"value": 0, "name": "background", ...}``; an entry may also carry a
  ``terminology`` object (DICOM category / type / modifier codes, see data/label_table.py). The model's
  segmentation has max(value) + 1 classes; the card keeps the table.

Optional fields (a missing one takes its default):

- ``validation_pairs``: ``[{"moving": NAME, "fixed": NAME}]``, both items with labels; after training the
  model card's metrics (registration and segmentation Dice, folding) are measured on these pairs
  (default: none, and the card then has no validation figures).
- ``n_labelled``: how many training images may supervise (default: the number of ``labelled`` items).
- ``modality``: the kind of image, in words; it goes into the model card (default ``"unknown"``).
- ``seed``: the seed the writer used (default null).
- ``sources``: a list of objects describing where the data came from (name, source, licence) (default []).
- ``notes``: free text copied into the model card (default "").
- Writers may add their own fields (``held_out``, ``import``); readers ignore what they do not know.

`load_manifest` checks all of this (and that every file exists and lies on the working grid, from the
file headers) and names the field, item or file at fault, so a hand-written manifest fails with a
sentence instead of a KeyError deep in the training code.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import SimpleITK as sitk

from ..core.errors import JointRegSegError

FORMAT = "jointregseg-dataset"
VERSION = 1
MANIFEST_NAME = "dataset.json"
IDENTITY = [1, 0, 0, 0, 1, 0, 0, 0, 1]
HOW_TO_WRITE = ("`jointregseg data import` writes one from your own labelled scans, "
                "`jointregseg data build` the offline brain set")
# header geometry that counts as "the same grid": float32 NIfTI headers round spacing and direction
SPACING_TOLERANCE = 1e-3      # relative
DIRECTION_TOLERANCE = 1e-3


class DatasetFormatError(JointRegSegError, ValueError):
    """A data set folder or its dataset.json does not follow the format above."""


def write_manifest(folder: Path, items: list[dict], n_labelled: int, validation_pairs: list | None = None,
                   **fields) -> None:
    """Mark the few-shot labels and write dataset.json: only the first `n_labelled` training images with
    labels may supervise training (the other training labels stay on disk for oracle studies only);
    validation pairs run round the validation subjects unless `validation_pairs` names them.

    `fields` are the manifest's other fields (working_grid, label_table, seed, sources, notes, modality,
    ...); the manifest is checked against the format before it is written."""
    candidates = [e for e in items if e["split"] == "train" and e["labels"]]
    for entry in candidates[:n_labelled]:
        entry["labelled"] = True
    if validation_pairs is None:
        val = [e["name"] for e in items if e["split"] == "val"]
        validation_pairs = [{"moving": val[i], "fixed": val[(i + 1) % len(val)]} for i in range(len(val))]
    manifest = {"format": FORMAT, "version": VERSION, "modality": "MR-T1 brain-extracted",
                "n_labelled": n_labelled, "items": items, "validation_pairs": validation_pairs, **fields}
    validate_manifest(copy.deepcopy(manifest), Path(folder))   # the writer's own fields are what is written
    (Path(folder) / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def load_manifest(folder: str | Path) -> dict:
    """dataset.json of `folder`, checked against the format (with the optional fields' defaults filled in)
    and with every file present on the working grid; a DatasetFormatError names what is wrong."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise DatasetFormatError(f"{folder}: no such data set folder; {HOW_TO_WRITE}")
    if not path.is_file():
        raise DatasetFormatError(f"{folder}: no {MANIFEST_NAME}, so this is not a training data set folder; "
                                 f"{HOW_TO_WRITE}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetFormatError(f"{path}: not valid JSON ({err})") from None
    manifest = validate_manifest(manifest, folder)
    check_files(manifest, folder)
    return manifest


# ---- the checks -----------------------------------------------------------------------------------------

def _fail(folder: Path, problem: str):
    raise DatasetFormatError(f"{folder / MANIFEST_NAME}: {problem} (format: JointRegSegLib/data/dataset_format.py; "
                             f"{HOW_TO_WRITE})")


def validate_manifest(manifest, folder: Path) -> dict:
    """The manifest with its optional fields' defaults filled in; raises on the first field that is wrong."""
    if not isinstance(manifest, dict):
        _fail(folder, "the manifest is not a JSON object")
    if manifest.get("format") != FORMAT:
        _fail(folder, f"field 'format' must be {FORMAT!r}, found {manifest.get('format')!r}")
    if manifest.get("version") != VERSION:
        _fail(folder, f"field 'version' must be {VERSION}, found {manifest.get('version')!r} "
                      "(a newer JointRegSeg may read it)")
    for field in ("items", "working_grid", "label_table"):
        if field not in manifest:
            _fail(folder, f"required field '{field}' is missing")
    manifest["working_grid"] = _checked_grid(manifest["working_grid"], folder)
    _check_label_table(manifest["label_table"], folder)
    manifest["items"] = _checked_items(manifest["items"], folder)
    labelled_count = sum(e["labelled"] for e in manifest["items"])
    defaults = {"validation_pairs": [], "n_labelled": labelled_count, "modality": "unknown", "seed": None,
                "sources": [], "notes": ""}
    for field, default in defaults.items():
        if manifest.get(field) is None:
            manifest[field] = default
    _check_validation_pairs(manifest["validation_pairs"], manifest["items"], folder)
    if not isinstance(manifest["sources"], list):
        _fail(folder, "field 'sources' must be a list")
    if not isinstance(manifest["notes"], str):
        _fail(folder, "field 'notes' must be a string")
    return manifest


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _checked_grid(grid, folder: Path) -> dict:
    if not isinstance(grid, dict):
        _fail(folder, "field 'working_grid' must be an object with 'size', 'spacing' and 'direction'")
    size, spacing = grid.get("size"), grid.get("spacing")
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(n, int) and n > 0 for n in size)):
        _fail(folder, f"working_grid 'size' must be 3 positive whole numbers (x, y, z), found {size!r}")
    if not (isinstance(spacing, list) and len(spacing) == 3 and all(_is_number(s) and s > 0 for s in spacing)):
        _fail(folder, f"working_grid 'spacing' must be 3 positive numbers in mm, found {spacing!r}")
    direction = grid.get("direction", IDENTITY)
    if not (isinstance(direction, list) and len(direction) == 9 and all(_is_number(v) for v in direction)):
        _fail(folder, f"working_grid 'direction' must be 9 numbers (a row-major 3x3 matrix), found {direction!r}")
    return {**grid, "direction": direction}


def _check_label_table(table, folder: Path) -> None:
    if not isinstance(table, list) or not table:
        _fail(folder, "field 'label_table' must be a non-empty list of {value, name, color} entries")
    values = []
    for position, entry in enumerate(table):
        if not isinstance(entry, dict) or not {"value", "name", "color"} <= set(entry):
            _fail(folder, f"label_table entry {position} ({entry!r}) needs 'value', 'name' and 'color'")
        value, color = entry["value"], entry["color"]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            _fail(folder, f"label_table entry {position}: 'value' must be a whole number >= 0, found {value!r}")
        if not isinstance(entry["name"], str) or not entry["name"].strip():
            _fail(folder, f"label_table entry {position} (value {value}): 'name' must be a non-empty string")
        if not (isinstance(color, list) and len(color) == 3 and all(_is_number(c) and 0 <= c <= 1 for c in color)):
            _fail(folder, f"label_table entry {position} (value {value}): 'color' must be [r, g, b] in 0..1, "
                          f"found {color!r}")
        values.append(value)
    if values[0] != 0:
        _fail(folder, f"label_table must start with value 0 (background), found {values[0]} first")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        _fail(folder, f"label_table repeats the values {repeated}")


def _checked_items(items, folder: Path) -> list[dict]:
    if not isinstance(items, list) or not items:
        _fail(folder, "field 'items' must be a non-empty list of images")
    checked, names = [], set()
    for position, item in enumerate(items):
        if not isinstance(item, dict):
            _fail(folder, f"items[{position}] is not an object")
        for field in ("name", "image"):
            if not isinstance(item.get(field), str) or not item[field]:
                _fail(folder, f"items[{position}] needs '{field}' (a non-empty string)")
        name = item["name"]
        if name in names:
            _fail(folder, f"items: the name {name!r} appears twice")
        names.add(name)
        labels, split = item.get("labels"), item.get("split", "train")
        if labels is not None and (not isinstance(labels, str) or not labels):
            _fail(folder, f"item {name!r}: 'labels' must be a path or null, found {labels!r}")
        if split not in ("train", "val"):
            _fail(folder, f"item {name!r}: 'split' must be \"train\" or \"val\", found {split!r}")
        labelled = item.get("labelled", split == "train" and labels is not None)
        if not isinstance(labelled, bool):
            _fail(folder, f"item {name!r}: 'labelled' must be true or false, found {labelled!r}")
        if labelled and labels is None:
            _fail(folder, f"item {name!r} is 'labelled' but has no 'labels' file")
        checked.append({**item, "labels": labels, "split": split, "labelled": labelled and split == "train",
                        "source": item.get("source", name), "synthetic": bool(item.get("synthetic", False))})
    if not any(e["split"] == "train" for e in checked):
        _fail(folder, "no item has split \"train\"")
    return checked


def _check_validation_pairs(pairs, items: list[dict], folder: Path) -> None:
    if not isinstance(pairs, list):
        _fail(folder, "field 'validation_pairs' must be a list of {moving, fixed} objects")
    with_labels = {e["name"] for e in items if e["labels"]}
    for position, pair in enumerate(pairs):
        if not isinstance(pair, dict) or not {"moving", "fixed"} <= set(pair):
            _fail(folder, f"validation_pairs[{position}] needs 'moving' and 'fixed'")
        for role in ("moving", "fixed"):
            if pair[role] not in with_labels:
                _fail(folder, f"validation_pairs[{position}] {role} {pair[role]!r} is not an item with labels "
                              "(validation measures label overlap)")


def check_files(manifest: dict, folder: Path) -> None:
    """Every image and label map exists and lies on the working grid (read from the file headers)."""
    grid = manifest["working_grid"]
    for item in manifest["items"]:
        for role in ("image", "labels"):
            if item[role] is None:
                continue
            path = folder / item[role]
            if not path.exists():
                raise DatasetFormatError(f"{folder / MANIFEST_NAME}: item {item['name']!r}: {role} file {path} "
                                         "does not exist")
            off_grid = _grid_difference(path, grid)
            if off_grid:
                raise DatasetFormatError(f"{path}: not on the data set's working grid ({off_grid}); every file of "
                                         f"a data set lies on one grid ({HOW_TO_WRITE}, resampling onto it)")


def _grid_difference(path: Path, grid: dict) -> str:
    """'' when the file's header has the grid's size, spacing and direction; else what differs."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise DatasetFormatError(f"{path}: SimpleITK cannot read this file") from None
    size, spacing, direction = reader.GetSize(), reader.GetSpacing(), reader.GetDirection()
    if list(size[:3]) != list(grid["size"]) or any(n != 1 for n in size[3:]):
        return f"size {list(size)}, grid {grid['size']}"
    if any(abs(a - b) > SPACING_TOLERANCE * b for a, b in zip(spacing, grid["spacing"])):
        return f"spacing {[round(s, 4) for s in spacing[:3]]} mm, grid {grid['spacing']} mm"
    direction3 = direction if len(direction) == 9 else [direction[r * 4 + c] for r in range(3) for c in range(3)]
    if any(abs(a - b) > DIRECTION_TOLERANCE for a, b in zip(direction3, grid["direction"])):
        return f"direction {[round(v, 4) for v in direction3]}, grid {grid['direction']}"
    return ""
