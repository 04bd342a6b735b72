"""The MRML adapter: Slicer nodes <-> the lib's files, and a Register & Segment job on scene nodes.

The only lib file that imports `slicer`/`vtk`. The work itself runs in a child process (worker.py)
on volumes exported to a private folder; results come back as new nodes only once everything has been
read, and a failure removes every node it added, so the scene ends either complete or as it was.
Coordinates: files are LPS (ITK); MRML is RAS; F = diag(-1, -1, 1) converts either way.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util.numpy_support import vtk_to_numpy

from .card import read_card
from .errors import InputImageError, JointRegSegError
from .outputs import OUTPUT_FILES
from .worker import BackgroundRun

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
OUTPUT_ROLES = ("transform", "warped", "fixed_segmentation", "moving_segmentation", "jacobian")


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
    parent = node.GetParentTransformNode()
    if parent is not None:
        raise InputImageError(f"{role} volume '{name}' is under transform '{parent.GetName()}'; harden or "
                              "remove that transform first")


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


def grid_transform_from_displacement(displacement: sitk.Image) -> vtk.vtkAbstractTransform:
    """A VTK grid transform equal to the ITK displacement field (LPS), for use as TransformFromParent:
    a fixed-space RAS point x maps to the moving-space point x + u(x), u = F d(F x)."""
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


def _fill_volume(node, image: sitk.Image) -> None:
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras(image)))
    slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(image))


def _fill_segmentation(node, labels: sitk.Image, label_table: list, reference) -> None:
    segmentation = node.GetSegmentation()
    segmentation.RemoveAllSegments()
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    array = sitk.GetArrayFromImage(labels)
    for entry in label_table:
        value = int(entry["value"])
        if value == 0:
            continue
        segment_id = segmentation.AddEmptySegment(f"label_{value}", entry["name"], [float(c) for c in entry["color"]])
        slicer.util.updateSegmentBinaryLabelmapFromArray((array == value).astype(np.uint8), node, segment_id,
                                                         reference)


# --- results ------------------------------------------------------------------------------------

@dataclass
class Results:
    transform: object = None
    warped: object = None
    fixed_segmentation: object = None
    moving_segmentation: object = None
    jacobian: object = None
    qc: dict = field(default_factory=dict)

    def nodes(self) -> dict:
        return {role: getattr(self, role) for role in OUTPUT_ROLES if getattr(self, role) is not None}


def _node_ids(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def load_results(scene, out_dir: Path, moving_node, fixed_node, outputs: dict | None = None,
                 jacobian: bool = False) -> Results:
    """Nodes for the outputs in `out_dir`. `outputs` may name existing nodes (role -> node) to fill
    instead of creating new ones. Any failure leaves the scene as it was."""
    out_dir, outputs = Path(out_dir), dict(outputs or {})
    unknown = set(outputs) - set(OUTPUT_ROLES)
    if unknown:
        raise JointRegSegError(f"unknown output roles {sorted(unknown)}; known: {OUTPUT_ROLES}")
    qc = json.loads((out_dir / OUTPUT_FILES["qc"]).read_text(encoding="utf-8"))
    label_table = qc["label_table"]
    moving_name, fixed_name = moving_node.GetName(), fixed_node.GetName()
    read = {key: sitk.ReadImage(str(out_dir / OUTPUT_FILES[key])) for key in
            ("warped", "displacement", "fixed_segmentation", "moving_segmentation", "jacobian")}
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

            transform = node_for("transform", "vtkMRMLGridTransformNode", f"{moving_name} to {fixed_name}")
            transform.SetAndObserveTransformFromParent(grid_transform_from_displacement(read["displacement"]))
            _fill_volume(node_for("warped", "vtkMRMLScalarVolumeNode", f"{moving_name} warped to {fixed_name}"),
                         read["warped"])
            results.warped.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
            _fill_segmentation(node_for("fixed_segmentation", "vtkMRMLSegmentationNode",
                                        f"{fixed_name} segmentation"),
                               read["fixed_segmentation"], label_table, fixed_node)
            _fill_segmentation(node_for("moving_segmentation", "vtkMRMLSegmentationNode",
                                        f"{moving_name} segmentation"),
                               read["moving_segmentation"], label_table, moving_node)
            if jacobian or "jacobian" in outputs:
                _fill_volume(node_for("jacobian", "vtkMRMLScalarVolumeNode",
                                      f"{moving_name} to {fixed_name} Jacobian determinant"), read["jacobian"])
            _into_existing(scene, results, outputs)
        finally:
            scene.EndState(scene.BatchProcessState)
    except BaseException:
        for node_id in reversed(_node_ids(scene)):
            if node_id not in before:
                scene.RemoveNode(scene.GetNodeByID(node_id))
        raise
    return results


def _into_existing(scene, results: Results, outputs: dict) -> None:
    """Move freshly built content into the nodes the user chose, then drop the fresh nodes."""
    for role, target in outputs.items():
        fresh = getattr(results, role)
        if target is None or fresh is None:
            continue
        if role == "transform":
            target.SetAndObserveTransformFromParent(fresh.GetTransformFromParent())
        elif role in ("fixed_segmentation", "moving_segmentation"):
            target.GetSegmentation().DeepCopy(fresh.GetSegmentation())
            target.SetNodeReferenceID(target.GetReferenceImageGeometryReferenceRole(),
                                      fresh.GetNodeReferenceID(fresh.GetReferenceImageGeometryReferenceRole()))
            if target.GetDisplayNode() is None:
                target.CreateDefaultDisplayNodes()
        else:
            matrix = vtk.vtkMatrix4x4()
            fresh.GetIJKToRASMatrix(matrix)
            target.SetIJKToRASMatrix(matrix)
            target.SetAndObserveImageData(fresh.GetImageData())
            if target.GetDisplayNode() is None:
                target.CreateDefaultDisplayNodes()
        setattr(results, role, target)
        for display in [fresh.GetNthDisplayNode(i) for i in range(fresh.GetNumberOfDisplayNodes())]:
            scene.RemoveNode(display)
        scene.RemoveNode(fresh)


# --- a job --------------------------------------------------------------------------------------

class Job:
    """One Register & Segment run on scene nodes: export inputs, run the lib in a child process,
    import outputs. `run` is the BackgroundRun (progress, state, cancel)."""

    def __init__(self, moving_node, fixed_node, model_path, affine: bool = True, refine_iterations: int = 0,
                 device: str = "auto", python: str | None = None, guide: tuple | None = None):
        """`guide` = (moving segmentation node, fixed segmentation node): corrected segmentations that the
        refinement also aligns (label-driven instance optimisation)."""
        check_volume_node(moving_node, "moving")
        check_volume_node(fixed_node, "fixed")
        if model_path is None:
            from .models import default_model_path
            model_path = default_model_path()
        self.card = read_card(model_path)
        if int(refine_iterations) < 0:
            raise JointRegSegError(f"refinement iterations must be 0 or more, got {refine_iterations}")
        self.moving_id, self.fixed_id = moving_node.GetID(), fixed_node.GetID()
        self.workdir = Path(tempfile.mkdtemp(prefix="JointRegSeg-"))
        try:
            moving_file = export_volume(moving_node, self.workdir / "moving.nrrd")
            fixed_file = export_volume(fixed_node, self.workdir / "fixed.nrrd")
            args = ["run", "--moving", moving_file, "--fixed", fixed_file, "--model", Path(model_path).resolve(),
                    "--out", self.workdir / "out", "--refine", int(refine_iterations), "--device", device]
            if guide is not None:
                if any(g is None for g in guide):
                    raise InputImageError("label guidance needs a corrected segmentation of both images")
                for flag, segmentation, node, image_file in (
                        ("--guide-moving-labels", guide[0], moving_node, moving_file),
                        ("--guide-fixed-labels", guide[1], fixed_node, fixed_file)):
                    path = export_labels(segmentation, node, self.card["labels"], self.workdir / f"{flag[8:]}.nrrd",
                                         image_file)
                    args += [flag, path]
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
        self.run.cancel()
        self.cleanup()

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def label_array_from_segmentation(segmentation_node, volume_node, label_table: list) -> np.ndarray:
    """The segments as one label array on `volume_node`'s grid, values from `label_table` by segment name."""
    segmentation = segmentation_node.GetSegmentation()
    by_name = {e["name"]: int(e["value"]) for e in label_table if int(e["value"]) != 0}
    segment_names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    unknown = [n for n in segment_names if n not in by_name]
    if unknown:
        raise InputImageError(f"segments {unknown} are not in the model's label table {sorted(by_name)}; rename or "
                              "delete them")
    if not segment_names:
        raise InputImageError(f"segmentation '{segmentation_node.GetName()}' has no segments")
    labels = np.zeros(slicer.util.arrayFromVolume(volume_node).shape, np.uint8)
    for segment_name in segment_names:
        segment_id = segmentation.GetSegmentIdBySegmentName(segment_name)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume_node)
        labels[mask > 0] = by_name[segment_name]
    return labels


def export_labels(segmentation_node, volume_node, label_table: list, path: Path, image_file: Path) -> Path:
    """Write the segmentation as a label map on the grid of `image_file` (the exported `volume_node`)."""
    image = sitk.ReadImage(str(image_file))
    label_image = sitk.GetImageFromArray(label_array_from_segmentation(segmentation_node, volume_node, label_table))
    label_image.CopyInformation(image)
    sitk.WriteImage(label_image, str(path), True)
    return path


# --- annotate & refine --------------------------------------------------------------------------

def save_training_case(folder, volume_node, segmentation_node, label_table: list, name: str | None = None) -> dict:
    """Add a corrected case to a fine-tuning folder: NAME.nrrd (the image), NAME_labels.nrrd (a label map
    on the image's grid, values from `label_table` matched by segment name) and NAME.seg.nrrd (the
    segmentation, for people); without a segmentation, the image alone (an unlabelled image). Nothing
    is written unless everything can be."""
    from .training.finetune import LABEL_SUFFIX
    check_volume_node(volume_node, "annotated")
    folder = Path(folder)
    name = name or "".join(c if c.isalnum() or c in "-_" else "_" for c in volume_node.GetName())
    if segmentation_node is None:            # an image without labels: used in registration pairs only
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".case-", dir=folder))
        try:
            export_volume(volume_node, staging / "image.nrrd").replace(folder / f"{name}.nrrd")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return {"image": folder / f"{name}.nrrd"}
    labels = label_array_from_segmentation(segmentation_node, volume_node, label_table)
    folder.mkdir(parents=True, exist_ok=True)
    targets = {"image": folder / f"{name}.nrrd", "labels": folder / f"{name}{LABEL_SUFFIX}.nrrd",
               "segmentation": folder / f"{name}.seg.nrrd"}
    staging = Path(tempfile.mkdtemp(prefix=".case-", dir=folder))
    try:
        export_volume(volume_node, staging / "image.nrrd")
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
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return targets
