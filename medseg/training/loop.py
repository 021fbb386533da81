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
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.config import Config, config_hash
from medseg.data.augment import Augmenter
from medseg.data.cache import CachedCase
from medseg.data.plan import Plan
from medseg.data.sampling import sample_patch
from medseg.errors import ConfigError, DataError
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


def _load_train_case(cc: CachedCase, mode: str) -> TrainCase:
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


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """Learning-rate multiplier at the start of ``epoch`` (0-based): poly (power 0.9), cosine or constant."""
    t = min(epoch / max(epochs, 1), 1.0)
    if schedule == "poly":
        return (1 - t) ** 0.9
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


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


def dice_per_structure(pred: np.ndarray, ref: np.ndarray, plan: Plan) -> list[float]:
    """Dice per structure; NaN when both prediction and reference are empty.

    softmax: ``pred``/``ref`` are ``(*spatial)`` class-index maps; sigmoid: ``(S, *spatial)`` masks.
    """
    from medseg.metrics.overlap import count_overlaps, count_overlaps_masks, dice

    if plan.mode == "softmax":
        counts = count_overlaps(pred, np.asarray(ref), range(1, len(plan.structure_names) + 1))
    else:
        counts = count_overlaps_masks(pred, np.asarray(ref))
    return [dice(c) for c in counts.values()]


@torch.no_grad()
def predict_preprocessed(
    model: nn.Module,
    image: np.ndarray,
    plan: Plan,
    device: torch.device,
    *,
    overlap: float = 0.5,
    batch_size: int = 2,
) -> np.ndarray:
    """Sliding-window labels on the preprocessed grid: argmax (softmax) or logit > 0 (sigmoid)."""
    from medseg.inference.sliding_window import sliding_window_logits

    logits = sliding_window_logits(
        model, image, plan.patch_size, device, overlap=overlap, batch_size=batch_size
    )
    if plan.mode == "softmax":
        return logits.argmax(0).numpy().astype(np.uint8)
    return (logits > 0).numpy().astype(np.uint8)


def _swap_pairs(plan: Plan) -> list[tuple[int, int]]:
    names = list(plan.structure_names)
    off = 1 if plan.mode == "softmax" else 0
    return [(names.index(a) + off, names.index(b) + off) for a, b in plan.left_right_pairs]


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

    cached = _cache_cases(ctx, [by_id[c] for c in sorted(set(train_ids) | set(val_ids))], plan, cfg, progress)
    train_cases = [_load_train_case(cached[i], plan.mode) for i in train_ids]

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
        Augmenter(plan.spatial_dims, plan.patch_size, plan.mode, _swap_pairs(plan)) if tc.augment else None
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
            per = validate(
                net, [cached[v] for v in val_ids], plan, device, overlap=cfg.predict.overlap, ctx=ctx
            )
            mean, val_text = _record_validation(per, plan, row, writer, epoch + 1)
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

    from medseg.data.cache import cache_case, default_cache_dir

    cache_dir = Path(cfg.train.cache_dir) if cfg.train.cache_dir else default_cache_dir()
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


def validate(
    model: nn.Module,
    cases: Sequence[CachedCase],
    plan: Plan,
    device: torch.device,
    *,
    overlap: float = 0.5,
    ctx: DistContext | None = None,
) -> np.ndarray:
    """Mean Dice per structure over cached cases (sliding window on the preprocessed grid); NaN for a
    structure absent from every case and every prediction.

    Distributed (``ctx``): every process predicts its share of the cases (case k on rank k mod world
    size) with the unwrapped ``model``; the per-case scores are gathered back in case order, so every
    process returns the same array, equal to a single-process validation.
    """
    ctx = ctx or DistContext()
    mine = {
        k: dice_per_structure(
            predict_preprocessed(model, cases[k].image(), plan, device, overlap=overlap),
            _reference(cases[k], plan),
            plan,
        )
        for k in range(ctx.rank, len(cases), ctx.world_size)
    }
    gathered: dict[int, list[float]] = {}
    for part in ctx.all_gather_object(mine):
        gathered.update(part)
    scores = [gathered[k] for k in range(len(cases))]
    arr = np.array(scores, dtype=float).reshape(len(scores), len(plan.structure_names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: structure never present
        return np.nanmean(arr, axis=0)


def _reference(cc: CachedCase, plan: Plan) -> np.ndarray:
    label = cc.label()
    assert label is not None
    return label[0] if plan.mode == "softmax" else label


def _record_validation(
    per: np.ndarray, plan: Plan, row: dict[str, Any], writer: Any, epoch: int
) -> tuple[float, str]:
    """Put per-structure Dice into the metrics row and TensorBoard; returns (mean, log text)."""
    mean = float(np.nanmean(per)) if np.isfinite(per).any() else float("nan")
    row["val_mean_dice"] = "" if np.isnan(mean) else round(mean, 6)
    for name, v in zip(plan.structure_names, per, strict=True):
        row[f"val_dice_{name}"] = "" if np.isnan(v) else round(float(v), 6)
    if writer is not None:
        writer.add_scalar("val/mean_dice", mean, epoch)
        for name, v in zip(plan.structure_names, per, strict=True):
            writer.add_scalar(f"val/dice_{name}", float(v), epoch)
    pairs = ", ".join(f"{n} {v:.3f}" for n, v in zip(plan.structure_names, per, strict=True))
    return mean, f"  val Dice {mean:.4f} ({pairs})"


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
