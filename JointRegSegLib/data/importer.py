"""`jointregseg data import`: a user's own labelled scans as a training data set (data/dataset_format.py).

What goes in:

- an images folder: every file SimpleITK reads (NIfTI, NRRD, MetaImage, ...) and every sub-folder holding
  one DICOM series is an image, in any orientation, voxel size and origin. Its name is the file name
  without the image extension (``case01.nii.gz`` -> ``case01``) or the DICOM folder's name. Hidden files,
  files SimpleITK cannot read (notes, CSVs) and the data halves of header/data pairs (``.raw`` beside
  ``.mhd``, ``.img`` beside ``.hdr``) are not images.
- label maps (optional per image), integer values from the label table, each on its image's voxel grid:
    - in a separate labels folder: named like their image (``case01.nii.gz``), or with one of the suffixes
      ``_labels``, ``_label``, ``_seg``, ``-labels``, ``-label``, ``-seg`` (``case01_seg.nrrd``); the
      format may differ from the image's;
    - or, without a labels folder, beside the images with one of those suffixes (then no image's own name
      may end with one).
  Images without a label map are unlabelled training images (registration learns from them too).
- a label table CSV: columns ``value,name[,color]`` (a header row naming them is optional); colour as
  ``#rrggbb``, or three numbers 0..1 or 0..255 (in one cell separated by spaces or semicolons, or in three
  cells). Value 0 is background and is added when the table leaves it out; values go up to 255 (the
  network has max(value) + 1 outputs).

What comes out (atomically: the folder appears complete or not at all): the reference is the first
labelled image by name; every other image is affinely pre-aligned to it (`affine_prealign`, SimpleITK
Mattes MI on the images) and every image (linear) and label map (nearest neighbour) resampled onto one
axis-aligned working grid centred on the reference's intensity centre of mass.

Validation split: ``val`` labelled images other than the reference (drawn with ``seed``) are held out;
their labels only measure the model (default: 1 when there are two or more labelled images, else 0).
Validation pairs: with two or more held out, each held-out image registers onto the next (round robin);
with one, a labelled training image (the first that supervises) registers onto it, so the segmentation
Dice is still measured on an image training never saw; with none there are no pairs and the model card
has no validation figures. ``labelled`` K: only the first K labelled training images by name (the
reference first) may supervise training (default: all); the others train as unlabelled images.
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..core.errors import InputImageError, JointRegSegError
from ..core.geometry import canonical_storage, center_of_mass, make_grid, physical_box, resample
from ..inference.affine import affine_prealign
from ..io.imageio import read_image, staged_output_dir, validate_volume
from .dataset_format import IDENTITY, write_manifest

LABEL_SUFFIXES = ("_labels", "_label", "_seg", "-labels", "-label", "-seg")
# extensions of two parts; every other extension is the text after the last dot
DOUBLE_EXTENSIONS = (".nii.gz", ".img.gz", ".hdr.gz", ".gipl.gz")
# files that are only the voxel data of a header file beside them
DATA_HALVES = {".raw": (".mhd",), ".zraw": (".mhd",), ".img": (".hdr",), ".img.gz": (".hdr", ".hdr.gz")}
# a file with one of these extensions that SimpleITK cannot read is a broken scan, not a stray note
IMAGE_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".hdr", ".dcm", ".gipl", ".gipl.gz",
                    ".mnc", ".vtk")
MAX_LABEL_VALUE = 255
DEFAULT_SPACING_MM = 2.0
MAX_GRID_SIDE = 128          # voxels per axis; a default grid grows its spacing instead of its size beyond it
GRID_MULTIPLE = 8            # the configs/ networks downsample 8 times
# a label map counts as on its image's grid within these (other tools round headers differently)
SPACING_TOLERANCE = 1e-3     # relative
ORIGIN_TOLERANCE_VOXELS = 0.05
DIRECTION_TOLERANCE = 1e-3


@dataclass
class Scan:
    name: str
    image: Path
    labels: Path | None = None


@dataclass
class Geometry:
    size: tuple
    spacing: tuple
    origin: tuple
    direction: tuple


def import_dataset(images_dir, labels_dir, label_table_csv, out_dir, *, spacing_mm: float | None = None,
                   size=None, val: int | None = None, labelled: int | None = None, seed: int = 0,
                   modality: str = "unspecified", progress=None) -> Path:
    """Write the data set folder `out_dir` from the scans (module docstring: what is read, how it is
    aligned and split); every input is checked before any alignment starts. Returns `out_dir`."""
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    table = read_label_table(label_table_csv)
    scans = match_scans(images_dir, labels_dir)
    known_values = {entry["value"] for entry in table}
    for scan in scans:
        if scan.labels is not None:
            check_label_map(scan, known_values, label_table_csv)
    labelled_names = [s.name for s in scans if s.labels is not None]
    val_names, supervising = choose_splits(labelled_names, [s.name for s in scans], val, labelled, seed, images_dir)
    reference_scan = next(s for s in scans if s.name == labelled_names[0])
    reference = canonical_storage(_read_volume(reference_scan.image, reference_scan.name))
    grid_spec = working_grid_spec(reference, spacing_mm, size)
    grid = make_grid(grid_spec["size"], grid_spec["spacing"], np.eye(3), center_of_mass(reference))
    items = []
    with staged_output_dir(out_dir) as staging:
        (staging / "images").mkdir()
        (staging / "labels").mkdir()
        for done, scan in enumerate(scans):
            items.append(import_scan(scan, reference_scan.name, reference, grid, staging,
                                      "val" if scan.name in val_names else "train"))
            if progress:
                progress("import data", (done + 1) / len(scans))
        write_manifest(staging, items, len(supervising), validation_pairs=validation_pairs(val_names, supervising),
                       modality=modality, seed=seed, working_grid=grid_spec, label_table=table,
                       sources=[_source_record(images_dir, labels_dir, label_table_csv)],
                       notes=_notes(scans, reference_scan.name, grid_spec),
                       **{"import": {"reference": reference_scan.name, "val": val_names,
                                     "supervising": supervising}})
    return out_dir


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise JointRegSegError(f"--out {out_dir}: exists and is not an empty folder; choose a new folder "
                               "(an import never mixes with earlier files)")


# ---- the label table ------------------------------------------------------------------------------------

def read_label_table(path) -> list[dict]:
    """[{value, name, color}] from the CSV (module docstring), background first, sorted by value."""
    path = Path(path)
    if not path.is_file():
        raise JointRegSegError(f"label table {path}: file not found")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = [(number, [cell.strip() for cell in row]) for number, row in enumerate(csv.reader(handle), start=1)]
    rows = [(number, row) for number, row in rows if any(row)]
    if rows and rows[0][1][0].lower() == "value":
        header = [cell.lower() for cell in rows[0][1]]
        rows = [(number, _by_header(header, row)) for number, row in rows[1:]]
    if not rows:
        raise JointRegSegError(f"label table {path}: no rows (expected lines of value,name[,color])")
    table, values, names = [], set(), set()
    for number, row in rows:
        entry = _table_entry(row, f"label table {path}, line {number}")
        if entry["value"] in values:
            raise JointRegSegError(f"label table {path}, line {number}: value {entry['value']} appears twice")
        if entry["name"].lower() in names:
            raise JointRegSegError(f"label table {path}, line {number}: name {entry['name']!r} appears twice")
        values.add(entry["value"])
        names.add(entry["name"].lower())
        table.append(entry)
    if 0 not in values:
        table.append({"value": 0, "name": "background", "color": [0.0, 0.0, 0.0]})
    if len(table) < 2:
        raise JointRegSegError(f"label table {path}: only background; name at least one structure")
    table.sort(key=lambda e: e["value"])
    for position, entry in enumerate(table):
        if entry["color"] is None:
            entry["color"] = _distinct_colour(position)
    return table


def _by_header(header: list[str], row: list[str]) -> list[str]:
    """A row in value, name, colour order from a CSV whose header names its columns."""
    column = {name: index for index, name in enumerate(header)}
    cell = lambda index: row[index] if index is not None and index < len(row) else ""  # noqa: E731
    colour_at = column.get("color", column.get("colour"))
    if colour_at is None:
        colour = []
    elif colour_at == len(header) - 1:
        colour = row[colour_at:]      # an unquoted r,g,b in the last column spills into the cells after it
    else:
        colour = [cell(colour_at)]
    return [cell(column.get("value")), cell(column.get("name")), *colour]


def _table_entry(row: list[str], where: str) -> dict:
    if len(row) < 2 or not row[1]:
        raise JointRegSegError(f"{where}: expected value,name[,color], found {','.join(row)!r}")
    try:
        value = int(row[0])
    except ValueError:
        raise JointRegSegError(f"{where}: value {row[0]!r} is not a whole number") from None
    if not 0 <= value <= MAX_LABEL_VALUE:
        raise JointRegSegError(f"{where}: value {value} is outside 0..{MAX_LABEL_VALUE} (the network has max(value) "
                               "+ 1 outputs: number the structures 1, 2, 3, ...)")
    colour_cells = [cell for cell in row[2:] if cell]
    return {"value": value, "name": row[1], "color": _colour(colour_cells, where) if colour_cells else None}


def _colour(cells: list[str], where: str) -> list[float]:
    text = " ".join(cells)
    if re.fullmatch(r"#[0-9a-fA-F]{6}", text):
        return [round(int(text[i:i + 2], 16) / 255, 3) for i in (1, 3, 5)]
    try:
        numbers = [float(part) for part in re.split(r"[\s;,/]+", text) if part]
    except ValueError:
        numbers = []
    if len(numbers) != 3 or not all(0 <= n <= 255 for n in numbers):
        raise JointRegSegError(f"{where}: colour {text!r} is not #rrggbb or three numbers (0..1 or 0..255)")
    scale = 255.0 if max(numbers) > 1 else 1.0
    return [round(n / scale, 3) for n in numbers]


def _distinct_colour(position: int) -> list[float]:
    """Background black; structures step round the hue circle by the golden angle (neighbours differ)."""
    import colorsys
    if position == 0:
        return [0.0, 0.0, 0.0]
    hue = (position * 0.618033988749895) % 1.0
    return [round(c, 3) for c in colorsys.hls_to_rgb(hue, 0.55, 0.75)]


# ---- finding the scans ----------------------------------------------------------------------------------

def _extension(path: Path) -> str:
    name = path.name.lower()
    return next((ext for ext in DOUBLE_EXTENSIONS if name.endswith(ext)), path.suffix.lower())


def _name_of(path: Path) -> str:
    if path.is_dir():
        return path.name
    extension = _extension(path)
    return path.name[: len(path.name) - len(extension)] if extension else path.name


def _is_data_half(path: Path) -> bool:
    headers = DATA_HALVES.get(_extension(path), ())
    stem = _name_of(path)
    return any((path.parent / (stem + header)).exists() for header in headers)


def _readable(path: Path) -> bool:
    """Whether SimpleITK can read the header (a file) or the folder holds a DICOM series."""
    if path.is_dir():
        return bool(sitk.ImageSeriesReader().GetGDCMSeriesIDs(str(path)))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return False
    return True


def list_volumes(folder, role: str) -> dict[str, Path]:
    """{name: path} of every image file or DICOM series folder in `folder` (module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise JointRegSegError(f"{role} folder {folder}: not found (or not a folder)")
    found: dict[str, list[Path]] = {}
    ignored = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or (path.is_file() and _is_data_half(path)):
            continue
        if not _readable(path):
            if path.is_file() and _extension(path) in IMAGE_EXTENSIONS:
                raise InputImageError(f"{role} {path}: SimpleITK cannot read this file (damaged or not an image)")
            ignored.append(path.name)
            continue
        found.setdefault(_name_of(path), []).append(path)
    duplicates = {name: paths for name, paths in found.items() if len(paths) > 1}
    if duplicates:
        listed = "; ".join(f"{name}: {', '.join(p.name for p in paths)}" for name, paths in duplicates.items())
        raise JointRegSegError(f"{role} folder {folder}: two files share a name ({listed}); keep one per name")
    if not found:
        skipped = f" (not images: {', '.join(ignored[:10])}{' ...' if len(ignored) > 10 else ''})" if ignored else ""
        raise JointRegSegError(f"{role} folder {folder}: no image SimpleITK can read{skipped}")
    return {name: paths[0] for name, paths in found.items()}


def _image_name_for(label_name: str, image_names) -> str | None:
    if label_name in image_names:
        return label_name
    for suffix in LABEL_SUFFIXES:
        if label_name.endswith(suffix) and label_name[: -len(suffix)] in image_names:
            return label_name[: -len(suffix)]
    return None


def match_scans(images_dir, labels_dir=None) -> list[Scan]:
    """Every image with its label map (or None), sorted by name; unmatched label maps are an error."""
    beside = labels_dir is None or Path(labels_dir).resolve() == Path(images_dir).resolve()
    volumes = list_volumes(images_dir, "images")
    if beside:
        label_like = {n for n in volumes if n.endswith(LABEL_SUFFIXES)}
        images = {n: p for n, p in volumes.items() if n not in label_like}
        label_maps = {n: volumes[n] for n in label_like}
        where = f"{images_dir} (label maps beside the images)"
        if not images:
            raise JointRegSegError(f"images folder {images_dir}: every file's name ends with a label-map suffix "
                                   f"{LABEL_SUFFIXES}; no image left")
    else:
        images, label_maps, where = volumes, list_volumes(labels_dir, "labels"), str(labels_dir)
    scans = {name: Scan(name, path) for name, path in images.items()}
    unmatched = []
    for label_name, path in sorted(label_maps.items()):
        image_name = _image_name_for(label_name, images)
        if image_name is None:
            unmatched.append(path.name)
        elif scans[image_name].labels is not None:
            raise JointRegSegError(f"labels {where}: two label maps for image {image_name!r}: "
                                   f"{scans[image_name].labels.name} and {path.name}")
        else:
            scans[image_name].labels = path
    if unmatched:
        raise JointRegSegError(
            f"labels {where}: no image in {images_dir} matches the label map(s) {', '.join(unmatched)}; a label "
            f"map is named like its image, alone or with one of the suffixes {', '.join(LABEL_SUFFIXES)} "
            f"(images: {', '.join(sorted(images)[:10])}{' ...' if len(images) > 10 else ''})")
    return [scans[name] for name in sorted(scans)]


# ---- checking the label maps ----------------------------------------------------------------------------

def _geometry_of(image: sitk.Image) -> Geometry:
    return Geometry(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def _header_geometry(path: Path) -> Geometry:
    """The grid from the file header (a DICOM series is read whole)."""
    if path.is_dir():
        return _geometry_of(read_image(path))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    size, spacing, origin, direction = reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()
    if len(size) == 4 and size[3] == 1:   # a one-volume 4D file reads as its 3D volume
        direction = [direction[r * 4 + c] for r in range(3) for c in range(3)]
        size, spacing, origin = size[:3], spacing[:3], origin[:3]
    return Geometry(size, spacing, origin, tuple(direction))


def grid_differences(labels: Geometry, image: Geometry) -> list[str]:
    """What differs between a label map's grid and its image's, beyond the tolerances ([] when none)."""
    if tuple(labels.size) != tuple(image.size):
        return [f"size {tuple(labels.size)} vs the image's {tuple(image.size)}"]
    out = []
    if any(abs(a - b) > SPACING_TOLERANCE * b for a, b in zip(labels.spacing, image.spacing)):
        out.append(f"spacing {_rounded(labels.spacing)} vs {_rounded(image.spacing)} mm")
    if np.linalg.norm(np.subtract(labels.origin, image.origin)) > ORIGIN_TOLERANCE_VOXELS * min(image.spacing):
        out.append(f"origin {_rounded(labels.origin)} vs {_rounded(image.origin)} mm")
    if np.max(np.abs(np.subtract(labels.direction, image.direction))) > DIRECTION_TOLERANCE:
        out.append(f"direction {_rounded(labels.direction)} vs {_rounded(image.direction)}")
    return out


def _rounded(values) -> list:
    return [round(float(v), 3) for v in values]


def _read_label_map(path: Path, role: str) -> sitk.Image:
    labels = read_image(path, role)
    if labels.GetDimension() == 4 and labels.GetSize()[3] == 1:
        labels = labels[:, :, :, 0]
    if labels.GetDimension() != 3 or labels.GetNumberOfComponentsPerPixel() != 1:
        raise InputImageError(f"{role} {path}: expected a 3D label map of whole numbers, got a "
                              f"{labels.GetDimension()}D image with {labels.GetNumberOfComponentsPerPixel()} "
                              "component(s) per voxel")
    return labels


def check_label_map(scan: Scan, known_values: set, table_path) -> None:
    """The label map lies on its image's grid and holds only whole numbers from the table."""
    role = f"label map of {scan.name}"
    labels = _read_label_map(scan.labels, role)
    differences = grid_differences(_geometry_of(labels), _header_geometry(scan.image))
    if differences:
        raise JointRegSegError(f"labels {scan.labels}: not on the grid of its image {scan.image} "
                               f"({'; '.join(differences)}); save the label map on the image's grid")
    values = np.unique(sitk.GetArrayViewFromImage(labels))
    fractional = values[np.mod(values, 1) != 0]
    if fractional.size:
        raise JointRegSegError(f"labels {scan.labels}: holds fractional values (e.g. {fractional[0]}); is it an "
                               "image rather than a label map?")
    unknown = sorted({int(v) for v in values} - known_values)
    if unknown:
        raise JointRegSegError(f"labels {scan.labels}: values {unknown[:20]}{' ...' if len(unknown) > 20 else ''} "
                               f"are not in the label table {table_path} (its values: {sorted(known_values)})")


# ---- splits and the working grid ------------------------------------------------------------------------

def choose_splits(labelled_names: list, all_names: list, val: int | None, labelled: int | None, seed: int,
                  images_dir) -> tuple[list, list]:
    """(held-out validation names, names of the labelled training images that may supervise)."""
    if not labelled_names:
        raise JointRegSegError(f"images {images_dir}: no image has a label map; training needs at least one "
                               "labelled image (label maps are named like their image, see --help)")
    val = (1 if len(labelled_names) >= 2 else 0) if val is None else int(val)
    if not 0 <= val <= len(labelled_names) - 1:
        raise JointRegSegError(f"--val {val}: {len(labelled_names)} image(s) have labels and at least one must "
                               f"stay for training; hold out 0 to {len(labelled_names) - 1}")
    rng = np.random.default_rng(seed)
    # the reference (first labelled by name) always trains: it anchors the working grid
    held = sorted(rng.choice(labelled_names[1:], size=val, replace=False).tolist()) if val else []
    train_labelled = [n for n in labelled_names if n not in held]
    k = len(train_labelled) if labelled is None else int(labelled)
    if not 1 <= k <= len(train_labelled):
        raise JointRegSegError(f"--labelled {k}: {len(train_labelled)} labelled image(s) train (after --val "
                               f"{val}); choose 1 to {len(train_labelled)}")
    if len(all_names) - val < 2:
        raise JointRegSegError(f"images {images_dir}: training registers pairs of training images and only "
                               f"{len(all_names) - val} would train (after --val {val}); add images (labelled or "
                               "not) or hold out fewer")
    return held, train_labelled[:k]


def validation_pairs(val_names: list, supervising: list) -> list[dict]:
    """Round robin over two or more held-out images; one held-out image is the fixed image of a pair from
    the first supervising image (module docstring); none, no pairs."""
    if len(val_names) >= 2:
        return [{"moving": val_names[i], "fixed": val_names[(i + 1) % len(val_names)]} for i in range(len(val_names))]
    return [{"moving": supervising[0], "fixed": name} for name in val_names]


def working_grid_spec(reference: sitk.Image, spacing_mm: float | None = None, size=None) -> dict:
    """Size and spacing of the axis-aligned working grid: the options as given; a missing spacing is the
    one that fits the reference's field of view into `size` (or 2 mm, coarser if the field of view needs
    more than 128 voxels a side); a missing size covers that field of view, in multiples of 8, at most 128."""
    low, high = physical_box(reference)
    extent = high - low
    if size is not None:
        size = [int(n) for n in size]
        if len(size) != 3 or any(n < GRID_MULTIPLE or n % GRID_MULTIPLE for n in size):
            raise JointRegSegError(f"--size {size}: three sizes (x y z), each a multiple of {GRID_MULTIPLE} "
                                   "(the networks halve the grid three times)")
    if spacing_mm is None:
        spacing_mm = (max(extent[i] / size[i] for i in range(3)) if size is not None
                      else max(DEFAULT_SPACING_MM, float(extent.max()) / MAX_GRID_SIDE))
    spacing_mm = float(spacing_mm)
    if not (math.isfinite(spacing_mm) and spacing_mm > 0):
        raise JointRegSegError(f"--spacing {spacing_mm}: must be a positive number of mm")
    if size is None:
        size = [int(min(MAX_GRID_SIDE, max(GRID_MULTIPLE, GRID_MULTIPLE * math.ceil(e / spacing_mm / GRID_MULTIPLE))))
                for e in extent]
    spacing_mm = round(spacing_mm, 4)
    return {"size": size, "spacing": [spacing_mm] * 3, "direction": list(IDENTITY)}


# ---- one scan onto the grid ------------------------------------------------------------------------------

def _read_volume(path: Path, name: str) -> sitk.Image:
    return validate_volume(read_image(path, f"image {name}"), f"image {name} ({path})")


def import_scan(scan: Scan, reference_name: str, reference: sitk.Image, grid: sitk.Image, staging: Path,
                 split: str) -> dict:
    """Align the scan to the reference, resample it (and its labels) onto the grid, write both; its item."""
    as_stored = _read_volume(scan.image, scan.name)
    image = canonical_storage(as_stored)
    # the scans' storage orientations differ but they share physical space: the affine maps grid points
    # (the reference's space) to the scan's; the reference itself needs none
    affine = None if scan.name == reference_name else affine_prealign(image, reference)
    # pad with the scan's own lowest value (air in CT is -1000, not 0)
    background = float(sitk.GetArrayViewFromImage(image).min())
    on_grid = resample(image, grid, affine, sitk.sitkLinear, background, sitk.sitkFloat32)
    sitk.WriteImage(on_grid, str(staging / "images" / f"{scan.name}.nii.gz"), True)
    entry = {"name": scan.name, "image": f"images/{scan.name}.nii.gz", "labels": None, "split": split,
             "labelled": False, "source": scan.image.name, "synthetic": False}
    if scan.labels is not None:
        labels = _read_label_map(scan.labels, f"label map of {scan.name}")
        labels.CopyInformation(as_stored)   # within the tolerance check_label_map allowed: the image's grid exactly
        labels_on_grid = resample(sitk.Cast(labels, sitk.sitkUInt8), grid, affine, sitk.sitkNearestNeighbor, 0,
                                  sitk.sitkUInt8)
        sitk.WriteImage(labels_on_grid, str(staging / "labels" / f"{scan.name}.nii.gz"), True)
        entry["labels"] = f"labels/{scan.name}.nii.gz"
    return entry


def _source_record(images_dir, labels_dir, label_table_csv) -> dict:
    where = f"images {Path(images_dir).resolve()}"
    if labels_dir is not None:
        where += f", labels {Path(labels_dir).resolve()}"
    return {"name": Path(images_dir).name, "source": f"{where}, label table {Path(label_table_csv).resolve()}",
            "licence": "the user's own data"}


def _notes(scans: list[Scan], reference_name: str, grid_spec: dict) -> str:
    labelled = sum(s.labels is not None for s in scans)
    return (f"Imported with `jointregseg data import`: {len(scans)} scans, {labelled} with label maps. Every image "
            f"is affinely pre-aligned (SimpleITK Mattes MI) to the reference {reference_name} and resampled (linear; "
            f"label maps nearest neighbour) onto a {grid_spec['size']} grid of {grid_spec['spacing'][0]} mm centred "
            "on the reference's centre of mass. Each scan counts as its own anatomy: if several scans show one "
            "subject, validation figures are optimistic.")
