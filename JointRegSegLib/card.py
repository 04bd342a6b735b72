"""The model card of a checkpoint, read without torch or safetensors (the Slicer panel lists models
before the heavy dependencies are installed). A safetensors file is: 8-byte little-endian header
length, a JSON header whose "__metadata__" holds string metadata, then the tensor bytes."""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from .errors import CheckpointError

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
    return card


def _sniff(path: Path) -> str | None:
    """Name a file type that is clearly not safetensors, from its first bytes."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if len(head) < 8:
        return f"file is only {len(head)} bytes long"
    if head[:2] == b"PK":
        return "it is a zip archive (a PyTorch torch.save checkpoint?); JointRegSeg never unpickles files"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "it is a Python pickle; JointRegSeg never unpickles files"
    if head[:4] == b"\x89HDF":
        return "it is an HDF5 file"
    return None


def read_card(path: str | os.PathLike) -> dict:
    """The model card alone, without loading weights (for `jointregseg info` and model lists)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    reason = _sniff(path)
    if reason:
        raise CheckpointError(f"{path}: not a JointRegSeg safetensors checkpoint: {reason}")
    metadata = _safetensors_metadata(path)
    if CARD_KEY not in metadata:
        raise CheckpointError(f"{path}: safetensors file has no JointRegSeg model card in its metadata")
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
