"""Atlas propagation with a deformable refinement: the registration baselines LCS is compared with (SimpleITK's
B-spline, and ANTs SyN, the tool most users would reach for)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import SimpleITK as sitk

from LabelConditionedSegLib.errors import LCSError, itk_message
from LabelConditionedSegLib.geometry import no_finer_than

FOLD_FREE = 0.4  # B-spline coefficients below this share of the control-point spacing keep the warp free of folds


def bspline_propagate(subject: sitk.Image, atlas_image: sitk.Image, atlas_labels: sitk.Image, affine: sitk.Transform,
                      atlas_mask: sitk.Image, mesh_mm: float = 40.0, say: Callable[[str], None] = print) -> sitk.Image:
    """Atlas labels warped onto the subject's grid by the affine (atlas -> subject) plus a B-spline.

    The B-spline is fitted on the subject's side (Mattes mutual information, L-BFGS-B, two levels, control
    points every `mesh_mm`), so the labels are pulled through it directly, without inverting a deformation. Its
    coefficients are bounded to keep the warp fold-free; where ITK gives up all the same (the optimiser stepped out
    of the atlas), the labels are the affine's, as a user would keep them, and `say` tells."""
    fixed = no_finer_than(sitk.Cast(subject, sitk.sitkFloat32), min(atlas_image.GetSpacing()))
    to_atlas = affine.GetInverse()
    mask = sitk.Resample(atlas_mask, fixed, to_atlas, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    extent = [size * spacing for size, spacing in zip(fixed.GetSize(), fixed.GetSpacing())]
    mesh = [max(1, int(round(e / mesh_mm))) for e in extent]
    bspline = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    bound = FOLD_FREE * min(e / m for e, m in zip(extent, mesh))
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.2, 1)
    method.SetMetricFixedMask(mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=60, lowerBound=-bound,
                                upperBound=bound)
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1, 0])
    method.SetMovingInitialTransform(to_atlas)
    method.SetInitialTransform(bspline, inPlace=True)
    try:
        method.Execute(fixed, sitk.Cast(atlas_image, sitk.sitkFloat32))
        transform = sitk.CompositeTransform([to_atlas, bspline])
    except RuntimeError as error:
        say(f"B-spline registration failed ({itk_message(error)}); its labels are the affine's")
        transform = to_atlas
    return sitk.Resample(atlas_labels, subject, transform, sitk.sitkNearestNeighbor, 0)


def require_ants():
    """The antspyx module, or an LCSError saying how to install it (an evaluation extra, never needed by inference)."""
    try:
        import ants
    except ImportError:
        raise LCSError("--ants needs antspyx (ANTs SyN): pip install antspyx (or, in a clone of the project, "
                       "pip install '.[evaluate]'), or drop --ants") from None
    return ants


def ants_propagate(subject: sitk.Image, atlas_image: sitk.Image, atlas_labels: sitk.Image) -> sitk.Image:
    """Atlas labels warped onto the subject's grid by ANTs SyN (its own affine stage first, Mattes mutual information
    at both stages, so any contrast), as `ants.registration(fixed=scan, moving=atlas, type_of_transform="SyN")` does
    with its defaults; the labels are pulled through with the "genericLabel" interpolator."""
    ants = require_ants()
    fixed = _to_ants(ants, subject)
    registration = ants.registration(fixed=fixed, moving=_to_ants(ants, atlas_image), type_of_transform="SyN")
    warped = ants.apply_transforms(fixed=fixed, moving=_to_ants(ants, atlas_labels),
                                   transformlist=registration["fwdtransforms"], interpolator="genericLabel")
    labels = sitk.GetImageFromArray(np.round(warped.numpy().T).astype(np.int32))  # ANTs arrays are x, y, z
    labels.CopyInformation(subject)
    return sitk.Cast(labels, atlas_labels.GetPixelID())


def _to_ants(ants, image: sitk.Image):
    """A SimpleITK image as an ANTs image: the same voxels, spacing, origin and direction (both ITK's LPS frame)."""
    return ants.from_numpy(sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32)).T, origin=list(image.GetOrigin()),
                           spacing=list(image.GetSpacing()),
                           direction=np.array(image.GetDirection()).reshape(3, 3))
