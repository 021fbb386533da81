"""The training loop: plan → cache → patches → model/loss → validation → run directory.

:func:`train` is what ``medseg train`` calls. A run directory is a model bundle that ``medseg predict``
uses as it is (DESIGN §7). Resuming (``resume=True``) restores model, optimiser, scheduler, AMP scaler,
RNG states and the epoch; patches are drawn from generators seeded by ``(seed, epoch, index)``, so an
epoch interrupted by SIGKILL is replayed identically after resuming.

Under ``torchrun`` the same function trains one DDP model in several processes; rank 0 writes the run
directory. Batch, iteration, seed, validation and resume conventions: :mod:`medseg.training.distributed`
and docs/training.md.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.config import Config, config_hash
from medseg.data.augment import Augmenter
from medseg.data.cache import CachedCase, cache_original, default_cache_dir
from medseg.data.patches import PatchDataset, load_train_case, split_validation
from medseg.data.plan import Plan
from medseg.errors import ConfigError, DataError
from medseg.inference.engine import EngineOptions
from medseg.runtime.bundle import network_of
from medseg.runtime.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from medseg.runtime.device import amp_dtype, resolve_device
from medseg.training.distributed import (
    DistContext,
    ddp_device,
    distributed,
    params_in_sync,
    rank_seed,
)
from medseg.training.run_dir import MetricsCSV, plot_curves, write_bundle_files
from medseg.training.validation import record_validation, validate, validation_bundle

logger = logging.getLogger(__name__)


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """Learning-rate multiplier at the start of ``epoch`` (0-based): poly (power 0.9), cosine or constant."""
    t = min(epoch / max(epochs, 1), 1.0)
    if schedule == "poly":
        return (1 - t) ** 0.9
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


def train(
    cfg: Config,
    *,
    run_dir: Path,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Train a model as configured; returns the run directory.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process calls this; they train one DDP model and
    only rank 0 writes ``run_dir`` (conventions: :mod:`medseg.training.distributed`).

    Args:
        cfg: Validated config.
        run_dir: The run directory (created; with ``resume`` it must hold ``checkpoints/last.pt``).
        resume: Continue from ``checkpoints/last.pt``; ``train.epochs`` may be raised to extend a
            finished run.
        progress: Show progress bars (rank 0 only).
    """
    with distributed(cfg.train.device) as ctx:
        return _train(cfg, ctx, Path(run_dir), resume=resume, progress=progress and ctx.is_main)


def _train(cfg: Config, ctx: DistContext, run_dir: Path, *, resume: bool, progress: bool) -> Path:
    from medseg.data.datasets import load_dataset
    from medseg.losses.compound import create_loss
    from medseg.models.unet import create_network

    tc = cfg.train
    device = ddp_device(tc.device, ctx.local_rank) if ctx.enabled else resolve_device(tc.device)
    torch.manual_seed(rank_seed(tc.seed, ctx.rank))
    ckpt_last = run_dir / "checkpoints" / "last.pt"
    _check_run_dir(run_dir, resume, ctx)

    ck = None
    if resume:  # check before anything in the run directory is rewritten
        ck = load_checkpoint(ckpt_last, map_location=device)
        _check_resumable(ck, cfg, ckpt_last)

    dataset = load_dataset(cfg.data)
    train_ids, val_ids = split_validation([c.case_id for c in dataset.train_cases], tc.val_fraction, tc.seed)
    if not train_ids:
        raise DataError(f"{cfg.data.root}: no labelled training cases found (run `medseg data check`)")
    by_id = {c.case_id: c for c in dataset.train_cases}

    # the other processes wait for rank 0's plan instead of reading every image again
    plan: Plan = ctx.broadcast_object(
        _plan_and_bundle(
            cfg, run_dir, [by_id[i] for i in train_ids], resume, device, ctx.world_size, progress
        )
        if ctx.is_main
        else None
    )

    cached = _cache_cases(ctx, [by_id[c] for c in train_ids], plan, cfg, progress)
    train_cases = [load_train_case(cached[i], plan.mode) for i in train_ids]
    val_cases = [cache_original(by_id[v], cfg.data, _cache_dir(cfg)) for v in val_ids]
    val_opts = EngineOptions.from_config(cfg.predict)

    spec = network_of(plan, ck, where=run_dir)  # an old run resumed: derived once, with a warning
    net = create_network(spec, in_channels=plan.in_channels, out_channels=plan.out_channels).to(device)
    loss_fn = create_loss(cfg.loss, plan.mode, plan.out_channels).to(device)
    if tc.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(
            net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay
        )
    else:
        opt = torch.optim.SGD(
            net.parameters(), lr=tc.lr, momentum=0.99, nesterov=True, weight_decay=tc.weight_decay
        )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(tc.schedule, e, tc.epochs))
    autocast_dtype = amp_dtype(device, enabled=tc.amp)
    use_amp = autocast_dtype is not None
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype == torch.float16)

    metrics = MetricsCSV(run_dir / "metrics.csv", plan.structure_names) if ctx.is_main else None
    start_epoch, best, since_best = 0, -1.0, 0
    if ck is not None:
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):  # empty when the run was saved without fp16 scaling (e.g. on a CPU)
            scaler.load_state_dict(ck["scaler"])
        start_epoch, best = ck["epoch"], ck["best_metric"]
        since_best = 0  # patience restarts: resuming (e.g. with more epochs) is a deliberate decision
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda e: lr_factor(tc.schedule, e, tc.epochs), last_epoch=start_epoch - 1
        )
        _restore_rng(ck, ctx, tc.batch_size)
        logger.info("resumed %s at epoch %d/%d", run_dir, start_epoch, tc.epochs)
        if start_epoch >= tc.epochs:
            logger.info("run already finished %d epochs; raise train.epochs to extend it", start_epoch)
    if metrics is not None:
        metrics.truncate_after(start_epoch)

    model = _wrap_ddp(net, ctx, device, tc.batch_size, tc.iterations_per_epoch)  # `net` is saved

    writer = _tensorboard(run_dir) if ctx.is_main else None
    augmenter = (
        Augmenter(plan.spatial_dims, plan.patch_size, plan.mode, plan.labels.lr_channel_pairs())
        if tc.augment
        else None
    )
    ds = PatchDataset(
        train_cases,
        plan,
        batch_size=tc.batch_size,
        iterations=tc.iterations_per_epoch,
        seed=rank_seed(tc.seed, ctx.rank),
        foreground_fraction=tc.foreground_fraction,
        augmenter=augmenter,
    )
    for epoch in range(start_epoch, tc.epochs):
        t0 = time.time()
        ds.epoch = epoch
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=tc.batch_size,
            shuffle=False,
            num_workers=tc.num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )
        train_loss = _train_epoch(
            model,
            loader,
            loss_fn,
            opt,
            scaler,
            device,
            autocast_dtype or torch.float16,  # unused when use_amp is false
            use_amp,
            tc.grad_clip,
            desc=f"epoch {epoch + 1}/{tc.epochs}",
            progress=progress,
        )
        train_loss = ctx.mean(train_loss, device)
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": round(train_loss, 6),
            "lr": opt.param_groups[0]["lr"],  # the rate this epoch trained with
        }
        sched.step()
        val_text, improved = "", False
        if val_ids and ((epoch + 1) % tc.val_every == 0 or epoch + 1 == tc.epochs):
            ctx.broadcast_buffers(net)
            per = validate(validation_bundle(net, plan, cfg, device, run_dir), val_cases, val_opts, ctx=ctx)
            mean, val_text = record_validation(per, plan, row, writer, epoch + 1)
            if np.isnan(mean):
                pass  # nothing to compare (no structure in the validation cases or predictions)
            elif mean > best:
                best, since_best, improved = mean, 0, True
            else:
                since_best += 1
        rng = ctx.all_gather_object(rng_state())  # every process's RNG states go into the checkpoints
        row["seconds"] = round(time.time() - t0, 2)
        if ctx.is_main:
            assert metrics is not None
            state = _checkpoint(net, opt, sched, scaler, epoch + 1, best, since_best, cfg, plan, rng)
            if improved:
                save_checkpoint(run_dir / "checkpoints" / "best.pt", state)
            if writer is not None:
                writer.add_scalar("train/loss", train_loss, epoch + 1)
                writer.add_scalar("train/lr", row["lr"], epoch + 1)
                writer.flush()
            metrics.append(row)
            save_checkpoint(ckpt_last, state)
            if not val_ids:  # nothing to select on: the latest model is the best one
                shutil.copyfile(ckpt_last, run_dir / "checkpoints" / "best.pt")
            plot_curves(metrics, run_dir / "curves.png", plan.structure_names)
        logger.info(
            "epoch %d/%d  loss %.4f  lr %.2e  %.1fs%s",
            epoch + 1,
            tc.epochs,
            train_loss,
            row["lr"],
            row["seconds"],
            val_text,
        )
        # every process computed the same validation numbers; rank 0's decision is final all the same
        stop = ctx.broadcast_object(tc.early_stopping is not None and since_best >= tc.early_stopping)
        if stop:
            logger.info("early stopping: no improvement in %d validations", since_best)
            break
    if writer is not None:
        writer.close()
    _report_sync(net, ctx)
    return run_dir


def _wrap_ddp(
    net: nn.Module, ctx: DistContext, device: torch.device, batch_size: int, iterations: int
) -> nn.Module:
    """``net`` in DistributedDataParallel when distributed, else ``net`` itself."""
    if not ctx.enabled:
        return net
    logger.info(
        "DDP: %d processes (%s), batch %d per process = %d in all, %d iterations per epoch",
        ctx.world_size,
        ctx.backend,
        batch_size,
        batch_size * ctx.world_size,
        iterations,
    )
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)


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


def _plan_and_bundle(
    cfg: Config,
    run_dir: Path,
    cases: Sequence[Any],
    resume: bool,
    device: torch.device,
    world_size: int,
    progress: bool,
) -> Plan:
    """Rank 0: plan (or reload the run's plan when resuming), write config.yaml, env.json, plan.json."""
    from medseg.data.plan import compute_fingerprint, make_plan
    from medseg.training.memory import memory_estimator

    plan_path = run_dir / "plan.json"
    if resume and plan_path.exists():
        plan = Plan.load(plan_path)
    else:
        logger.info("planning from %d training cases", len(cases))
        fp = compute_fingerprint(cases, cfg.data, seed=cfg.train.seed, progress=progress)
        plan = make_plan(cfg, fp, memory=memory_estimator(cfg), divisor=2 ** (len(cfg.model.channels) - 1))
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


def _report_sync(net: nn.Module, ctx: DistContext) -> None:
    """Log whether the DDP processes ended with bit-identical weights (they must)."""
    if not ctx.enabled:
        return
    same, digests = params_in_sync(net, ctx)
    if same:
        logger.info("DDP: model weights identical on all %d processes (%s)", ctx.world_size, digests[0][:12])
    else:
        logger.error("DDP: model weights differ between processes: %s", [d[:12] for d in digests])


def _cache_cases(
    ctx: DistContext, cases: Sequence[Any], plan: Plan, cfg: Config, progress: bool
) -> dict[str, CachedCase]:
    """Preprocess ``cases`` into the cache (or find them there); no case is built by two processes at
    once. Distributed: each process builds its share (case k on rank k mod world size); then the first
    process of every node fills in what that node's cache lacks (nothing when the cache is on a shared
    filesystem); then every process opens the finished entries."""
    from tqdm.auto import tqdm

    from medseg.data.cache import cache_case

    cache_dir = _cache_dir(cfg)
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


def _restore_rng(ck: dict[str, Any], ctx: DistContext, batch_size: int) -> None:
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


def _train_epoch(
    model: nn.Module,
    loader: Any,
    loss_fn: nn.Module,
    opt: torch.optim.Optimizer,
    scaler: Any,
    device: torch.device,
    autocast_dtype: torch.dtype,
    use_amp: bool,
    grad_clip: float,
    *,
    desc: str,
    progress: bool,
) -> float:
    """One pass over the epoch's batches; returns the mean training loss."""
    from tqdm.auto import tqdm

    model.train()
    losses = []
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False)
    for batch in bar:
        x = batch["image"].to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True)
        w = batch["weights"].to(device, non_blocking=True) if "weights" in batch else None
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_amp):
            out = model(x)
        loss = loss_fn(_float(out), y, w)
        if not torch.isfinite(loss):
            raise DataError(f"training loss became {loss.item()} ({desc}); lower train.lr")
        scaler.scale(loss).backward()
        if grad_clip > 0:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return float(np.mean(losses))


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


def _float(out: Any) -> Any:
    if isinstance(out, (list, tuple)):
        return [o.float() for o in out]
    return out.float()


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but keep training working without it
        logger.warning("tensorboard is not installed; no event files are written")
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _checkpoint(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    scaler: Any,
    epoch: int,
    best: float,
    since_best: int,
    cfg: Config,
    plan: Plan,
    rng: list[dict[str, Any]],
) -> dict[str, Any]:
    """Checkpoint contents with the unwrapped ``model``; ``rng`` holds every process's RNG states in rank
    order: ``rng`` keeps rank 0's (what a single process restores), ``rng_ranks`` all of them."""
    payload = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "best_metric": best,
        "since_best": since_best,
        "rng": rng[0],
        "world_size": len(rng),
        "config_hash": config_hash(cfg),
        "plan": plan.to_dict(),
        "model_config": cfg.model.model_dump(mode="json"),
    }
    if len(rng) > 1:
        payload["rng_ranks"] = rng
    return payload
