"""Geometry comparison of a case's files, shared by case loading and ``medseg data check``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medseg.data.datasets._common import (
    _ASPECT_TOL,
)
from medseg.types import Volume, same_physical_grid

_FIX_RESAMPLE = (
    "resample it onto the image grid with nearest-neighbour interpolation (e.g. SimpleITK.Resample(label, "
    "image, sitk.Transform(), sitk.sitkNearestNeighbor)), or pair it with the image it was drawn on"
)
_FIX_HEADER = (
    "if it was drawn on this image and only the header is off, copy the image's geometry into its "
    "header; otherwise resample it onto the image grid with nearest-neighbour interpolation"
)


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def _pixel_frame(vol: Volume) -> bool:
    """2D raster images (PNG/JPEG) have no physical geometry: they are compared by pixel grid only."""
    return vol.spatial_dims == 2 and vol.meta.get("format") == "raster"


def grid_mismatches(
    reference: Volume,
    other: Volume,
    *,
    what: str = "label",
    ref_what: str = "image",
    tol_spacing: float = 1e-3,
    tol_origin_mm: float = 1e-2,
    tol_direction: float = 1e-3,
) -> list[tuple[str, str]]:
    """Ways in which ``other``'s voxel grid differs from ``reference``'s.

    The shape must match exactly; the spacing within ``tol_spacing`` (relative), the origin (world
    position of voxel 0) within ``tol_origin_mm`` (Euclidean distance) and the axis directions within
    ``tol_direction`` (largest absolute difference of the unit direction vectors). The default origin
    tolerance, 0.01 mm, is far above float32 header rounding (< 1e-4 mm) and far below any real
    misregistration. When either volume is a 2D raster (pixel frame, no physical geometry) only the
    shape is compared.

    Args:
        reference: The image.
        other: The label map or mask that must lie on the image's grid.
        what: Name of ``other`` in messages.
        ref_what: Name of ``reference`` in messages.
        tol_spacing: Relative spacing tolerance.
        tol_origin_mm: Origin tolerance in mm.
        tol_direction: Direction-cosine tolerance.

    Returns:
        ``(check, message)`` pairs with check ``shape_mismatch``, ``spacing_mismatch``,
        ``origin_mismatch`` or ``direction_mismatch``; empty when the grids agree.
    """
    out: list[tuple[str, str]] = []
    rs, os_ = reference.spatial_shape, other.spatial_shape
    if rs != os_:
        out.append(
            ("shape_mismatch", f"{what} shape {os_} differs from {ref_what} shape {rs}; {_FIX_RESAMPLE}")
        )
    if _pixel_frame(reference) or _pixel_frame(other) or reference.spatial_dims != other.spatial_dims:
        return out
    sp_r, sp_o = np.asarray(reference.spacing_mm), np.asarray(other.spacing_mm)
    if np.any(np.abs(sp_r - sp_o) > tol_spacing * np.maximum(np.abs(sp_r), np.abs(sp_o))):
        msg = (
            f"{what} spacing {_fmt(sp_o)} mm differs from {ref_what} spacing {_fmt(sp_r)} mm "
            f"(relative tolerance {tol_spacing:g}); {_FIX_HEADER}"
        )
        out.append(("spacing_mismatch", msg))
    dist = float(np.linalg.norm(np.subtract(reference.origin_mm, other.origin_mm)))
    if dist > tol_origin_mm:
        msg = (
            f"{what} origin {_fmt(other.origin_mm)} mm differs from {ref_what} origin "
            f"{_fmt(reference.origin_mm)} mm by {dist:.4g} mm (tolerance {tol_origin_mm:g} mm); {_FIX_HEADER}"
        )
        out.append(("origin_mismatch", msg))
    nd = reference.spatial_dims
    ddiff = float(np.abs(reference.direction[:, :nd] - other.direction[:, :nd]).max())
    if ddiff > tol_direction:
        msg = (
            f"{what} orientation {other.orientation} differs from {ref_what} orientation "
            f"{reference.orientation} (largest direction-cosine difference {ddiff:.3g}, "
            f"tolerance {tol_direction:g}); "
        )
        atol = max(tol_origin_mm, 1e-3)
        if rs == os_ and same_physical_grid(rs, reference.affine, os_, other.affine, atol_mm=atol):
            msg += (
                "it covers the same voxels stored in another axis order/direction: reorient it to the "
                f"{ref_what}'s orientation (e.g. nibabel as_reoriented) so that voxel indices match"
            )
        else:
            msg += _FIX_HEADER
        out.append(("direction_mismatch", msg))
    return out


def squeeze_2d(vol: Volume) -> Volume:
    """A 3D volume with one slice as a 2D volume (nnU-Net stores 2D data as X x Y x 1 NIfTI).

    Other volumes are returned unchanged.
    """
    if vol.spatial_dims != 3 or vol.spatial_shape[-1] != 1:
        return vol
    affine = vol.affine.copy()
    n = np.linalg.norm(affine[:3, 2])
    if n > 0:
        affine[:3, 2] /= n
    return Volume(vol.array[..., 0], affine, vol.meta)


def mask_geometry_problems(
    reference: Volume,
    mask: Volume,
    *,
    what: str = "mask",
    tol_spacing: float = 1e-3,
    tol_origin_mm: float = 1e-2,
    tol_direction: float = 1e-3,
) -> list[tuple[str, str]]:
    """Geometry problems of an overlapping-structure mask relative to its image.

    A 2D mask with another pixel grid size is taken to cover the image's field of view (SCR masks
    are stored at half resolution) and is fine when the aspect ratio matches within 1 %; otherwise
    ``aspect_ratio`` is returned. Same-size 2D masks and 3D masks are compared with
    :func:`grid_mismatches` (same tolerances).

    Returns:
        ``(check, message)`` pairs; empty when the mask can be placed on the image grid.
    """
    if reference.spatial_dims == 2:
        mask = squeeze_2d(mask)
    if reference.spatial_dims == mask.spatial_dims == 2 and mask.spatial_shape != reference.spatial_shape:
        (ix, iy), (mx, my) = reference.spatial_shape, mask.spatial_shape
        fx, fy = ix / mx, iy / my
        if abs(fx - fy) <= _ASPECT_TOL * max(fx, fy):
            return []
        msg = (
            f"{what} is {mx}x{my} pixels (width x height) but the image is {ix}x{iy}: the aspect ratios "
            f"differ (scale {fx:.4g} across, {fy:.4g} down), so the mask cannot cover the image's field "
            "of view; re-export the mask at the image's size or with the image's aspect ratio"
        )
        return [("aspect_ratio", msg)]
    return grid_mismatches(
        reference,
        mask,
        what=what,
        tol_spacing=tol_spacing,
        tol_origin_mm=tol_origin_mm,
        tol_direction=tol_direction,
    )


def _nearest_resize(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest neighbour on pixel-frame geometry: output pixel ``i`` (centre at ``(i + 0.5) / n`` of
    the field of view) takes the input pixel containing that point; a half-resolution mask pixel
    thus covers exactly 2 x 2 output pixels."""
    index = []
    for n_out, n_in in zip(shape, mask.shape, strict=True):
        idx = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.intp)
        index.append(np.minimum(idx, n_in - 1))
    return mask[np.ix_(*index)]
