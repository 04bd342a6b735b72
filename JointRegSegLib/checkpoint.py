"""One-file checkpoints: safetensors weights + a JSON model card in the header metadata.

Loading never unpickles. Every failure names the file and what is wrong with it.
"""
from __future__ import annotations

import copy
import hashlib
import math
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .networks import build_network

FORMAT = "jointregseg-checkpoint"
FORMAT_VERSION = 1
CARD_KEY = "jointregseg_model_card"
REQUIRED_CARD_KEYS = ("architecture", "labels", "intensity", "working_grid")


@dataclass
class JointRegSegModel:
    """A network and the model card that says how to feed it and what its outputs mean."""

    card: dict
    network: torch.nn.Module

    @property
    def label_table(self) -> list[dict]:
        return self.card["labels"]

    @property
    def num_classes(self) -> int:
        return max(int(entry["value"]) for entry in self.card["labels"]) + 1


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


def new_model(card: dict, seed: int | None = 0) -> JointRegSegModel:
    """An untrained model for `card` (deterministic initialisation from `seed`)."""
    card = copy.deepcopy(card)
    card.setdefault("format", FORMAT)
    card.setdefault("format_version", FORMAT_VERSION)
    validate_card(card)
    if seed is not None:
        torch.manual_seed(seed)
    labels = card["labels"]
    network = build_network(card["architecture"], max(int(e["value"]) for e in labels) + 1)
    return JointRegSegModel(card=card, network=network)


def _weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_model(model: JointRegSegModel, path: str | os.PathLike) -> Path:
    """Write the model as one .safetensors file, atomically."""
    path = Path(path)
    card = copy.deepcopy(model.card)
    card["format"], card["format_version"] = FORMAT, FORMAT_VERSION
    validate_card(card, str(path))
    tensors = {name: value.detach().cpu().contiguous() for name, value in model.network.state_dict().items()}
    card["weights_sha256"] = _weights_digest(tensors)
    card["parameter_count"] = int(sum(p.numel() for p in model.network.parameters()))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={CARD_KEY: json.dumps(card)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    model.card = card
    return path


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
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err}); it may be truncated") from None
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


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> JointRegSegModel:
    path = Path(path)
    card = read_card(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: weights cannot be read ({err}); the file may be truncated") from None
    expected = card.get("weights_sha256")
    if expected and _weights_digest(tensors) != expected:
        raise CheckpointError(f"{path}: weights do not match the checksum in the model card; "
                              "the file was modified or corrupted")
    model = new_model(card, seed=None)
    own = model.network.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    mismatched = [f"{k}: file {tuple(tensors[k].shape)} vs card {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(tensors)) if tensors[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        details = "; ".join(filter(None, [
            f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
            f"{len(mismatched)} with other shapes (e.g. {mismatched[0]})" if mismatched else ""]))
        raise CheckpointError(f"{path}: the card's architecture {card['architecture'].get('name')!r} does not "
                              f"match the stored weights: {details}")
    model.network.load_state_dict(tensors, strict=True)
    model.network.to(device).eval()
    model.card = card
    return model
