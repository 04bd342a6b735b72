"""One-file checkpoints: safetensors weights + a JSON model card in the header metadata.

Loading never unpickles. Every failure names the file and what is wrong with it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .card import CARD_KEY, FORMAT, FORMAT_VERSION, read_card, validate_card
from ..core.errors import CheckpointError
from .networks import build_network



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


def _new_file_mode() -> int:
    """The mode a newly created file gets here (0o666 less the umask: 0644 under the usual umask 022)."""
    try:   # Linux names the umask without changing it (os.umask must set one to read it)
        status = Path("/proc/self/status").read_text(encoding="ascii")
        umask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


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
        os.chmod(tmp, _new_file_mode())   # mkstemp makes it 0600; a model is shared like the other outputs
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    model.card = card
    return path


UNSIGNED_HINT = ("pass --trust-unsigned (trust_unsigned=True in Python) only for a file from a source you trust, "
                 "or re-save it with JointRegSeg (save_model adds the checksum)")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               trust_unsigned: bool = False) -> JointRegSegModel:
    """Load a checkpoint; its weights must match the SHA-256 in its model card.

    A card without a checksum (weights that cannot be verified, e.g. edited and the checksum deleted) is
    refused unless `trust_unsigned`.
    """
    path = Path(path)
    card = read_card(path)
    if not card.get("weights_sha256") and not trust_unsigned:
        raise CheckpointError(f"{path}: the model card has no weights checksum (weights_sha256), so its weights "
                              f"cannot be verified and may have been modified; {UNSIGNED_HINT}")
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
