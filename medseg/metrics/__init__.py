"""Evaluation metrics: per-structure overlap counts, Dice, volumes in mL, field-of-view contact, and
surface distances (HD95, normalised surface Dice) in mm.

Counting is separate from reducing: :func:`count_overlaps` / :func:`count_overlaps_masks` give tp, fp,
fn, tn per structure in one pass over the voxels; :func:`dice` and summaries are derived from the counts.
The empty-structure policy is stated once in :mod:`medseg.metrics.overlap` (:data:`EMPTY_POLICY`).
Imports numpy and scipy only (no torch).
"""

from medseg.metrics.distances import (
    SurfaceMetrics,
    surface_metrics,
    surface_metrics_labels,
    surface_metrics_masks,
)
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
    "SurfaceMetrics",
    "count_overlaps",
    "count_overlaps_masks",
    "dice",
    "label_volumes",
    "surface_metrics",
    "surface_metrics_labels",
    "surface_metrics_masks",
    "touches_border",
    "touches_border_labels",
    "volume_ml",
]
