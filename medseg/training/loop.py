"""The training loop: setup → network and optimiser → epochs → validation → run directory.

:func:`train` is what ``medseg train`` calls. A run directory is a model bundle that ``medseg predict``
uses as it is. Resuming (``resume=True``) restores model, optimiser, scheduler, AMP scaler, RNG states
and the epoch; patches are drawn from generators seeded by ``(seed, epoch, index)``, so an epoch
interrupted by SIGKILL is replayed identically after resuming.

Under ``torchrun`` the same function trains one DDP model in several processes; rank 0 writes the run
directory. Batch, iteration, seed, validation and resume conventions: :mod:`medseg.training.distributed`
and docs/training.md.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from medseg.config import Config, config_hash
from medseg.data.augment import Augmenter
from medseg.data.patches import PatchDataset
from medseg.data.plan import Plan
from medseg.errors import DataError
from medseg.inference.engine import EngineOptions
from medseg.io._atomic import atomic_write
from medseg.losses.compound import create_loss
from medseg.models.unet import create_network
from medseg.runtime.bundle import network_of
from medseg.runtime.checkpoint import rng_state, save_checkpoint
from medseg.runtime.device import amp_dtype
from medseg.training.distributed import DistContext, distributed, params_in_sync, rank_seed
from medseg.training.run_dir import MetricsCSV, plot_curves
from medseg.training.setup import Setup, prepare, restore_rng
from medseg.training.validation import record_validation, validate, validation_bundle

logger = logging.getLogger(__name__)

_clock = time.monotonic
"""The clock of ``train.max_minutes`` (seconds; a test may replace it)."""


def lr_factor(schedule: str, epoch: int, epochs: int, *, time_fraction: float = 0.0) -> float:
    """Learning-rate multiplier at the start of ``epoch`` (0-based): poly (power 0.9), cosine or constant.

    The schedule's progress is ``epoch / epochs``, or the share of the time budget used so far
    (``train.max_minutes``) when that is further along, so a run cut short by its budget still anneals.
    """
    t = min(max(epoch / max(epochs, 1), time_fraction), 1.0)
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
    started = _clock()  # train.max_minutes counts planning and preprocessing too
    with distributed(cfg.train.device) as ctx:
        return _train(
            cfg, ctx, Path(run_dir), resume=resume, progress=progress and ctx.is_main, started=started
        )


def _train(
    cfg: Config, ctx: DistContext, run_dir: Path, *, resume: bool, progress: bool, started: float
) -> Path:
    setup = prepare(cfg, ctx, run_dir, resume=resume, progress=progress)
    run = _Training(cfg, ctx, run_dir, setup, started=started)
    for epoch in range(run.start_epoch, cfg.train.epochs):
        row = run.train_epoch(epoch, progress=progress)
        stop = run.end_epoch(epoch, row)
        if stop:
            logger.info("%s", stop)
            break
    if run.writer is not None:
        run.writer.close()
    _report_sync(run.net, ctx)
    return run_dir


class _Training:
    """The state of one training run: network, loss, optimiser, schedule, scaler, best score."""

    def __init__(
        self, cfg: Config, ctx: DistContext, run_dir: Path, setup: Setup, *, started: float | None = None
    ) -> None:
        tc = cfg.train
        self.cfg, self.ctx, self.run_dir, self.setup = cfg, ctx, run_dir, setup
        # the time budget: its end, when the epochs began, the share used, the last validation's cost
        now = _clock()
        self.deadline = (
            None if tc.max_minutes is None else (now if started is None else started) + 60 * tc.max_minutes
        )
        self.epochs_started, self.val_seconds = now, 0.0
        # the schedule's progress by time; a resumed run lays its new budget over what is left of it
        self.time_base = self.time_fraction = 0.0
        if self.deadline is not None and now >= self.deadline:
            logger.warning(
                "planning and preprocessing used all of train.max_minutes = %g; training one step",
                tc.max_minutes,
            )
        plan, device = setup.plan, setup.device
        self.plan, self.device = plan, device
        spec = network_of(plan, setup.checkpoint, where=run_dir)  # an old run resumed: derived once
        self.net = create_network(spec, in_channels=plan.in_channels, out_channels=plan.out_channels).to(
            device
        )
        self.loss_fn = create_loss(
            cfg.loss, plan.mode, plan.out_channels, class_weights=plan.class_weights.get("weights")
        ).to(device)
        if tc.optimizer == "adamw":
            self.opt: torch.optim.Optimizer = torch.optim.AdamW(
                self.net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay
            )
        else:
            self.opt = torch.optim.SGD(
                self.net.parameters(), lr=tc.lr, momentum=0.99, nesterov=True, weight_decay=tc.weight_decay
            )
        self.autocast_dtype = amp_dtype(device, enabled=tc.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype == torch.float16)
        self.start_epoch, self.best, self.since_best = 0, -1.0, 0
        if setup.checkpoint is not None:
            self._resume(setup.checkpoint)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt,
            lambda e: lr_factor(tc.schedule, e, tc.epochs, time_fraction=self.time_fraction),
            last_epoch=self.start_epoch - 1,
        )
        self.metrics = MetricsCSV(run_dir / "metrics.csv", plan.structure_names) if ctx.is_main else None
        if self.metrics is not None:
            self.metrics.truncate_after(self.start_epoch)
        self.model = _wrap_ddp(self.net, ctx, device, tc.batch_size, tc.iterations_per_epoch)  # net is saved
        self.writer = _tensorboard(run_dir) if ctx.is_main else None
        pairs = plan.labels.lr_channel_pairs()
        augmenter = Augmenter(plan.spatial_dims, plan.patch_size, plan.mode, pairs) if tc.augment else None
        self.patches = PatchDataset(
            setup.train_cases,
            plan,
            batch_size=tc.batch_size,
            iterations=tc.iterations_per_epoch,
            seed=rank_seed(tc.seed, ctx.rank),
            foreground_fraction=tc.foreground_fraction,
            augmenter=augmenter,
        )
        self.val_opts = EngineOptions.from_config(cfg.predict)

    def _resume(self, ck: dict[str, Any]) -> None:
        tc = self.cfg.train
        self.net.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):  # empty when the run was saved without fp16 scaling (e.g. on a CPU)
            self.scaler.load_state_dict(ck["scaler"])
        self.start_epoch, self.best = ck["epoch"], ck["best_metric"]
        self.time_base = self.time_fraction = min(max(float(ck.get("time_fraction", 0.0)), 0.0), 1.0)
        # since_best stays 0: resuming (e.g. with more epochs) is a deliberate decision, patience restarts
        restore_rng(ck, self.ctx, tc.batch_size)
        logger.info("resumed %s at epoch %d/%d", self.run_dir, self.start_epoch, tc.epochs)
        if self.start_epoch >= tc.epochs:
            logger.info("run already finished %d epochs; raise train.epochs to extend it", self.start_epoch)

    def train_epoch(self, epoch: int, *, progress: bool) -> dict[str, Any]:
        """One epoch of training steps; the metrics row so far (epoch, loss, learning rate)."""
        tc = self.cfg.train
        self.t0, self.t_mono = time.time(), _clock()
        self.patches.epoch = epoch
        loader = torch.utils.data.DataLoader(
            self.patches,
            batch_size=tc.batch_size,
            shuffle=False,
            num_workers=tc.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        loss = _train_epoch(
            self.model,
            loader,
            self.loss_fn,
            self.opt,
            self.scaler,
            self.device,
            self.autocast_dtype or torch.float16,  # unused when autocast is off
            self.autocast_dtype is not None,
            tc.grad_clip,
            desc=f"epoch {epoch + 1}/{tc.epochs}",
            progress=progress,
            stop=None if self.deadline is None else self._past_deadline,
        )
        loss = self.ctx.mean(loss, self.device)
        row = {"epoch": epoch + 1, "train_loss": round(loss, 6), "lr": self.opt.param_groups[0]["lr"]}
        if self.deadline is not None:
            now = _clock()
            used = min((now - self.epochs_started) / max(self.deadline - self.epochs_started, 1e-9), 1.0)
            # rank 0's clock for every process: the learning rates must not differ between them
            self.time_fraction = float(
                self.ctx.broadcast_object(self.time_base + (1 - self.time_base) * used)
            )
        self.sched.step()
        return row

    def _past_deadline(self) -> bool:
        """Whether the time budget is spent (rank 0 decides, so every process ends the epoch together)."""
        assert self.deadline is not None
        return bool(self.ctx.broadcast_object(_clock() > self.deadline))

    def _out_of_time(self) -> bool:
        """Whether another epoch (as long as this one, with a validation) would end past the budget.

        Rank 0 decides for every process, so that they stop together.
        """
        if self.deadline is None:
            return False
        now = _clock()
        return bool(self.ctx.broadcast_object(now + (now - self.t_mono) + self.val_seconds > self.deadline))

    def end_epoch(self, epoch: int, row: dict[str, Any]) -> str | None:
        """Validate when due, write the checkpoints, metrics and curves (rank 0), log the epoch's line;
        returns why training stops here (early stopping, the time budget), or None to go on."""
        tc, ctx = self.cfg.train, self.ctx
        val_text, improved = "", False
        last = self._out_of_time() and epoch + 1 < tc.epochs  # the last epoch of the time budget
        due = (epoch + 1) % tc.val_every == 0 or epoch + 1 == tc.epochs or last
        if self.setup.val_cases and due:
            t_val = _clock()
            ctx.broadcast_buffers(self.net)
            bundle = validation_bundle(self.net, self.plan, self.cfg, self.device, self.run_dir)
            per = validate(bundle, self.setup.val_cases, self.val_opts, ctx=ctx)
            mean, val_text = record_validation(per, self.plan, row, self.writer, epoch + 1)
            if np.isnan(mean):
                pass  # nothing to compare (no structure in the validation cases or predictions)
            elif mean > self.best:
                self.best, self.since_best, improved = mean, 0, True
            else:
                self.since_best += 1
            self.val_seconds = _clock() - t_val
        rng = ctx.all_gather_object(rng_state())  # every process's RNG states go into the checkpoints
        row["seconds"] = round(time.time() - self.t0, 2)
        if ctx.is_main:
            self._save(epoch, row, rng, improved)
        logger.info(
            "epoch %d/%d  loss %.4f  lr %.2e  %.1fs%s",
            epoch + 1,
            tc.epochs,
            row["train_loss"],
            row["lr"],
            row["seconds"],
            val_text,
        )
        if last:
            return (
                f"time budget: stopping after epoch {epoch + 1} of {tc.epochs}, another would end past "
                f"train.max_minutes = {tc.max_minutes:g}"
            )
        # every process computed the same validation numbers; rank 0's decision is final all the same
        if ctx.broadcast_object(tc.early_stopping is not None and self.since_best >= tc.early_stopping):
            return f"early stopping: no improvement in {self.since_best} validations"
        return None

    def _save(self, epoch: int, row: dict[str, Any], rng: list[dict[str, Any]], improved: bool) -> None:
        assert self.metrics is not None
        checkpoints = self.run_dir / "checkpoints"
        state = _checkpoint(
            self.net,
            self.opt,
            self.sched,
            self.scaler,
            epoch + 1,
            self.best,
            self.since_best,
            self.cfg,
            self.plan,
            rng,
            self.time_fraction,
        )
        if improved:
            save_checkpoint(checkpoints / "best.pt", state)
        if self.writer is not None:
            self.writer.add_scalar("train/loss", row["train_loss"], epoch + 1)
            self.writer.add_scalar("train/lr", row["lr"], epoch + 1)
            self.writer.flush()
        self.metrics.append(row)
        save_checkpoint(checkpoints / "last.pt", state)
        if not self.setup.val_cases:  # nothing to select on: the latest model is the best one
            with atomic_write(checkpoints / "best.pt", fsync=True) as tmp:  # predict loads best.pt
                shutil.copyfile(checkpoints / "last.pt", tmp)
        plot_curves(self.metrics, self.run_dir / "curves.png", self.plan.structure_names)


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


def _report_sync(net: nn.Module, ctx: DistContext) -> None:
    """Log whether the DDP processes ended with bit-identical weights (they must)."""
    if not ctx.enabled:
        return
    same, digests = params_in_sync(net, ctx)
    if same:
        logger.info("DDP: model weights identical on all %d processes (%s)", ctx.world_size, digests[0][:12])
    else:
        logger.error("DDP: model weights differ between processes: %s", [d[:12] for d in digests])


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
    stop: Callable[[], bool] | None = None,
) -> float:
    """One pass over the epoch's batches (cut short after the step at which ``stop()`` turns true);
    returns the mean training loss."""
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
        if stop is not None and stop():
            break
    return float(np.mean(losses))


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
    time_fraction: float = 0.0,
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
        "time_fraction": time_fraction,  # the schedule's progress by train.max_minutes
    }
    if len(rng) > 1:
        payload["rng_ranks"] = rng
    return payload
