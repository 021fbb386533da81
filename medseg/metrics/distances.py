"""Surface distances per structure: HD95 and normalised surface Dice (NSD), in millimetres.

Definitions (the same as MONAI's ``compute_hausdorff_distance(percentile=95, spacing=...)`` and
``compute_surface_dice(spacing=..., use_subvoxels=False)``):

* **Surface** of a binary mask: its voxels with at least one face neighbour (6-connectivity in 3D,
  4 in 2D) outside the mask, i.e. ``mask ^ binary_erosion(mask)``; voxels on the image border count
  as surface (outside the field of view is background).
* **Distances** are Euclidean in mm between voxel centres, with each axis scaled by the file's
  spacing: ``scipy.ndimage.distance_transform_edt(~surface_ref, sampling=spacing_mm)`` evaluated on
  the predicted surface gives the prediction-to-reference distances, and vice versa.
* **HD95** is the larger of the two directed 95th percentiles (``np.percentile``, linear
  interpolation): ``max(P95(d(pred -> ref)), P95(d(ref -> pred)))``.
* **NSD** at tolerance ``tau`` mm (Nikolov et al., 2021, on voxel-centre surfaces) is
  ``(#{d(pred -> ref) <= tau} + #{d(ref -> pred) <= tau}) / (#pred surface + #ref surface)``.

Empty structures follow :data:`medseg.metrics.overlap.EMPTY_POLICY`: both empty -> HD95 and NSD NaN;
one empty -> HD95 ``inf`` (there is no surface to measure to) and NSD 0. Summaries leave NaN and
``inf`` out of their statistics and count them.

Why hand-written rather than MONAI: MONAI's metrics take one-hot tensors of the whole volume and, per
label, build and crop the full-size masks, so 100+ structures of a 512x512x600 CT cost 100+
full-volume passes (plus importing torch). Here the label map is indexed once, one
``scipy.ndimage.find_objects`` gives every structure's bounding box, and each structure is handled
only inside the union of its predicted and reference boxes (plus a one-voxel margin). Because every
surface voxel lies inside that box and background outside the field of view is treated alike, the
result is *identical* to the full-volume computation (the tests check it against MONAI).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from medseg.errors import DataError, ShapeError
from medseg.metrics.overlap import _check_labels, _check_masks, _compact_label_map

__all__ = ["SurfaceMetrics", "surface_metrics", "surface_metrics_labels", "surface_metrics_masks"]

_MARGIN = 1  # voxels added around each structure's bounding box (clipped to the image)


@dataclass(frozen=True)
class SurfaceMetrics:
    """Surface-distance metrics of one structure: prediction against reference.

    Attributes:
        hd95_mm: 95th-percentile symmetric Hausdorff distance in mm; NaN if both are empty, ``inf``
            if only one is.
        nsd: Normalised surface Dice in [0, 1] at the tolerance used; NaN if both are empty, 0 if
            only one is.
        n_surface_pred: Surface voxels of the prediction.
        n_surface_ref: Surface voxels of the reference.
    """

    hd95_mm: float
    nsd: float
    n_surface_pred: int
    n_surface_ref: int


def surface_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    tolerance_mm: float = 2.0,
    percentile: float = 95.0,
) -> SurfaceMetrics:
    """HD95 and NSD of one structure given as two binary masks, computed on their bounding box.

    Args:
        pred: Predicted mask of shape (X, Y) or (X, Y, Z); bool or integer 0/1.
        ref: Reference mask of the same shape.
        spacing_mm: Voxel size along each axis in mm (e.g. ``Volume.spacing_mm``).
        tolerance_mm: NSD tolerance in mm (>= 0).
        percentile: Percentile of the Hausdorff distance, in (0, 100].

    Returns:
        The :class:`SurfaceMetrics` of the structure (see the module docstring for the definitions).

    Raises:
        ShapeError: If the masks differ in shape.
        DataError: If the masks are not 2D/3D binary arrays, or the spacing, tolerance or percentile
            is invalid.

    Example:
        >>> ref = np.zeros((10, 10, 10), dtype=bool); ref[2:6, 2:6, 2:6] = True
        >>> m = surface_metrics(np.roll(ref, 1, axis=0), ref, (1.0, 1.0, 2.0))
        >>> m.hd95_mm, round(m.nsd, 3)
        (1.0, 1.0)
    """
    name = "surface_metrics"
    pred = _check_masks(np.asarray(pred)[None], "pred", name)[0]
    ref = _check_masks(np.asarray(ref)[None], "ref", name)[0]
    _check_same_shape(pred, ref, name)
    spacing = _check_args(spacing_mm, pred.ndim, tolerance_mm, percentile, name)
    box = _union_box(_bbox(pred), _bbox(ref), pred.shape)
    if box is None:
        return _pair(pred[:0], ref[:0], spacing, tolerance_mm, percentile)
    return _pair(pred[box], ref[box], spacing, tolerance_mm, percentile)


def surface_metrics_labels(
    pred: np.ndarray,
    ref: np.ndarray,
    labels: Sequence[int],
    spacing_mm: Sequence[float],
    *,
    tolerance_mm: float = 2.0,
    percentile: float = 95.0,
) -> dict[int, SurfaceMetrics]:
    """HD95 and NSD of every label of two exclusive label maps, each on its own bounding box.

    Both maps are indexed once and their bounding boxes found in one ``find_objects`` pass each; each
    label is then processed inside the union of its two boxes (plus a one-voxel margin).

    Args:
        pred: Predicted label map of shape (X, Y) or (X, Y, Z) (e.g. ``vol.array[0]``); integer dtype,
            values >= 0.
        ref: Reference label map of the same shape.
        labels: Label values to measure; distinct integers >= 0.
        spacing_mm: Voxel size along each axis in mm.
        tolerance_mm: NSD tolerance in mm (>= 0).
        percentile: Percentile of the Hausdorff distance, in (0, 100].

    Returns:
        ``{label: SurfaceMetrics}`` in the order of `labels`.

    Raises:
        ShapeError: If the maps differ in shape.
        DataError: If a map is not a 2D/3D integer label map, or an argument is invalid.

    Example:
        >>> ref = np.zeros((12, 10, 8), dtype=np.uint8); ref[2:6, 2:6, 2:6] = 1; ref[8:10, 6:8, 5:7] = 2
        >>> out = surface_metrics_labels(ref, ref, [1, 2, 3], (1.0, 1.0, 2.5))
        >>> [(out[k].hd95_mm, out[k].nsd) for k in (1, 3)]
        [(0.0, 1.0), (nan, nan)]
    """
    name = "surface_metrics_labels"
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.ndim not in (2, 3):
        raise DataError(
            f"{name}: label maps must have shape (X, Y) or (X, Y, Z), got shape {pred.shape}. Drop the "
            "channel axis first (`volume.array[0]`)."
        )
    _check_same_shape(pred, ref, name)
    spacing = _check_args(spacing_mm, pred.ndim, tolerance_mm, percentile, name)
    label_list = _check_labels(labels, name)
    if all(a.flags.f_contiguous and not a.flags.c_contiguous for a in (pred, ref)):
        # NIfTI arrays are Fortran-ordered: the same metrics on the C-ordered transposed views (with the
        # spacing reversed) make the full-volume passes 3-4x faster
        pred, ref, spacing = pred.T, ref.T, spacing[::-1]
    cp = _compact_label_map(pred, label_list, name=name)  # label i of the list -> i + 1, others -> 0
    cr = _compact_label_map(ref, label_list, name=name)
    boxes_p = ndi.find_objects(cp, max_label=len(label_list))
    boxes_r = ndi.find_objects(cr, max_label=len(label_list))
    out = {}
    for i, label in enumerate(label_list, start=1):
        box = _union_box(boxes_p[i - 1], boxes_r[i - 1], pred.shape)
        if box is None:
            out[label] = _pair(cp[:0] == i, cr[:0] == i, spacing, tolerance_mm, percentile)
        else:
            out[label] = _pair(cp[box] == i, cr[box] == i, spacing, tolerance_mm, percentile)
    return out


def surface_metrics_masks(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing_mm: Sequence[float],
    labels: Sequence[int] | None = None,
    *,
    tolerance_mm: float = 2.0,
    percentile: float = 95.0,
) -> dict[int, SurfaceMetrics]:
    """HD95 and NSD of possibly overlapping structures given as one binary mask per channel.

    Args:
        pred: Predicted masks of shape (S, X, Y) or (S, X, Y, Z); bool or integer 0/1.
        ref: Reference masks of the same shape and channel order.
        spacing_mm: Voxel size along each spatial axis in mm.
        labels: Key of each channel; defaults to ``0..S-1``.
        tolerance_mm: NSD tolerance in mm (>= 0).
        percentile: Percentile of the Hausdorff distance, in (0, 100].

    Returns:
        ``{label: SurfaceMetrics}`` in channel order.

    Raises:
        ShapeError: If the stacks differ in shape or `labels` has not S entries.
        DataError: If the masks are not binary (S, ...) arrays, or an argument is invalid.
    """
    name = "surface_metrics_masks"
    pred = _check_masks(pred, "pred", name)
    ref = _check_masks(ref, "ref", name)
    _check_same_shape(pred, ref, name)
    if pred.ndim not in (3, 4):
        raise DataError(f"{name}: masks must have shape (S, X, Y) or (S, X, Y, Z), got {pred.shape}.")
    keys = list(range(pred.shape[0])) if labels is None else _check_labels(labels, name, allow_negative=True)
    if len(keys) != pred.shape[0]:
        raise ShapeError(
            f"{name}: one label per mask channel. Number of labels",
            expected=(pred.shape[0],),
            actual=(len(keys),),
        )
    spacing = _check_args(spacing_mm, pred.ndim - 1, tolerance_mm, percentile, name)
    out = {}
    for key, p, r in zip(keys, pred, ref, strict=True):
        box = _union_box(_bbox(p), _bbox(r), p.shape)
        sl = box if box is not None else (slice(0, 0),)
        out[key] = _pair(p[sl], r[sl], spacing, tolerance_mm, percentile)
    return out


# --------------------------------------------------------------------------- helpers


def _pair(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], tolerance_mm: float, percentile: float
) -> SurfaceMetrics:
    """Metrics of two boolean masks already cropped to (a margin around) their union bounding box."""
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return SurfaceMetrics(math.nan, math.nan, 0, 0)
    surf_pred = pred ^ ndi.binary_erosion(pred) if has_pred else pred
    surf_ref = ref ^ ndi.binary_erosion(ref) if has_ref else ref
    n_pred, n_ref = int(np.count_nonzero(surf_pred)), int(np.count_nonzero(surf_ref))
    if not has_pred or not has_ref:
        return SurfaceMetrics(math.inf, 0.0, n_pred, n_ref)
    d_pred_to_ref = ndi.distance_transform_edt(~surf_ref, sampling=spacing)[surf_pred]
    d_ref_to_pred = ndi.distance_transform_edt(~surf_pred, sampling=spacing)[surf_ref]
    hd = max(float(np.percentile(d_pred_to_ref, percentile)), float(np.percentile(d_ref_to_pred, percentile)))
    close = int(
        np.count_nonzero(d_pred_to_ref <= tolerance_mm) + np.count_nonzero(d_ref_to_pred <= tolerance_mm)
    )
    return SurfaceMetrics(hd, close / (n_pred + n_ref), n_pred, n_ref)


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    (box,) = ndi.find_objects(mask.view(np.uint8), max_label=1)
    return box


def _union_box(
    a: tuple[slice, ...] | None, b: tuple[slice, ...] | None, shape: tuple[int, ...]
) -> tuple[slice, ...] | None:
    """Union of two bounding boxes, grown by ``_MARGIN`` voxels and clipped to the image."""
    boxes = [x for x in (a, b) if x is not None]
    if not boxes:
        return None
    return tuple(
        slice(
            max(0, min(bx[d].start for bx in boxes) - _MARGIN),
            min(n, max(bx[d].stop for bx in boxes) + _MARGIN),
        )
        for d, n in enumerate(shape)
    )


def _check_same_shape(pred: np.ndarray, ref: np.ndarray, name: str) -> None:
    if pred.shape != ref.shape:
        raise ShapeError(
            f"{name}: pred and ref must be on the same voxel grid; resample the prediction onto the "
            "reference grid with nearest-neighbour interpolation. Shape",
            expected=ref.shape,
            actual=pred.shape,
        )


def _check_args(
    spacing_mm: Sequence[float], ndim: int, tolerance_mm: float, percentile: float, name: str
) -> tuple[float, ...]:
    if ndim not in (2, 3):
        raise DataError(f"{name}: masks must be 2D or 3D, got {ndim} spatial dimensions.")
    try:
        spacing = tuple(float(s) for s in spacing_mm)
    except (TypeError, ValueError):
        raise DataError(
            f"{name}: spacing_mm must be {ndim} numbers (mm per voxel), got {spacing_mm!r}."
        ) from None
    if len(spacing) != ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise DataError(
            f"{name}: spacing_mm must be {ndim} finite positive numbers (one per spatial axis, in mm), got "
            f"{spacing}. Pass `volume.spacing_mm` of the image the masks are on."
        )
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise DataError(f"{name}: tolerance_mm must be a finite number >= 0 (mm), got {tolerance_mm!r}.")
    if not (0 < percentile <= 100):
        raise DataError(f"{name}: percentile must be in (0, 100], got {percentile!r} (95 for HD95).")
    return spacing
