"""The training loop: plan → cache → patches → model/loss → validation → run directory.

:func:`train` is what ``medseg train`` calls. A run directory is a model bundle that ``medseg predict``
uses as it is (DESIGN §7). Resuming (``resume=True``) restores model, optimiser, scheduler, AMP scaler,
RNG states and the epoch; patches are drawn from generators seeded by ``(seed, epoch, index)``, so an
epoch interrupted by SIGKILL is replayed identically after resuming.
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
from medseg.data.plan import Plan
from medseg.data.preprocess import CachedCase
from medseg.data.sampling import sample_patch
from medseg.errors import ConfigError, DataError
from medseg.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from medseg.training.run_dir import MetricsCSV, plot_curves, write_bundle_files

logger = logging.getLogger(__name__)

CONTEXT_FACTOR = 1.25  # patches are cut larger and centre-cropped after rotation/scaling


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available else CPU; ``cuda[:i]`` must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device is {name!r} but no CUDA device is available; use --device cpu or auto"
            )
        idx = int(name.split(":")[1]) if ":" in name else 0
        if idx >= torch.cuda.device_count():
            raise ConfigError(f"train.device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


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

    Args:
        cfg: Validated config.
        run_dir: The run directory (created; with ``resume`` it must hold ``checkpoints/last.pt``).
        resume: Continue from ``checkpoints/last.pt``; ``train.epochs`` may be raised to extend a
            finished run.
        progress: Show progress bars.
    """
    from tqdm.auto import tqdm

    from medseg.data.datasets import load_dataset
    from medseg.data.plan import compute_fingerprint, make_plan
    from medseg.data.preprocess import cache_case, default_cache_dir
    from medseg.losses.compound import create_loss
    from medseg.models.unet import create_model

    tc = cfg.train
    device = resolve_device(tc.device)
    torch.manual_seed(tc.seed)
    run_dir = Path(run_dir)
    ckpt_last = run_dir / "checkpoints" / "last.pt"
    if resume and not ckpt_last.exists():
        raise DataError(
            f"{run_dir}: nothing to resume (no checkpoints/last.pt); drop --resume to start a new run"
        )
    if not resume and ckpt_last.exists():
        raise DataError(
            f"{run_dir} already holds a trained run; pass --resume to continue it or choose a new --run-dir"
        )

    ck = None
    if resume:  # check before anything in the run directory is rewritten
        ck = load_checkpoint(ckpt_last, map_location=device)
        _check_resumable(ck, cfg, ckpt_last)

    dataset = load_dataset(cfg.data)
    train_ids, val_ids = split_validation([c.case_id for c in dataset.train_cases], tc.val_fraction, tc.seed)
    if not train_ids:
        raise DataError(f"{cfg.data.root}: no labelled training cases found (run `medseg data check`)")
    by_id = {c.case_id: c for c in dataset.train_cases}

    plan_path = run_dir / "plan.json"
    if resume and plan_path.exists():
        plan = Plan.load(plan_path)
    else:
        logger.info("planning from %d training cases", len(train_ids))
        fp = compute_fingerprint([by_id[i] for i in train_ids], cfg.data, seed=tc.seed, progress=progress)
        plan = make_plan(cfg, fp, divisor=2 ** (len(cfg.model.channels) - 1))
    write_bundle_files(run_dir, cfg, str(device))
    plan.save(plan_path)
    logger.info(
        "plan: spacing %s mm, patch %s, %s with %d structures",
        plan.target_spacing_mm,
        plan.patch_size,
        plan.mode,
        len(plan.structure_names),
    )

    cache_dir = Path(tc.cache_dir) if tc.cache_dir else default_cache_dir()
    cached = {
        cid: cache_case(by_id[cid], plan, cfg.data, cache_dir)
        for cid in tqdm(
            sorted(set(train_ids) | set(val_ids)), desc="preprocess", disable=not progress, leave=False
        )
    }
    train_cases = [_load_train_case(cached[i], plan.mode) for i in train_ids]

    model = create_model(
        cfg.model,
        spatial_dims=plan.spatial_dims,
        in_channels=plan.in_channels,
        out_channels=plan.out_channels,
        patch_size=plan.patch_size,
        spacing_mm=plan.target_spacing_mm,
    ).to(device)
    loss_fn = create_loss(cfg.loss, plan.mode, plan.out_channels).to(device)
    if tc.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(
            model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay
        )
    else:
        opt = torch.optim.SGD(
            model.parameters(), lr=tc.lr, momentum=0.99, nesterov=True, weight_decay=tc.weight_decay
        )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(tc.schedule, e, tc.epochs))
    use_amp = tc.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    metrics = MetricsCSV(run_dir / "metrics.csv", plan.structure_names)
    start_epoch, best, since_best = 0, -1.0, 0
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):  # empty when the run was saved without fp16 scaling (e.g. on a CPU)
            scaler.load_state_dict(ck["scaler"])
        start_epoch, best = ck["epoch"], ck["best_metric"]
        since_best = 0  # patience restarts: resuming (e.g. with more epochs) is a deliberate decision
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda e: lr_factor(tc.schedule, e, tc.epochs), last_epoch=start_epoch - 1
        )
        set_rng_state(ck["rng"])
        metrics.truncate_after(start_epoch)
        logger.info("resumed %s at epoch %d/%d", run_dir, start_epoch, tc.epochs)
        if start_epoch >= tc.epochs:
            logger.info("run already finished %d epochs; raise train.epochs to extend it", start_epoch)
    else:
        metrics.truncate_after(0)

    writer = _tensorboard(run_dir)
    augmenter = (
        Augmenter(plan.spatial_dims, plan.patch_size, plan.mode, _swap_pairs(plan)) if tc.augment else None
    )
    ds = PatchDataset(
        train_cases,
        plan,
        batch_size=tc.batch_size,
        iterations=tc.iterations_per_epoch,
        seed=tc.seed,
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
            amp_dtype,
            use_amp,
            tc.grad_clip,
            desc=f"epoch {epoch + 1}/{tc.epochs}",
            progress=progress,
        )
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": round(train_loss, 6),
            "lr": opt.param_groups[0]["lr"],  # the rate this epoch trained with
        }
        sched.step()
        val_text = ""
        if val_ids and ((epoch + 1) % tc.val_every == 0 or epoch + 1 == tc.epochs):
            per = validate(model, [cached[v] for v in val_ids], plan, device, overlap=cfg.predict.overlap)
            mean, val_text = _record_validation(per, plan, row, writer, epoch + 1)
            if np.isnan(mean):
                pass  # nothing to compare (no structure in the validation cases or predictions)
            elif mean > best:
                best, since_best = mean, 0
                _save(
                    run_dir / "checkpoints" / "best.pt",
                    model,
                    opt,
                    sched,
                    scaler,
                    epoch + 1,
                    best,
                    0,
                    cfg,
                    plan,
                )
            else:
                since_best += 1
        row["seconds"] = round(time.time() - t0, 2)
        if writer is not None:
            writer.add_scalar("train/loss", train_loss, epoch + 1)
            writer.add_scalar("train/lr", row["lr"], epoch + 1)
            writer.flush()
        metrics.append(row)
        _save(ckpt_last, model, opt, sched, scaler, epoch + 1, best, since_best, cfg, plan)
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
        if tc.early_stopping is not None and since_best >= tc.early_stopping:
            logger.info("early stopping: no improvement in %d validations", since_best)
            break
    if writer is not None:
        writer.close()
    return run_dir


def _train_epoch(
    model: nn.Module,
    loader: Any,
    loss_fn: nn.Module,
    opt: torch.optim.Optimizer,
    scaler: Any,
    device: torch.device,
    amp_dtype: torch.dtype,
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
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
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
    model: nn.Module, cases: Sequence[CachedCase], plan: Plan, device: torch.device, *, overlap: float = 0.5
) -> np.ndarray:
    """Mean Dice per structure over cached cases (sliding window on the preprocessed grid); NaN for a
    structure absent from every case and every prediction."""
    scores = []
    for cc in cases:
        pred = predict_preprocessed(model, cc.image(), plan, device, overlap=overlap)
        label = cc.label()
        scores.append(dice_per_structure(pred, label[0] if plan.mode == "softmax" else label, plan))
    arr = np.array(scores, dtype=float).reshape(len(scores), len(plan.structure_names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: structure never present
        return np.nanmean(arr, axis=0)


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


def _save(
    path: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    scaler: Any,
    epoch: int,
    best: float,
    since_best: int,
    cfg: Config,
    plan: Plan,
) -> None:
    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "best_metric": best,
            "since_best": since_best,
            "rng": rng_state(),
            "config_hash": config_hash(cfg),
            "plan": plan.to_dict(),
            "model_config": cfg.model.model_dump(mode="json"),
        },
    )
