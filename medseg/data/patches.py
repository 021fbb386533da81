"""Training patches: cached cases ready for sampling, the seeded patch dataset, and the train/validation
split of the training cases.

Every patch is drawn from a generator seeded by ``(seed, epoch, index)``, so an epoch interrupted by
SIGKILL is replayed identically after resuming, whatever the number of loader workers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medseg.data.augment import Augmenter
from medseg.data.cache import CachedCase
from medseg.data.plan import Plan
from medseg.data.sampling import sample_patch
from medseg.errors import DataError

__all__ = ["CONTEXT_FACTOR", "PatchDataset", "TrainCase", "load_train_case", "split_validation"]

logger = logging.getLogger(__name__)

CONTEXT_FACTOR = 1.25  # patches are cut larger and centre-cropped after rotation/scaling


@dataclass
class TrainCase:
    """A cached case ready for sampling (arrays memory-mapped)."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    weights: np.ndarray | None
    locations: dict[int, np.ndarray]
    pad_value: float


def load_train_case(cc: CachedCase, mode: str) -> TrainCase:
    label = cc.label()
    if label is None:
        raise DataError(f"case {cc.case_id}: training case has no label")
    props = cc.props()
    image = cc.image()
    return TrainCase(
        cc.case_id,
        image,
        label,
        cc.weights(),
        cc.locations(mode),
        float(props.get("pad_value", float(np.min(image[0])))),
    )


class PatchDataset(torch.utils.data.Dataset):
    """``iterations × batch_size`` augmented patches per epoch, each from its own seeded generator."""

    def __init__(
        self,
        cases: Sequence[TrainCase],
        plan: Plan,
        *,
        batch_size: int,
        iterations: int,
        seed: int,
        foreground_fraction: float,
        augmenter: Augmenter | None,
    ) -> None:
        self.cases, self.plan = list(cases), plan
        self.batch_size, self.iterations, self.seed = batch_size, iterations, seed
        self.foreground_fraction, self.augmenter = foreground_fraction, augmenter
        self.epoch = 0
        ctx = CONTEXT_FACTOR if augmenter is not None else 1.0
        self.cut_size = tuple(int(math.ceil(p * ctx)) for p in plan.patch_size)

    def __len__(self) -> int:
        return self.iterations * self.batch_size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        case = self.cases[int(rng.integers(len(self.cases)))]
        force = bool(rng.random() < self.foreground_fraction)
        p = sample_patch(
            case.image,
            case.label,
            case.weights,
            case.locations,
            self.cut_size,
            rng,
            force_foreground=force,
            pad_value=case.pad_value,
        )
        d: dict[str, Any] = {"image": p.image, "label": p.label, "weights": p.weights}
        if self.augmenter is not None:
            d = self.augmenter(d, seed=int(rng.integers(2**31)))
        out = {
            "image": torch.from_numpy(np.ascontiguousarray(d["image"], dtype=np.float32)),
            "label": torch.from_numpy(np.ascontiguousarray(d["label"]).astype(np.int64)),
        }
        if d.get("weights") is not None:
            out["weights"] = torch.from_numpy(np.ascontiguousarray(d["weights"], dtype=np.float32))
        return out


def split_validation(case_ids: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split of the training cases (at least one validation case when
    there are two or more cases; a single case is used for both, with a warning)."""
    ids = sorted(case_ids)
    if len(ids) < 2 or fraction <= 0:
        if len(ids) < 2:
            logger.warning("only %d training case(s): validating on the training data", len(ids))
        return ids, ids if len(ids) < 2 else []
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(len(ids)))
    n_val = min(len(ids) - 1, max(1, round(fraction * len(ids))))
    val = sorted(ids[i] for i in order[:n_val])
    return [i for i in ids if i not in val], val
