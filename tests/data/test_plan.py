"""Planning: the patch fits train.memory_gb (nnU-Net style shrinking), the plan records the estimate,
and the preprocessing cache key ignores the memory fields."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict
from typing import Any

import numpy as np
import pytest
from factories import build_plan

from medseg.config import Config, load_config
from medseg.data.plan import ChannelNorm, Fingerprint, Plan, make_plan, plan_patch_size
from medseg.errors import ConfigError
from medseg.training.memory import TrainingMemory, memory_estimator
from medseg.units import GB

# a tiny 3D network: 3 levels -> patches are multiples of 4
TINY: dict[str, Any] = {
    "data": {"root": ".", "labels": {"a": 1, "b": 2}},
    "model": {"channels": [4, 8, 16]},
    "train": {"batch_size": 2, "device": "cpu"},
}
MEDIAN = (40, 48, 24)


def tiny_cfg(**train: Any) -> Config:
    d = json.loads(json.dumps(TINY))
    d["train"].update(train)
    return load_config(d, resolve_paths=False)


def fingerprint(shape: tuple[int, ...] = MEDIAN, spacing: tuple[float, ...] = (1.0, 1.0, 2.0)) -> Fingerprint:
    rng = np.random.default_rng(0)
    return Fingerprint(
        spacings=[spacing] * 3,
        shapes=[shape] * 3,
        in_channels=1,
        foreground_samples=[rng.normal(50, 10, 1000).astype(np.float32)],
    )


def cpu_memory(cfg: Config) -> TrainingMemory:
    """float32, no CUDA overhead: the same figures on every machine."""
    return TrainingMemory(cfg, in_channels=1, spacing_mm=(1.0, 1.0, 2.0), amp=False, cuda=False)


def full_estimate() -> int:
    cfg = tiny_cfg()
    return cpu_memory(cfg).estimate(MEDIAN).total_bytes


# --------------------------------------------------------------------------------------------
# plan_patch_size with a stand-in estimate (pure arithmetic)


def test_plan_patch_size_shrinks_the_axis_largest_relative_to_the_median() -> None:
    median = (100, 200, 50)

    def est(p: tuple[int, ...]) -> int:
        return math.prod(p)

    budget = 60 * 120 * 32
    patch, used = plan_patch_size(median, 8, est, budget)
    assert used == math.prod(patch) <= budget
    assert all(p % 8 == 0 for p in patch)
    assert all(p <= -(-m // 8) * 8 for p, m in zip(patch, median, strict=True))
    ratios = [p / m for p, m in zip(patch, median, strict=True)]
    # nnU-Net's rule keeps the patch proportional to the median shape (within one step per axis)
    assert max(ratios) - min(ratios) <= 8 / 50 + 1e-9
    # it stopped at the first fitting shape: one step back (on some axis) did not fit, so the budget
    # is used up to the share of one step of the shortest side
    assert used > budget * min(patch) / (min(patch) + 8)


def test_plan_patch_size_whole_image_when_it_fits_and_per_axis_divisor() -> None:
    patch, _ = plan_patch_size((30, 30, 10), (8, 8, 4), lambda p: 0, 1)
    assert patch == (32, 32, 12)


def test_plan_patch_size_treats_rejected_candidates_as_floor() -> None:
    def est(p: tuple[int, ...]) -> int:
        if min(p) < 16:
            raise ConfigError("patch too small for the levels")
        return math.prod(p)

    patch, _ = plan_patch_size((64, 64, 64), 8, est, 16 * 16 * 24)
    assert min(patch) >= 16 and math.prod(patch) <= 16 * 16 * 24
    with pytest.raises(ConfigError, match="train.memory_gb"):
        plan_patch_size((64, 64, 64), 8, est, 16**3 - 1)


# --------------------------------------------------------------------------------------------
# make_plan with the real estimator on a tiny network


def test_planned_patch_fits_the_budget_and_more_budget_gives_a_larger_patch() -> None:
    full = full_estimate()
    budget_gb = 0.3 * full / GB
    cfg = tiny_cfg(memory_gb=budget_gb)
    plan = make_plan(cfg, fingerprint(), memory=cpu_memory(cfg))
    assert math.prod(plan.patch_size) < math.prod(MEDIAN)  # it had to shrink
    assert all(p % 4 == 0 for p in plan.patch_size)
    assert plan.memory_budget_bytes == round(budget_gb * GB)
    assert plan.memory_estimate_bytes is not None
    assert plan.memory_estimate_bytes <= plan.memory_budget_bytes
    assert plan.memory_estimate_bytes == cpu_memory(cfg).estimate(plan.patch_size).total_bytes

    cfg2 = tiny_cfg(memory_gb=2 * budget_gb)
    plan2 = make_plan(cfg2, fingerprint(), memory=cpu_memory(cfg2))
    assert all(b >= a for a, b in zip(plan.patch_size, plan2.patch_size, strict=True))
    assert math.prod(plan2.patch_size) > math.prod(plan.patch_size)
    assert plan2.memory_estimate_bytes is not None
    assert plan2.memory_estimate_bytes <= plan2.memory_budget_bytes

    roomy = tiny_cfg(memory_gb=2 * full / GB)
    assert make_plan(roomy, fingerprint(), memory=cpu_memory(roomy)).patch_size == MEDIAN


def test_budget_below_the_smallest_patch_is_a_config_error() -> None:
    cfg = tiny_cfg(memory_gb=1e-6)
    with pytest.raises(ConfigError, match=r"train\.memory_gb = 1e-06 GB is too small") as exc:
        make_plan(cfg, fingerprint(), memory=cpu_memory(cfg))
    msg = str(exc.value)
    assert "train.batch_size" in msg and "train.patch_size" in msg


def test_median_image_too_small_for_the_network_is_a_config_error() -> None:
    cfg = tiny_cfg()
    with pytest.raises(ConfigError, match=r"median image \(\[4, 4, 2\] voxels.*too small for 3 levels"):
        make_plan(cfg, fingerprint((4, 4, 2)), memory=cpu_memory(cfg))


def test_config_patch_size_wins_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    cfg = tiny_cfg(memory_gb=1e-6, patch_size=[16, 16, 8])
    with caplog.at_level(logging.WARNING, logger="medseg.data.plan"):
        plan = make_plan(cfg, fingerprint(), memory=cpu_memory(cfg))
    assert plan.patch_size == (16, 16, 8)
    assert plan.memory_estimate_bytes == cpu_memory(cfg).estimate((16, 16, 8)).total_bytes
    assert plan.memory_estimate_bytes > plan.memory_budget_bytes
    assert any("train.memory_gb" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)

    caplog.clear()
    roomy = tiny_cfg(patch_size=[16, 16, 8])  # default 8 GB: no warning
    with caplog.at_level(logging.WARNING, logger="medseg.data.plan"):
        assert make_plan(roomy, fingerprint(), memory=cpu_memory(roomy)).patch_size == (16, 16, 8)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_make_plan_with_the_training_estimator_keeps_the_rng() -> None:
    import torch

    cfg = tiny_cfg(memory_gb=0.3 * full_estimate() / GB)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    plan = make_plan(cfg, fingerprint(), memory=memory_estimator(cfg))  # cpu: float32, no CUDA overhead
    assert torch.equal(torch.get_rng_state(), before)  # planning must not shift the model's init
    assert plan.memory_estimate_bytes is not None
    assert plan.memory_estimate_bytes <= plan.memory_budget_bytes


# --------------------------------------------------------------------------------------------
# plan.json: backward compatible, and the cache key ignores the memory fields


def sample_plan(**kw: Any) -> Plan:
    return build_plan(
        target_spacing_mm=(1.0, 1.0, 2.0),
        patch_size=(32, 32, 16),
        normalization=(ChannelNorm("ct", -100, 200, 40.0, 50.0),),
        median_shape=MEDIAN,
        body_threshold=None,
        **kw,
    )


def test_plan_json_round_trip_and_old_files_without_memory_fields(tmp_path: Any) -> None:
    plan = sample_plan(memory_estimate_bytes=123, memory_budget_bytes=8 * GB)
    assert Plan.load(plan.save(tmp_path / "plan.json")) == plan
    old = plan.to_dict()
    del old["memory_estimate_bytes"], old["memory_budget_bytes"]
    loaded = Plan.from_dict(old)
    assert loaded.memory_estimate_bytes is None and loaded.memory_budget_bytes is None
    assert loaded.patch_size == plan.patch_size


def test_plan_records_the_network_with_its_planned_strides(tmp_path: Any) -> None:
    from medseg.models import NetworkSpec, create_network

    cfg = tiny_cfg(patch_size=[16, 16, 8])
    plan = make_plan(cfg, fingerprint(spacing=(1.0, 1.0, 3.0)), memory=cpu_memory(cfg))
    assert plan.network is not None
    # 1 x 1 x 3 mm: the coarse axis is not pooled at the first downsampling level
    assert plan.network.strides == ((1, 1, 1), (2, 2, 1), (2, 2, 2))
    assert plan.network.channels == (4, 8, 16) and plan.network.name == "unet"
    loaded = Plan.load(plan.save(tmp_path / "plan.json"))
    assert loaded.network == plan.network
    assert json.loads((tmp_path / "plan.json").read_text())["network"]["strides"] == [
        [1, 1, 1],
        [2, 2, 1],
        [2, 2, 2],
    ]
    net = create_network(loaded.network, in_channels=1, out_channels=3)
    assert net.level_strides == [(1, 1, 1), (2, 2, 1), (2, 2, 2)]
    # an older plan.json without the record loads with network None (the bundle derives it)
    old = plan.to_dict()
    del old["network"]
    assert Plan.from_dict(old).network is None
    assert isinstance(NetworkSpec.from_dict(plan.network.to_dict()), NetworkSpec)


def test_configured_patch_that_does_not_fit_the_strides_is_refused_when_planning() -> None:
    cfg = tiny_cfg(patch_size=[18, 16, 8])
    with pytest.raises(
        ConfigError, match=r"not divisible by \[4, 4, 2\].*use train.patch_size \[20, 16, 8\]"
    ):
        make_plan(cfg, fingerprint(), memory=cpu_memory(cfg))


def test_preprocess_key_ignores_memory_fields_and_matches_older_plans() -> None:
    plain = sample_plan()
    planned = sample_plan(memory_estimate_bytes=5 * GB, memory_budget_bytes=8 * GB)
    assert planned.preprocess_key() == plain.preprocess_key()
    # the key of a plan written before these fields existed: patch_size and median_shape dropped
    d = json.loads(json.dumps(asdict(plain)))
    older = ("patch_size", "median_shape", "memory_estimate_bytes", "memory_budget_bytes", "network")
    for k in (*older, "class_weights"):
        d.pop(k)
    old_key = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    assert planned.preprocess_key() == old_key
    # the key follows the code's preprocessing version, not the plan's: an older plan resumed today is
    # trained on arrays made as prediction makes them
    assert sample_plan(version=1).preprocess_key() == plain.preprocess_key()
    # but a preprocessing setting still changes it
    assert sample_plan(crop_to_body=False).preprocess_key() != plain.preprocess_key()
