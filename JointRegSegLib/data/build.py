"""`jointregseg data build`: a deterministic few-shot training set from the offline sources."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..inference.affine import affine_prealign
from ..core.geometry import center_of_mass, make_grid
from ..io.imageio import staged_output_dir
from . import sources
from .dataset_format import write_manifest
from .generator import synthesize

DEFAULT_GRID = {"size": [64, 80, 64], "spacing": [2.5, 2.5, 2.5], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}


def _into_reference_space(subject: sources.Subject, reference: sitk.Image) -> sources.Subject:
    """Affinely align a subject to the reference anatomy once, at 1 mm, so all sources share a space."""
    affine = affine_prealign(subject.image, reference)
    image = sitk.Resample(subject.image, reference, affine, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    labels = None
    if subject.labels is not None:
        labels = sitk.Resample(subject.labels, reference, affine, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sources.Subject(subject.name, image, labels, subject.source, subject.licence)


def build_dataset(out_dir: str | Path, seed: int = 0, n_train: int = 36, n_val: int = 8, n_labelled: int = 2,
                  grid_spec: dict | None = None, progress=None) -> Path:
    grid_spec = grid_spec or DEFAULT_GRID
    rng = np.random.default_rng(seed)
    colin = sources.colin27()
    labelled_sources = [colin, _into_reference_space(sources.mni2009c(), colin.image)]
    unlabelled_sources = [_into_reference_space(sources.itk_kmeans_brain(), colin.image)]
    grid = make_grid(grid_spec["size"], grid_spec["spacing"], np.array(grid_spec["direction"]).reshape(3, 3),
                     center_of_mass(colin.image))
    items = []
    out_dir = Path(out_dir)
    with staged_output_dir(out_dir) as staging:
        (staging / "images").mkdir()
        (staging / "labels").mkdir()

        def add(name, subject, split, deform, strength):
            image, labels = synthesize(subject.image, subject.labels, grid, rng, deform=deform, strength=strength)
            sitk.WriteImage(image, str(staging / "images" / f"{name}.nii.gz"), True)
            entry = {"name": name, "image": f"images/{name}.nii.gz", "split": split, "source": subject.name,
                     "synthetic": deform, "labels": None, "labelled": False}
            if labels is not None:
                sitk.WriteImage(labels, str(staging / "labels" / f"{name}.nii.gz"), True)
                entry["labels"] = f"labels/{name}.nii.gz"
            items.append(entry)
            if progress:
                progress("build data", len(items) / (len(all_sources) + n_train + n_val))

        all_sources = labelled_sources + unlabelled_sources
        for subject in all_sources:
            add(subject.name, subject, "train", deform=False, strength=0.0)
        for i in range(n_train):
            add(f"synth_train_{i:03d}", all_sources[i % len(all_sources)], "train", deform=True, strength=1.0)
        for i in range(n_val):
            add(f"synth_val_{i:03d}", labelled_sources[i % 2], "val", deform=True, strength=1.2)
        write_manifest(staging, items, n_labelled, seed=seed, working_grid=grid_spec, label_table=sources.LABEL_TABLE,
                       sources=[{"name": s.name, "source": s.source, "licence": s.licence} for s in all_sources],
                       notes="Synthetic subjects: random affine (+-6 deg, +-6 % scale, +-5 mm) and smooth diffeomorphic "
                             "deformation (velocity std 4 mm on a 40 mm control grid) of a real anatomy, plus gamma, "
                             "bias field and noise. Validation subjects derive from the same two labelled anatomies "
                             "with stronger changes; numbers on them are optimistic for unseen anatomy.")
    return out_dir
