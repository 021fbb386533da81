"""Validation measures what ``medseg predict`` ships.

Each validation case is predicted on its own grid by the prediction path itself
(:func:`medseg.inference.predict.predict_volume`: the engine's tiling, the resampling back to the scan's
grid, the configured post-processing and sigmoid threshold) and scored with :mod:`medseg.metrics` as
``medseg evaluate`` scores it. So ``val_mean_dice`` in ``metrics.csv`` equals ``medseg predict`` +
``medseg evaluate`` on the same cases, and ``best.pt`` is chosen on the number a user gets.

The cases are read once and kept memory-mapped (:func:`medseg.data.cache.cache_original`).
Validation runs every ``train.val_every`` epochs and at the last one.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from medseg.config import Config
from medseg.data.cache import OriginalCase
from medseg.data.plan import Plan
from medseg.inference.engine import EngineOptions
from medseg.inference.predict import predict_volume
from medseg.labels import Mode
from medseg.metrics.overlap import count_overlaps, count_overlaps_masks, dice
from medseg.runtime.bundle import Bundle, PostProcessing
from medseg.training.distributed import DistContext

__all__ = ["case_dice", "record_validation", "validate", "validation_bundle"]


def validation_bundle(net: nn.Module, plan: Plan, cfg: Config, device: Any, run_dir: Path) -> Bundle:
    """The model being trained as ``medseg predict`` would load it from the run directory: the same plan,
    the config's ``predict`` settings and post-processing."""
    return Bundle(
        path=run_dir,
        format="medseg-run",
        plan=plan,
        model=net,
        device=device,
        checkpoint="(in training)",
        predict=cfg.predict,
        postprocessing=PostProcessing.from_config(cfg),
    )


def case_dice(bundle: Bundle, case: OriginalCase, opts: EngineOptions) -> list[float]:
    """Dice per structure of one case predicted on its own grid; NaN where prediction and reference
    are both empty (``medseg evaluate``'s policy)."""
    label = case.label()
    if label is None:
        raise ValueError(f"validation case {case.case_id} has no label")
    pred = predict_volume(bundle, case.image(), opts).array
    ref = np.asarray(label.array).reshape(pred.shape)
    plan = bundle.plan
    if plan.mode == Mode.SOFTMAX:
        counts = count_overlaps(pred[0], ref[0], plan.label_values)
    else:
        counts = count_overlaps_masks(pred, ref)
    return [dice(c) for c in counts.values()]


def validate(
    bundle: Bundle, cases: Sequence[OriginalCase], opts: EngineOptions, *, ctx: DistContext | None = None
) -> np.ndarray:
    """Mean Dice per structure over ``cases`` (NaN for a structure absent from every case and every
    prediction). The model is put in eval mode and its previous mode restored.

    Distributed (``ctx``): every process predicts its share of the cases (case k on rank k mod world
    size) with the unwrapped model; the per-case scores are gathered back in case order, so every
    process returns the same array, equal to a single-process validation.
    """
    ctx = ctx or DistContext()
    was_training = bundle.model.training
    bundle.model.eval()
    try:
        mine = {k: case_dice(bundle, cases[k], opts) for k in range(ctx.rank, len(cases), ctx.world_size)}
    finally:
        bundle.model.train(was_training)
    gathered: dict[int, list[float]] = {}
    for part in ctx.all_gather_object(mine):
        gathered.update(part)
    names = bundle.plan.structure_names
    arr = np.array([gathered[k] for k in range(len(cases))], dtype=float).reshape(len(cases), len(names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: structure never present
        return np.nanmean(arr, axis=0)


def record_validation(
    per: np.ndarray, plan: Plan, row: dict[str, Any], writer: Any, epoch: int
) -> tuple[float, str]:
    """Put per-structure Dice into the metrics row and TensorBoard; returns (mean, log text)."""
    mean = float(np.nanmean(per)) if np.isfinite(per).any() else float("nan")
    row["val_mean_dice"] = "" if np.isnan(mean) else round(mean, 6)
    for name, v in zip(plan.structure_names, per, strict=True):
        row[f"val_dice_{name}"] = "" if np.isnan(v) else round(float(v), 6)
    if writer is not None:
        writer.add_scalar("val/mean_dice", mean, epoch)
        for name, v in zip(plan.structure_names, per, strict=True):
            writer.add_scalar(f"val/dice_{name}", float(v), epoch)
    pairs = ", ".join(f"{n} {v:.3f}" for n, v in zip(plan.structure_names, per, strict=True))
    return mean, f"  val Dice {mean:.4f} ({pairs})"
