"""``medseg train``: train a model from a config; the run directory is the model bundle."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from medseg.cli._common import add_config_args
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
    from medseg.training.loop import train
    from medseg.training.run_dir import new_run_dir

    run_dir = args.run_dir or new_run_dir(cfg)
    logger.info("run directory: %s", run_dir)
    train(cfg, run_dir=run_dir, resume=args.resume, progress=not args.no_progress)
    print(run_dir)
    return 0
