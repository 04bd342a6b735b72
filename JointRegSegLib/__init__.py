"""JointRegSeg engine: joint deep registration + segmentation of 3D volumes in physical space."""
from .checkpoint import JointRegSegModel, load_model, new_model, read_card, save_model
from .errors import Cancelled, CheckpointError, InputImageError, JointRegSegError
from .imageio import read_image
from .pipeline import Result, register_and_segment

__version__ = "0.1.0"
__all__ = ["register_and_segment", "Result", "load_model", "save_model", "new_model", "read_card",
           "read_image", "JointRegSegModel", "JointRegSegError", "InputImageError", "CheckpointError",
           "Cancelled", "__version__"]
