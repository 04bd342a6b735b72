"""Warnings that say nothing a user can act on, silenced in every process that runs the engine."""
from __future__ import annotations

import warnings


def quiet_known_warnings() -> None:
    """MONAI's note that it warps with torch's grid_sample and torch's indexing deprecation say nothing a
    user can act on."""
    warnings.filterwarnings("ignore", message=".*native grid_sample.*")
    warnings.filterwarnings("ignore", message=".*non-tuple sequence for multidimensional indexing.*")
