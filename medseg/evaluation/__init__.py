"""Evaluation of predictions against references (``medseg evaluate``).

:func:`evaluate` matches cases by name, counts every structure of a case in one pass, optionally adds
surface distances, and writes ``metrics.csv`` (one row per case and structure), ``summary.json``
(statistics per structure, the empty-structure policy) and ``dice_boxplot.png``. Imports numpy and
scipy only (no torch); matplotlib is imported when the plot is drawn.
"""

from medseg.evaluation._report import format_table
from medseg.evaluation.evaluate import (
    COLUMNS,
    DISTANCE_COLUMNS,
    EvaluateOptions,
    EvaluationResult,
    evaluate,
    evaluate_case,
)

__all__ = [
    "COLUMNS",
    "DISTANCE_COLUMNS",
    "EvaluateOptions",
    "EvaluationResult",
    "evaluate",
    "evaluate_case",
    "format_table",
]
