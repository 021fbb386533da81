"""Argument helpers shared by commands."""

from __future__ import annotations

import argparse
import sys
from typing import Any

GLOBAL_FLAGS = (
    (("--debug",), "show full tracebacks on errors"),
    (("-v", "--verbose"), "more log output"),
    (("-q", "--quiet"), "only warnings and errors"),
)
"""Options of the ``medseg`` command that every subcommand also accepts (before or after its name)."""


def add_global_flags(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--debug``, ``-v``/``--verbose``, ``-q``/``--quiet``. On subcommands they default to *unset*
    (``argparse.SUPPRESS``), so that a flag given before the subcommand is not reset by its parser."""
    default: Any = False if top else argparse.SUPPRESS
    debug, verbose, quiet = GLOBAL_FLAGS
    parser.add_argument(*debug[0], action="store_true", default=default, help=debug[1])
    group = parser.add_mutually_exclusive_group()
    group.add_argument(*verbose[0], action="store_true", default=default, help=verbose[1])
    group.add_argument(*quiet[0], action="store_true", default=default, help=quiet[1])


def add_global_flags_everywhere(sub: argparse._SubParsersAction) -> None:
    """The global flags on every subcommand parser, nested ones (``data check``) included."""
    for parser in set(sub.choices.values()):
        add_global_flags(parser, top=False)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                add_global_flags_everywhere(action)


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars only on a terminal, and not with ``--no-progress`` or ``-q``: a log redirected to
    a file gets the one line per epoch or case instead of hundreds of bar updates."""
    if getattr(args, "no_progress", False) or getattr(args, "quiet", False):
        return False
    return sys.stderr.isatty()


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
