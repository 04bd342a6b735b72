"""`jointregseg data build --held-out colin27`: a few-shot set whose validation anatomy is never trained on.

Training subjects are synthesised (`generator.BrainSynthesizer`, real T1 intensities under random affine,
smooth diffeomorphic deformation, bias, gamma, blur, anisotropy, noise) from the offline sources that
have a T1 image (`atlas_sources.training_sources`: ICBM 2009c with AAL2, FSL MNI152 with the FreeSurfer
aseg, ICBM 2009a tissue, the ITK KmeansTest subject). Labelled candidates alternate between the two
sources with labels, so the labelled images are distinct synthetic anatomies carrying two distinct label
maps. Validation subjects are synthetic deformations of Colin27 (ch2bet + AAL), which no training
source contains: figures on them measure generalisation to an unseen brain.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..core.geometry import center_of_mass, make_grid
from ..io.imageio import staged_output_dir
from . import atlas_sources
from .dataset_format import write_manifest
from .generator import BrainSynthesizer, SynthesisSettings
from .label_table import LABEL_TABLE
from .generator import synthesize


def study_grid(spacing: float) -> tuple[dict, sitk.Image]:
    """The common MNI-space brain box at `spacing` mm: its manifest spec and an empty image on it."""
    extent = np.array(atlas_sources.COMMON_GRID["size"]) * atlas_sources.COMMON_GRID["spacing"][0]
    size = [int(16 * np.ceil(e / spacing / 16)) for e in extent]   # the U-Nets halve the grid 4 times
    grid = make_grid(size, [spacing] * 3, np.eye(3), np.array(atlas_sources.COMMON_GRID["center_lps"]))
    return {"size": size, "spacing": [spacing] * 3, "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}, grid


def _write(array: np.ndarray, grid: sitk.Image, path: Path, pixel) -> None:
    image = sitk.GetImageFromArray(array.astype(np.float32 if pixel == sitk.sitkFloat32 else np.uint8))
    image.CopyInformation(grid)
    sitk.WriteImage(image, str(path), True)


def build_heldout_dataset(out_dir: str | Path, seed: int = 0, n_train: int = 24, n_val: int = 6,
                          n_labelled: int = 4, spacing: float = 2.5, progress=None) -> Path:
    grid_spec, grid = study_grid(spacing)
    rng = np.random.default_rng(seed)
    sources = [s for s in atlas_sources.training_sources(grid) if s.image is not None]
    labelled_sources = [i for i, s in enumerate(sources) if s.target is not None]
    # the few-shot methods learn deformable registration behind an affine pre-alignment: keep the random
    # affines as small as the classic few-shot set's (build.py), the shapes as varied as the model's
    settings = SynthesisSettings(rotation_deg=6.0, scale=0.06, shear=0.02, shift_fraction=0.03, spacing_mm=spacing,
                                 real_image_probability=1.0)
    synthesizer = BrainSynthesizer(sources, settings)
    colin_image, colin_labels = atlas_sources.colin27_heldout()
    val_grid = make_grid(grid_spec["size"], grid_spec["spacing"], np.eye(3), center_of_mass(colin_image))
    items, out_dir = [], Path(out_dir)
    total = n_train + n_val
    with staged_output_dir(out_dir) as staging:
        (staging / "images").mkdir()
        (staging / "labels").mkdir()
        # labelled candidates first, alternating label maps; then the rest cycle through every source
        order = [labelled_sources[i % len(labelled_sources)] for i in range(n_labelled)]
        order += [i % len(sources) for i in range(n_train - n_labelled)]
        for k, index in enumerate(order):
            name = f"train_{k:03d}_{sources[index].name}"
            subject = synthesizer.sample(rng, index, use_real=True)
            _write(subject.image[0, 0].numpy(), grid, staging / "images" / f"{name}.nii.gz", sitk.sitkFloat32)
            entry = {"name": name, "image": f"images/{name}.nii.gz", "split": "train", "source": sources[index].name,
                     "synthetic": True, "labels": None, "labelled": False}
            if subject.target is not None:
                _write(subject.target[0, 0].numpy(), grid, staging / "labels" / f"{name}.nii.gz", sitk.sitkUInt8)
                entry["labels"] = f"labels/{name}.nii.gz"
            items.append(entry)
            if progress:
                progress("build data", len(items) / total)
        for k in range(n_val):
            name = f"val_{k:03d}_colin27"
            image, labels = synthesize(colin_image, colin_labels, val_grid, rng, deform=True, strength=1.0)
            sitk.WriteImage(image, str(staging / "images" / f"{name}.nii.gz"), True)
            sitk.WriteImage(labels, str(staging / "labels" / f"{name}.nii.gz"), True)
            items.append({"name": name, "image": f"images/{name}.nii.gz", "split": "val", "source": "colin27",
                          "synthetic": True, "labels": f"labels/{name}.nii.gz", "labelled": False})
            if progress:
                progress("build data", len(items) / total)
        write_manifest(staging, items, n_labelled, seed=seed, working_grid=grid_spec, label_table=LABEL_TABLE,
                       held_out=["colin27"],
                       sources=[{"name": s.name, "source": s.provenance, "licence": s.licence} for s in sources],
                       notes="Training subjects: real T1 images of the training sources (ICBM/MNI152 population "
                             "averages and the ITK KmeansTest subject) under random affine and smooth diffeomorphic "
                             "deformation, bias, gamma, blur, anisotropy and noise. Validation subjects are synthetic "
                             "deformations of Colin27, an anatomy held out of training entirely.")
    return out_dir
