"""Atlas propagation with a deformable refinement: the registration baseline LCS is compared with."""
from __future__ import annotations

import SimpleITK as sitk

from LabelConditionedSegLib.geometry import no_finer_than


def bspline_propagate(subject: sitk.Image, atlas_image: sitk.Image, atlas_labels: sitk.Image, affine: sitk.Transform,
                      atlas_mask: sitk.Image, mesh_mm: float = 40.0) -> sitk.Image:
    """Atlas labels warped onto the subject's grid by the affine (atlas -> subject) plus a B-spline.

    The B-spline is fitted on the subject's side (Mattes mutual information, L-BFGS-B, two levels, control
    points every `mesh_mm`), so the labels are pulled through it directly, without inverting a deformation."""
    fixed = no_finer_than(sitk.Cast(subject, sitk.sitkFloat32), min(atlas_image.GetSpacing()))
    to_atlas = affine.GetInverse()
    mask = sitk.Resample(atlas_mask, fixed, to_atlas, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    extent = [size * spacing for size, spacing in zip(fixed.GetSize(), fixed.GetSpacing())]
    bspline = sitk.BSplineTransformInitializer(fixed, [max(1, int(round(e / mesh_mm))) for e in extent], order=3)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.2, 1)
    method.SetMetricFixedMask(mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=60)
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1, 0])
    method.SetMovingInitialTransform(to_atlas)
    method.SetInitialTransform(bspline, inPlace=True)
    method.Execute(fixed, sitk.Cast(atlas_image, sitk.sitkFloat32))
    return sitk.Resample(atlas_labels, subject, sitk.CompositeTransform([to_atlas, bspline]), sitk.sitkNearestNeighbor, 0)
