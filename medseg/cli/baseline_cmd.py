"""``medseg baseline threshold``: the classical baseline every learned model must beat."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from medseg.cli._common import add_config_args, load_config_from_args, show_progress

logger = logging.getLogger(__name__)

THRESHOLD_HELP = """\
Fit the classical baseline on the config's training cases and write a run directory that
`medseg predict --model DIR` and `medseg evaluate` use exactly as they use a trained run.

The baseline is gray-level thresholds + connected components + hole filling; nothing is trained:
  1. the same setup as `medseg train`: dataset, train/validation split, plan (target spacing and
     intensity normalisation) and preprocessing cache;
  2. per structure, the intensity window [lo, hi] (on the normalised intensities, optionally after a
     small Gaussian smoothing) that maximises the Dice of "lo <= x <= hi" against the structure over
     all training voxels, searched exhaustively over a 512-bin histogram; on multi-channel input
     each structure uses the channel where its window scores best;
  3. a lateral prior for the data.left_right_pairs: structures found (>= 95 %) on opposite sides of
     the scan's left-right centre share one window and are kept on their sides (intensities cannot
     tell a left kidney from a right one; mirror TTA then changes nothing);
  4. post-processing: structures that are one object in every training case keep their largest
     connected component, components smaller than half the smallest training object are removed,
     holes are filled (written to config.yaml: data.single_component, predict.min_component_mm3,
     predict.fill_holes).

The model is `model.name: threshold`: its windows are the network's options in plan.json, and
checkpoints/best.pt holds no weights. Prints the windows (in HU for CT) and the Dice per structure
on the training cases (windows alone and after post-processing) and on the validation cases (through
the prediction path, as `medseg train` validates); baseline.json in the run directory holds the same.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "baseline",
        help="classical baselines (no training) to compare learned models with",
        description="Classical baselines: run directories made without training, which `medseg predict` "
        "and `medseg evaluate` use as they use trained runs.",
    )
    p.set_defaults(_subparser=p)
    bsub = p.add_subparsers(dest="baseline_command", metavar="SUBCOMMAND")
    t = bsub.add_parser(
        "threshold",
        help="intensity windows per structure + connected components + hole filling",
        description=THRESHOLD_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(t)
    t.add_argument(
        "--run-dir", type=Path, help="run directory (default: runs/<config name>-threshold-<time>/)"
    )
    t.add_argument(
        "--device", help="auto, cpu, cuda or cuda:N for the validation pass (overrides train.device)"
    )
    t.add_argument("--no-smoothing", action="store_true", help="fit the windows on unsmoothed intensities")
    t.add_argument(
        "--no-side-prior",
        action="store_true",
        help="no lateral prior for the left/right pairs: intensities only",
    )
    t.add_argument(
        "--no-postprocess",
        action="store_true",
        help="keep the config's post-processing as it is instead of fitting it (thresholds alone unless the "
        "config sets some)",
    )
    t.add_argument("--no-progress", action="store_true", help="hide progress bars")
    t.set_defaults(func=run_threshold)


def run_threshold(args: argparse.Namespace) -> int:
    if args.device:
        args.overrides = [*args.overrides, f"train.device={args.device}"]
    cfg = load_config_from_args(args)
    from medseg.io._atomic import ensure_writable_folder
    from medseg.training.run_dir import new_run_dir
    from medseg.training.threshold import BaselineOptions, fit_threshold_baseline

    run_dir = args.run_dir or new_run_dir(cfg.model_copy(update={"name": f"{cfg.name or 'run'}-threshold"}))
    ensure_writable_folder(run_dir, what="--run-dir")
    logger.info("run directory: %s", run_dir)
    options = BaselineOptions(
        smoothing=not args.no_smoothing,
        side_prior=not args.no_side_prior,
        postprocess=not args.no_postprocess,
    )
    result = fit_threshold_baseline(cfg, run_dir, options=options, progress=show_progress(args))
    print(result.describe())
    print(run_dir)
    return 0
