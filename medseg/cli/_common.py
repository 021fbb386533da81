"""Argument helpers shared by commands."""

from __future__ import annotations

import argparse
from typing import Any


def add_config_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """``--config FILE`` and repeatable ``--set key.path=value`` overrides."""
    parser.add_argument(
        "-c", "--config", required=required, metavar="FILE", help="YAML config (see configs/)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=3 --set data.root=/data/x (repeatable; "
        "values are parsed as YAML)",
    )


def load_config_from_args(args: argparse.Namespace) -> Any:
    from medseg.config import load_config

    return load_config(args.config, args.overrides)
