"""``medseg data check`` and ``medseg data synth``."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from medseg.cli._common import add_config_args, load_config_from_args, show_progress
from medseg.errors import MedsegError

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="check datasets, make synthetic phantoms", description="Dataset tools.")
    p.set_defaults(_subparser=p)
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    check = dsub.add_parser(
        "check",
        help="list every problem in a dataset (exit 2 on errors)",
        description="Read every case of a dataset once and report every problem in one table: "
        "unreadable files, missing image/label pairs, image/label grid mismatches (shape, spacing, "
        "origin, direction), undeclared or empty labels, NaN/Inf intensities, 4D images where 3D "
        "was expected. Exit code 0 when there are no errors (warnings don't fail), 2 otherwise. "
        "Give --config (layout and labels from the config) or a dataset folder (layout detected: "
        "dataset.json/imagesTr = MSD/nnU-Net, images/+masks/ = SCR).",
    )
    check.add_argument("folder", nargs="?", help="dataset folder (instead of --config)")
    add_config_args(check, required=False)
    check.add_argument("--json", action="store_true", help="print the problems as JSON records")
    check.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    check.set_defaults(func=run_check)

    synth = dsub.add_parser(
        "synth",
        help="write synthetic CT or chest X-ray phantoms",
        description="Write a synthetic dataset in the layout real datasets use: 'ct' = torso-like CT "
        "phantoms (HU, anisotropic spacing, mixed RAS/LPS/LAS orientations) in the MSD/nnU-Net layout "
        "with some held-out cases also as DICOM series; 'chest_xray' = radiograph-like PNGs with "
        "per-structure masks (lungs, heart, clavicles overlapping the lungs) in the SCR layout. About "
        "a fifth of the cases (at least one) are held out. Deterministic for a given --seed.",
    )
    synth.add_argument("kind", choices=["ct", "chest_xray"], help="which phantom")
    synth.add_argument("--out", required=True, type=Path, help="output folder (created; must be empty)")
    synth.add_argument(
        "--cases", type=int, default=None, help="total number of cases (ct: 10, chest_xray: 20)"
    )
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    synth.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    synth.set_defaults(func=run_synth)


def run_check(args: argparse.Namespace) -> int:
    if (args.config is None) == (args.folder is None):
        raise MedsegError("give either --config FILE or a dataset FOLDER (not both, not neither)")
    from medseg.data.check import check_dataset
    from medseg.data.datasets import dataset_from_folder, load_dataset

    if args.config is not None:
        cfg = load_config_from_args(args)
        dataset, data_cfg = load_dataset(cfg.data), cfg.data
    else:
        if args.overrides:
            raise MedsegError("--set needs --config")
        dataset, data_cfg = dataset_from_folder(Path(args.folder)), None
    report = check_dataset(dataset, data_cfg, progress=show_progress(args))
    if args.json:
        print(json.dumps(report.to_records(), indent=2))
    else:
        print(report.to_table())
    return report.exit_code


def run_synth(args: argparse.Namespace) -> int:
    from medseg.data.synthetic import synth_ct
    from medseg.data.synthetic_cxr import synth_chest_xray

    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise MedsegError(f"{out} is not empty; choose a new --out folder or pass --overwrite")
    if args.cases is not None and args.cases < 1:
        raise MedsegError(f"--cases must be at least 1, got {args.cases}")
    progress = show_progress(args)
    if args.kind == "ct":
        synth_ct(out, cases=args.cases or 10, seed=args.seed, progress=progress)
    else:
        synth_chest_xray(out, cases=args.cases or 20, seed=args.seed, progress=progress)
    logger.info("wrote %s phantoms to %s", args.kind, out)
    print(out)
    return 0
