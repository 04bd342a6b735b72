"""Installed models: the embedded defaults in Resources/Models plus any folder in $JOINTREGSEG_MODELS."""
from __future__ import annotations

import os
from pathlib import Path

from .card import read_card
from ..core.errors import CheckpointError

REPO_ROOT = Path(__file__).resolve().parents[2]
EMBEDDED_MODELS = REPO_ROOT / "Resources" / "Models"
DEFAULT_MODEL_NAME = "brain-head-synth.safetensors"


def model_folders() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("JOINTREGSEG_MODELS", "").split(os.pathsep) if p]
    return extra + [EMBEDDED_MODELS]


def installed_models() -> dict[str, Path]:
    """Model name (from its card) -> path, for every readable checkpoint in the model folders."""
    found = {}
    for folder in model_folders():
        for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            try:
                found.setdefault(read_card(path).get("name", path.stem), path)
            except CheckpointError:
                continue
    return found


def default_model_path() -> Path:
    path = EMBEDDED_MODELS / DEFAULT_MODEL_NAME
    if not path.is_file():
        raise CheckpointError(f"the embedded default model is missing: {path}; pass --model CHECKPOINT")
    return path
