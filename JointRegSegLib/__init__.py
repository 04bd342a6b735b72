"""JointRegSeg engine: joint deep registration + segmentation of 3D volumes in physical space.

Names are imported on first use, so `import JointRegSegLib.slicer.mrml` or reading a model card inside
Slicer works before torch and MONAI are installed.
"""
import sys
from importlib import import_module

__version__ = "0.1.0"
_EXPORTS = {
    "register_and_segment": "inference.pipeline", "Result": "inference.pipeline", "load_model": "models.checkpoint",
    "save_model": "models.checkpoint", "new_model": "models.checkpoint", "JointRegSegModel": "models.checkpoint",
    "read_card": "models.card", "read_image": "io.imageio", "JointRegSegError": "core.errors", "InputImageError": "core.errors",
    "CheckpointError": "core.errors", "Cancelled": "core.errors",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Packages MONAI's package __init__ imports eagerly (it loads every MONAI submodule) only for features a
# registration run never uses: plotting, CSV/pathology datasets, scipy/scikit-image/OpenCV transforms and
# metrics. They are over half of MONAI's import time.
MONAI_EXTRAS = ("matplotlib", "pandas", "scipy", "sklearn", "skimage", "PIL", "nibabel", "cv2", "requests", "itk")


def import_monai_lean() -> None:
    """Import torch and MONAI without MONAI's optional extras, for processes that only run the networks.

    `jointregseg run` and `batch` call this first. In this process MONAI then treats those packages as
    absent (MONAI's plotting, CSV datasets, HD95 and other scipy-based metrics and transforms are
    unavailable through MONAI); the packages themselves import normally afterwards (matplotlib for
    `--report`). Does nothing when MONAI is already imported (inside Slicer, or after `evaluate` code).
    """
    if "monai" in sys.modules:
        return
    import torch  # noqa: F401  (imported first so nothing of torch's sees the blocked names)
    blocked = [name for name in MONAI_EXTRAS if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # makes `import name` raise ImportError, which MONAI's optional_import absorbs
    try:
        import monai  # noqa: F401
    finally:
        for name in blocked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
