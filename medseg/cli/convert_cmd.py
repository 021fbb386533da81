"""``medseg convert-run``: bring a run directory written by an older medseg up to date."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert-run",
        help="update a run directory written by an older medseg (checkpoints, plan.json)",
        description="Rewrite the run's checkpoints in the current format (tensors and plain values only, "
        "so they load without running code; older ones stored numpy RNG state as arrays) and record the "
        "network's architecture in plan.json. Nothing in the files is executed: a checkpoint that holds "
        "other Python objects is refused. Files are replaced atomically; running it twice is harmless.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory written by `medseg train`")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medseg.runtime.bundle import convert_run

    done = convert_run(args.run_dir)
    for line in done:
        print(line)
    if not done:
        print(f"{args.run_dir}: already up to date")
    return 0
