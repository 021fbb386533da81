"""Invertible geometric steps of preprocessing: canonical reorientation, resampling, cropping.

Each forward step returns the data on its new grid together with the new voxel->world affine, so that
prediction can undo every step exactly (a prediction must lie on the input's own grid). Resampling follows
nnU-Net/scikit-image semantics: the new grid covers the same field of view (voxel *edges* are preserved),
i.e. voxel ``i`` of the new grid sits at old index ``(i + 0.5) * old/new - 0.5``. ``torch.nn.functional.
interpolate(..., align_corners=False)`` implements exactly this mapping and is multithreaded, which is why
it is used instead of scipy here. Label maps are resampled per class (linear interpolation of each class's
indicator, then argmax), never with nearest neighbour.
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from medseg.types import Volume


def canonical_ornt(affine: np.ndarray, spatial_dims: int) -> np.ndarray:
    """nibabel orientation transform that brings a 3D grid closest to RAS (2D: identity)."""

    if spatial_dims == 2:
        return np.array([[0, 1], [1, 1]], dtype=float)
    return nib.orientations.io_orientation(affine)


def reorient(array: np.ndarray, affine: np.ndarray, ornt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply an orientation transform to a ``(C, *spatial)`` array; returns ``(array, new_affine)``.

    Only permutes and flips axes (no interpolation), so it is exactly invertible with
    :func:`invert_ornt`.
    """

    spatial = array.shape[1:]
    if len(spatial) == 2 or np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return array, affine
    out = np.stack([nib.orientations.apply_orientation(c, ornt) for c in array])
    return np.ascontiguousarray(out), oriented_affine(affine, ornt, spatial)


def oriented_affine(affine: np.ndarray, ornt: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Affine of a grid of ``shape`` after :func:`reorient` with ``ornt`` (2D grids: unchanged)."""

    if len(shape) == 2:
        return affine
    return affine @ nib.orientations.inv_ornt_aff(ornt, shape)


def invert_ornt(ornt: np.ndarray) -> np.ndarray:
    """The orientation transform that undoes ``ornt``."""

    identity = np.array([[i, 1] for i in range(len(ornt))], dtype=float)
    return nib.orientations.ornt_transform(identity, ornt)


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]
) -> tuple[int, ...]:
    """Grid size after resampling ``shape`` at ``spacing`` to ``target`` spacing (at least 1 per axis)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target, strict=True))


def resampled_affine(affine: np.ndarray, old_shape: Sequence[int], new_shape: Sequence[int]) -> np.ndarray:
    """Affine of the grid made by :func:`resample_image` (same field of view, new voxel count)."""
    d = len(old_shape)
    t = np.eye(4)
    for i in range(d):
        scale = old_shape[i] / new_shape[i]
        t[i, i] = scale
        t[i, 3] = 0.5 * scale - 0.5
    return affine @ t


def _interp(x: np.ndarray, new_shape: tuple[int, ...], linear: bool) -> np.ndarray:

    if tuple(x.shape[1:]) == tuple(new_shape):
        return x.astype(np.float32, copy=False)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
    if linear:
        mode = "bilinear" if len(new_shape) == 2 else "trilinear"
        out = F.interpolate(t, size=new_shape, mode=mode, align_corners=False)
    else:
        out = F.interpolate(t, size=new_shape, mode="nearest-exact")
    return out[0].numpy()


def resample_image(array: np.ndarray, new_shape: Sequence[int], *, order: int = 1) -> np.ndarray:
    """Resample a ``(C, *spatial)`` intensity array to ``new_shape`` (float32).

    ``order`` 1 = (bi/tri)linear, 0 = nearest. Channels are processed one at a time to bound memory.
    """
    new_shape = tuple(int(s) for s in new_shape)
    return np.stack([_interp(c[None], new_shape, linear=order == 1)[0] for c in array])


def resample_labels(
    labels: np.ndarray, new_shape: Sequence[int], values: Sequence[int] | None = None
) -> np.ndarray:
    """Resample an integer label map ``(1, *spatial)`` by per-class linear interpolation + argmax.

    Memory stays at two float32 maps of the new size whatever the number of classes: a running
    maximum and the winning label. Values not in ``values`` (default: those present) are dropped.
    """
    new_shape = tuple(int(s) for s in new_shape)
    lab = labels[0]
    if tuple(lab.shape) == new_shape:
        return labels.copy()
    present = [int(v) for v in np.unique(lab)] if values is None else [0, *[int(v) for v in values]]
    best = _interp((lab == 0)[None].astype(np.float32), new_shape, linear=True)[0]
    winner = np.zeros(new_shape, dtype=labels.dtype)
    for v in present:
        if v == 0:
            continue
        m = lab == v
        if not m.any():
            continue
        p = _interp(m[None].astype(np.float32), new_shape, linear=True)[0]
        upd = p > best
        best[upd] = p[upd]
        winner[upd] = v
    return winner[None]


def resample_masks(masks: np.ndarray, new_shape: Sequence[int]) -> np.ndarray:
    """Resample binary masks ``(S, *spatial)`` by linear interpolation and a 0.5 threshold (uint8)."""
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(masks.shape[1:]) == new_shape:
        return masks.astype(np.uint8, copy=True)
    return np.stack([(_interp(m[None].astype(np.float32), new_shape, True)[0] >= 0.5) for m in masks]).astype(
        np.uint8
    )


def bbox_of(mask: np.ndarray, *, margin: int | Sequence[int] = 0) -> tuple[slice, ...]:
    """Bounding box (slices) of the nonzero voxels of a spatial mask, grown by ``margin`` voxels.

    An empty mask gives the whole array.
    """
    nd = mask.ndim
    margins = [margin] * nd if isinstance(margin, int) else list(margin)
    if not mask.any():
        return tuple(slice(0, s) for s in mask.shape)
    out = []
    for ax in range(nd):
        other = tuple(a for a in range(nd) if a != ax)
        idx = np.flatnonzero(mask.any(axis=other))
        lo = max(0, int(idx[0]) - margins[ax])
        hi = min(mask.shape[ax], int(idx[-1]) + 1 + margins[ax])
        out.append(slice(lo, hi))
    return tuple(out)


def crop_affine(affine: np.ndarray, box: Sequence[slice]) -> np.ndarray:
    """Affine of a cropped grid whose first voxel is ``(box[0].start, box[1].start, ...)``."""
    t = np.eye(4)
    for i, s in enumerate(box):
        t[i, 3] = s.start or 0
    return affine @ t


def to_canonical(vol: Volume) -> tuple[Volume, np.ndarray]:
    """Reorient a Volume to the axis order/directions closest to RAS; returns it and the transform."""
    ornt = canonical_ornt(vol.affine, vol.spatial_dims)
    arr, aff = reorient(vol.array, vol.affine, ornt)
    return Volume(arr, aff, dict(vol.meta)), ornt
