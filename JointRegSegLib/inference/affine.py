"""Classical affine pre-alignment with SimpleITK (moments initialisation + Mattes MI)."""
from __future__ import annotations

import SimpleITK as sitk

MAX_SAMPLES = 50_000


def _shrunk(image: sitk.Image, target_mm: float) -> sitk.Image:
    factors = [max(1, int(round(target_mm / s))) for s in image.GetSpacing()]
    smoothed = sitk.SmoothingRecursiveGaussian(image, target_mm / 2) if max(factors) > 1 else image
    return sitk.Shrink(smoothed, factors)


def affine_prealign(moving: sitk.Image, fixed: sitk.Image, iterations: int = 100, seed: int = 7,
                    on_iteration=None) -> sitk.AffineTransform:
    """Affine transform mapping fixed physical points to moving ones (the resampling direction).

    Runs on copies resampled to about 4 mm then 2 mm, so a 1 mm brain pair aligns in a few seconds.
    """
    fixed_small, moving_small = _shrunk(fixed, 4.0), _shrunk(moving, 4.0)
    initial = sitk.CenteredTransformInitializer(
        fixed_small, moving_small, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS)
    affine = sitk.AffineTransform(initial)

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4,
                                                    numberOfIterations=iterations,
                                                    relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetInitialTransform(affine, inPlace=True)
    for pyramid_mm in (4.0, 2.0):
        fixed_level = fixed_small if pyramid_mm == 4.0 else _shrunk(fixed, 2.0)
        moving_level = moving_small if pyramid_mm == 4.0 else _shrunk(moving, 2.0)
        # ~50k random samples per iteration estimate 12 parameters well (elastix uses a few thousand);
        # a quarter of a 2 mm brain (220k) cost 4x the time for the same transform
        voxels = fixed_level.GetNumberOfPixels()
        method.SetMetricSamplingPercentage(min(0.25, MAX_SAMPLES / voxels), seed)
        if on_iteration is not None:
            method.RemoveAllCommands()
            method.AddCommand(sitk.sitkIterationEvent, lambda m=method: on_iteration(m.GetOptimizerIteration()))
        method.Execute(fixed_level, moving_level)
    return affine
