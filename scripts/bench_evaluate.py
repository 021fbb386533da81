"""Benchmark ``medseg evaluate`` on a large synthetic label-map pair; prints a markdown table.

Builds a reference label map (default 512 x 512 x 600 voxels at 0.8 x 0.8 x 1.5 mm, 120 structures:
random ellipsoids clipped to random boxes) and a prediction that shifts every structure by up to one
voxel and drops a few blobs, writes both as NIfTI into a temporary folder, then times

1. ``medseg evaluate`` without distances (all structures),
2. ``medseg evaluate --distances`` restricted with ``--labels`` to a subset of structures,

in-process through ``medseg.cli.main.main``. Loading the two files is timed separately.

    .venv/bin/python scripts/bench_evaluate.py [--shape 512 512 600] [--structures 120]
        [--distance-structures 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def make_pair(shape: tuple[int, int, int], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A reference with `n` blob structures and a perturbed copy (uint8 label maps)."""
    rng = np.random.default_rng(seed)
    ref = np.zeros(shape, dtype=np.uint8)
    for k in range(1, n + 1):
        size = rng.integers(8, np.maximum(9, np.array(shape) // 6))
        start = rng.integers(0, np.array(shape) - size)
        box = tuple(slice(int(s), int(s + z)) for s, z in zip(start, size, strict=True))
        axes = np.ogrid[tuple(slice(0, int(z)) for z in size)]
        inside = sum(((a - (z - 1) / 2) / (z / 2)) ** 2 for a, z in zip(axes, size, strict=True)) <= 1
        ref[box][inside] = k
    pred = np.roll(ref, 1, axis=2)  # every structure one voxel along z
    for k in rng.choice(np.arange(1, n + 1), size=max(1, n // 20), replace=False):
        pred[pred == k] = 0  # a few missed structures
    return pred, ref


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 600))
    parser.add_argument("--structures", type=int, default=120)
    parser.add_argument("--distance-structures", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from medseg.cli.main import main as medseg_main
    from medseg.io import load_volume, save_label_map
    from medseg.types import Volume

    shape = tuple(args.shape)
    affine = np.diag([0.8, 0.8, 1.5, 1.0])
    t = time.perf_counter()
    pred, ref = make_pair(shape, args.structures, args.seed)
    t_make = time.perf_counter() - t
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_evaluate_") as tmp:
        root = Path(tmp)
        pred_path = save_label_map(Volume(pred[None], affine), root / "pred" / "case.nii.gz")
        ref_path = save_label_map(Volume(ref[None], affine), root / "ref" / "case.nii.gz")
        present = np.flatnonzero(np.bincount(ref.ravel())[1:]) + 1
        del pred, ref
        names = root / "subset.json"
        names.write_text(json.dumps({str(v): f"s{v}" for v in present[: args.distance_structures].tolist()}))

        t = time.perf_counter()
        load_volume(pred_path), load_volume(ref_path)
        rows.append(("load both NIfTI files (part of every run)", len(present), time.perf_counter() - t))

        def run(label: str, extra: list[str], n_struct: int) -> None:
            argv = ["-q", "evaluate", "--pred", str(pred_path), "--ref", str(ref_path)]
            argv += ["--output", str(root / "out"), *extra]
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                code = medseg_main(argv)
            if code != 0:
                raise SystemExit(f"medseg evaluate failed with exit code {code}")
            rows.append((label, n_struct, time.perf_counter() - t0))

        run("`medseg evaluate` (Dice, volumes, border flags, CSV/JSON/plot)", [], len(present))
        run("same, `--no-plot`", ["--no-plot"], len(present))
        n_dist = min(args.distance_structures, len(present))
        run(
            "`medseg evaluate --distances` (HD95, NSD) on a subset",
            ["--labels", str(names), "--distances"],
            n_dist,
        )

    print(
        f"\nmedseg evaluate benchmark: {shape[0]}x{shape[1]}x{shape[2]} uint8 label maps "
        f"({np.prod(shape) / 1e6:.0f} M voxels), {len(present)} structures, seed {args.seed}; "
        f"{platform.machine()}, {_cpus()} CPU(s); synthetic pair built in {t_make:.1f} s\n"
    )
    print("| step | structures | wall time (s) |")
    print("|---|---:|---:|")
    for label, n, sec in rows:
        print(f"| {label} | {n} | {sec:.2f} |")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    main()
