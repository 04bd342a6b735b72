"""Peer registration tools, each run in its own process: `python peers.py METHOD MOVING FIXED OUT_DIR`.

Writes OUT_DIR/displacement.nii.gz (on the fixed grid, LPS mm, fixed -> moving: an ITK displacement
field that resamples the moving image onto the fixed one, affine part included) and OUT_DIR/stats.json
({"seconds": registration time, "peak_memory_mb": this process's peak RSS}). This is the interface of
JointRegSegLib.evaluation.methods.ExternalMethod. antspyx and itk-elastix crash when imported into one
process, hence one process per tool.

Methods and settings (the tools' own defaults, as a user would run them):
  ants-syn        ants.registration(type_of_transform="SyN")  (affine + SyN, antspyx defaults)
  ants-synquick   ants.registration(type_of_transform="antsRegistrationSyNQuick[s]")
  elastix         itk-elastix default "affine" (initialised at the centres of mass) then default "bspline"
  sitk-demons     SimpleITK: affine (Mattes MI, 3 levels) then diffeomorphic demons (3 levels)
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path


def _peak_mb() -> float:
    """Peak RSS of this process since exec (VmHWM). ru_maxrss would include the memory of the parent
    at fork time, since Linux keeps it across exec."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def ants_method(kind: str):
    def run(moving_path, fixed_path, out: Path) -> None:
        import ants
        fixed, moving = ants.image_read(str(fixed_path)), ants.image_read(str(moving_path))
        result = ants.registration(fixed, moving, type_of_transform=kind)
        composed = ants.apply_transforms(fixed, moving, result["fwdtransforms"], compose=str(out / "ants_"))
        os.replace(composed, out / "displacement.nii.gz")
    return run


def elastix(moving_path, fixed_path, out: Path) -> None:
    import itk
    fixed = itk.imread(str(fixed_path), itk.F)
    moving = itk.imread(str(moving_path), itk.F)
    parameters = itk.ParameterObject.New()
    affine = parameters.GetDefaultParameterMap("affine")
    # the one change from the defaults: start from the centres of mass (as ANTs does), else elastix
    # stops with "too many samples map outside moving image buffer" on pairs with other origins
    affine["AutomaticTransformInitialization"] = ["true"]
    affine["AutomaticTransformInitializationMethod"] = ["CenterOfGravity"]
    parameters.AddParameterMap(affine)
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("bspline"))
    _, transform_parameters = itk.elastix_registration_method(fixed, moving, parameter_object=parameters,
                                                               log_to_console=False)
    field = itk.transformix_deformation_field(moving, transform_parameters)
    itk.imwrite(field, str(out / "displacement.nii.gz"))


def sitk_demons(moving_path, fixed_path, out: Path) -> None:
    import SimpleITK as sitk
    fixed = sitk.ReadImage(str(fixed_path), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(moving_path), sitk.sitkFloat32)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, seed=7)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 200)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg.SetInitialTransform(initial, inPlace=False)
    affine = reg.Execute(fixed, moving)
    moved = sitk.Resample(moving, fixed, affine, sitk.sitkLinear, 0.0)
    moved = sitk.HistogramMatching(moved, fixed, 256, 15, True)
    demons = sitk.DiffeomorphicDemonsRegistrationFilter()
    demons.SetNumberOfIterations(50)
    demons.SetStandardDeviations(1.5)
    field = None
    for shrink in (4, 2, 1):
        f_small, m_small = sitk.Shrink(fixed, [shrink] * 3), sitk.Shrink(moved, [shrink] * 3)
        if field is not None:
            field = sitk.Resample(field, f_small, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
            field = demons.Execute(f_small, m_small, field)
        else:
            field = demons.Execute(f_small, m_small)
    # total map x -> affine(x + d_demons(x)): a composite applies its last transform first
    demons_transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    total = sitk.TransformToDisplacementField(sitk.CompositeTransform([affine, demons_transform]),
                                              sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(),
                                              fixed.GetSpacing(), fixed.GetDirection())
    sitk.WriteImage(total, str(out / "displacement.nii.gz"))


METHODS = {"ants-syn": ants_method("SyN"), "ants-synquick": ants_method("antsRegistrationSyNQuick[s]"),
           "elastix": elastix, "sitk-demons": sitk_demons}


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] not in METHODS:
        print(f"usage: peers.py {{{','.join(METHODS)}}} MOVING FIXED OUT_DIR", file=sys.stderr)
        return 2
    method, moving, fixed, out = argv
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    METHODS[method](moving, fixed, out)
    seconds = time.perf_counter() - started
    (out / "stats.json").write_text(json.dumps({"seconds": seconds, "peak_memory_mb": _peak_mb()}), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
