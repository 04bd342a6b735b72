"""The MRML adapter: Slicer nodes <-> the lib's files, and a Register & Segment job on scene nodes.

The only lib file that imports `slicer`/`vtk`. The work itself runs in another process (worker.py)
on volumes exported to a private folder; results come back as new nodes only once everything has been
read, and a failure removes every node it added, so the scene ends either complete or as it was.
Nothing here adds temporary nodes to the scene (no helper label maps, no orphan display nodes).
Coordinates: files are LPS (ITK); MRML is RAS; F = diag(-1, -1, 1) converts either way.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util.numpy_support import vtk_to_numpy

from ..models.card import read_card
from ..core.errors import InputImageError, JointRegSegError
from ..io.outputs import OUTPUT_FILES
from .worker import BackgroundRun

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
MASK_ROLES = ("fixed_brain_mask", "moving_brain_mask")     # from models that give brain masks; else absent
OUTPUT_ROLES = ("transform", "warped", "fixed_segmentation", "moving_segmentation", "warped_moving_segmentation",
                "jacobian") + MASK_ROLES
SEGMENTATION_ROLES = ("fixed_segmentation", "moving_segmentation", "warped_moving_segmentation") + MASK_ROLES
MOVING_SIDE_ROLES = ("moving_segmentation", "moving_brain_mask")   # on the moving image: under its study
MASK_FILE_NAMES = {role: f"{role}.nii.gz" for role in MASK_ROLES}  # as outputs.MASK_FILES
MIN_SLICES = 4            # along every axis: the affine pyramid (ITK recursive Gaussian) fails on 3 (measured: 3 fail, 4 run)
LABEL_SUFFIX = "_labels"  # as JointRegSegLib.training.finetune (kept here: that module imports torch)
CASE_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha")
JACOBIAN_COLOR_NODE_NAME = "JointRegSeg Jacobian determinant"

# --- terminology ----------------------------------------------------------------------------------
# Segments carry standard codes (SNOMED CT) as SlicerMONAIAuto3DSeg and TotalSegmentator do. New model
# cards hold them per label ("terminology": {"category": [scheme, code, meaning], "type": [...],
# "modifier": [...]}); for older cards the label name is looked up here. The codes live in the extension's
# own terminology context (JointRegSeg/Resources/SegmentationCategoryTypeModifier-JointRegSeg.term.json,
# loaded at start-up): Slicer's General Anatomy list lacks hippocampus and cerebellum, names 40146001
# differently and has no sides for cerebellum.
TERMINOLOGY_CONTEXT = "Segmentation category and type - JointRegSeg"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMICAL_STRUCTURE = ("SCT", "123037004", "Anatomical Structure")
TISSUE = ("SCT", "85756007", "Tissue")
SIDES = {"left": ("SCT", "7771000", "Left"), "right": ("SCT", "24028007", "Right")}
STRUCTURES = {   # lower-case name or synonym -> SNOMED CT type
    "caudate": ("SCT", "11000004", "Caudate nucleus"),
    "caudate nucleus": ("SCT", "11000004", "Caudate nucleus"),
    "putamen": ("SCT", "89278009", "Putamen"),
    "pallidum": ("SCT", "14738005", "Globus pallidus"),
    "globus pallidus": ("SCT", "14738005", "Globus pallidus"),
    "thalamus": ("SCT", "119406000", "Thalamus"),
    "hippocampus": ("SCT", "5366008", "Hippocampus"),
    "hippocampal formation": ("SCT", "5366008", "Hippocampus"),
    "amygdala": ("SCT", "4958002", "Amygdala"),
    "amygdaloid body": ("SCT", "4958002", "Amygdala"),
    "cerebellum": ("SCT", "113305005", "Cerebellum"),
    "cerebral cortex": ("SCT", "40146001", "Cerebral cortex"),
    "cortex": ("SCT", "40146001", "Cerebral cortex"),
    "cerebral white matter": ("SCT", "68523003", "Cerebral white matter"),
    "white matter": ("SCT", "68523003", "Cerebral white matter"),
    "lateral ventricle": ("SCT", "66720007", "Lateral ventricle"),
    "accumbens": ("SCT", "279215006", "Nucleus accumbens"),
    "nucleus accumbens": ("SCT", "279215006", "Nucleus accumbens"),
    "ventral diencephalon": ("SCT", "62137007", "Diencephalon"),
    "diencephalon": ("SCT", "62137007", "Diencephalon"),
    "third ventricle": ("SCT", "49688004", "Third ventricle"),
    "fourth ventricle": ("SCT", "35918002", "Fourth ventricle"),
    "brainstem": ("SCT", "15926001", "Brainstem"),
    "brain stem": ("SCT", "15926001", "Brainstem"),
    "cerebrospinal fluid": ("SCT", "65216001", "Cerebrospinal fluid"),
    "csf": ("SCT", "65216001", "Cerebrospinal fluid"),
    "brain": ("SCT", "12738006", "Brain"),
}
# the one segment of a brain mask's segmentation
BRAIN_MASK_ENTRY = {"value": 1, "name": "brain", "color": [0.98, 0.98, 0.88],
                    "terminology": {"category": list(ANATOMICAL_STRUCTURE), "type": ["SCT", "12738006", "Brain"]}}


def _codes(value) -> tuple | None:
    if not value:
        return None
    if len(value) != 3:
        raise JointRegSegError(f"a terminology code needs [scheme, code, meaning], got {value!r}")
    return tuple(str(v) for v in value)


def _split_side(name: str) -> tuple[tuple | None, str]:
    words = name.strip().lower().split()
    if len(words) > 1 and words[0] in SIDES:
        return SIDES[words[0]], " ".join(words[1:])
    if len(words) > 1 and words[-1] in SIDES:
        return SIDES[words[-1]], " ".join(words[:-1])
    return None, " ".join(words)


def label_terminology(entry: dict) -> dict:
    """{"category", "type", "modifier"} code triples for a label-table entry: the card's own, else by name
    (a known structure, optionally with a side), else generic "Tissue"."""
    own = entry.get("terminology")
    if own:
        return {"category": _codes(own.get("category")) or ANATOMICAL_STRUCTURE, "type": _codes(own["type"]),
                "modifier": _codes(own.get("modifier"))}
    side, base = _split_side(entry["name"])
    if base in STRUCTURES:
        return {"category": ANATOMICAL_STRUCTURE, "type": STRUCTURES[base], "modifier": side}
    return {"category": TISSUE, "type": TISSUE, "modifier": None}


def terminology_entry(entry: dict) -> str:
    """The label's terminology as Slicer's serialized segment terminology entry."""
    codes = label_terminology(entry)
    category, kind = codes["category"], codes["type"]
    modifier = codes["modifier"] or ("", "", "")
    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
        TERMINOLOGY_CONTEXT, category[1], category[0], category[2], kind[1], kind[0], kind[2],
        modifier[1], modifier[0], modifier[2], ANATOMIC_CONTEXT, "", "", "", "", "", "")


def _segment_codes(segment) -> tuple | None:
    """(type code, modifier code) of a segment's terminology, None when it has none or only the default."""
    text = segment.GetTerminology() if hasattr(segment, "GetTerminology") else None
    if not text:
        return None
    entry = slicer.vtkSlicerTerminologyEntry()
    if not slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(text, entry):
        return None
    kind = entry.GetTypeObject()
    code = kind.GetCodeValue() if kind is not None else ""
    if not code or code == TISSUE[1]:
        return None
    modifier = entry.GetTypeModifierObject()
    return code, (modifier.GetCodeValue() if modifier is not None else "") or ""


def _names_for(entry: dict) -> set[str]:
    """Lower-case names a segment may carry for this label: the name, its SNOMED meaning and synonyms."""
    codes = label_terminology(entry)
    side = codes["modifier"][2].lower() + " " if codes["modifier"] else ""
    names = {entry["name"].strip().lower()}
    if codes["type"] not in (TISSUE,):
        names.add(side + codes["type"][2].lower())
        names |= {side + synonym for synonym, kind in STRUCTURES.items() if kind[1] == codes["type"][1]}
    return names


def match_segments_to_labels(segmentation_node, label_table: list) -> dict[str, int]:
    """segment ID -> label value, matched by terminology code (type and side), else by name (case-insensitive,
    with the structure's standard name and synonyms, e.g. "Caudate nucleus" for "caudate").
    Raises InputImageError naming the segments that match no label."""
    segmentation = segmentation_node.GetSegmentation()
    labels = [e for e in label_table if int(e["value"]) != 0]
    by_code, by_name = {}, {}
    for entry in labels:
        codes = label_terminology(entry)
        if codes["type"] != TISSUE:
            by_code[(codes["type"][1], codes["modifier"][1] if codes["modifier"] else "")] = int(entry["value"])
        for name in _names_for(entry):
            by_name.setdefault(name, int(entry["value"]))
    matched, unknown = {}, []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        value = by_code.get(_segment_codes(segment) or ("", ""))
        if value is None:
            value = by_name.get(" ".join(segment.GetName().strip().lower().split()))
        if value is None:
            unknown.append(segment.GetName())
        else:
            matched[segment_id] = value
    if unknown:
        raise InputImageError(f"segments {unknown} of '{segmentation_node.GetName()}' match no structure of the "
                              f"model ({', '.join(e['name'] for e in labels)}); rename or delete them")
    if not matched:
        raise InputImageError(f"segmentation '{segmentation_node.GetName()}' has no segments")
    return matched


# --- inputs -------------------------------------------------------------------------------------

def check_volume_node(node, role: str) -> None:
    """Raise InputImageError naming what is wrong with `node` as the `role` input."""
    if node is None:
        raise InputImageError(f"no {role} volume selected")
    name = node.GetName()
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputImageError(f"{role} volume '{name}' is a label map; select an intensity image")
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputImageError(f"{role} volume '{name}' is a {node.GetClassName()}, not a scalar volume")
    image = node.GetImageData()
    if image is None:
        raise InputImageError(f"{role} volume '{name}' has no image data")
    components = image.GetNumberOfScalarComponents()
    if components != 1:
        raise InputImageError(f"{role} volume '{name}' has {components} values per voxel (a 4D, vector or "
                              "colour volume); select a 3D scalar volume")
    dims = image.GetDimensions()
    if sum(d > 1 for d in dims) < 3:
        raise InputImageError(f"{role} volume '{name}' is {sum(d > 1 for d in dims)}D ({dims[0]}x{dims[1]}x"
                              f"{dims[2]} voxels); a 3D volume is needed")
    if min(dims) < MIN_SLICES:
        raise InputImageError(f"{role} volume '{name}' is only {min(dims)} slices thick ({dims[0]}x{dims[1]}x"
                              f"{dims[2]} voxels); at least {MIN_SLICES} along every axis are needed for a 3D "
                              "registration")
    parent = node.GetParentTransformNode()
    if parent is not None:
        raise InputImageError(f"{role} volume '{name}' is under transform '{parent.GetName()}'; harden or "
                              "remove that transform first")


def check_inputs(moving_node, fixed_node) -> None:
    check_volume_node(moving_node, "moving")
    check_volume_node(fixed_node, "fixed")
    if moving_node.GetID() == fixed_node.GetID():
        raise InputImageError(f"moving and fixed are the same volume ('{moving_node.GetName()}'); select two "
                              "different volumes")


def check_outputs(outputs: dict | None, inputs=()) -> dict:
    """Validate the nodes chosen for the outputs (role -> node or None) before any work starts; an output may
    not be one of the `inputs` (its voxels would be overwritten)."""
    outputs = {role: node for role, node in (outputs or {}).items() if node is not None}
    input_ids = {node.GetID() for node in inputs if node is not None}
    for role, node in outputs.items():
        if node.GetID() in input_ids:
            raise InputImageError(f"the output {role.replace('_', ' ')} '{node.GetName()}' is an input of this run; "
                                  "its voxels would be overwritten: choose another node or 'Create new'")
    unknown = set(outputs) - set(OUTPUT_ROLES)
    if unknown:
        raise JointRegSegError(f"unknown output roles {sorted(unknown)}; known: {OUTPUT_ROLES}")
    expected = {"transform": "vtkMRMLTransformNode", "warped": "vtkMRMLScalarVolumeNode",
                "jacobian": "vtkMRMLScalarVolumeNode", **{r: "vtkMRMLSegmentationNode" for r in SEGMENTATION_ROLES}}
    for role, node in outputs.items():
        if not node.IsA(expected[role]) or node.IsA("vtkMRMLLabelMapVolumeNode"):
            raise JointRegSegError(f"output {role.replace('_', ' ')} '{node.GetName()}' is a {node.GetClassName()}; "
                                   f"a {expected[role]} is needed")
    transform = outputs.get("transform")
    if transform is not None and (transform.IsA("vtkMRMLLinearTransformNode") or
                                  transform.IsA("vtkMRMLBSplineTransformNode")):
        raise JointRegSegError(f"output transform '{transform.GetName()}' is a {transform.GetClassName()}; the result "
                               "is an affine and a displacement field: choose a (general or grid) transform node or "
                               "'Create new transform'")
    return outputs


def export_volume(node, path: Path) -> Path:
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(0)
    if not storage.WriteData(node):
        raise JointRegSegError(f"could not write volume '{node.GetName()}' to {path}")
    return path


# --- geometry helpers ---------------------------------------------------------------------------

def ijk_to_ras(image: sitk.Image) -> np.ndarray:
    direction = np.array(image.GetDirection()).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = LPS_TO_RAS @ np.array(image.GetOrigin())
    return matrix


def _vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def _node_matrix(volume_node) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix


def grid_transform_from_displacement(displacement: sitk.Image, pad: int = 0) -> vtk.vtkAbstractTransform:
    """A VTK grid transform equal to the ITK displacement field (LPS), for use as TransformFromParent:
    a fixed-space RAS point x maps to the moving-space point x + u(x), u = F d(F x). `pad` voxels of zero
    displacement around the grid: beyond its grid ITK's field is 0, while VTK's repeats the edge value."""
    if pad:
        array = np.pad(sitk.GetArrayFromImage(displacement), ((pad, pad),) * 3 + ((0, 0),))
        padded = sitk.GetImageFromArray(array, isVector=True)
        padded.SetSpacing(displacement.GetSpacing())
        padded.SetDirection(displacement.GetDirection())
        padded.SetOrigin(displacement.TransformContinuousIndexToPhysicalPoint((-float(pad),) * 3))
        displacement = padded
    field_lps = sitk.GetArrayFromImage(displacement).astype(np.float64)          # (K, J, I, 3)
    field_ras = field_lps @ LPS_TO_RAS.T
    size, spacing = displacement.GetSize(), np.array(displacement.GetSpacing())
    matrix = ijk_to_ras(displacement)
    grid_image = vtk.vtkImageData()
    grid_image.SetDimensions(*size)
    grid_image.SetSpacing(*spacing)
    grid_image.SetOrigin(*matrix[:3, 3])
    grid_image.AllocateScalars(vtk.VTK_DOUBLE, 3)
    vtk_to_numpy(grid_image.GetPointData().GetScalars()).reshape(size[2], size[1], size[0], 3)[:] = field_ras
    direction = np.eye(4)
    direction[:3, :3] = matrix[:3, :3] / spacing
    grid = slicer.vtkOrientedGridTransform()
    grid.SetDisplacementGridData(grid_image)
    grid.SetGridDirectionMatrix(_vtk_matrix(direction))
    grid.SetInterpolationModeToLinear()
    return grid


def _linear_ras(transform: sitk.Transform) -> np.ndarray:
    """The 4x4 RAS matrix of a linear ITK transform (LPS, resampling direction): F (A p + b) with p = F x."""
    origin = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    columns = [np.array(transform.TransformPoint(tuple(float(v) for v in axis))) - origin for axis in np.eye(3)]
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ np.stack(columns, axis=1) @ LPS_TO_RAS
    matrix[:3, 3] = LPS_TO_RAS @ origin
    return matrix


def _itk_parts(transform: sitk.Transform) -> list:
    """A transform as its parts in ITK's composite order (the last is applied first); nested composites flattened."""
    if transform.GetTransformEnum() == sitk.sitkComposite:
        composite = sitk.CompositeTransform(transform)
        return [part for n in range(composite.GetNumberOfTransforms())
                for part in _itk_parts(composite.GetNthTransform(n))]
    return [transform]


def transform_from_itk(transform: sitk.Transform) -> vtk.vtkAbstractTransform:
    """An ITK transform (LPS, fixed -> moving points: the resampling direction) as a VTK transform to use as
    TransformFromParent in RAS. The engine's compact form, an affine and a displacement field on the model's
    working grid (ITK composite), stays compact: a vtkGeneralTransform of a matrix and an oriented grid (as
    SlicerElastix loads composites), hardenable, a few MB whatever the fixed image's size, exact inside the
    field's grid, and the affine alone far outside it (as in ITK)."""
    general = vtk.vtkGeneralTransform()
    general.PreMultiply()                    # each part concatenated is applied before the previous ones: ITK's order
    for part in _itk_parts(transform):
        if part.GetTransformEnum() == sitk.sitkDisplacementField:
            field = sitk.DisplacementFieldTransform(part).GetDisplacementField()
            general.Concatenate(grid_transform_from_displacement(field, pad=1))
        elif part.IsLinear():
            linear = vtk.vtkTransform()
            linear.SetMatrix(_vtk_matrix(_linear_ras(part)))
            general.Concatenate(linear)
        else:
            raise JointRegSegError(f"cannot load a {part.GetName()} into Slicer here (affine and displacement "
                                   "field transforms only)")
    return general


def _fill_volume(node, image: sitk.Image) -> None:
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras(image)))
    slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(image))


def _oriented_labels(array: np.ndarray, image_to_world: vtk.vtkMatrix4x4) -> "slicer.vtkOrientedImageData":
    k, j, i = array.shape
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(i, j, k)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    vtk_to_numpy(image.GetPointData().GetScalars())[:] = array.astype(np.uint8).ravel()
    image.SetImageToWorldMatrix(image_to_world)
    return image


def _fill_segmentation(node, labels: sitk.Image, label_table: list, reference) -> None:
    """One segment per label (standard terminology, the model's name and colour, auto-generated flags off),
    all in one shared label-map layer on `reference`'s grid; no node is added to the scene."""
    segmentation = node.GetSegmentation()
    segmentation.RemoveAllSegments()
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    layer = _oriented_labels(sitk.GetArrayFromImage(labels), _vtk_matrix(ijk_to_ras(labels)))
    representation = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    segmentation.SetSourceRepresentationName(representation) if hasattr(segmentation, "SetSourceRepresentationName") \
        else segmentation.SetMasterRepresentationName(representation)
    for entry in label_table:
        value = int(entry["value"])
        if value == 0:
            continue
        segment = slicer.vtkSegment()
        segment.SetName(entry["name"])
        segment.SetColor(*[float(c) for c in entry["color"]])
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        segment.SetTag(segment.GetTerminologyEntryTagName(), terminology_entry(entry))
        segment.SetLabelValue(value)
        segment.AddRepresentation(representation, layer)
        segmentation.AddSegment(segment, f"label_{value}")


def segment_label_array(segmentation_node, segment_ids: dict, volume_node) -> np.ndarray:
    """Segments (segment ID -> label value) as one label array on `volume_node`'s grid (nearest neighbour),
    without temporary scene nodes."""
    if segmentation_node.GetParentTransformNode() is not None:
        raise InputImageError(f"segmentation '{segmentation_node.GetName()}' is under a transform; harden or "
                              "remove it first")
    dims = volume_node.GetImageData().GetDimensions()
    reference = slicer.vtkOrientedImageData()
    reference.SetDimensions(*dims)
    reference.SetImageToWorldMatrix(_node_matrix(volume_node))
    representation = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    segmentation = segmentation_node.GetSegmentation()
    if not segmentation.ContainsRepresentation(representation):
        segmentation.CreateRepresentation(representation)
    labels = np.zeros((dims[2], dims[1], dims[0]), np.uint8)
    for segment_id, value in segment_ids.items():
        source = slicer.vtkOrientedImageData()
        if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
                segmentation_node, segment_id, source):
            raise JointRegSegError(f"could not read segment '{segmentation.GetSegment(segment_id).GetName()}'")
        extent = source.GetExtent()
        if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
            continue                                  # an empty segment
        resampled = slicer.vtkOrientedImageData()
        slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            source, reference, resampled, False)
        array = vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
        labels[array == segmentation.GetSegment(segment_id).GetLabelValue()] = value
    return labels


# --- results ------------------------------------------------------------------------------------

@dataclass
class Results:
    transform: object = None
    warped: object = None
    fixed_segmentation: object = None
    moving_segmentation: object = None
    warped_moving_segmentation: object = None
    jacobian: object = None
    fixed_brain_mask: object = None          # segmentation nodes with one "brain" segment, when the model gives masks
    moving_brain_mask: object = None
    qc: dict = field(default_factory=dict)

    def nodes(self) -> dict:
        return {role: getattr(self, role) for role in OUTPUT_ROLES if getattr(self, role) is not None}


def _node_ids(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def jacobian_color_node(scene):
    """A diverging colour table for det J, shared by every run in the scene: 0 and below (folding) black,
    compression blue, 1 white, expansion red, over display window [0, 2]."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLColorTableNode")
        if node.GetName() == JACOBIAN_COLOR_NODE_NAME:
            return node
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", JACOBIAN_COLOR_NODE_NAME)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    node.SetColor(0, "folding (det J <= 0)", 0.0, 0.0, 0.0, 1.0)
    for i in range(1, 256):
        t = (i - 128) / 127.0
        if t < 0:
            rgb = (1 + t * 0.85, 1 + t * 0.6, 1.0)          # white -> blue
        else:
            rgb = (1.0, 1 - t * 0.85, 1 - t * 0.85)        # white -> red
        node.SetColor(i, f"{2 * i / 255:.2f}", *rgb, 1.0)
    node.SetAttribute("JointRegSeg.role", "jacobian colours")
    return node


def style_jacobian(node) -> None:
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(jacobian_color_node(node.GetScene()).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 2.0)


def show_over(background, foreground, opacity: float = 0.5) -> int:
    """Show `foreground` over `background` in every slice view of the scene; returns the number of views."""
    scene = background.GetScene()
    count = 0
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        composite.SetBackgroundVolumeID(background.GetID())
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetForegroundOpacity(opacity)
        count += 1
    return count


def load_results(scene, out_dir: Path, moving_node, fixed_node, outputs: dict | None = None,
                 jacobian: bool = False) -> Results:
    """Nodes for the outputs in `out_dir`. `outputs` may name existing nodes (role -> node) to fill
    instead of creating new ones. Any failure leaves the scene as it was."""
    out_dir = Path(out_dir)
    outputs = check_outputs(outputs)
    qc = json.loads((out_dir / OUTPUT_FILES["qc"]).read_text(encoding="utf-8"))
    label_table = qc["label_table"]
    moving_name, fixed_name = moving_node.GetName(), fixed_node.GetName()
    read = {key: sitk.ReadImage(str(out_dir / OUTPUT_FILES[key])) for key in
            ("warped", "fixed_segmentation", "moving_segmentation", "warped_moving_segmentation", "jacobian")}
    masks = {role: sitk.ReadImage(str(out_dir / name)) for role, name in MASK_FILE_NAMES.items()
             if (out_dir / name).is_file()}
    compact = transform_from_itk(sitk.ReadTransform(str(out_dir / OUTPUT_FILES["transform"])))
    before = set(_node_ids(scene))
    results = Results(qc=qc)
    try:
        scene.StartState(scene.BatchProcessState)
        try:
            def node_for(role, node_class, name):
                node = scene.AddNewNodeByClass(node_class, scene.GenerateUniqueName(name))
                node.CreateDefaultDisplayNodes()
                setattr(results, role, node)
                return node

            transform = node_for("transform", "vtkMRMLTransformNode", f"{moving_name} to {fixed_name}")
            transform.SetAndObserveTransformFromParent(compact)
            _fill_volume(node_for("warped", "vtkMRMLScalarVolumeNode", f"{moving_name} warped to {fixed_name}"),
                         read["warped"])
            results.warped.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
            _fill_segmentation(node_for("fixed_segmentation", "vtkMRMLSegmentationNode",
                                        f"{fixed_name} segmentation"),
                               read["fixed_segmentation"], label_table, fixed_node)
            _fill_segmentation(node_for("moving_segmentation", "vtkMRMLSegmentationNode",
                                        f"{moving_name} segmentation"),
                               read["moving_segmentation"], label_table, moving_node)
            _fill_segmentation(node_for("warped_moving_segmentation", "vtkMRMLSegmentationNode",
                                        f"{moving_name} segmentation warped to {fixed_name}"),
                               read["warped_moving_segmentation"], label_table, fixed_node)
            if jacobian or "jacobian" in outputs:
                _fill_volume(node_for("jacobian", "vtkMRMLScalarVolumeNode",
                                      f"{moving_name} to {fixed_name} Jacobian determinant"), read["jacobian"])
            for role, mask in masks.items():
                on_fixed = role == "fixed_brain_mask"
                volume_node, name = (fixed_node, fixed_name) if on_fixed else (moving_node, moving_name)
                _fill_segmentation(node_for(role, "vtkMRMLSegmentationNode", f"{name} brain mask"),
                                   sitk.Cast(mask != 0, sitk.sitkUInt8), [BRAIN_MASK_ENTRY], volume_node)
            _into_existing(scene, results, outputs)
            if results.jacobian is not None:
                style_jacobian(results.jacobian)
            # the transform knows what it registers (as SlicerElastix sets it)
            results.transform.SetNodeReferenceID(results.transform.GetMovingNodeReferenceRole(), moving_node.GetID())
            results.transform.SetNodeReferenceID(results.transform.GetFixedNodeReferenceRole(), fixed_node.GetID())
        finally:
            scene.EndState(scene.BatchProcessState)
        place_in_subject_hierarchy(scene, results, moving_node, fixed_node)
    except BaseException:
        for node_id in reversed(_node_ids(scene)):
            if node_id not in before and scene.GetNodeByID(node_id) is not None:
                scene.RemoveNode(scene.GetNodeByID(node_id))
        raise
    return results


def place_in_subject_hierarchy(scene, results: Results, moving_node, fixed_node) -> None:
    """Results under their input's subject-hierarchy parent (patient / study, where DICOM export looks for
    them): the moving image's segmentations under the moving volume's parent, the rest under the fixed one's;
    an input at the scene's top level gives the other input's parent; both there: left at the top level."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return
    top = hierarchy.GetSceneItemID()

    def parent_of(node):
        item = hierarchy.GetItemByDataNode(node)
        parent = hierarchy.GetItemParent(item) if item else 0
        return parent if parent and parent != top else None

    fixed_parent, moving_parent = parent_of(fixed_node), parent_of(moving_node)
    for role, node in results.nodes().items():
        parent = (moving_parent or fixed_parent) if role in MOVING_SIDE_ROLES else (fixed_parent or moving_parent)
        if not parent:
            continue
        item = hierarchy.GetItemByDataNode(node)
        if item:
            hierarchy.SetItemParent(item, parent)
        else:                    # no item yet (Slicer's subject hierarchy plugins make one for each new node)
            hierarchy.CreateItem(parent, node)


def _into_existing(scene, results: Results, outputs: dict) -> None:
    """Move freshly built content into the nodes the user chose, then drop the fresh nodes."""
    for role, target in outputs.items():
        fresh = getattr(results, role)
        if target is None or fresh is None:
            continue
        if role == "transform":
            target.SetAndObserveTransformFromParent(fresh.GetTransformFromParent())
        elif role in SEGMENTATION_ROLES:
            target.GetSegmentation().DeepCopy(fresh.GetSegmentation())
            target.SetNodeReferenceID(target.GetReferenceImageGeometryReferenceRole(),
                                      fresh.GetNodeReferenceID(fresh.GetReferenceImageGeometryReferenceRole()))
            if target.GetDisplayNode() is None:
                target.CreateDefaultDisplayNodes()
        else:
            target.SetIJKToRASMatrix(_node_matrix(fresh))
            target.SetAndObserveImageData(fresh.GetImageData())
            if target.GetDisplayNode() is None:
                target.CreateDefaultDisplayNodes()
        setattr(results, role, target)
        for display in [fresh.GetNthDisplayNode(i) for i in range(fresh.GetNumberOfDisplayNodes())]:
            scene.RemoveNode(display)
        scene.RemoveNode(fresh)


# --- a job --------------------------------------------------------------------------------------

WORK_PREFIX = "JointRegSeg-"


def temporary_root() -> Path:
    """Slicer's temporary folder (Application settings > Temporary directory; slicer.app.temporaryPath, the
    folder slicer.util.tempDirectory uses), else the system's when there is no Slicer application."""
    app = getattr(slicer, "app", None)
    folder = getattr(app, "temporaryPath", None) if app is not None else None
    return Path(folder) if folder else Path(tempfile.gettempdir())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_work_folders(root: Path) -> list[Path]:
    """Work folders of a Slicer that is gone (crashed: copies of patient volumes left behind); returns them,
    removed. A folder is named JointRegSeg-<pid>-<random>; those of a live process are kept."""
    removed = []
    for folder in root.glob(f"{WORK_PREFIX}*-*"):
        pid = folder.name[len(WORK_PREFIX):].split("-", 1)[0]
        if folder.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def work_folder() -> Path:
    """A private folder for one run's copies of the inputs and its outputs, in Slicer's temporary folder,
    named after this process (so that a later session removes it if this one crashes)."""
    root = temporary_root()
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_work_folders(root)
    return Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-", dir=root))

class Job:
    """One Register & Segment run on scene nodes: export inputs, run the lib in another process, import
    outputs. `run` has progress, state and cancel: a request to the warm `worker` when one is given (model
    and imports kept between runs), else a child process of its own."""

    def __init__(self, moving_node, fixed_node, model_path, affine: bool = True, refine_iterations: int = 0,
                 device: str = "auto", python: str | None = None, guide: tuple | None = None, worker=None,
                 outputs: dict | None = None):
        """`guide` = (moving segmentation node, fixed segmentation node): corrected segmentations that the
        refinement also aligns (label-driven instance optimisation)."""
        check_inputs(moving_node, fixed_node)
        check_outputs(outputs, (moving_node, fixed_node, *(guide or ())))
        if model_path is None:
            from ..models.installed import default_model_path
            model_path = default_model_path()
        self.card = read_card(model_path)
        if int(refine_iterations) < 0:
            raise JointRegSegError(f"refinement iterations must be 0 or more, got {refine_iterations}")
        if guide is not None and any(g is None for g in guide):
            raise InputImageError("label guidance needs a corrected segmentation of both images")
        self.moving_id, self.fixed_id = moving_node.GetID(), fixed_node.GetID()
        self.workdir = work_folder()
        # removed however the job ends: finished, cancelled, failed, or dropped (scene closed, Slicer quit)
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.workdir), True)
        try:
            moving_file = export_volume(moving_node, self.workdir / "moving.nrrd")
            fixed_file = export_volume(fixed_node, self.workdir / "fixed.nrrd")
            # the outputs are read into the scene and deleted: not worth deflating
            request = {"moving": str(moving_file), "fixed": str(fixed_file), "model": str(Path(model_path).resolve()),
                       "out": str(self.workdir / "out"), "refine": int(refine_iterations), "device": device,
                       "affine": bool(affine), "compress": False}
            if guide is not None:
                for key, segmentation, node, image_file in (
                        ("guide_moving_labels", guide[0], moving_node, moving_file),
                        ("guide_fixed_labels", guide[1], fixed_node, fixed_file)):
                    request[key] = str(export_labels(segmentation, node, self.card["labels"],
                                                     self.workdir / f"{key}.nrrd", image_file))
            if worker is not None:
                self.run = worker.run(request)
            else:
                args = ["run", "--moving", moving_file, "--fixed", fixed_file, "--model", request["model"],
                        "--out", request["out"], "--refine", request["refine"], "--device", device]
                for key in ("guide_moving_labels", "guide_fixed_labels"):
                    if key in request:
                        args += ["--" + key.replace("_", "-"), request[key]]
                self.run = BackgroundRun(args + ([] if affine else ["--no-affine"]), python=python)
        except BaseException:
            self.cleanup()
            raise

    def finish(self, scene, outputs: dict | None = None, jacobian: bool = False) -> Results:
        """Import the outputs of a finished run (raises Cancelled / JointRegSegError otherwise)."""
        try:
            self.run.raise_for_state()
            if self.run.state == "running":
                raise JointRegSegError("the run has not finished yet")
            moving, fixed = scene.GetNodeByID(self.moving_id), scene.GetNodeByID(self.fixed_id)
            if moving is None or fixed is None:
                raise JointRegSegError("an input volume was removed from the scene while the run was going on")
            return load_results(scene, self.workdir / "out", moving, fixed, outputs, jacobian)
        finally:
            self.cleanup()

    def cancel(self) -> None:
        """Stop the run; returns once it has stopped (blocking: scripts). The module uses request_cancel."""
        try:
            self.run.cancel()
        finally:
            self.cleanup()

    def request_cancel(self, grace_s: float | None = None) -> None:
        """Ask the run to stop and return at once; call `reap()` (from a timer) until it returns True. The
        scene is never touched: a cancelled job's outputs are not loaded."""
        self.run.request_cancel(*(() if grace_s is None else (grace_s,)))

    def reap(self) -> bool:
        """One non-blocking step of a cancel (the process tree is killed once the grace period has passed);
        True once the run has ended, its private folder then removed."""
        if not self.run.reap():
            return False
        self.cleanup()
        return True

    def cleanup(self) -> None:
        self._finalizer()


def label_array_from_segmentation(segmentation_node, volume_node, label_table: list) -> np.ndarray:
    """The segments as one label array on `volume_node`'s grid, values from `label_table` matched by terminology
    or name (see match_segments_to_labels)."""
    return segment_label_array(segmentation_node, match_segments_to_labels(segmentation_node, label_table),
                               volume_node)


def export_labels(segmentation_node, volume_node, label_table: list, path: Path, image_file: Path) -> Path:
    """Write the segmentation as a label map on the grid of `image_file` (the exported `volume_node`)."""
    image = sitk.ReadImage(str(image_file))
    label_image = sitk.GetImageFromArray(label_array_from_segmentation(segmentation_node, volume_node, label_table))
    label_image.CopyInformation(image)
    sitk.WriteImage(label_image, str(path), True)
    return path


# --- annotate & refine --------------------------------------------------------------------------

def case_name(volume_node) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in volume_node.GetName())


def list_training_cases(folder) -> list[str]:
    """Case names in a fine-tuning folder (NAME.nrrd with or without NAME_labels.nrrd), sorted; reads file
    names only (no torch: this runs in Slicer's process)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stems = set()
    for path in folder.iterdir():
        if path.name.endswith(".seg.nrrd") or path.name.startswith("."):
            continue
        for suffix in CASE_SUFFIXES:
            if path.name.endswith(suffix):
                stems.add(path.name[: -len(suffix)])
                break
    return sorted(s for s in stems if not s.endswith(LABEL_SUFFIX))


def existing_case_files(folder, name: str) -> list[Path]:
    folder = Path(folder)
    return [folder / f"{base}{suffix}" for base in (name, name + LABEL_SUFFIX) for suffix in CASE_SUFFIXES + (".seg.nrrd",)
            if (folder / f"{base}{suffix}").exists()]


def save_training_case(folder, volume_node, segmentation_node, label_table: list, name: str | None = None,
                       overwrite: bool = False) -> dict:
    """Add a corrected case to a fine-tuning folder: NAME.nrrd (the image), NAME_labels.nrrd (a label map
    on the image's grid, values from `label_table` matched by terminology or segment name) and NAME.seg.nrrd
    (the segmentation, for people); without a segmentation, the image alone (an unlabelled image). A case
    of that name already there is an error unless `overwrite`. Nothing is written unless everything can be."""
    check_volume_node(volume_node, "annotated")
    folder = Path(folder)
    name = name or case_name(volume_node)
    existing = existing_case_files(folder, name)
    if existing and not overwrite:
        raise JointRegSegError(f"the training folder already has a case '{name}' ({', '.join(p.name for p in existing)}); "
                               "rename the volume or confirm replacing it")
    targets = {"image": folder / f"{name}.nrrd"}
    labels = None
    if segmentation_node is not None:
        labels = label_array_from_segmentation(segmentation_node, volume_node, label_table)
        targets.update({"labels": folder / f"{name}{LABEL_SUFFIX}.nrrd", "segmentation": folder / f"{name}.seg.nrrd"})
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".case-", dir=folder))
    try:
        export_volume(volume_node, staging / "image.nrrd")
        if labels is not None:
            image = sitk.ReadImage(str(staging / "image.nrrd"))
            label_image = sitk.GetImageFromArray(labels)
            label_image.CopyInformation(image)
            sitk.WriteImage(label_image, str(staging / "labels.nrrd"), True)   # (labels checked before any write)
            storage = slicer.vtkMRMLSegmentationStorageNode()
            storage.SetFileName(str(staging / "segmentation.seg.nrrd"))
            if not storage.WriteData(segmentation_node):
                raise JointRegSegError(f"could not write segmentation '{segmentation_node.GetName()}'")
        for key, target in targets.items():
            source = {"image": "image.nrrd", "labels": "labels.nrrd", "segmentation": "segmentation.seg.nrrd"}[key]
            (staging / source).replace(target)
        for path in existing:                     # replacing: drop what else the old case had (other formats)
            if path not in targets.values():
                path.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return targets
