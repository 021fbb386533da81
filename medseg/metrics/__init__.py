"""Evaluation metrics: per-structure overlap counts, Dice, volumes in mL and field-of-view contact.

Counting is separate from reducing: :func:`count_overlaps` / :func:`count_overlaps_masks` give tp, fp,
fn, tn per structure in one pass over the voxels; :func:`dice` and summaries are derived from the counts.
The empty-structure policy is stated once in :mod:`medseg.metrics.overlap` (:data:`EMPTY_POLICY`).
Imports numpy and scipy only (no torch).
"""

from medseg.metrics.overlap import EMPTY_POLICY, Counts, count_overlaps, count_overlaps_masks, dice
from medseg.metrics.volume import (
    AXIS_NAMES,
    label_volumes,
    touches_border,
    touches_border_labels,
    volume_ml,
)

__all__ = [
    "AXIS_NAMES",
    "EMPTY_POLICY",
    "Counts",
    "count_overlaps",
    "count_overlaps_masks",
    "dice",
    "label_volumes",
    "touches_border",
    "touches_border_labels",
    "volume_ml",
]
