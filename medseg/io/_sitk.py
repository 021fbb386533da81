"""SimpleITK <-> :class:`~medseg.types.Volume` conversion: the one place that knows ITK's axis order.

SimpleITK arrays are ``(Z, Y, X)`` (2D: ``(Y, X)``; vector pixels add a trailing component axis)
while spacing/origin/direction are given in ``(x, y, z)`` order and in the LPS+ world frame. medseg
volumes are ``(C, X, Y, Z)`` with a RAS+ affine (see :mod:`medseg.types`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medseg.types import Volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def sitk_affine(img: Any) -> np.ndarray:
    """4x4 voxel-to-RAS affine of a 3D SimpleITK image (float64)."""
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing[None, :]
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def sitk_to_volume(img: Any, *, meta: dict[str, Any] | None = None, pixel_frame_2d: bool = True) -> Volume:
    """Convert a 2D or 3D SimpleITK image to a Volume.

    3D images get their LPS geometry converted to a RAS affine. 2D images (PNG/JPEG, 2D DICOM
    radiographs) have no patient frame: with ``pixel_frame_2d`` their affine is
    ``diag(sx, sy, 1, 1)`` (x along columns, y along rows).
    """
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(img)
    ncomp = img.GetNumberOfComponentsPerPixel()
    dim = img.GetDimension()
    if ncomp > 1:  # (..., C) -> (C, ...)
        arr = np.moveaxis(arr, -1, 0)
    else:
        arr = arr[None]
    # (C, Z, Y, X) -> (C, X, Y, Z)
    arr = np.ascontiguousarray(np.transpose(arr, (0, *range(arr.ndim - 1, 0, -1))))
    if dim == 3:
        affine = sitk_affine(img)
    elif dim == 2:
        sx, sy = img.GetSpacing()
        if pixel_frame_2d:
            affine = np.diag([float(sx), float(sy), 1.0, 1.0])
            ox, oy = img.GetOrigin()
            affine[:2, 3] = [ox, oy]
        else:  # pragma: no cover - kept for completeness
            d = np.asarray(img.GetDirection()).reshape(2, 2)
            lps = np.eye(4)
            lps[:2, :2] = d * np.array([sx, sy])[None, :]
            lps[:2, 3] = img.GetOrigin()
            affine = LPS_TO_RAS @ lps
    else:
        raise ValueError(f"only 2D and 3D images are supported, got a {dim}D image")
    return Volume(arr, affine, dict(meta or {}))


def volume_to_sitk(vol: Volume) -> Any:
    """Convert a single-channel Volume to a SimpleITK image with the same geometry.

    3D: LPS direction/spacing/origin from the RAS affine (shear is not representable in ITK and
    raises). 2D: pixel frame, spacing from the affine.
    """
    import SimpleITK as sitk

    if vol.num_channels != 1:
        raise ValueError(f"only single-channel volumes can be written with SimpleITK, got {vol.num_channels}")
    arr = vol.array[0]
    arr = np.ascontiguousarray(np.transpose(arr, tuple(range(arr.ndim - 1, -1, -1))))
    img = sitk.GetImageFromArray(arr)
    if vol.spatial_dims == 3:
        lps = np.linalg.inv(LPS_TO_RAS) @ vol.affine
        m = lps[:3, :3]
        spacing = np.linalg.norm(m, axis=0)
        direction = m / spacing[None, :]
        if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
            raise ValueError("affine has shear; ITK images cannot represent it (write NIfTI instead)")
        img.SetSpacing(tuple(float(s) for s in spacing))
        img.SetDirection(tuple(float(v) for v in direction.ravel()))
        img.SetOrigin(tuple(float(v) for v in lps[:3, 3]))
    else:
        img.SetSpacing(tuple(float(s) for s in vol.spacing_mm))
        img.SetOrigin(tuple(float(v) for v in vol.affine[:2, 3]))
    return img
