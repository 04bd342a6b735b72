"""How results enter the scene (issue 24, items 6-8), on real MRML (slicer-core), from an engine output folder
built here (no network): the compact transform (affine + working-grid field as a composite, hardenable,
reproducing the warped volume, the affine alone far outside the field), results under the inputs' patient /
study with the transform referencing its fixed and moving volumes, brain masks as segmentations when present,
and the run's status and warnings in the QC text."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import grid_for, phantom_array, phantom_labels, sample_on, smooth_field

import slicer  # noqa: E402  (slicer-core; a missing one fails collection)
from slicer_runtime import boot, import_module_file  # noqa: E402

from JointRegSegLib.core.geometry import physical_points  # noqa: E402
from JointRegSegLib.slicer.mrml import ijk_to_ras, load_results  # noqa: E402
from JointRegSegLib.io.outputs import OUTPUT_FILES  # noqa: E402

F = np.diag([-1.0, -1.0, 1.0])
LABELS = [{"value": 0, "name": "background", "color": [0, 0, 0]},
          {"value": 1, "name": "core", "color": [0.9, 0.2, 0.1]},
          {"value": 2, "name": "shell", "color": [0.1, 0.6, 0.9]}]


@pytest.fixture
def ctx():
    return boot()


def engine_transform(fixed: sitk.Image) -> sitk.Transform:
    """What the engine gives: an affine and a smooth field on a coarse working grid over the fixed image."""
    affine = sitk.AffineTransform(3)
    angle = np.deg2rad(6.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine.SetMatrix(tuple((1.03 * rotation).ravel()))
    affine.SetTranslation((2.5, -3.0, 1.5))
    working = sitk.Image([40, 40, 40], sitk.sitkVectorFloat64, 3)
    working.SetSpacing((3.0, 3.0, 3.0))
    working.SetOrigin((-58.5, -58.5, -58.5))
    points = physical_points(working)
    field = sitk.GetImageFromArray(smooth_field(points, 3.0).astype(np.float64), isVector=True)
    field.CopyInformation(working)
    return sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(field)])


def write_engine_outputs(folder, moving, fixed, masks=True, qc=None):
    transform = engine_transform(fixed)
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteTransform(transform, str(folder / OUTPUT_FILES["transform"]))
    warped = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0)
    moving_labels = sample_on(moving, phantom_labels)
    fixed_labels = sample_on(fixed, phantom_labels)
    images = {"warped": warped, "fixed_segmentation": fixed_labels, "moving_segmentation": moving_labels,
              "warped_moving_segmentation": sitk.Resample(moving_labels, fixed, transform, sitk.sitkNearestNeighbor),
              "jacobian": sitk.Cast(fixed * 0 + 1, sitk.sitkFloat32)}
    for key, image in images.items():
        sitk.WriteImage(image, str(folder / OUTPUT_FILES[key]))
    if masks:
        sitk.WriteImage(sitk.Cast(fixed_labels > 0, sitk.sitkUInt8), str(folder / "fixed_brain_mask.nii.gz"))
        sitk.WriteImage(sitk.Cast(moving_labels > 0, sitk.sitkUInt8), str(folder / "moving_brain_mask.nii.gz"))
    (folder / OUTPUT_FILES["qc"]).write_text(json.dumps({"label_table": LABELS, "folding_percent": 0.0,
                                                         **(qc or {})}), encoding="utf-8")
    return transform, warped


def add_volume(image, name):
    return slicer.util.addVolumeFromArray(sitk.GetArrayFromImage(image), ijk_to_ras(image), name)


@pytest.fixture
def pair(ctx):
    moving = sample_on(grid_for("lps-oblique"), phantom_array)
    fixed = sample_on(grid_for("axis-aligned"), phantom_array, lambda p: p + np.array([2.0, -3.0, 1.5]))
    return moving, fixed, add_volume(moving, "moving"), add_volume(fixed, "fixed")


def concatenated(node):
    general = node.GetTransformFromParent()
    return [general.GetConcatenatedTransform(i) for i in range(general.GetNumberOfConcatenatedTransforms())]


def test_the_transform_is_the_compact_composite_and_hardening_gives_the_warped_volume(ctx, pair, tmp_path):
    moving, fixed, moving_node, fixed_node = pair
    transform, warped = write_engine_outputs(tmp_path / "out", moving, fixed)
    results = load_results(ctx.scene, tmp_path / "out", moving_node, fixed_node)
    node = results.transform
    # compact: a matrix and the working-grid field (+1 voxel of zero border), not a grid on the fixed image
    parts = concatenated(node)
    assert len(parts) == 2 and sorted(p.IsA("vtkLinearTransform") for p in parts) == [0, 1]
    grid = next(p for p in parts if p.IsA("vtkOrientedGridTransform")).GetDisplacementGrid()
    assert grid.GetDimensions() == (42, 42, 42)
    assert grid.GetPointData().GetScalars().GetNumberOfValues() * 8 < 2e6   # whatever the fixed image's size
    # the same mapping as the engine's ITK transform inside the field, and the affine alone far outside it
    rng = np.random.default_rng(1)
    inside = rng.uniform(-50, 50, (200, 3))
    outside = np.array([[150.0, -20.0, 10.0], [-10.0, 220.0, -180.0], [300.0, 300.0, 300.0]])
    for points, tolerance in ((inside, 1e-4), (outside, 1e-4)):
        for x in points:
            itk = F @ np.array(transform.TransformPoint(tuple(F @ x)))
            assert np.abs(np.array(node.GetTransformFromParent().TransformPoint(x)) - itk).max() < tolerance, x
    # resampling the moving volume through the node, or hardening it, gives the engine's warped volume
    warped_array = sitk.GetArrayFromImage(warped)
    body = sitk.GetArrayFromImage(fixed) > 0
    moving_node.SetAndObserveTransformNodeID(node.GetID())
    resampled = slicer.vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume(moving_node, fixed_node)
    resampled.SetAndObserveTransformNodeID(None)
    difference = np.abs(slicer.util.arrayFromVolume(resampled) - warped_array)[body]
    assert difference.mean() < 0.01 * np.abs(warped_array[body]).mean()
    assert ctx.transforms.hardenTransform(moving_node)
    assert moving_node.GetParentTransformNode() is None
    hardened = slicer.vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume(moving_node, fixed_node)
    difference = np.abs(slicer.util.arrayFromVolume(hardened) - warped_array)[body]
    assert difference.mean() < 0.03 * np.abs(warped_array[body]).mean()     # two linear interpolations


def test_results_go_under_the_inputs_study_and_the_transform_names_its_volumes(ctx, pair, tmp_path):
    moving, fixed, moving_node, fixed_node = pair
    write_engine_outputs(tmp_path / "out", moving, fixed)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(ctx.scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "patient")
    fixed_study = hierarchy.CreateStudyItem(patient, "fixed study")
    moving_study = hierarchy.CreateStudyItem(patient, "moving study")
    hierarchy.CreateItem(fixed_study, fixed_node)
    hierarchy.CreateItem(moving_study, moving_node)
    results = load_results(ctx.scene, tmp_path / "out", moving_node, fixed_node, jacobian=True)
    parents = {role: hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node))
               for role, node in results.nodes().items()}
    assert parents == {"transform": fixed_study, "warped": fixed_study, "fixed_segmentation": fixed_study,
                       "warped_moving_segmentation": fixed_study, "jacobian": fixed_study,
                       "fixed_brain_mask": fixed_study, "moving_segmentation": moving_study,
                       "moving_brain_mask": moving_study}
    transform = results.transform
    assert transform.GetNodeReference(transform.GetMovingNodeReferenceRole()) is moving_node
    assert transform.GetNodeReference(transform.GetFixedNodeReferenceRole()) is fixed_node
    # inputs at the scene's top level: results stay there too
    ctx.scene.Clear(0)
    moving_node, fixed_node = add_volume(moving, "moving"), add_volume(fixed, "fixed")
    results = load_results(ctx.scene, tmp_path / "out", moving_node, fixed_node)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(ctx.scene)
    for node in results.nodes().values():
        item = hierarchy.GetItemByDataNode(node)
        assert not item or hierarchy.GetItemParent(item) == hierarchy.GetSceneItemID()


def test_brain_masks_become_segmentations_when_the_engine_gives_them(ctx, pair, tmp_path):
    moving, fixed, moving_node, fixed_node = pair
    write_engine_outputs(tmp_path / "with", moving, fixed, masks=True)
    results = load_results(ctx.scene, tmp_path / "with", moving_node, fixed_node)
    for role, volume, image in (("fixed_brain_mask", fixed_node, fixed), ("moving_brain_mask", moving_node, moving)):
        node = getattr(results, role)
        assert node.GetName() == f"{volume.GetName()} brain mask"
        segmentation = node.GetSegmentation()
        assert segmentation.GetNumberOfSegments() == 1
        segment = segmentation.GetNthSegment(0)
        assert segment.GetName() == "brain" and "12738006" in segment.GetTerminology()
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(node, segmentation.GetNthSegmentID(0), volume)
        assert np.array_equal(mask > 0, sitk.GetArrayFromImage(sample_on(image, phantom_labels)) > 0)
    # an engine (or model) without masks: no mask nodes, nothing else missing
    before = ctx.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    write_engine_outputs(tmp_path / "without", moving, fixed, masks=False)
    results = load_results(ctx.scene, tmp_path / "without", moving_node, fixed_node)
    assert results.fixed_brain_mask is None and results.moving_brain_mask is None
    assert "fixed_brain_mask" not in results.nodes()
    assert ctx.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before + 3


def test_the_worker_writes_the_results_brain_masks(tmp_path):
    from types import SimpleNamespace
    from JointRegSegLib.slicer.worker import _write_brain_masks
    mask = sitk.Image([4, 4, 4], sitk.sitkUInt8) + 1
    _write_brain_masks(SimpleNamespace(fixed_brain_mask=mask, moving_brain_mask=None), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed_brain_mask.nii.gz"]
    _write_brain_masks(SimpleNamespace(), tmp_path)          # a Result from before the engine gave masks


def test_the_qc_panel_shows_the_runs_status_and_warnings(ctx, monkeypatch):
    module = import_module_file(monkeypatch)
    qc = {"folding_percent": 0.0, "jacobian_min": 0.7, "jacobian_max": 1.4, "fixed_volumes_ml": {"core": 10.0},
          "registration_status": "check", "agreement_mean": 0.412,
          "warnings": ["the fixed image does not look like a head <MRI>", "low overlap"]}
    text = module.JointRegSegLogic.describeQc(qc)
    assert "Registration: check" in text and "0.41" in text and "&#9888;" in text
    assert "head &lt;MRI&gt;" in text and "low overlap" in text
    assert "Registration: ok" in module.JointRegSegLogic.describeQc(dict(qc, registration_status="ok", warnings=[]))
    assert "Contrasts differ" not in text
    mapped = dict(qc, contrast={"mapped": "moving image mapped into the fixed image's contrast"})
    assert ("Contrasts differ: the registration saw the moving image mapped into the fixed image&#x27;s contrast"
            in module.JointRegSegLogic.describeQc(mapped))
    older = {k: v for k, v in qc.items() if k not in ("registration_status", "agreement_mean", "warnings")}
    assert "Registration" not in module.JointRegSegLogic.describeQc(older)        # an engine before the self-check
