"""Exceptions a user sees. Each names what is wrong with which input."""


class JointRegSegError(Exception):
    """Base class for every error this library raises on purpose."""


class InputImageError(JointRegSegError, ValueError):
    """An input volume cannot be used (wrong dimension, empty, NaN, unreadable)."""


class CheckpointError(JointRegSegError, ValueError):
    """A model file is missing, not a safetensors checkpoint, truncated, tampered or inconsistent."""


class Cancelled(JointRegSegError):
    """The caller asked to stop; nothing was written."""
