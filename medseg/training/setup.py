"""Everything training needs before its first step: the device, the checkpoint to resume, the plan
and run directory, the preprocessed training cases and the validation cases.

Under ``torchrun`` rank 0 plans and writes the run directory; the other processes receive the plan and
build their share of the preprocessing cache (conventions: :mod:`medseg.training.distributed`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from medseg.config import Config, config_hash
from medseg.data.cache import CachedCase, OriginalCase, cache_case, cache_original, default_cache_dir
from medseg.data.datasets import load_dataset
from medseg.data.patches import TrainCase, load_train_case, split_validation
from medseg.data.plan import Plan, compute_fingerprint, make_plan
from medseg.errors import ConfigError, DataError
from medseg.io._atomic import sweep_stale_temps
from medseg.runtime.checkpoint import load_checkpoint, set_rng_state
from medseg.runtime.device import resolve_device
from medseg.training.distributed import DistContext, ddp_device, rank_seed
from medseg.training.memory import memory_estimator
from medseg.training.run_dir import write_bundle_files

__all__ = ["Setup", "prepare", "restore_rng"]

logger = logging.getLogger(__name__)

MemoryFactory = Callable[[Sequence[float], int], Any]
"""``(target spacing, in_channels) ->`` a training-memory estimator (what :func:`make_plan` takes)."""


@dataclass
class Setup:
    """What :func:`prepare` found and built."""

    device: torch.device
    checkpoint: dict[str, Any] | None  # the checkpoint resumed from, else None
    plan: Plan
    train_cases: list[TrainCase]
    val_cases: list[OriginalCase]


def prepare(
    cfg: Config,
    ctx: DistContext,
    run_dir: Path,
    *,
    resume: bool,
    progress: bool,
    memory: MemoryFactory | None = None,
) -> Setup:
    """Choose the device, check the run directory (and the checkpoint to resume, before anything in
    the run directory is rewritten), split the cases, plan (rank 0), and cache the training cases.

    ``memory`` is the planner's training-memory estimator factory (``(target spacing, in_channels) ->``
    estimator); by default training's, measured on the configured network. A model that is not trained
    by gradient steps (the threshold baseline) passes its own.

    Raises:
        DataError: No labelled training cases, a run directory that holds a run (without ``resume``)
            or none (with it), an unreadable or unsafe checkpoint.
        ConfigError: Resuming with another network.
    """
    tc = cfg.train
    device = ddp_device(tc.device, ctx.local_rank) if ctx.enabled else resolve_device(tc.device)
    torch.manual_seed(rank_seed(tc.seed, ctx.rank))
    _check_run_dir(run_dir, resume, ctx)
    if ctx.is_main:  # temporary files of a run killed while it wrote (SIGKILL cannot clean up)
        for folder in (run_dir, run_dir / "checkpoints"):
            for path in sweep_stale_temps(folder):
                logger.info("removed %s, left behind by a process that no longer runs", path)
    ck = None
    if resume:
        last = run_dir / "checkpoints" / "last.pt"
        ck = load_checkpoint(last)  # on the CPU: RNG states must stay CPU tensors; weights move on load
        _check_resumable(ck, cfg, last)

    dataset = load_dataset(cfg.data)
    train_ids, val_ids = split_validation([c.case_id for c in dataset.train_cases], tc.val_fraction, tc.seed)
    if not train_ids:
        raise DataError(f"{cfg.data.root}: no labelled training cases found (run `medseg data check`)")
    by_id = {c.case_id: c for c in dataset.train_cases}
    # the other processes wait for rank 0's plan instead of reading every image again
    plan: Plan = ctx.broadcast_object(
        _plan_and_bundle(
            cfg, run_dir, [by_id[i] for i in train_ids], resume, device, ctx.world_size, progress, memory
        )
        if ctx.is_main
        else None
    )
    cached = _cache_cases(ctx, [by_id[c] for c in train_ids], plan, cfg, progress)
    return Setup(
        device=device,
        checkpoint=ck,
        plan=plan,
        train_cases=[load_train_case(cached[i], plan.mode) for i in train_ids],
        val_cases=[cache_original(by_id[v], cfg.data, _cache_dir(cfg)) for v in val_ids],
    )


def _check_run_dir(run_dir: Path, resume: bool, ctx: DistContext) -> None:
    if resume and not (run_dir / "checkpoints" / "last.pt").exists():
        raise DataError(
            f"{run_dir}: nothing to resume (no checkpoints/last.pt); drop --resume to start a new run"
            + (" (every process must see the run directory)" if ctx.enabled else "")
        )
    if not resume and (run_dir / "checkpoints" / "last.pt").exists():
        raise DataError(
            f"{run_dir} already holds a trained run; pass --resume to continue it or choose a new --run-dir"
        )


def _check_resumable(ck: dict[str, Any], cfg: Config, path: Path) -> None:
    """Refuse to resume with a different network; warn when other settings changed."""
    saved = ck.get("model_config")
    now = cfg.model.model_dump(mode="json")
    if saved is not None and saved != now:
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise ConfigError(
            f"{path}: cannot resume: the model section changed ({', '.join(f'model.{k}' for k in diff)}: "
            f"{[saved.get(k) for k in diff]} -> {[now.get(k) for k in diff]}); start a new --run-dir instead"
        )
    if ck.get("config_hash") and ck["config_hash"] != config_hash(cfg):
        logger.warning("resuming with a changed config (hash %s -> %s)", ck["config_hash"], config_hash(cfg))


def _plan_and_bundle(
    cfg: Config,
    run_dir: Path,
    cases: Sequence[Any],
    resume: bool,
    device: torch.device,
    world_size: int,
    progress: bool,
    memory: MemoryFactory | None = None,
) -> Plan:
    """Rank 0: plan (or reload the run's plan when resuming), write config.yaml, env.json, plan.json."""
    plan_path = run_dir / "plan.json"
    if resume and plan_path.exists():
        plan = Plan.load(plan_path)
    else:
        logger.info("planning from %d training cases", len(cases))
        fp = compute_fingerprint(cases, cfg.data, seed=cfg.train.seed, progress=progress)
        estimator = memory if memory is not None else memory_estimator(cfg)
        plan = make_plan(cfg, fp, memory=estimator, divisor=2 ** (len(cfg.model.channels) - 1))
    write_bundle_files(run_dir, cfg, str(device), world_size=world_size)
    plan.save(plan_path)
    logger.info(
        "plan: spacing %s mm, patch %s, %s with %d structures",
        plan.target_spacing_mm,
        plan.patch_size,
        plan.mode,
        len(plan.structure_names),
    )
    return plan


def _cache_cases(
    ctx: DistContext, cases: Sequence[Any], plan: Plan, cfg: Config, progress: bool
) -> dict[str, CachedCase]:
    """Preprocess ``cases`` into the cache (or find them there); no case is built by two processes at
    once. Distributed: each process builds its share (case k on rank k mod world size); then the first
    process of every node fills in what that node's cache lacks (nothing when the cache is on a shared
    filesystem); then every process opens the finished entries."""
    cache_dir = _cache_dir(cfg)
    sweep_stale_temps(cache_dir / plan.preprocess_key())
    mine = cases[ctx.rank :: ctx.world_size]
    built = {
        c.case_id: cache_case(c, plan, cfg.data, cache_dir)
        for c in tqdm(mine, desc="preprocess", disable=not progress, leave=False)
    }
    if not ctx.enabled:
        return built
    ctx.barrier()
    if ctx.local_rank == 0:
        for c in cases:
            cache_case(c, plan, cfg.data, cache_dir)
    ctx.barrier()
    return {c.case_id: cache_case(c, plan, cfg.data, cache_dir) for c in cases}


def _cache_dir(cfg: Config) -> Path:
    return Path(cfg.train.cache_dir) if cfg.train.cache_dir else default_cache_dir()


def restore_rng(ck: dict[str, Any], ctx: DistContext, batch_size: int) -> None:
    """Restore this process's RNG states from a checkpoint.

    Patches do not depend on these states (they are drawn from ``(seed, epoch, index)``); they matter for
    anything that uses the global generators. With the world size the checkpoint was written with,
    every rank gets its own saved state back; otherwise rank 0 gets rank 0's state and the other ranks
    keep their fresh :func:`rank_seed` seeding.
    """
    saved_world = int(ck.get("world_size", 1))
    states = ck.get("rng_ranks") or [ck["rng"]]
    if saved_world != ctx.world_size and ctx.is_main:
        logger.warning(
            "resuming a checkpoint written by %d process(es) with %d: the batch per step changes from "
            "%d to %d patches; rank 0 restores the saved RNG state%s",
            saved_world,
            ctx.world_size,
            batch_size * saved_world,
            batch_size * ctx.world_size,
            ", the other ranks start from fresh per-rank seeds" if ctx.world_size > 1 else "",
        )
    if ctx.rank < len(states) and (saved_world == ctx.world_size or ctx.is_main):
        set_rng_state(states[ctx.rank])
