"""U-Net border weight maps (Ronneberger et al., MICCAI 2015, eq. 2), spacing-aware, 2D and 3D.

``w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 * sigma**2))``

The map is a per-voxel weight for a cross-entropy loss (``sum(w * ce) / sum(w)``): it balances class
frequencies (``w_c``) and stresses thin background gaps between nearby objects (the exp term), where
segmentations tend to merge neighbouring structures.

Why this is hand-written: no maintained library implements the border term with physical spacing.
MONAI, TorchIO and segmentation-models-pytorch have no equivalent; the snippets that circulate compute
one full-image distance transform per object in pixel units, which is both wrong on anisotropic CT
(σ must be in mm) and O(objects × voxels).

Choices (one place, so callers and tests agree):

* **Objects** are connected components of each foreground structure: of each label value of an
  exclusive label map, or of each channel of a multi-channel binary mask. Two organs that touch are
  two objects; one organ in two pieces is two objects.
* **Connectivity** defaults to ``"full"`` (8-neighbourhood in 2D, 26 in 3D, i.e.
  ``generate_binary_structure(ndim, ndim)``), so a thin oblique structure drawn as a staircase on the
  voxel grid stays one object instead of being split at every diagonal step (which would put a large
  spurious separation weight at each step). ``"face"`` (4/6-neighbourhood, scipy's default) is offered.
* **Distances** ``d1``/``d2`` are Euclidean distances in mm from a voxel centre to the nearest voxel
  centre of the nearest / second-nearest object (``scipy.ndimage.distance_transform_edt`` with
  ``sampling=spacing_mm``). A one-voxel gap between two objects therefore gives ``d1 = d2 = 1`` voxel.
* **Background only**: the separation term is added only at background voxels (label 0, or no channel
  set), as in the paper, where it is what makes the network learn the background line between touching
  cells. Foreground voxels get ``w_c`` only. Consequence: two organs whose labels touch directly (no
  background voxel between them) get no extra weight at their interface; the term acts on thin
  background gaps (fat planes) between structures. With fewer than two objects there is no term.
* **Class balance** ``w_c``: median-frequency balancing (Eigen & Fergus, ICCV 2015) over the classes
  *present in this map*, background included: ``w_c = clip(median_f / f_c, 1 / max_class_weight,
  max_class_weight)`` with ``f_c`` the fraction of voxels of class ``c``. Rare organs get larger weights;
  a map with a single class (e.g. all background) gets ``w_c = 1``. ``class_balance=False`` gives
  ``w_c = 1`` everywhere. The frequencies are those of the map passed in, so compute the map once per
  case (not per patch) if the weights must not vary between patches.
* **σ default 5 mm**. The paper uses σ ≈ 5 px on its cell images. On CT (0.6-1.5 mm in-plane) 5 mm is
  3-8 voxels, close to the paper's setting in voxels, and in physical terms the term is ≈ 0.6·w0 for a
  5 mm gap (``d1 + d2``), ≈ 0.14·w0 for 10 mm and ≈ 0.01·w0 for 15 mm: it concentrates on the sub-cm fat
  planes between adjacent organs where segmentations leak.

Speed: ``method="naive"`` computes one distance transform per object over the whole image, O(objects ×
voxels). ``method="bbox"`` (default) computes each object's transform only inside a crop: its bounding
box grown by at most ``margin_sigmas·σ`` mm towards the objects that are closer than that (objects with
no such neighbour are skipped), and keeps running minima of ``d1²``/``d2²`` in float32. Every distance it
computes is exact or an over-estimate, and it is exact wherever ``d1 + d2 < margin_sigmas·σ``; elsewhere
the true term is below ``w0·exp(-margin_sigmas**2 / 2)``, so ``0 <= w_naive - w_bbox <=
w0·exp(-margin_sigmas**2 / 2)`` (3.7e-6·w0 for the default 5σ). Measured numbers: docs/benchmarks.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

from medseg.errors import ConfigError, DataError

__all__ = ["unet_border_weight_map", "unet_border_weight_map_multichannel"]

Method = Literal["bbox", "naive"]
Connectivity = Literal["full", "face"]
_Box = tuple[slice, ...]
_LUT_MAX = 1 << 24  # above this label value, find the values present with np.unique, not find_objects


def unet_border_weight_map(
    labels: np.ndarray,
    *,
    w0: float = 10.0,
    sigma_mm: float = 5.0,
    spacing_mm: Sequence[float] | None = None,
    class_balance: bool = True,
    max_class_weight: float = 10.0,
    method: Method = "bbox",
    margin_sigmas: float = 5.0,
    connectivity: Connectivity = "full",
) -> np.ndarray:
    """Per-voxel loss weights that emphasise thin gaps between nearby objects.

    Computes ``w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 * sigma_mm**2))`` at background
    voxels and ``w_c(x)`` elsewhere, where ``d1`` and ``d2`` are the distances in mm to the nearest and
    second-nearest object (Ronneberger et al., "U-Net: Convolutional Networks for Biomedical Image
    Segmentation", MICCAI 2015, eq. 2). Objects are the connected components of each label value.
    See the module docstring for the choices (connectivity, background only, ``w_c``, σ default).

    Args:
        labels: Exclusive label map of shape (X, Y) or (X, Y, Z), integer or bool dtype; 0 is background.
        w0: Peak extra weight of the separation term (unitless, ≥ 0).
        sigma_mm: Width σ of the separation term, in mm (in voxels when `spacing_mm` is None).
        spacing_mm: Voxel size along each axis in mm; None means 1 along every axis.
        class_balance: Use median-frequency class weights as ``w_c``; if False, ``w_c = 1``.
        max_class_weight: Clip ``w_c`` to ``[1 / max_class_weight, max_class_weight]`` (≥ 1).
        method: ``"bbox"`` (fast, exact up to ``w0·exp(-margin_sigmas**2 / 2)``) or ``"naive"`` (one
            whole-image distance transform per object; reference implementation).
        margin_sigmas: Margin of the ``"bbox"`` method around each object, in units of σ.
        connectivity: ``"full"`` (8/26-neighbourhood) or ``"face"`` (4/6-neighbourhood) components.

    Returns:
        float32 array with the same shape as `labels`.

    Raises:
        DataError: If `labels` is not 2D or 3D, not integer, contains negative values, or `spacing_mm`
            does not have one positive value per axis.
        ConfigError: If a numeric option is out of range or `method`/`connectivity` is unknown.

    Example:
        >>> import numpy as np
        >>> from medseg.losses.weight_maps import unet_border_weight_map
        >>> labels = np.zeros((8, 8), dtype=np.uint8); labels[1:4, 1:4] = 1; labels[1:4, 5:8] = 2
        >>> w = unet_border_weight_map(labels, w0=10, sigma_mm=2, class_balance=False)
        >>> bool(w[2, 4] > w[6, 6])  # the gap between the objects outweighs distant background
        True
        >>> round(float(w[2, 4]), 3)  # d1 = d2 = 1 mm: 1 + 10 * exp(-(1 + 1)**2 / (2 * 2**2))
        7.065
    """
    name = "unet_border_weight_map"
    labels = _check_labels(labels, name)
    spacing = _check_spacing(spacing_mm, labels.ndim, name)
    _check_options(w0, sigma_mm, max_class_weight, method, margin_sigmas, connectivity, name)
    if labels.size == 0:
        return np.zeros(labels.shape, dtype=np.float32)

    regions = _label_regions(labels)
    if class_balance:
        n_background = labels.size - sum(np.count_nonzero(mask) for _, mask in regions)
        w = _class_weight_map(labels.shape, regions, n_background, max_class_weight)
    else:
        w = np.ones(labels.shape, dtype=np.float32)
    structure = _structure(labels.ndim, connectivity)
    objects = [obj for region in regions for obj in _components(region, structure)]
    _add_separation_term(
        w, lambda box: labels[box] == 0, objects, spacing, w0, sigma_mm, method, margin_sigmas
    )
    return w


def unet_border_weight_map_multichannel(
    masks: np.ndarray,
    *,
    w0: float = 10.0,
    sigma_mm: float = 5.0,
    spacing_mm: Sequence[float] | None = None,
    class_balance: bool = True,
    max_class_weight: float = 10.0,
    method: Method = "bbox",
    margin_sigmas: float = 5.0,
    connectivity: Connectivity = "full",
) -> np.ndarray:
    """Border weight map for overlapping structures given as binary masks, one map for all channels.

    Same formula and options as :func:`unet_border_weight_map`, for the sigmoid output mode where
    structures may overlap (e.g. clavicles over lung fields). Objects are the connected components of
    each channel; components of different channels are distinct objects even where they overlap, so a
    background voxel next to a boundary shared by two structures is treated like one between touching
    objects. Background (where the separation term applies) is the set of voxels in no channel.

    Class balance: the "classes" are background (no channel) and each channel; ``f_c`` is the fraction
    of voxels in background or in channel ``c`` (overlaps count for every channel they belong to), and
    ``w_c = clip(median_f / f_c, 1 / max_class_weight, max_class_weight)`` over the classes present. A
    voxel in several channels takes the largest of their weights. For a one-hot encoding of an exclusive
    label map this gives exactly :func:`unet_border_weight_map` of that map.

    Args:
        masks: Binary masks of shape (S, X, Y) or (S, X, Y, Z), bool or integer 0/1.
        w0: Peak extra weight of the separation term (unitless, ≥ 0).
        sigma_mm: Width σ of the separation term, in mm (in voxels when `spacing_mm` is None).
        spacing_mm: Voxel size along each spatial axis in mm; None means 1 along every axis.
        class_balance: Use median-frequency class weights as ``w_c``; if False, ``w_c = 1``.
        max_class_weight: Clip ``w_c`` to ``[1 / max_class_weight, max_class_weight]`` (≥ 1).
        method: ``"bbox"`` (fast) or ``"naive"`` (reference), as in :func:`unet_border_weight_map`.
        margin_sigmas: Margin of the ``"bbox"`` method around each object, in units of σ.
        connectivity: ``"full"`` (8/26-neighbourhood) or ``"face"`` (4/6-neighbourhood) components.

    Returns:
        float32 array of shape (X, Y) or (X, Y, Z): one weight per voxel, shared by all channels.

    Raises:
        DataError: If `masks` is not 3D/4D, not binary, or `spacing_mm` does not match the spatial axes.
        ConfigError: If a numeric option is out of range or `method`/`connectivity` is unknown.

    Example:
        >>> import numpy as np
        >>> from medseg.losses.weight_maps import unet_border_weight_map_multichannel
        >>> masks = np.zeros((2, 8, 8), dtype=bool); masks[0, 1:4, 1:4] = True; masks[1, 1:4, 3:7] = True
        >>> w = unet_border_weight_map_multichannel(masks, sigma_mm=2, class_balance=False)
        >>> w.shape, round(float(w[4, 3]), 3)  # below both: d1 = d2 = 1 voxel
        ((8, 8), 7.065)
    """
    name = "unet_border_weight_map_multichannel"
    masks = _check_masks(masks, name)
    spacing = _check_spacing(spacing_mm, masks.ndim - 1, name)
    _check_options(w0, sigma_mm, max_class_weight, method, margin_sigmas, connectivity, name)
    spatial = masks.shape[1:]
    if math.prod(spatial) == 0:
        return np.zeros(spatial, dtype=np.float32)

    background = ~np.any(masks, axis=0)
    regions = [r for r in (_mask_region(channel) for channel in masks) if r is not None]
    if class_balance:
        w = _class_weight_map(spatial, regions, int(np.count_nonzero(background)), max_class_weight)
    else:
        w = np.ones(spatial, dtype=np.float32)
    structure = _structure(len(spatial), connectivity)
    objects = [obj for region in regions for obj in _components(region, structure)]
    _add_separation_term(
        w, lambda box: background[box], objects, spacing, w0, sigma_mm, method, margin_sigmas
    )
    return w


# --------------------------------------------------------------------------- validation


def _check_labels(labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3):
        raise DataError(
            f"{name}: labels must be a 2D (X, Y) or 3D (X, Y, Z) label map, got {labels.ndim} dimensions "
            f"with shape {labels.shape}. Drop the channel axis first (e.g. `volume.array[0]`); for "
            "several binary masks of shape (S, ...) use unet_border_weight_map_multichannel."
        )
    if labels.dtype == bool:
        return labels.view(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{name}: labels must have an integer dtype, got {labels.dtype}. A label map must hold whole "
            "class numbers (resample it with nearest-neighbour interpolation); cast it with "
            "`labels.astype(np.int16)` once you have checked that the values are integers."
        )
    if labels.size and np.issubdtype(labels.dtype, np.signedinteger):
        low = labels.min()
        if low < 0:
            raise DataError(
                f"{name}: labels contain negative values (minimum {low}); expected 0 for background and "
                "1, 2, ... for structures. Remap the label values (e.g. an ignore label -1 must be "
                "removed before computing weights)."
            )
    return labels


def _check_masks(masks: np.ndarray, name: str) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim not in (3, 4):
        raise DataError(
            f"{name}: masks must have shape (S, X, Y) or (S, X, Y, Z) (one binary mask per structure), "
            f"got {masks.ndim} dimensions with shape {masks.shape}. For an exclusive label map use "
            "unet_border_weight_map; for a single mask add a leading axis (`mask[None]`)."
        )
    if masks.dtype == bool:
        return masks
    if not np.issubdtype(masks.dtype, np.integer):
        raise DataError(
            f"{name}: masks must be binary (bool or integer 0/1), got dtype {masks.dtype}. Threshold "
            "probabilities first, e.g. `masks > 0.5`."
        )
    if masks.size and (masks.min() < 0 or masks.max() > 1):
        raise DataError(
            f"{name}: masks must be binary (values 0 and 1), got values in [{masks.min()}, {masks.max()}]. "
            "Convert a label map with `np.stack([labels == k for k in ids])`."
        )
    return masks.astype(bool)


def _check_spacing(spacing_mm: Sequence[float] | None, ndim: int, name: str) -> tuple[float, ...]:
    if spacing_mm is None:
        return (1.0,) * ndim
    try:
        spacing = tuple(float(s) for s in spacing_mm)
    except (TypeError, ValueError):
        raise DataError(
            f"{name}: spacing_mm must be a sequence of {ndim} numbers (mm per voxel along each axis), "
            f"got {spacing_mm!r}."
        ) from None
    if len(spacing) != ndim:
        raise DataError(
            f"{name}: spacing_mm has {len(spacing)} values {spacing} but the image has {ndim} spatial axes; "
            f"pass one spacing per axis in the array's axis order (e.g. `volume.spacing_mm`)."
        )
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise DataError(
            f"{name}: spacing_mm must be finite and positive, got {spacing}. Check the image header "
            "(a zero spacing usually means a broken affine)."
        )
    return spacing


def _check_options(
    w0: float,
    sigma_mm: float,
    max_class_weight: float,
    method: str,
    margin_sigmas: float,
    connectivity: str,
    name: str,
) -> None:
    checks = [
        ("w0", w0, math.isfinite(w0) and w0 >= 0, "a finite number >= 0"),
        ("sigma_mm", sigma_mm, math.isfinite(sigma_mm) and sigma_mm > 0, "a finite number > 0"),
        (
            "max_class_weight",
            max_class_weight,
            math.isfinite(max_class_weight) and max_class_weight >= 1,
            "a finite number >= 1",
        ),
        ("margin_sigmas", margin_sigmas, math.isfinite(margin_sigmas) and margin_sigmas > 0, "a number > 0"),
        ("method", method, method in ("bbox", "naive"), "one of 'bbox', 'naive'"),
        ("connectivity", connectivity, connectivity in ("full", "face"), "one of 'full', 'face'"),
    ]
    for option, value, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{name}: {option} must be {expected}, got {value!r}.")


# --------------------------------------------------------------------------- classes and objects

_Region = tuple[_Box, np.ndarray]  # bounding box and the boolean mask inside it


def _structure(ndim: int, connectivity: str) -> np.ndarray:
    return ndi.generate_binary_structure(ndim, ndim if connectivity == "full" else 1)


def _label_regions(labels: np.ndarray) -> list[_Region]:
    """Bounding box and mask of each label value present (background excluded), in one pass."""
    if labels.max() <= _LUT_MAX:
        boxes = ndi.find_objects(labels)
        return [(box, labels[box] == value) for value, box in enumerate(boxes, start=1) if box is not None]
    # find_objects allocates one list entry per value up to the maximum: use the values present instead
    regions = []
    for value in np.unique(labels):
        if value:
            region = _mask_region(labels == value)
            if region is not None:
                regions.append(region)
    return regions


def _mask_region(mask: np.ndarray) -> _Region | None:
    (box,) = ndi.find_objects(mask.view(np.uint8), max_label=1)
    return None if box is None else (box, mask[box])


def _median_frequency_weights(counts: np.ndarray, max_class_weight: float) -> np.ndarray:
    """``clip(median_f / f_c, 1/max, max)`` for classes with a count > 0; 0 for absent classes."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros(counts.shape, dtype=np.float64)
    if present.any():
        median = np.median(counts[present])
        weights[present] = np.clip(median / counts[present], 1.0 / max_class_weight, max_class_weight)
    return weights


def _class_weight_map(
    shape: tuple[int, ...], regions: list[_Region], n_background: int, max_class_weight: float
) -> np.ndarray:
    """``w_c`` per voxel; a voxel in several (overlapping) regions gets the largest of their weights."""
    counts = np.array([n_background] + [np.count_nonzero(mask) for _, mask in regions])
    weights = _median_frequency_weights(counts, max_class_weight).astype(np.float32)
    w = np.full(shape, weights[0], dtype=np.float32)
    for i in np.argsort(weights[1:], kind="stable"):  # ascending: the largest weight is written last
        box, mask = regions[i]
        w[box][mask] = weights[i + 1]
    return w


def _components(region: _Region, structure: np.ndarray) -> Iterator[_Region]:
    """Connected components of a region, each as (global bounding box, mask inside it)."""
    box, mask = region
    components, _ = ndi.label(mask, structure=structure)
    for index, sub in enumerate(ndi.find_objects(components), start=1):
        if sub is not None:
            glob = tuple(slice(b.start + s.start, b.start + s.stop) for b, s in zip(box, sub, strict=True))
            yield glob, components[sub] == index


# --------------------------------------------------------------------------- distances


def _grow(box: _Box, margin: Sequence[int], shape: Sequence[int]) -> _Box:
    return tuple(
        slice(max(0, s.start - m), min(n, s.stop + m)) for s, m, n in zip(box, margin, shape, strict=True)
    )


def _intersect(a: _Box, b: _Box) -> _Box | None:
    out = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b, strict=True))
    return None if any(s.start >= s.stop for s in out) else out


def _hull(boxes: Sequence[_Box]) -> _Box:
    return tuple(slice(min(s.start for s in ax), max(s.stop for s in ax)) for ax in zip(*boxes, strict=True))


def _relative(inner: _Box, outer: _Box) -> _Box:
    return tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer, strict=True))


def _size(box: _Box) -> int:
    return math.prod(s.stop - s.start for s in box)


def _pair_box(a: _Box, b: _Box, reach: Sequence[float], shape: Sequence[int]) -> _Box | None:
    """Box holding every voxel x with ``d_a(x) + d_b(x) < margin`` for objects with boxes a and b.

    Along axis i, ``d(x) >= spacing_i * |x_i - nearest index of the box|``, so x_i must satisfy
    ``dist_i(x_i, a) + dist_i(x_i, b) <= reach_i`` with ``reach_i = margin / spacing_i`` (in voxels).
    """
    out = []
    for sa, sb, r, n in zip(a, b, reach, shape, strict=True):
        lo = max(0, min(sa.start, sb.start) - math.ceil(r))
        t = np.arange(lo, min(n, max(sa.stop, sb.stop) + math.ceil(r)))
        f = np.maximum(0, np.maximum(sa.start - t, t - (sa.stop - 1)))
        f += np.maximum(0, np.maximum(sb.start - t, t - (sb.stop - 1)))
        inside = np.flatnonzero(f <= r)
        if inside.size == 0:
            return None
        out.append(slice(lo + int(inside[0]), lo + int(inside[-1]) + 1))
    return tuple(out)


def _bbox_crops(
    boxes: list[_Box], shape: Sequence[int], spacing: Sequence[float], margin_mm: float
) -> list[_Box | None]:
    """Region in which each object's distance transform is needed, or None to skip the object.

    The term is non-negligible at x only if two objects k, j have ``d_k(x) + d_j(x) < margin_mm``. Then
    the boxes of k and j are less than ``margin_mm`` apart, and x lies in their pair box (`_pair_box`),
    which reaches at most the margin (often half of it) beyond the two boxes. Object k's transform must
    be exact on ``R_k``, the hull of its pair boxes; that needs R_k itself plus the part of k's box
    within the margin of R_k (where k's nearest voxel lies). Objects without a neighbour are skipped.
    Elsewhere the crop's distances are exact or over-estimates (the crop may cut the object), which
    can only lower a term that is already below ``w0·exp(-margin**2 / (2σ²))``.
    """
    margin = [math.ceil(margin_mm / s) for s in spacing]
    reach = [margin_mm / s for s in spacing]
    lo = np.array([[s.start for s in b] for b in boxes], dtype=np.int64)
    hi = np.array([[s.stop - 1 for s in b] for b in boxes], dtype=np.int64)  # inclusive
    sp = np.asarray(spacing, dtype=np.float64)
    crops: list[_Box | None] = []
    for k, box in enumerate(boxes):
        gap = np.maximum(0, np.maximum(lo - hi[k], lo[k] - hi))  # voxel-centre gap per axis, (n, ndim)
        near = np.sqrt(((gap * sp) ** 2).sum(axis=1)) < margin_mm
        near[k] = False
        pairs = [p for j in np.flatnonzero(near) if (p := _pair_box(box, boxes[j], reach, shape)) is not None]
        if not pairs:
            crops.append(None)
            continue
        needed = _hull(pairs)
        nearest = _intersect(_grow(needed, margin, shape), box)
        crops.append(_hull([needed, nearest]) if nearest is not None else needed)
    return crops


class _Workspace:
    """Buffers reused by every per-object transform: fresh large allocations are page-faulted each time."""

    def __init__(self, ndim: int, size: int) -> None:
        self.ft = np.empty(ndim * size, dtype=np.int32)
        self.sq = np.empty(size, dtype=np.float32)
        self.tmp = np.empty(size, dtype=np.float32)

    def squared_edt(self, objmask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        """Squared distance (mm²) to the nearest True voxel, float32 (a view into the workspace).

        scipy's feature transform (exact, spacing-aware) gives the nearest object voxel; the squared
        distance is then formed in float32 in place, instead of scipy's float64 ``np.indices`` route.
        """
        shape, n, ndim = objmask.shape, objmask.size, objmask.ndim
        ft = self.ft[: ndim * n].reshape((ndim, *shape))
        ndi.distance_transform_edt(
            ~objmask, sampling=spacing, return_distances=False, return_indices=True, indices=ft
        )
        sq, tmp = self.sq[:n].reshape(shape), self.tmp[:n].reshape(shape)
        for axis, step in enumerate(spacing):
            delta = ft[axis]
            delta -= np.arange(shape[axis], dtype=np.int32).reshape(
                [-1 if i == axis else 1 for i in range(ndim)]
            )
            target = sq if axis == 0 else tmp
            np.copyto(target, delta, casting="same_kind")
            np.multiply(target, target, out=target)
            target *= np.float32(step * step)
            if axis:
                sq += tmp
        return sq

    def scratch(self, shape: tuple[int, ...]) -> np.ndarray:
        return self.tmp[: math.prod(shape)].reshape(shape)


def _two_nearest_squared(
    shape: tuple[int, ...], objects: list[_Region], spacing: tuple[float, ...], margin_mm: float | None
) -> tuple[_Box, np.ndarray, np.ndarray] | None:
    """Squared distances (mm²) to the nearest and second-nearest object over a region.

    Returns ``(region, sq1, sq2)`` with float32 arrays covering ``region`` only (inf where no object was
    considered), or None when no object needs a transform. ``margin_mm=None`` is the naive method: one
    plain ``distance_transform_edt`` per object over the whole image.
    """
    full = tuple(slice(0, n) for n in shape)
    if margin_mm is None:
        crops: list[_Box | None] = [full] * len(objects)
    else:
        crops = _bbox_crops([box for box, _ in objects], shape, spacing, margin_mm)
    used = [c for c in crops if c is not None]
    if not used:
        return None
    region = _hull(used)
    sq1 = np.full(tuple(s.stop - s.start for s in region), np.inf, dtype=np.float32)
    sq2 = np.full_like(sq1, np.inf)
    workspace = None if margin_mm is None else _Workspace(len(shape), max(_size(c) for c in used))
    for (box, mask), crop in zip(objects, crops, strict=True):
        inside = None if crop is None else _intersect(box, crop)
        if inside is None:
            continue
        local = np.zeros(tuple(s.stop - s.start for s in crop), dtype=bool)
        local[_relative(inside, crop)] = mask[_relative(inside, box)]
        if not local.any():  # the EDT of an input without zeros is undefined
            continue
        if workspace is None:
            sq = np.square(ndi.distance_transform_edt(~local, sampling=spacing)).astype(np.float32)
            tmp = np.empty_like(sq)
        else:
            sq = workspace.squared_edt(local, spacing)
            tmp = workspace.scratch(sq.shape)
        view = _relative(crop, region)
        v1, v2 = sq1[view], sq2[view]
        # New second-nearest = min(d2, max(d1, d)), computed with the *old* d1; then d1 = min(d1, d).
        np.maximum(v1, sq, out=tmp)
        np.minimum(v2, tmp, out=v2)
        np.minimum(v1, sq, out=v1)
    return region, sq1, sq2


def _add_separation_term(
    w: np.ndarray,
    background: Callable[[_Box], np.ndarray],
    objects: list[_Region],
    spacing: tuple[float, ...],
    w0: float,
    sigma_mm: float,
    method: str,
    margin_sigmas: float,
) -> None:
    """Add ``w0 * exp(-(d1 + d2)**2 / (2 sigma**2))`` at background voxels of `w`, in place.

    `background(box)` returns the boolean background mask inside `box`.
    """
    if len(objects) < 2 or w0 == 0:
        return
    margin_mm = None if method == "naive" else margin_sigmas * sigma_mm
    result = _two_nearest_squared(w.shape, objects, spacing, margin_mm)
    if result is None:
        return
    region, sq1, sq2 = result
    term = np.sqrt(sq1, out=sq1)  # d1; inf stays inf, and exp(-inf) = 0
    term += np.sqrt(sq2, out=sq2)
    del sq2
    np.square(term, out=term)
    term *= np.float32(-1.0 / (2.0 * sigma_mm**2))
    np.exp(term, out=term)
    term *= np.float32(w0)
    term *= background(region)
    w[region] += term
