"""Structure volumes in millilitres, and which sides of the field of view a structure touches.

* **Volume** in mL is ``n_voxels * prod(spacing_mm) / 1000`` on the grid the label map is on (use the
  scan's original grid, not a resampled one). ``spacing_mm`` is :attr:`Volume.spacing_mm` (the column
  norms of the affine), so for the orthogonal voxel axes of CT/MR this is the exact physical volume; it
  matches SimpleITK's ``LabelShapeStatisticsImageFilter.GetPhysicalSize`` (in mm³).
* **Border contact**: a structure whose bounding box reaches a face of the voxel grid is cut by the
  field of view, so its volume (and any surface metric) is a lower bound. Report it with an
  ``incomplete`` flag, never as 0 or as a complete organ. Sides are named after the *voxel* axes of
  ``Volume.array`` (``x`` = first spatial axis, ``y`` = second, ``z`` = third; ``_min`` = index 0,
  ``_max`` = last index), not after anatomical directions; map them with :attr:`Volume.orientation` if
  needed (e.g. for an ``RAS`` volume ``z_max`` is the superior end).

All labels of a map are handled in one pass: volumes with one ``np.bincount``, bounding boxes with one
``scipy.ndimage.find_objects``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from medseg.errors import DataError
from medseg.metrics.overlap import _compact_label_map, _label_counts
from medseg.types import Volume

__all__ = ["AXIS_NAMES", "volume_ml", "label_volumes", "touches_border", "touches_border_labels"]

AXIS_NAMES = ("x", "y", "z")  # names of the spatial voxel axes 0, 1, 2 in the border-side strings


def volume_ml(n_voxels: int, spacing_mm: Sequence[float]) -> float:
    """Volume of ``n_voxels`` voxels, in millilitres.

    Args:
        n_voxels: Number of voxels (>= 0), e.g. ``Counts.n_pred``.
        spacing_mm: Voxel size along the three spatial axes, in mm (e.g. ``Volume.spacing_mm``).

    Returns:
        ``n_voxels * prod(spacing_mm) / 1000``, in mL (1 mL = 1000 mm³).

    Raises:
        DataError: If `n_voxels` is not an integer >= 0, or `spacing_mm` is not three finite positive
            numbers.

    Example:
        >>> round(volume_ml(64, (1.0, 1.0, 2.5)), 6)  # a 4x4x4 cube at 1 x 1 x 2.5 mm
        0.16
    """
    try:
        n = operator.index(n_voxels)
    except TypeError:
        n = -1
    if n < 0 or isinstance(n_voxels, (bool, np.bool_)):
        raise DataError(f"volume_ml: n_voxels must be an integer >= 0 (a voxel count), got {n_voxels!r}.")
    return n * math.prod(_check_spacing(spacing_mm, "volume_ml")) / 1000.0


def label_volumes(vol: Volume, labels: Sequence[int]) -> dict[int, float]:
    """Volume in mL of each label of a 3D label map, counted in one pass.

    Args:
        vol: Label map of shape (1, X, Y, Z) with an integer dtype and values >= 0, on its original grid.
        labels: Label values to measure, e.g. ``range(1, 118)``; distinct integers >= 0. Values of the
            map not listed are ignored; listed labels that are absent get 0.0.

    Returns:
        ``{label: volume in mL}`` in the order of `labels`.

    Raises:
        DataError: If `vol` is not a single-channel 3D integer label map with valid spacing, or `labels`
            is not a sequence of distinct integers >= 0.

    Example:
        >>> from medseg.types import Volume
        >>> a = np.zeros((1, 12, 10, 8), dtype=np.uint8); a[0, 2:6, 2:6, 2:6] = 1
        >>> {k: round(v, 6) for k, v in label_volumes(Volume(a, np.diag([1, 1, 2.5, 1])), [1, 2]).items()}
        {1: 0.16, 2: 0.0}
    """
    name = "label_volumes"
    if vol.num_channels != 1 or vol.spatial_dims != 3:
        raise DataError(
            f"{name}: expected a 3D label map of shape (1, X, Y, Z), got shape {vol.array.shape}. "
            "Volumes in mL need three spatial axes; for one-hot or multi-channel masks take "
            "`argmax` (or use volume_ml on each channel's voxel count)."
        )
    counts = _label_counts(vol.array, labels, name=name)
    spacing = _check_spacing(vol.spacing_mm, name)
    return {label: volume_ml(n, spacing) for label, n in counts.items()}


def touches_border(mask: np.ndarray) -> list[str]:
    """Sides of the field of view that a structure touches, from its bounding box.

    Args:
        mask: Binary mask of shape (X, Y) or (X, Y, Z); bool or integer 0/1.

    Returns:
        The sides touched, in the order ``x_min, x_max, y_min, y_max, z_min, z_max`` (see the module
        docstring for the axis names); empty if the structure is inside the field of view or empty.

    Raises:
        DataError: If `mask` is not a 2D/3D binary array.

    Example:
        >>> m = np.zeros((10, 10, 10), dtype=bool); m[0:3, 4:7, 8:10] = True
        >>> touches_border(m)
        ['x_min', 'z_max']
    """
    mask = np.asarray(mask)
    _check_spatial(mask, "touches_border", "mask")
    if mask.dtype == bool:
        mask = mask.view(np.uint8)
    elif not np.issubdtype(mask.dtype, np.integer) or (mask.size and (mask.min() < 0 or mask.max() > 1)):
        raise DataError(
            f"touches_border: mask must be binary (bool or integer 0/1), got dtype {mask.dtype}. "
            "Pass `label_map == k`, or use touches_border_labels for all labels of a label map at once."
        )
    (box,) = ndi.find_objects(mask, max_label=1)
    return _sides(box, mask.shape)


def touches_border_labels(label_map: np.ndarray, labels: Sequence[int]) -> dict[int, list[str]]:
    """Sides of the field of view touched by each label of a label map, in one pass.

    Args:
        label_map: Label map of shape (X, Y) or (X, Y, Z) (e.g. ``vol.array[0]``); integer dtype,
            values >= 0.
        labels: Label values to check; distinct integers >= 0.

    Returns:
        ``{label: sides}`` in the order of `labels`, as for :func:`touches_border`; absent labels get
        an empty list.

    Raises:
        DataError: If `label_map` is not a 2D/3D integer label map with values >= 0, or `labels` is not
            a sequence of distinct integers >= 0.

    Example:
        >>> lab = np.zeros((8, 8, 4), dtype=np.int16); lab[0:2, 3:5, 1:3] = 1; lab[3:5, 3:5, 1:3] = 2
        >>> touches_border_labels(lab, [1, 2, 3])
        {1: ['x_min'], 2: [], 3: []}
    """
    name = "touches_border_labels"
    label_map = np.asarray(label_map)
    _check_spatial(label_map, name, "label_map")
    label_list = list(labels) if not isinstance(labels, (str, bytes)) else labels
    compact = _compact_label_map(label_map, label_list, name=name)  # label i of the list -> i + 1
    boxes = ndi.find_objects(compact, max_label=len(label_list))
    return {label: _sides(box, label_map.shape) for label, box in zip(label_list, boxes, strict=True)}


def _sides(box: tuple[slice, ...] | None, shape: tuple[int, ...]) -> list[str]:
    if box is None:
        return []
    sides = []
    for axis, (sl, n) in enumerate(zip(box, shape, strict=True)):
        if sl.start == 0:
            sides.append(f"{AXIS_NAMES[axis]}_min")
        if sl.stop == n:
            sides.append(f"{AXIS_NAMES[axis]}_max")
    return sides


def _check_spatial(array: np.ndarray, name: str, what: str) -> None:
    if array.ndim not in (2, 3):
        raise DataError(
            f"{name}: {what} must have shape (X, Y) or (X, Y, Z), got {array.ndim} dimensions with shape "
            f"{array.shape}. Drop the channel axis first (e.g. `volume.array[0]`)."
        )


def _check_spacing(spacing_mm: Sequence[float], name: str) -> tuple[float, float, float]:
    try:
        spacing = tuple(float(s) for s in spacing_mm)
    except (TypeError, ValueError):
        raise DataError(
            f"{name}: spacing_mm must be three numbers (mm per voxel along x, y, z), got {spacing_mm!r}."
        ) from None
    if len(spacing) != 3:
        raise DataError(
            f"{name}: volumes in mL need three spacings (mm along x, y, z), got {len(spacing)}: {spacing}. "
            "Pass `volume.spacing_mm` of a 3D volume; 2D images have an area, not a volume."
        )
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise DataError(
            f"{name}: spacing_mm must be finite and positive, got {spacing}. Check the image header "
            "(a zero spacing usually means a broken affine)."
        )
    return spacing[0], spacing[1], spacing[2]
