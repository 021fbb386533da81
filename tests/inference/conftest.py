"""Shared helpers of the inference tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from medseg.config import ModelConfig
from medseg.data.plan import Plan
from medseg.models.unet import create_model


def _save_run(run: Path, plan: Plan, channels: tuple[int, ...] = (4, 8, 16), seed: int = 0) -> Path:
    """Write ``plan.json`` and a ``checkpoints/best.pt`` of an untrained ``monai_unet`` into ``run``:
    a run directory ``medseg predict`` accepts (geometry does not depend on the weights)."""
    plan.save(run / "plan.json")
    cfg = ModelConfig(name="monai_unet", channels=list(channels))
    torch.manual_seed(seed)
    net = create_model(
        cfg,
        spatial_dims=plan.spatial_dims,
        in_channels=plan.in_channels,
        out_channels=plan.out_channels,
        patch_size=plan.patch_size,
    )
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(
        {"model": net.state_dict(), "model_config": cfg.model_dump(mode="json"), "epoch": 1},
        run / "checkpoints" / "best.pt",
    )
    return run


@pytest.fixture(scope="session")
def save_run() -> Callable[..., Path]:
    """``save_run(folder, plan, channels=(4, 8, 16), seed=0)`` -> a run directory with random weights."""
    return _save_run
