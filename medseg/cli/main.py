"""Entry point of the ``medseg`` command.

Exit codes: 0 success, 2 bad input (config, data, arguments; a :class:`~medseg.errors.MedsegError`),
1 unexpected failure. ``--debug`` prints tracebacks. Heavy libraries (torch, MONAI) are imported inside
the commands so ``medseg --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from medseg._version import __version__
from medseg.cli._common import add_global_flags, add_global_flags_everywhere
from medseg.errors import MedsegError

DESCRIPTION = """\
medseg: 2D and 3D medical image segmentation with exact geometry.

Common tasks:
  medseg info scan.nii.gz                      geometry and intensity summary of a scan
  medseg data synth ct --out data/ct           synthetic CT phantoms (MSD layout)
  medseg data check --config configs/x.yaml    list every problem in a dataset
  medseg config show --config configs/x.yaml   the resolved config with all defaults
  medseg train --config configs/demo_ct.yaml   train a model; the run directory is the model
  medseg baseline threshold --config CFG --run-dir DIR   classical baseline (fitted, not trained)
  medseg predict --model RUN --input SCAN --output DIR   label maps on each scan's own grid
  medseg evaluate --pred DIR --ref DIR --output DIR      Dice, volumes (mL), HD95/NSD per structure
  medseg report --image SCAN --mask LABELS --output DIR  organ volumes, overlays (HTML, PDF)
  medseg convert-run RUN                       update a run written by an older medseg

Run `medseg COMMAND --help` for the options of each command.
"""


def build_parser() -> argparse.ArgumentParser:
    from medseg.cli import (
        baseline_cmd,
        config_cmd,
        convert_cmd,
        data_cmd,
        evaluate_cmd,
        info_cmd,
        predict_cmd,
        report_cmd,
        train_cmd,
    )

    parser = argparse.ArgumentParser(
        prog="medseg", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    add_global_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info_cmd.register(sub)
    data_cmd.register(sub)
    config_cmd.register(sub)
    train_cmd.register(sub)
    baseline_cmd.register(sub)
    predict_cmd.register(sub)
    evaluate_cmd.register(sub)
    report_cmd.register(sub)
    convert_cmd.register(sub)
    add_global_flags_everywhere(sub)
    return parser


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    # libraries' chatter (highdicom logs every module it copies) only with --verbose
    for name in ("highdicom", "pydicom"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)

    def show_warning(message: Warning | str, *args: object, **kwargs: object) -> None:
        # the message only: Python's format adds the source file, line and code, meaningless to a user
        logging.getLogger("medseg").warning("warning: %s", message)

    warnings.showwarning = show_warning


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``medseg`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None or not hasattr(args, "func"):
        # `medseg` or `medseg data` alone: show the relevant help
        (getattr(args, "_subparser", None) or parser).print_help()
        return 0 if args.command is None else 2
    _configure_logging(args.verbose, args.quiet)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, where it is handled, not at interpreter exit
        return code
    except MedsegError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (`medseg info x | head -1`): nothing left to say; send
        # what is still buffered to /dev/null so that Python's exit flush does not complain either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # as a process killed by SIGPIPE
    except OSError as exc:
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - last-resort handler of the CLI
        if args.debug:
            raise
        print(
            f"unexpected error: {type(exc).__name__}: {exc}\n(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
