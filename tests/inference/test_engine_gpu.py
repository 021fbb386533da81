"""The engine on a CUDA device (AMP, pinned transfers, accumulation on the CPU). Skipped without CUDA
(the ``gpu`` marker); run on a GPU machine with ``pytest -m gpu``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factories import build_plan

from medseg.data.plan import ChannelNorm, Plan
from medseg.inference.engine import EngineOptions, EngineStats, segment
from medseg.metrics import count_overlaps, dice
from medseg.types import Volume

pytestmark = pytest.mark.gpu


def _plan() -> Plan:
    return build_plan(
        structure_names=("a", "b", "c"),
        label_values=(1, 2, 3),
        target_spacing_mm=(1.5, 1.5, 2.0),
        patch_size=(32, 32, 16),
        normalization=(ChannelNorm("ct", -200.0, 250.0, 20.0, 80.0),),
        left_right_pairs=(("a", "b"),),
    )


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(8, 4, 3, padding=1)
    ).eval()


def _scan() -> Volume:
    rng = np.random.default_rng(0)
    arr = np.full((1, 90, 80, 40), -1000, np.int16)
    arr[0, 10:80, 8:70, 3:37] = rng.integers(-150, 220, (70, 62, 34))
    return Volume(arr, np.diag([1.2, 1.2, 2.5, 1.0]))


@pytest.mark.parametrize("tta", [False, True])
def test_cuda_with_amp_agrees_with_cpu(tta: bool) -> None:
    plan, vol, net = _plan(), _scan(), _net()
    opts = EngineOptions(tta=tta, batch_size=3)
    on_cpu = segment(vol, plan, net, "cpu", opts)
    stats = EngineStats()
    on_gpu = segment(vol, plan, net.to("cuda"), "cuda", opts, stats=stats)
    assert on_gpu.shape == on_cpu.shape and on_gpu.dtype == on_cpu.dtype
    assert isinstance(on_gpu, np.ndarray)  # decided on the CPU, not a CUDA tensor
    counts = count_overlaps(on_gpu[0], on_cpu[0], list(plan.label_values))
    for v in plan.label_values:  # bf16/fp16 autocast moves near-ties only
        assert dice(counts[v]) > 0.97, (v, dice(counts[v]))
    assert stats.windows_run > 0
