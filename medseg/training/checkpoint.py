"""Atomic checkpoints with everything ``--resume`` needs: model, optimiser, scheduler, AMP scaler,
RNG states (python, numpy, torch, CUDA) and the epoch counter.

Checkpoints hold the unwrapped model's ``state_dict`` (never DDP's ``module.``-prefixed one), so a
checkpoint of a multi-process run loads into a plain model. ``rng`` is rank 0's RNG state (what a
single process restores); a multi-process run also stores ``world_size`` and ``rng_ranks``, the states
of every rank in rank order.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.errors import DataError


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch (and CUDA) RNG states."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states returned by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """``torch.save`` to a temporary sibling, fsync, then rename: a crash never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint; :class:`DataError` with the path when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found (train first, or check --run-dir)")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many types on corrupt files
        raise DataError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
