"""JointRegSeg engine: joint deep registration + segmentation of 3D volumes in physical space.

Names are imported on first use, so `import JointRegSegLib.mrml` or reading a model card inside
Slicer works before torch and MONAI are installed.
"""
from importlib import import_module

__version__ = "0.1.0"
_EXPORTS = {
    "register_and_segment": "pipeline", "Result": "pipeline", "load_model": "checkpoint",
    "save_model": "checkpoint", "new_model": "checkpoint", "JointRegSegModel": "checkpoint",
    "read_card": "card", "read_image": "imageio", "JointRegSegError": "errors", "InputImageError": "errors",
    "CheckpointError": "errors", "Cancelled": "errors",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
