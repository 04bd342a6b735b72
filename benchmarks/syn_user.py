"""ANTs SyN as a user of antspyx runs it, as one process: `python syn_user.py MOVING FIXED MOVING_LABELS OUT_DIR`.

Reads both images, registers with `ants.registration(type_of_transform="SyN")` (antspyx defaults: an affine
then SyN), warps the moving image (linear) and its label map (genericLabel) onto the fixed grid and writes
them with the transforms: the outputs a `jointregseg run` also writes, minus the segmentations.
"""
import shutil
import sys
from pathlib import Path

import ants

moving_path, fixed_path, labels_path, out = sys.argv[1:5]
out = Path(out)
out.mkdir(parents=True, exist_ok=True)
fixed, moving = ants.image_read(fixed_path), ants.image_read(moving_path)
result = ants.registration(fixed, moving, type_of_transform="SyN", outprefix=str(out / "syn_"))
ants.image_write(result["warpedmovout"], str(out / "warped_moving.nii.gz"))
labels = ants.apply_transforms(fixed, ants.image_read(labels_path), result["fwdtransforms"],
                               interpolator="genericLabel")
ants.image_write(labels, str(out / "warped_moving_labels.nii.gz"))
for path in result["fwdtransforms"] + result["invtransforms"]:
    if Path(path).parent != out and Path(path).is_file():
        shutil.copy(path, out)
