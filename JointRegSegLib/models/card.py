"""The model card of a checkpoint, read without torch or safetensors (the Slicer panel lists models
before the heavy dependencies are installed). A safetensors file is: 8-byte little-endian header
length, a JSON header whose "__metadata__" holds string metadata, then the tensor bytes."""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from ..core.errors import CheckpointError

FORMAT = "jointregseg-checkpoint"
FORMAT_VERSION = 1
CARD_KEY = "jointregseg_model_card"
REQUIRED_CARD_KEYS = ("architecture", "labels", "intensity", "working_grid")
_MAX_HEADER = 100 * 1024 * 1024


def validate_card(card: dict, source: str = "model card") -> dict:
    if not isinstance(card, dict):
        raise CheckpointError(f"{source}: model card is not a JSON object")
    missing = [key for key in REQUIRED_CARD_KEYS if key not in card]
    if missing:
        raise CheckpointError(f"{source}: model card lacks {', '.join(missing)}")
    labels = card["labels"]
    if not isinstance(labels, list) or not labels:
        raise CheckpointError(f"{source}: model card 'labels' must be a non-empty list")
    values = []
    for entry in labels:
        if not {"value", "name", "color"} <= set(entry) or len(entry["color"]) != 3:
            raise CheckpointError(f"{source}: label entry {entry!r} needs 'value', 'name' and an RGB 'color'")
        values.append(int(entry["value"]))
    if len(set(values)) != len(values) or 0 not in values:
        raise CheckpointError(f"{source}: label values must be unique and include 0 (background): {values}")
    grid = card["working_grid"]
    size, spacing = grid.get("size"), grid.get("spacing")
    if not (isinstance(size, list) and isinstance(spacing, list) and len(size) == 3 and len(spacing) == 3):
        raise CheckpointError(f"{source}: working_grid needs 3-element 'size' and 'spacing'")
    arch = card["architecture"]
    factor = int(arch.get("velocity_downsample", 2))
    for part in ("registration", "segmentation"):
        factor = math.lcm(factor, math.prod(int(s) for s in arch.get(part, {}).get("strides", [1])))
    if any(int(n) % factor for n in size):
        raise CheckpointError(f"{source}: working_grid size {size} must be divisible by {factor} "
                              "(the network's total downsampling)")
    licence = card.get("licence")
    if licence is not None and not (isinstance(licence, str) or (isinstance(licence, dict) and
                                                                 isinstance(licence.get("weights"), str))):
        raise CheckpointError(f"{source}: 'licence' must be a string or an object with a 'weights' string")
    return card


def licence_text(card: dict) -> str | None:
    """The licence of a model's weights in one line (the card's `licence`: a string, or {"weights", "note"})."""
    licence = card.get("licence", card.get("license"))
    if not licence:
        return None
    if isinstance(licence, str):
        return licence
    return licence["weights"] + (f" ({licence['note']})" if licence.get("note") else "")


def _sniff(path: Path) -> str | None:
    """Name a file type that is clearly not safetensors, from its first bytes (a safetensors file starts
    with its 8-byte header length and then the header's "{")."""
    with open(path, "rb") as handle:
        head = handle.read(348)
    if len(head) < 8:
        return f"the file is only {len(head)} bytes long"
    if head[:2] == b"PK":
        return "it is a zip archive, e.g. a PyTorch torch.save checkpoint; JointRegSeg never unpickles files"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "it is a Python pickle; JointRegSeg never unpickles files"
    if head[:4] == b"\x89HDF":
        return "it is an HDF5 file, e.g. an ITK transform"
    if head[:2] == b"\x1f\x8b":
        return "it is a gzip-compressed file, e.g. a .nii.gz image"
    if head[:4] == b"NRRD":
        return "it is an NRRD image"
    if len(head) >= 348 and head[344:347] in (b"n+1", b"ni1") or head[4:7] in (b"n+2", b"ni2"):
        return "it is a NIfTI image"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "it is a PNG picture"
    if len(head) > 8 and head[8:9] != b"{":
        return "it is not a safetensors file: no JSON header after its first 8 bytes"
    return None


def read_card(path: str | os.PathLike) -> dict:
    """The model card alone, without loading weights (for `jointregseg info` and model lists)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    reason = _sniff(path)
    if reason:
        raise CheckpointError(f"{path}: not a JointRegSeg checkpoint ({reason})")
    metadata = _safetensors_metadata(path)
    if CARD_KEY not in metadata:
        raise CheckpointError(f"{path}: not a JointRegSeg checkpoint (the safetensors file has no JointRegSeg "
                              "model card in its metadata)")
    try:
        card = json.loads(metadata[CARD_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: model card is not valid JSON: {err}") from None
    if card.get("format") != FORMAT:
        raise CheckpointError(f"{path}: model card format is {card.get('format')!r}, expected {FORMAT!r}")
    if int(card.get("format_version", -1)) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {card.get('format_version')} is newer than "
                              f"this JointRegSeg supports ({FORMAT_VERSION}); update JointRegSeg")
    return validate_card(card, str(path))




def _safetensors_metadata(path: Path) -> dict:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        (header_length,) = struct.unpack("<Q", handle.read(8))
        if header_length > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: not a readable safetensors file (header length {header_length} "
                                  f"does not fit in {size} bytes); it may be truncated")
        try:
            header = json.loads(handle.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file (header: {err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a readable safetensors file (header is not a JSON object)")
    data_end = max((entry["data_offsets"][1] for key, entry in header.items()
                    if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry), default=0)
    if 8 + header_length + data_end > size:
        raise CheckpointError(f"{path}: the file is truncated ({size} bytes, the header describes "
                              f"{8 + header_length + data_end})")
    return header.get("__metadata__") or {}


def _wrapped(label: str, text: str, width: int = 100) -> list[str]:
    import textwrap
    return textwrap.wrap(text, width=width, initial_indent=f"  {label}: ", subsequent_indent="      ",
                         break_on_hyphens=False) or [f"  {label}:"]


def _listed(label: str, items: list[str], width: int = 100) -> list[str]:
    """`items` joined by commas, wrapped between items only."""
    lines, line = [], f"  {label}: "
    for number, item in enumerate(items):
        piece = item + ("," if number < len(items) - 1 else "")
        if len(line) + len(piece) > width and line.strip() and not line.endswith(": "):
            lines.append(line.rstrip())
            line = "      "
        line += piece + " "
    return lines + [line.rstrip()]


def _number(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def summary_lines(card: dict) -> list[str]:
    """A readable summary of a model card (what `jointregseg info` prints; `--json` prints the whole card):
    name, description, the label table, the working grid, how and on what it was trained, the licence
    when the card names one, and the headline metrics."""
    lines = _wrapped(card.get("name", "unnamed model"), card.get("description", ""))
    lines[0] = lines[0][2:]
    architecture = card.get("architecture", {})
    parameters = card.get("parameter_count")
    lines.append(f"  architecture: {architecture.get('name', '?')}"
                 + (f", {parameters:,} parameters" if isinstance(parameters, int) else ""))
    lines += _wrapped("modality", str(card.get("modality", "?")))
    intensity = card.get("intensity", {})
    lines.append("  intensity: " + " ".join(f"{key} {value}" for key, value in intensity.items()))
    grid = card["working_grid"]
    lines.append(f"  working grid: {grid['size']} voxels at {grid['spacing']} mm")
    structures = [e for e in card["labels"] if int(e["value"])]
    lines += _listed(f"labels ({len(structures)} structures)", [f"{e['value']}={e['name']}" for e in structures])
    if card.get("weights_sha256"):
        lines.append(f"  weights checksum: sha256 {card['weights_sha256'][:16]}... (verified when the model loads)")
    else:
        lines.append("  weights checksum: MISSING - an unsigned checkpoint whose weights cannot be verified; "
                     "`run` refuses it unless --trust-unsigned")
    training = card.get("training")
    if isinstance(training, dict):
        parts = [f"strategy {training['strategy']}"] if training.get("strategy") else []
        config = training.get("config") if isinstance(training.get("config"), dict) else {}
        steps = training.get("steps", config.get("steps"))
        if isinstance(steps, int):
            parts.append(f"{steps:,} steps")
        for key in ("paper", "device"):
            if isinstance(training.get(key), str):
                parts.append(f"{key} {training[key]}")
        parent = card.get("parent") or (card.get("finetune") or {}).get("parent")
        if parent:
            name = parent.get("name", "?") if isinstance(parent, dict) else parent
            parts.append(f"fine-tuned from {name}")
        lines += _wrapped("training", "; ".join(parts) or "(see --json)")
    data = card.get("data")
    if isinstance(data, dict):
        sources = data.get("sources") or []
        names = [s.get("name", "?") if isinstance(s, dict) else str(s) for s in sources]
        if names:
            lines += _listed(f"data ({len(names)} source{'s' if len(names) != 1 else ''})", names)
        if isinstance(data.get("held_out"), str):
            lines += _wrapped("held out", data["held_out"])
    licence = licence_text(card)
    if licence:
        lines += _wrapped("licence", licence)
    metrics = card.get("metrics")
    if isinstance(metrics, dict):
        headline = [f"{key} {_number(value)}" for key, value in metrics.items()
                    if isinstance(value, (int, float)) and not isinstance(value, bool)]
        if headline:
            lines += _listed("metrics", headline)
        if isinstance(metrics.get("note"), str):
            lines += _wrapped("metrics note", metrics["note"])
    lines.append("  (the whole card: jointregseg info --json MODEL)")
    return lines
