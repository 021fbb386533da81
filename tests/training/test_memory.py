"""Training-step memory estimate (medseg.training.memory): linear in voxels and batch, grows with the
network, AMP/optimizer/CUDA terms, the RNG is left alone, and `medseg config show --memory`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from medseg.cli.main import main
from medseg.config import Config, load_config
from medseg.training.memory import (
    CUDA_OVERHEAD_BYTES,
    TrainingMemory,
    estimate_training_memory,
)

CONFIGS = Path(__file__).parents[2] / "configs"


def cfg_with(model: dict[str, Any] | None = None, **train: Any) -> Config:
    d: dict[str, Any] = {
        "data": {"root": ".", "labels": {"a": 1, "b": 2}},
        "model": {"channels": [4, 8, 16], **(model or {})},
        "train": {"batch_size": 2, "device": "cpu", **train},
    }
    return load_config(d, resolve_paths=False)


def fp32(cfg: Config, **kw: Any) -> TrainingMemory:
    return TrainingMemory(cfg, amp=False, cuda=False, **kw)


def test_saved_activations_are_linear_in_voxels_two_probe_sizes() -> None:
    """The premise of scaling one probe: bytes per voxel measured at 2x and 3x the divisor agree."""
    for cfg in (
        cfg_with(),
        cfg_with({"name": "monai_unet", "residual": True}),
        cfg_with({"deep_supervision": True, "channels": [4, 8, 16, 32]}),
    ):
        tm = fp32(cfg)
        strides = tm.strides((32, 32, 32))
        small, large = tm.probe(strides, scale=2), tm.probe(strides, scale=3)
        assert math.prod(large.probe_shape) > 3 * math.prod(small.probe_shape)
        for field in ("network_per_voxel", "other_per_voxel", "largest_per_voxel"):
            a, b = getattr(small, field), getattr(large, field)
            assert b == pytest.approx(a, rel=0.03), (cfg.model.name, field)
        assert small.network_per_voxel > 0 and small.other_per_voxel > 0


def test_estimate_scales_with_voxels_and_batch_size() -> None:
    tm = fp32(cfg_with())
    a = tm.estimate((32, 32, 16))
    b = tm.estimate((32, 32, 32))  # same strides, twice the voxels
    assert b.activation_bytes == pytest.approx(2 * a.activation_bytes, rel=1e-6)
    assert b.parameter_bytes == a.parameter_bytes
    b4 = tm.estimate((32, 32, 32), batch_size=4)
    assert b4.activation_bytes == pytest.approx(2 * b.activation_bytes, rel=1e-6)
    assert b4.total_bytes > b.total_bytes
    assert fp32(cfg_with(batch_size=4)).estimate((32, 32, 32)).total_bytes == b4.total_bytes


def test_estimate_grows_with_channels() -> None:
    narrow = fp32(cfg_with()).estimate((32, 32, 32))
    wide = fp32(cfg_with({"channels": [8, 16, 32]})).estimate((32, 32, 32))
    assert wide.activation_bytes > 1.5 * narrow.activation_bytes
    assert wide.parameters > 3 * narrow.parameters
    assert wide.total_bytes > narrow.total_bytes
    # more input channels: a bigger input batch and first layer
    assert fp32(cfg_with(), in_channels=4).estimate((32, 32, 32)).total_bytes > narrow.total_bytes


def test_amp_optimizer_and_cuda_terms() -> None:
    cfg = cfg_with()
    full = fp32(cfg).estimate((32, 32, 32))
    amp = TrainingMemory(cfg, amp=True, cuda=False).estimate((32, 32, 32))
    # network activations halve, the float32 loss tensors and input batch do not
    assert 0.45 * full.activation_bytes < amp.activation_bytes < 0.9 * full.activation_bytes
    assert amp.parameter_bytes == full.parameter_bytes + 2 * full.parameters
    assert full.parameter_bytes == 4 * 4 * full.parameters  # weights, grads, AdamW's two moments
    sgd = fp32(cfg_with(optimizer="sgd")).estimate((32, 32, 32))
    assert sgd.parameter_bytes == 4 * 3 * full.parameters  # momentum only
    on_gpu = TrainingMemory(cfg, amp=False, cuda=True).estimate((32, 32, 32))
    assert on_gpu.total_bytes - full.total_bytes == CUDA_OVERHEAD_BYTES
    # the loop's rule: AMP only on CUDA
    assert not TrainingMemory(cfg_with(device="cpu", amp=True)).amp
    assert not TrainingMemory(cfg_with(device="cuda", amp=False)).amp
    assert TrainingMemory(cfg_with(device="cuda", amp=True)).amp


def test_sigmoid_2d_and_rng_untouched() -> None:
    cfg = load_config(
        {
            "data": {"root": ".", "spatial_dims": 2, "modality": "xray", "structures": ["x", "y", "z"]},
            "model": {"name": "monai_unet", "channels": [4, 8, 16], "residual": True},
            "train": {"batch_size": 3, "device": "cpu"},
        },
        resolve_paths=False,
    )
    torch.manual_seed(0)
    state = torch.get_rng_state()
    est = estimate_training_memory(cfg, (64, 64), amp=False, cuda=False)
    assert torch.equal(torch.get_rng_state(), state)
    # at least the input batch: image float32 + 3 int64 masks + weights, batch 3
    assert est.activation_bytes > 3 * 64 * 64 * (4 + 3 * 8 + 4)
    assert est.batch_size == 3 and "patch [64, 64] x batch 3" in est.describe()


def test_config_show_memory(capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "show", "--config", str(CONFIGS / "demo_ct.yaml"), "--memory", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["config"]["train"]["memory_gb"] == 8.0
    mem = d["memory"]
    assert mem["cuda"]["amp"] is True and mem["cuda"]["overhead_gb"] == 1.0 and mem["cuda"]["fits"]
    assert mem["cpu"]["amp"] is False and mem["cpu"]["overhead_gb"] == 0.0
    assert mem["cuda"]["activation_gb"] < mem["cpu"]["activation_gb"]
    assert main(["config", "show", "--config", str(CONFIGS / "demo_ct.yaml"), "--memory"]) == 0
    text = capsys.readouterr().out
    assert "# training memory estimate" in text and "CUDA GPU:" in text and "not measured on a GPU" in text


@pytest.mark.gpu
def test_estimate_against_cuda_peak() -> None:
    """On a GPU: the estimate (less the fixed overhead) is within 2x of torch's peak allocation."""
    from medseg.losses.compound import create_loss
    from medseg.models.unet import create_model

    cfg = cfg_with({"channels": [16, 32, 64, 128]}, device="cuda")
    patch = (64, 64, 64)
    est = TrainingMemory(cfg).estimate(patch)
    dev = torch.device("cuda")
    model = create_model(cfg.model, spatial_dims=3, in_channels=1, out_channels=3, patch_size=patch).to(dev)
    loss_fn = create_loss(cfg.loss, "softmax", 3).to(dev)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(2, 1, *patch, device=dev)
    y = torch.randint(0, 3, (2, 1, *patch), device=dev)
    w = torch.ones(2, 1, *patch, device=dev)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # the second step has the optimizer state
        opt.zero_grad(set_to_none=True)
        with torch.autocast(
            "cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        ):
            out = model(x)
        loss_fn(out.float(), y, w).backward()
        opt.step()
    peak = torch.cuda.max_memory_allocated()
    predicted = est.total_bytes - est.overhead_bytes
    assert 0.5 * peak < predicted < 2 * peak, (predicted, peak)
