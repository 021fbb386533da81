"""The one in-memory image type, :class:`Volume`, and the axis conventions of medseg.

Axis convention (converted inside :mod:`medseg.io` only):

* ``Volume.array`` has shape ``(C, X, Y, Z)`` for 3D and ``(C, X, Y)`` for 2D, in *NIfTI voxel
  order*: the first spatial axis is the fastest-varying one on disk (DICOM/ITK column index ``i``),
  the second is the row index ``j``, the third the slice index ``k``. SimpleITK arrays are
  ``(Z, Y, X)`` and are transposed on the way in and out.
* ``Volume.affine`` is always a 4x4 voxel-to-world matrix in millimetres, world = **RAS+** (NIfTI/
  nibabel convention). ``world = affine @ [i, j, k, 1]``. DICOM/ITK LPS geometry is converted with
  ``diag(-1, -1, 1)``. For 2D volumes the third column is the (unit) slice normal and only the first
  two columns describe the pixel grid.
* 2D raster images (PNG/JPEG) have no patient frame: their affine is ``diag(sx, sy, 1, 1)`` in a
  pixel frame where ``x`` runs along image columns (left to right) and ``y`` along rows (top to
  bottom). Writers for PNG use the same frame, so masks land on the image's pixel grid.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medseg.errors import DataError

AXCODES_FLIP = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}


@dataclass(frozen=True)
class Volume:
    """Image or label map in voxel space, with the geometry needed to write it back.

    Attributes:
        array: ``(C, X, Y, Z)`` (3D) or ``(C, X, Y)`` (2D) array in NIfTI voxel order; label maps
            have ``C == 1`` and an integer dtype.
        affine: 4x4 voxel-to-world matrix (RAS+, mm), float64.
        meta: Free-form metadata, e.g. ``source`` path, ``modality``, DICOM ``series_uid``.

    Raises:
        ValueError: ``affine`` is not 4x4, or ``array`` has neither 3 nor 4 dimensions.
        DataError: ``affine`` cannot map voxels to the world (see :func:`affine_problem`); the message
            names ``meta['source']``.
    """

    array: np.ndarray
    affine: np.ndarray
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"Volume.affine must be 4x4, got shape {affine.shape}")
        if self.array.ndim not in (3, 4):
            raise ValueError(
                f"Volume.array must be (C, X, Y) or (C, X, Y, Z), got {self.array.ndim} dimensions "
                f"with shape {self.array.shape}"
            )
        problem = affine_problem(affine, self.array.ndim - 1)
        if problem is not None:
            source = self.meta.get("source") if isinstance(self.meta, Mapping) else None
            if isinstance(source, list | tuple):
                source = ", ".join(str(s) for s in source)
            raise DataError(
                f"{source or 'Volume'}: the voxel-to-world affine {problem}; expected finite values and "
                "non-zero voxel axes pointing in independent directions. Fix the geometry in the file's "
                "header (spacing, direction, origin) and export it again."
            )
        object.__setattr__(self, "affine", affine)

    @property
    def spatial_dims(self) -> int:
        """2 or 3."""
        return self.array.ndim - 1

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape without the channel axis."""
        return tuple(int(s) for s in self.array.shape[1:])

    @property
    def num_channels(self) -> int:
        return int(self.array.shape[0])

    @property
    def spacing_mm(self) -> tuple[float, ...]:
        """Voxel size along each spatial axis, in mm (column norms of the affine)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return tuple(float(s) for s in norms[: self.spatial_dims])

    @property
    def origin_mm(self) -> tuple[float, float, float]:
        """World (RAS, mm) position of the centre of voxel 0."""
        return tuple(float(v) for v in self.affine[:3, 3])

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix of unit column vectors: the world direction of each voxel axis (RAS)."""
        a = self.affine[:3, :3]
        return a / np.linalg.norm(a, axis=0)

    @property
    def orientation(self) -> str:
        """Orientation code such as ``RAS``/``LPS`` (nibabel's ``aff2axcodes``: the world direction
        each voxel axis points *towards*). For 2D volumes only two letters."""
        affine = self.affine
        if self.spatial_dims == 2 and affine_problem(affine, 3) is not None:
            # the grid does not use the third column; when it is degenerate (zero, or parallel to the
            # pixel axes) the plane's normal stands in for it, so that both pixel axes get a letter
            affine = affine.copy()
            normal = np.cross(affine[:3, 0], affine[:3, 1])
            affine[:3, 2] = normal / np.linalg.norm(normal)
        return orientation_code(affine)[: self.spatial_dims]

    def with_array(self, array: np.ndarray, **meta: Any) -> Volume:
        """A new Volume on the same grid with another array (and updated meta)."""
        if array.shape[1:] != self.array.shape[1:]:
            raise ValueError(f"spatial shape {array.shape[1:]} differs from {self.array.shape[1:]}")
        return Volume(array, self.affine.copy(), {**self.meta, **meta})

    def voxel_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """Map ``(N, 3)`` (or ``(N, 2)`` for 2D) voxel indices to ``(N, 3)`` RAS world points (mm)."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
        if ijk.shape[1] == 2:
            ijk = np.concatenate([ijk, np.zeros((len(ijk), 1))], axis=1)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]


def affine_problem(affine: np.ndarray, spatial_dims: int = 3) -> str | None:
    """What makes ``affine`` unusable as a voxel-to-world matrix, or None when it is usable.

    Checked: every value finite; each voxel axis of the grid (the first ``spatial_dims`` columns) has a
    non-zero length (spacing); and those axes point in independent directions (the direction part is
    non-singular). For 2D volumes the third column is a slice normal that the grid does not use, so it
    is not checked. The test is scale-free: tiny and huge spacings pass, parallel axes do not.
    """
    a = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        bad = [f"[{i}, {j}]" for i, j in zip(*np.nonzero(~np.isfinite(a)), strict=True)]
        more = " ..." if len(bad) > 4 else ""
        return f"has non-finite values (NaN or infinity at {', '.join(bad[:4])}{more})"
    axes = a[:3, :spatial_dims]
    with np.errstate(over="ignore"):
        spacing = np.linalg.norm(axes, axis=0)
    zero = [i for i, s in enumerate(spacing) if s == 0]
    if zero:
        return f"has zero spacing along voxel axis {', '.join(str(i) for i in zero)} (a zero column)"
    if not np.all(np.isfinite(spacing)):
        return f"has a spacing too large to compute ({a[:3, :spatial_dims].tolist()})"
    # smallest singular value of the unit axes: 0 for parallel axes, 1 for orthogonal ones
    if np.linalg.svd(axes / spacing, compute_uv=False)[-1] < 1e-6:
        return f"is singular: its voxel axes are parallel ({np.round(axes, 6).tolist()})"
    return None


def orientation_code(affine: np.ndarray) -> str:
    """Three-letter orientation code of a voxel-to-RAS affine (e.g. ``'RAS'``, ``'LPS'``)."""
    import nibabel as nib

    return "".join(nib.orientations.aff2axcodes(np.asarray(affine)))


def grid_points(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """World coordinates (RAS, mm) of the corner voxel centres of a grid, shape ``(2**ndim, 3)``.

    Two grids are the same physical grid iff their corner centres coincide (in some order of the
    voxel axes' signs) — use :func:`same_physical_grid` for that comparison.
    """
    import itertools

    corners = np.array(list(itertools.product(*[(0, n - 1) for n in shape])), dtype=np.float64)
    if corners.shape[1] == 2:
        corners = np.concatenate([corners, np.zeros((len(corners), 1))], axis=1)
    return corners @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def same_physical_grid(
    shape_a: tuple[int, ...],
    affine_a: np.ndarray,
    shape_b: tuple[int, ...],
    affine_b: np.ndarray,
    *,
    atol_mm: float = 1e-3,
) -> bool:
    """True if two grids have the same set of voxel-centre positions in world space.

    Grids that store the same voxels in a different axis order or direction (e.g. rows flipped)
    compare equal. Spacing per world direction must match as well as the corner positions, except
    along axes of length 1, whose step vector does not change any voxel-centre position.
    """
    if sorted(shape_a) != sorted(shape_b):
        return False
    pa = grid_points(shape_a, affine_a)
    pb = grid_points(shape_b, affine_b)
    # match each corner of a to its nearest corner of b
    d = np.linalg.norm(pa[:, None, :] - pb[None, :, :], axis=-1)
    if not np.all(d.min(axis=1) <= atol_mm) or not np.all(d.min(axis=0) <= atol_mm):
        return False
    # step vectors must match up to sign, each axis with an unused axis of the same length. A size-1
    # axis has no step between voxel centres, so its column (slice thickness, direction) is ignored.
    sa = np.asarray(affine_a)[:3, : len(shape_a)].T
    sb = np.asarray(affine_b)[:3, : len(shape_b)].T
    unused = [j for j, n in enumerate(shape_b) if n > 1]
    for i, n in enumerate(shape_a):
        if n == 1:
            continue
        match = next(
            (
                j
                for j in unused
                if shape_b[j] == n
                and (np.allclose(sa[i], sb[j], atol=atol_mm) or np.allclose(sa[i], -sb[j], atol=atol_mm))
            ),
            None,
        )
        if match is None:
            return False
        unused.remove(match)
    return True
