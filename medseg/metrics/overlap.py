"""Overlap counts per structure (tp, fp, fn, tn), and Dice derived from them.

Counting is kept apart from reducing (segmentation-models-pytorch ``get_stats``): :func:`count_overlaps`
and :func:`count_overlaps_masks` give integer voxel counts per structure; :func:`dice` and every summary
are computed from those counts, so counts can also be summed over cases (``Counts + Counts``) for a
global Dice.

Empty-structure policy (stated here once; :data:`EMPTY_POLICY` is the sentence for report headers):

* **Both empty** (the structure is absent from the reference *and* the prediction): Dice is NaN. Such
  pairs are excluded from means and reported separately as a count (``n_valid`` = the number of
  non-NaN values), as nnU-Net and MONAI's ``ignore_empty`` do. They are neither a perfect 1 nor a 0.
* **One empty** (a missed structure, or a structure predicted where the reference has none): Dice is
  0, which is what ``2 tp / (2 tp + fp + fn)`` gives since ``tp = 0`` and the denominator is positive.
* **Surface distances** (:mod:`medseg.metrics.distances`) follow the same rule: both empty -> HD95
  and NSD are NaN; one empty -> NSD is 0 and HD95 is ``inf`` (no surface to measure to). Summaries
  leave NaN and ``inf`` out of means and other statistics and report how many there were.

Speed: all structures of a label map are counted in one pass over the voxels, whatever their number.
Label values are mapped to compact indices ``0..K`` through a lookup table (``0`` = any value not asked
for), then one ``np.bincount`` of ``ref_index * (K + 1) + pred_index`` gives the joint histogram, whose
diagonal and margins are tp, n_ref and n_pred of every label (the cost does not grow with the number of
labels, unlike one ``pred == k`` / ``ref == k`` comparison per label). The volume is processed in slabs
along the first axis, so the temporary index arrays stay small on large CT volumes.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from medseg.errors import DataError, ShapeError

__all__ = ["EMPTY_POLICY", "Counts", "count_overlaps", "count_overlaps_masks", "dice"]

EMPTY_POLICY = (
    "Dice is NaN when a structure is absent from both the reference and the prediction (such cases are "
    "excluded from means and counted separately as n_valid); Dice is 0 when it is absent from only one. "
    "Surface distances likewise: both empty -> HD95 and NSD NaN; one empty -> NSD 0 and HD95 inf, which "
    "is excluded from HD95 statistics and counted (n_inf)."
)

_CHUNK_VOXELS = 1 << 22  # voxels per slab: bounds the temporary index arrays (~32 MB of intp)
_LUT_MAX = 1 << 22  # largest label value handled with a lookup table; above it, a sorted search
_JOINT_MAX_BINS = 1 << 22  # largest joint histogram ((K + 1) ** 2 bins); above it, diagonal + margins


@dataclass(frozen=True)
class Counts:
    """Voxel counts of one structure: prediction against reference.

    Attributes:
        tp: Voxels in both the prediction and the reference.
        fp: Voxels in the prediction only.
        fn: Voxels in the reference only.
        tn: Voxels in neither (the rest of the field of view).
    """

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def n_pred(self) -> int:
        """Voxels of the structure in the prediction (``tp + fp``)."""
        return self.tp + self.fp

    @property
    def n_ref(self) -> int:
        """Voxels of the structure in the reference (``tp + fn``)."""
        return self.tp + self.fn

    @property
    def n_total(self) -> int:
        """Voxels in the field of view (``tp + fp + fn + tn``)."""
        return self.tp + self.fp + self.fn + self.tn

    def __add__(self, other: Counts) -> Counts:
        """Element-wise sum, e.g. to pool the counts of several cases for a global Dice."""
        if not isinstance(other, Counts):
            return NotImplemented
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    def as_dict(self) -> dict[str, int]:
        """``{"tp", "fp", "fn", "tn", "n_pred", "n_ref"}`` as plain ints (for CSV/JSON rows)."""
        return {
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "tn": self.tn,
            "n_pred": self.n_pred,
            "n_ref": self.n_ref,
        }


def dice(counts: Counts) -> float:
    """Dice similarity coefficient ``2 tp / (2 tp + fp + fn)`` of one structure.

    Args:
        counts: Voxel counts from :func:`count_overlaps` or :func:`count_overlaps_masks` (possibly summed
            over cases).

    Returns:
        Dice in [0, 1] (unitless); NaN if the structure is empty in both the prediction and the
        reference, 0 if it is empty in only one of them (see the module docstring).

    Example:
        >>> dice(Counts(tp=48, fp=16, fn=16, tn=0))
        0.75
        >>> dice(Counts(tp=0, fp=0, fn=0, tn=100))
        nan
    """
    denominator = 2 * counts.tp + counts.fp + counts.fn
    if denominator == 0:
        return math.nan
    return 2 * counts.tp / denominator


def count_overlaps(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int]) -> dict[int, Counts]:
    """Count tp, fp, fn and tn of every label of two label maps, in one pass over the voxels.

    Args:
        pred: Predicted label map of any shape, e.g. (X, Y, Z) or ``Volume.array`` of shape
            (1, X, Y, Z); integer (or bool) dtype, values >= 0. Values not in `labels` count as
            background for every label.
        ref: Reference label map with the same shape as `pred`; integer (or bool) dtype, values >= 0.
        labels: Label values to count, e.g. ``range(1, 118)``; distinct integers >= 0. Labels absent
            from both maps get all-zero tp/fp/fn (Dice NaN).

    Returns:
        ``{label: Counts}`` in the order of `labels`; counts are numbers of voxels.

    Raises:
        ShapeError: If `pred` and `ref` have different shapes.
        DataError: If a map is not an integer label map, holds negative values, or `labels` is not a
            sequence of distinct integers >= 0.

    Example:
        >>> ref = np.zeros((6, 6, 6), dtype=np.uint8); ref[1:5, 1:5, 1:5] = 1
        >>> pred = np.roll(ref, 1, axis=0)  # shifted by one voxel
        >>> c = count_overlaps(pred, ref, [1])[1]
        >>> c.tp, c.fp, c.fn, dice(c)
        (48, 16, 16, 0.75)
    """
    name = "count_overlaps"
    pred = _check_label_map(pred, "pred", name)
    ref = _check_label_map(ref, "ref", name)
    if pred.shape != ref.shape:
        raise ShapeError(
            f"{name}: pred and ref must be label maps on the same voxel grid; resample the prediction "
            "onto the reference grid with nearest-neighbour interpolation (or crop both alike). Shape",
            expected=ref.shape,
            actual=pred.shape,
        )
    label_list = _check_labels(labels, name)
    k1 = len(label_list) + 1  # compact indices 0..K, 0 = any value not in `labels`
    index = _LabelIndex(label_list, _max_value(pred, ref))
    if k1 * k1 <= _JOINT_MAX_BINS:
        joint = np.zeros(k1 * k1, dtype=np.int64)
        for p, r in zip(_slabs(pred), _slabs(ref), strict=True):
            joint += np.bincount(index.joint(r, p, k1).ravel(), minlength=k1 * k1)
        hist = joint.reshape(k1, k1)  # rows: reference index, columns: predicted index
        tp, n_ref, n_pred = np.diagonal(hist), hist.sum(axis=1), hist.sum(axis=0)
    else:  # many labels: the diagonal and the two margins need O(K) memory, not O(K^2)
        tp, n_ref, n_pred = (np.zeros(k1, dtype=np.int64) for _ in range(3))
        for p, r in zip(_slabs(pred), _slabs(ref), strict=True):
            pi, ri = index(p).ravel(), index(r).ravel()
            tp += np.bincount(ri[ri == pi], minlength=k1)
            n_ref += np.bincount(ri, minlength=k1)
            n_pred += np.bincount(pi, minlength=k1)
    return _to_counts(label_list, tp[1:], n_pred[1:], n_ref[1:], pred.size)


def count_overlaps_masks(
    pred: np.ndarray, ref: np.ndarray, labels: Sequence[int] | None = None
) -> dict[int, Counts]:
    """Count tp, fp, fn and tn of possibly overlapping structures given as one binary mask each.

    Use this when structures may overlap (a voxel in several structures, e.g. an organ and the lesion
    inside it), which an exclusive label map cannot represent.

    Args:
        pred: Predicted masks of shape (S, X, Y, Z) or (S, X, Y), one channel per structure; bool or
            integer 0/1.
        ref: Reference masks of the same shape and channel order.
        labels: The key for each of the S channels, e.g. the structures' label values; defaults to the
            channel indices ``0..S-1``.

    Returns:
        ``{label: Counts}`` in channel order; counts are numbers of voxels.

    Raises:
        ShapeError: If `pred` and `ref` have different shapes, or `labels` does not have S entries.
        DataError: If the masks are not (S, ...) binary arrays, or `labels` is not a sequence of
            distinct integers.

    Example:
        >>> ref = np.zeros((2, 4, 4), dtype=bool); ref[0, :2] = True; ref[1, :3] = True  # overlapping
        >>> pred = ref.copy(); pred[1, 3] = True
        >>> {k: round(dice(c), 3) for k, c in count_overlaps_masks(pred, ref, labels=[5, 6]).items()}
        {5: 1.0, 6: 0.857}
    """
    name = "count_overlaps_masks"
    pred = _check_masks(pred, "pred", name)
    ref = _check_masks(ref, "ref", name)
    if pred.shape != ref.shape:
        raise ShapeError(
            f"{name}: pred and ref must have the same (S, ...) shape: the same structures in the same "
            "channel order, on the same voxel grid (resample with nearest-neighbour interpolation). Shape",
            expected=ref.shape,
            actual=pred.shape,
        )
    n_struct = pred.shape[0]
    if labels is None:
        label_list = list(range(n_struct))
    else:
        label_list = _check_labels(labels, name, allow_negative=True)
        if len(label_list) != n_struct:
            raise ShapeError(
                f"{name}: labels must give one key per mask channel; pass as many labels as channels "
                "(or labels=None for the channel indices). Number of labels",
                expected=(n_struct,),
                actual=(len(label_list),),
            )
    tp, n_pred, n_ref = (np.zeros(n_struct, dtype=np.int64) for _ in range(3))
    step = max(1, _CHUNK_VOXELS // max(1, math.prod(pred.shape[1:])))
    for start in range(0, n_struct, step):  # each channel is its own data: one pass over (S, ...)
        p, r = pred[start : start + step], ref[start : start + step]
        flat = (p.shape[0], -1)
        tp[start : start + step] = np.count_nonzero((p & r).reshape(flat), axis=1)
        n_pred[start : start + step] = np.count_nonzero(p.reshape(flat), axis=1)
        n_ref[start : start + step] = np.count_nonzero(r.reshape(flat), axis=1)
    return _to_counts(label_list, tp, n_pred, n_ref, math.prod(pred.shape[1:]))


# --------------------------------------------------------------------------- shared helpers


class _LabelIndex:
    """Maps label values to compact indices 1..K (in the order of `labels`), any other value to 0."""

    def __init__(self, labels: Sequence[int], vmax: int) -> None:
        n = len(labels) + 1
        self.dtype = np.uint8 if n <= 1 << 8 else np.uint16 if n <= 1 << 16 else np.int32
        self.lut: np.ndarray | None = None
        self._joint_luts: tuple[np.ndarray, np.ndarray] | None = None
        if vmax <= _LUT_MAX:
            self.lut = np.zeros(vmax + 1, dtype=self.dtype)
            for i, value in enumerate(labels, start=1):
                if value <= vmax:
                    self.lut[value] = i
        else:  # huge label values (e.g. instance ids): binary search in the sorted labels
            order = np.argsort(labels, kind="stable")
            self.sorted = np.asarray(labels, dtype=np.int64)[order]
            self.index_of = (order + 1).astype(self.dtype)

    def __call__(self, values: np.ndarray) -> np.ndarray:
        if self.lut is not None:
            return self.lut[values]
        if len(self.sorted) == 0:
            return np.zeros(values.shape, dtype=self.dtype)
        if values.dtype == np.uint64:  # int64 vs uint64 would be compared as float64
            values = values.astype(np.int64)
        pos = np.searchsorted(self.sorted, values)
        np.minimum(pos, len(self.sorted) - 1, out=pos)
        return np.where(self.sorted[pos] == values, self.index_of[pos], 0).astype(self.dtype, copy=False)

    def joint(self, ref: np.ndarray, pred: np.ndarray, k1: int) -> np.ndarray:
        """``ref_index * k1 + pred_index``, the input of the joint histogram (uint16 or intp)."""
        if self.lut is not None:  # two lookups and one addition per voxel
            if self._joint_luts is None:
                # uint16 lookups (up to 255 labels) are ~3x faster than intp ones, bincount included
                dtype = np.uint16 if k1 * k1 <= 1 << 16 else np.intp
                self._joint_luts = (self.lut.astype(dtype) * dtype(k1), self.lut.astype(dtype))
            ref_lut, pred_lut = self._joint_luts
            joint = ref_lut[ref]
            joint += pred_lut[pred]
            return joint
        joint = self(ref).astype(np.intp)
        joint *= k1
        joint += self(pred)
        return joint


def _label_counts(label_map: np.ndarray, labels: Sequence[int], *, name: str) -> dict[int, int]:
    """Voxels of each label value in one pass (one ``bincount`` per slab); used by the volume metrics."""
    label_map = _check_label_map(label_map, "label map", name)
    label_list = _check_labels(labels, name)
    index = _LabelIndex(label_list, _max_value(label_map))
    n = np.zeros(len(label_list) + 1, dtype=np.int64)
    for slab in _slabs(label_map):
        n += np.bincount(index(slab).ravel(), minlength=len(label_list) + 1)
    return {label: int(c) for label, c in zip(label_list, n[1:], strict=True)}


def _compact_label_map(label_map: np.ndarray, labels: Sequence[int], *, name: str) -> np.ndarray:
    """The label map with each value in `labels` replaced by its position + 1, any other value by 0."""
    label_map = _check_label_map(label_map, "label map", name)
    label_list = _check_labels(labels, name)
    return _LabelIndex(label_list, _max_value(label_map))(label_map)


def _to_counts(
    labels: Sequence[int], tp: np.ndarray, n_pred: np.ndarray, n_ref: np.ndarray, n_total: int
) -> dict[int, Counts]:
    out = {}
    for label, t, p, r in zip(labels, tp.tolist(), n_pred.tolist(), n_ref.tolist(), strict=True):
        out[label] = Counts(tp=t, fp=p - t, fn=r - t, tn=n_total - p - r + t)
    return out


def _slabs(array: np.ndarray) -> Iterator[np.ndarray]:
    """Consecutive slabs along the first axis with about ``_CHUNK_VOXELS`` voxels each."""
    if array.ndim == 0:
        yield array.reshape(1)
        return
    step = max(1, _CHUNK_VOXELS // max(1, math.prod(array.shape[1:])))
    for start in range(0, array.shape[0], step):
        yield array[start : start + step]


def _max_value(*arrays: np.ndarray) -> int:
    return max((int(a.max()) for a in arrays if a.size), default=0)


def _check_label_map(array: np.ndarray, what: str, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == bool:
        return array.view(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(
            f"{name}: {what} must be an integer label map, got dtype {array.dtype}. Labels are whole class "
            "numbers: resample label maps with nearest-neighbour interpolation, take `argmax` of "
            "probabilities, or cast with `.astype(np.int16)` once you have checked the values are integers."
        )
    if array.size and np.issubdtype(array.dtype, np.signedinteger):
        low = int(array.min())
        if low < 0:
            raise DataError(
                f"{name}: {what} holds negative values (minimum {low}); expected 0 for background and "
                "1, 2, ... for structures. Remap the values first (an ignore label such as -1 must be "
                "removed or mapped to a value that is not counted)."
            )
    return array


def _check_masks(array: np.ndarray, what: str, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim < 2:
        raise DataError(
            f"{name}: {what} must have shape (S, X, Y) or (S, X, Y, Z), one binary mask per structure, got "
            f"{array.ndim} dimension(s) with shape {array.shape}. For a single mask add a leading axis "
            "(`mask[None]`); for an exclusive label map use count_overlaps."
        )
    if array.dtype == bool:
        return array
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(
            f"{name}: {what} masks must be binary (bool or integer 0/1), got dtype {array.dtype}. "
            "Threshold probabilities first, e.g. `probs > 0.5`."
        )
    if array.size:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 1:
            raise DataError(
                f"{name}: {what} masks must be binary (values 0 and 1), got values in [{low}, {high}]. "
                "Convert a label map with `np.stack([label_map == k for k in labels])`, or use "
                "count_overlaps on the label map directly."
            )
    return array.astype(bool)


def _check_labels(labels: Sequence[int], name: str, *, allow_negative: bool = False) -> list[int]:
    if isinstance(labels, (str, bytes)) or not hasattr(labels, "__iter__"):
        raise DataError(
            f"{name}: labels must be a sequence of integer label values, e.g. [1, 2, 3] or range(1, 118), "
            f"got {labels!r}."
        )
    out = []
    for value in labels:
        if isinstance(value, (bool, np.bool_)):
            ok = False
        else:
            try:
                value = operator.index(value)
                ok = True
            except TypeError:
                ok = False
        if not ok:
            raise DataError(
                f"{name}: labels must be integers, got {value!r} ({type(value).__name__}) in {labels!r}. "
                "Pass the label values as ints, e.g. `[int(v) for v in values]`."
            )
        if value < 0 and not allow_negative:
            raise DataError(
                f"{name}: labels must be >= 0 (0 is background), got {value} in {list(labels)!r}. "
                "Label maps cannot hold negative values here; drop it from the list."
            )
        out.append(value)
    if len(set(out)) != len(out):
        dupes = sorted({v for v in out if out.count(v) > 1})
        raise DataError(
            f"{name}: labels must be distinct, got {dupes} more than once. Remove the duplicates "
            "(each label gets one entry in the result)."
        )
    return out
