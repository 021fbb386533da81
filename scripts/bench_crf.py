"""Benchmark the dense CRF (``predict.crf``): seconds per mean-field iteration by image size, number of
classes and appearance window, and the peak memory of the slab-wise (streaming) CRF against the whole
volume at once.

Each timing runs the CRF on random probabilities and intensities (the cost does not depend on the
values) with ``iterations`` mean-field updates and reports the mean seconds per update. The memory rows
run in child processes, one per measurement, and report the child's own peak resident memory (VmHWM)
above its baseline after imports and input allocation.

The script prints a markdown table; ``--write`` puts it into ``docs/benchmarks.md`` between the
``<!-- bench_crf:begin -->`` / ``<!-- bench_crf:end -->`` markers, with the command line.

Examples::

    python scripts/bench_crf.py                 # the table of docs/benchmarks.md (a few minutes)
    python scripts/bench_crf.py --quick         # small sizes only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medseg.config import CRFConfig
from medseg.inference.crf import StreamingCRF
from medseg.inference.process import peak_rss_bytes
from medseg.models.crf import MeanField

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench_crf:begin -->", "<!-- bench_crf:end -->"
MB = 2**20


def _inputs(shape: tuple[int, ...], classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    raw = rng.random((classes, *shape), dtype=np.float32) + 0.01
    return raw / raw.sum(0), rng.normal(0, 1, (1, *shape)).astype(np.float32)


def time_per_iteration(shape: tuple[int, ...], spacing: tuple[float, ...], classes: int, window: int,
                       iterations: int) -> float:  # fmt: skip
    probs, feats = _inputs(shape, classes)
    mf = MeanField(spacing, CRFConfig(iterations=iterations, window=window), "softmax")
    with torch.no_grad():
        t0 = time.perf_counter()
        mf(torch.from_numpy(probs[None]), torch.from_numpy(feats[None]))
    return (time.perf_counter() - t0) / iterations


def _child(args: argparse.Namespace) -> None:
    """One memory measurement: ``--child whole|slab`` prints JSON with peak MB above the baseline."""
    shape, spacing = tuple(args.shape3d), tuple(args.spacing3d)
    probs, feats = _inputs(shape, args.classes)
    base = peak_rss_bytes()
    cfg = CRFConfig(iterations=args.iterations, window=args.window3d)
    t0 = time.perf_counter()
    with torch.no_grad():
        if args.child == "whole":
            MeanField(spacing, cfg, "softmax")(torch.from_numpy(probs[None]), torch.from_numpy(feats[None]))
        else:  # rows along the last axis, 8 at a time, as the Restorer pushes them
            crf = StreamingCRF(spacing, cfg, "softmax", shape[-1], lambda z0, z1: feats[..., z0:z1])
            for z0 in range(0, shape[-1], 8):
                crf.push(z0, np.ascontiguousarray(np.moveaxis(probs[..., z0 : z0 + 8], -1, 0)))
    print(json.dumps({"peak_mb": (peak_rss_bytes() - base) / MB, "seconds": time.perf_counter() - t0}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes only (a check that it runs)")
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--classes", type=int, default=14, help="classes of the memory rows")
    p.add_argument("--shape3d", type=int, nargs=3, default=[256, 256, 64])
    p.add_argument("--spacing3d", type=float, nargs=3, default=[0.8, 0.8, 2.5])
    p.add_argument("--window3d", type=int, default=1)
    p.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    p.add_argument("--child", choices=["whole", "slab"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    if args.quick:
        args.shape3d = [64, 64, 32]
    shape2d = (128, 128) if args.quick else (512, 512)
    shape3d, spacing3d = tuple(args.shape3d), tuple(args.spacing3d)
    rows = ["| image | spacing mm | classes | window | s per iteration |", "|---|---|---|---|---|"]
    cases = [(shape2d, (0.35, 0.35), k, 3) for k in (2, 14)]
    cases += [(shape3d, spacing3d, k, w) for k in (2, 14) for w in (1, 3)]
    for shape, spacing, k, w in cases:
        s = time_per_iteration(shape, spacing, k, w, args.iterations)
        row = f"| {'×'.join(map(str, shape))} | {'×'.join(map(str, spacing))} | {k} | {w} | {s:.3f} |"
        print(row, flush=True)
        rows.append(row)
    mem = [
        "",
        "| 3D, 14 classes, window 1, 5 iterations | seconds | peak MB above the inputs |",
        "|---|---|---|",
    ]
    for kind in ("whole", "slab"):
        cmd = [sys.executable, __file__, "--child", kind, "--iterations", str(args.iterations),
               "--classes", str(args.classes), "--window3d", str(args.window3d),
               "--shape3d", *map(str, shape3d), "--spacing3d", *map(str, spacing3d)]  # fmt: skip
        out = json.loads(subprocess.check_output(cmd, cwd=ROOT).decode().strip().splitlines()[-1])
        label = "whole volume at once" if kind == "whole" else "slab-wise, 8 rows per push"
        mem.append(f"| {'×'.join(map(str, shape3d))} {label} | {out['seconds']:.1f} | {out['peak_mb']:.0f} |")
        print(mem[-1], flush=True)
    command = "python scripts/bench_crf.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    body = (
        f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}:\n\n```\n{command}\n```\n\n"
        + "\n".join(rows + mem)
    )
    print("\n" + body)
    if args.write:
        doc = ROOT / "docs" / "benchmarks.md"
        text = doc.read_text()
        block = f"{BEGIN}\n{body}\n{END}"
        if BEGIN in text and END in text:
            text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
        else:
            text = text.rstrip("\n") + "\n\n## Dense CRF (`predict.crf`)\n\n" + block + "\n"
        tmp = doc.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
