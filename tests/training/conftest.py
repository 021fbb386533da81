"""Shared helpers of the training tests: the `medseg train` command line and the metrics rows."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

CONFIGS = Path(__file__).parents[2] / "configs"


def _train_args(
    config: str, data: Path, cache: Path, run: Path, extra: Sequence[str] = (), epochs: int = 2
) -> list[str]:
    """``medseg train`` argv (without the program name): a shipped config on CPU without progress bars,
    ``data.root``, ``train.cache_dir``, ``train.epochs`` and ``extra`` as ``--set`` items."""
    out = [
        "train",
        "--config",
        str(CONFIGS / config),
        "--run-dir",
        str(run),
        "--no-progress",
        "--device",
        "cpu",
    ]
    for s in [f"data.root={data}", f"train.cache_dir={cache}", f"train.epochs={epochs}", *extra]:
        out += ["--set", s]
    return out


def _metrics_rows(run: Path) -> list[dict[str, str]]:
    """The rows of ``run/metrics.csv``."""
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="session")
def train_args() -> Callable[..., list[str]]:
    """``train_args(config, data, cache, run, extra=(), epochs=2)`` -> ``medseg train`` argv."""
    return _train_args


@pytest.fixture(scope="session")
def metrics_rows() -> Callable[[Path], list[dict[str, str]]]:
    """``metrics_rows(run)`` -> the rows of ``run/metrics.csv`` as dicts."""
    return _metrics_rows
