"""``medseg train``: train a model from a config; the run directory is the model bundle.

Multi-process (DDP) training: ``torchrun --nproc_per_node=N -m medseg train ...`` (docs/training.md).
Every process runs this command; rank 0 picks the run directory, logs and prints; the other ranks only
log warnings and errors, prefixed with their rank.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from medseg.cli._common import add_config_args, show_progress
from medseg.errors import MedsegError

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a 2D/3D segmentation model from a config",
        description="Plan preprocessing from the training cases (spacing, normalisation, patch size), "
        "cache the preprocessed cases, train a U-Net with soft Dice + (border-weighted) CE/BCE, validate "
        "every train.val_every epochs with sliding-window inference, and write a run directory that "
        "`medseg predict` uses as it is: config.yaml, plan.json, env.json, metrics.csv, curves.png, "
        "TensorBoard events and checkpoints/{last,best}.pt.",
    )
    add_config_args(p, required=False)
    p.add_argument("--run-dir", type=Path, help="run directory (default: runs/<config name>-<time>/)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir from checkpoints/last.pt (with --set train.epochs=N to extend a "
        "finished run); --config defaults to the run's config.yaml",
    )
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides train.device)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medseg.config import load_config

    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.resume:
        if args.run_dir is None:
            raise MedsegError("--resume needs --run-dir (the run to continue)")
        config = args.config or args.run_dir / "config.yaml"
    else:
        if args.config is None:
            raise MedsegError("give --config FILE (e.g. configs/demo_ct.yaml)")
        config = args.config
    cfg = load_config(config, overrides)
    if cfg.model.name == "threshold":
        raise MedsegError(
            "model.name 'threshold' is the classical baseline: it has no weights to train; fit it with "
            "`medseg baseline threshold --config FILE --run-dir DIR` instead"
        )
    from medseg.io._atomic import ensure_writable_folder
    from medseg.training.distributed import distributed
    from medseg.training.loop import train
    from medseg.training.run_dir import new_run_dir

    with distributed(cfg.train.device) as ctx:
        if not ctx.is_main:
            _quiet_logging(ctx.rank)
        # a new run's name holds the time: rank 0 chooses it for everyone
        run_dir = args.run_dir or ctx.broadcast_object(new_run_dir(cfg) if ctx.is_main else None)
        logger.info("run directory: %s", run_dir)
        if ctx.is_main:
            ensure_writable_folder(run_dir, what="--run-dir")
        train(cfg, run_dir=run_dir, resume=args.resume, progress=show_progress(args))
        if ctx.is_main:
            print(run_dir)
    return 0


def _quiet_logging(rank: int) -> None:
    """Ranks other than 0: warnings and errors only, prefixed with the rank."""
    root = logging.getLogger()
    root.setLevel(max(root.level, logging.WARNING))
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s"))
