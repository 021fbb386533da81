"""Benchmark the U-Net border weight map: naive (one whole-volume EDT per object) vs bbox (EDT per object
inside its bounding box grown by 5σ), on a synthetic abdominal/thoracic CT label map.

The phantom is a seeded arrangement of organ-like ellipsoids and tubes (liver, spleen, kidneys, stomach,
pancreas, gallbladder, aorta, IVC, bladder, lungs, a column of separate vertebrae, ...). Later organs
overwrite earlier ones, so some organs touch; others are separated by thin fat planes of a few mm. The
geometry is defined in mm relative to the field of view, so ``--shape`` and ``--spacing`` rescale it.

Both methods run once each, in this one process, bbox first. The script prints a markdown table row and
writes it into the "## Border weight maps" section of ``docs/benchmarks.md`` (replacing an earlier row
with the same shape, spacing, objects, σ and seed), together with the command that produced it.

Examples::

    python scripts/bench_weight_maps.py                                   # full 512x512x200 (minutes)
    python scripts/bench_weight_maps.py --shape 256 256 100 --objects 8   # quick
    python scripts/bench_weight_maps.py --no-write --skip-naive           # bbox only, doc untouched
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import shlex
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import scipy
from scipy import ndimage as ndi

from medseg.losses.weight_maps import unet_border_weight_map

SECTION = "## Border weight maps"
BEGIN, END = "<!-- bench_weight_maps:begin -->", "<!-- bench_weight_maps:end -->"
HEADER = (
    "| shape | spacing (mm) | labels / objects | σ (mm) | naive s (CPU s) | bbox s (CPU s) | speed-up "
    "| max abs diff | peak MiB naive / bbox | machine (load avg at start) | command |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)
INTRO = """\
`unet_border_weight_map` (`medseg/losses/weight_maps.py`) on a synthetic CT label map: seeded organ-like
ellipsoids and tubes (some touching, some separated by fat planes of a few mm, a column of separate
vertebrae as one label with several components), `w0 = 10`, σ and spacing as listed, class balance on.
*naive* computes one `scipy.ndimage.distance_transform_edt` per object over the whole volume; *bbox*
(the default) computes each object's transform only inside its bounding box grown by at most 5σ towards
the objects closer than 5σ (objects without such a neighbour are skipped), from scipy's feature
transform with float32 arithmetic and reused buffers. *max abs diff* is `max |w_bbox - w_naive|` over
the volume (bound: `w0·exp(-25/2)` = 3.7e-5). Both run once, in one process, bbox first: wall-clock
seconds, with the process CPU seconds in brackets (the machine is shared; the load average at the start
is in the *machine* column). *speed-up* is naive wall / bbox wall. *peak MiB* is the peak of memory traced
by `tracemalloc` (numpy/scipy arrays) during a separate run of each method, when measured.
Rows are written by `scripts/bench_weight_maps.py`; re-run the command in the row to reproduce it."""

# name, centre (fraction of the field of view), radii (mm at the reference field of view), kind
REF_FOV_MM = (409.6, 409.6, 500.0)  # 512 x 512 x 200 at 0.8 x 0.8 x 2.5 mm
ORGANS: list[tuple[str, float, float, float, float, float, float, str]] = [
    ("liver", 0.32, 0.46, 0.60, 75.0, 85.0, 80.0, "ellipsoid"),
    ("spleen", 0.74, 0.56, 0.64, 35.0, 50.0, 55.0, "ellipsoid"),
    ("kidney_right", 0.34, 0.66, 0.46, 30.0, 32.0, 55.0, "ellipsoid"),
    ("kidney_left", 0.67, 0.66, 0.48, 30.0, 32.0, 55.0, "ellipsoid"),
    ("stomach", 0.64, 0.38, 0.66, 50.0, 40.0, 50.0, "ellipsoid"),
    ("pancreas", 0.52, 0.54, 0.52, 60.0, 14.0, 18.0, "ellipsoid"),
    ("gallbladder", 0.37, 0.33, 0.50, 16.0, 20.0, 35.0, "ellipsoid"),
    ("aorta", 0.525, 0.64, 0.52, 12.0, 12.0, 160.0, "ellipsoid"),
    ("ivc", 0.455, 0.625, 0.52, 11.0, 11.0, 140.0, "ellipsoid"),
    ("bladder", 0.50, 0.44, 0.18, 40.0, 35.0, 35.0, "ellipsoid"),
    ("lung_right", 0.29, 0.53, 0.88, 70.0, 90.0, 60.0, "ellipsoid"),
    ("lung_left", 0.71, 0.53, 0.88, 70.0, 90.0, 60.0, "ellipsoid"),
    ("vertebrae", 0.50, 0.75, 0.50, 22.0, 20.0, 14.0, "column"),
    ("adrenal_right", 0.38, 0.62, 0.58, 10.0, 14.0, 15.0, "ellipsoid"),
    ("adrenal_left", 0.62, 0.62, 0.58, 10.0, 14.0, 15.0, "ellipsoid"),
]


def _paint_ellipsoid(labels, value, centre_mm, radii_mm, spacing) -> None:
    shape = labels.shape
    lo = [max(0, math.floor((c - r) / s)) for c, r, s in zip(centre_mm, radii_mm, spacing, strict=True)]
    hi = [
        min(n, math.ceil((c + r) / s) + 1)
        for c, r, s, n in zip(centre_mm, radii_mm, spacing, shape, strict=True)
    ]
    if any(a >= b for a, b in zip(lo, hi, strict=True)):
        return
    axes = [
        ((np.arange(a, b) * s - c) / r) ** 2
        for a, b, s, c, r in zip(lo, hi, spacing, centre_mm, radii_mm, strict=True)
    ]
    inside = axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :] <= 1.0
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    labels[box][inside] = value


def make_phantom(shape, spacing, n_labels: int, seed: int) -> np.ndarray:
    """Seeded synthetic label map (uint8, X, Y, Z) with `n_labels` organ labels.

    Sizes are given for the reference field of view (`REF_FOV_MM`) and scaled with the actual one, so a
    smaller ``--shape`` at the same spacing gives the same anatomy, shrunk.
    """
    rng = np.random.default_rng(seed)
    fov = [n * s for n, s in zip(shape, spacing, strict=True)]
    scale = np.array([f / r for f, r in zip(fov, REF_FOV_MM, strict=True)])
    labels = np.zeros(shape, dtype=np.uint8)
    specs = list(ORGANS[:n_labels])
    for i in range(len(specs), n_labels):  # extra random blobs beyond the organ list
        centre = rng.uniform(0.15, 0.85, size=3)
        radii = rng.uniform(8.0, 30.0, size=3)
        specs.append((f"blob{i}", *centre, *radii, "ellipsoid"))
    for value, (_, u, v, t, rx, ry, rz, kind) in enumerate(specs, start=1):
        jitter = rng.uniform(-3.0, 3.0, size=3) * scale  # mm
        centre = np.array([u, v, t]) * fov + jitter
        radii = np.array([rx, ry, rz]) * scale
        if kind == "column":  # separate vertebral bodies with ~6 mm discs between them
            step = 2 * radii[2] + 6.0 * scale[2]
            for k in range(-3, 4):
                _paint_ellipsoid(labels, value, centre + [0.0, 0.0, k * step], radii, spacing)
        else:
            _paint_ellipsoid(labels, value, centre, radii, spacing)
    return labels


def count_objects(labels: np.ndarray) -> int:
    structure = ndi.generate_binary_structure(labels.ndim, labels.ndim)
    boxes = ndi.find_objects(labels)
    return sum(
        ndi.label(labels[b] == v, structure=structure)[1] for v, b in enumerate(boxes, 1) if b is not None
    )


def _timed(labels, spacing, sigma, w0, method) -> tuple[np.ndarray, float, float]:
    """The weight map, wall-clock seconds and process CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    w = unet_border_weight_map(labels, spacing_mm=spacing, sigma_mm=sigma, w0=w0, method=method)
    return w, time.perf_counter() - wall, time.process_time() - cpu


def _peak_mib(labels, spacing, sigma, w0, method) -> float:
    tracemalloc.start()
    try:
        unet_border_weight_map(labels, spacing_mm=spacing, sigma_mm=sigma, w0=w0, method=method)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def update_doc(path: Path, row: str, key: str) -> None:
    """Insert or replace the row whose key columns match, inside this script's block of the section."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    rows: list[str] = []
    if SECTION in text:
        head, rest = text.split(SECTION, 1)
        nxt = re.search(r"^## ", rest, flags=re.MULTILINE)
        body, tail = (rest[: nxt.start()], rest[nxt.start() :]) if nxt else (rest, "")
        if BEGIN in body and END in body:
            block = body.split(BEGIN, 1)[1].split(END, 1)[0]
            rows = [ln for ln in block.splitlines() if ln.startswith("| ") and not ln.startswith("| shape")]
    else:
        head, tail = text.rstrip("\n") + "\n\n", ""
    rows = [r for r in rows if _row_key(r) != key] + [row]
    section = f"{SECTION}\n\n{INTRO}\n\n{BEGIN}\n{HEADER}\n" + "\n".join(rows) + f"\n{END}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + section + ("\n" + tail if tail else ""))


def _row_key(row: str) -> str:
    """Shape, spacing, labels/objects, σ and seed identify a configuration."""
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    seed = re.search(r"--seed (\d+)", row)
    return " | ".join(cells[:4] + [seed.group(1) if seed else ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 200], metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 2.5], metavar=("SX", "SY", "SZ"))
    parser.add_argument(
        "--objects", type=int, default=len(ORGANS), help=f"number of organ labels (default {len(ORGANS)})"
    )
    parser.add_argument("--sigma-mm", type=float, default=5.0)
    parser.add_argument("--w0", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-naive", action="store_true", help="time bbox only (no diff, doc untouched)")
    parser.add_argument("--memory", action="store_true", help="also measure peak traced memory (extra runs)")
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).resolve().parents[1] / "docs/benchmarks.md"
    )
    parser.add_argument("--no-write", action="store_true", help="print the row, do not update --output")
    args = parser.parse_args(argv)
    if not 1 <= args.objects <= 255:
        parser.error(f"--objects must be between 1 and 255 (uint8 label map), got {args.objects}")

    shape, spacing = tuple(args.shape), tuple(args.spacing)
    start = time.perf_counter()
    labels = make_phantom(shape, spacing, args.objects, args.seed)
    n_objects = count_objects(labels)
    print(
        f"phantom {shape} @ {spacing} mm: {len(np.unique(labels)) - 1} labels, {n_objects} objects, "
        f"{np.count_nonzero(labels) / labels.size:.1%} foreground ({time.perf_counter() - start:.1f} s)",
        flush=True,
    )
    load = os.getloadavg()[0]
    w_bbox, t_bbox, c_bbox = _timed(labels, spacing, args.sigma_mm, args.w0, "bbox")
    print(f"bbox : {t_bbox:8.2f} s wall, {c_bbox:8.2f} s CPU", flush=True)
    if args.skip_naive:
        return 0
    w_naive, t_naive, c_naive = _timed(labels, spacing, args.sigma_mm, args.w0, "naive")
    print(f"naive: {t_naive:8.2f} s wall, {c_naive:8.2f} s CPU", flush=True)
    diff = float(np.abs(w_bbox - w_naive).max())
    peak = "-"
    if args.memory:
        peaks = [_peak_mib(labels, spacing, args.sigma_mm, args.w0, m) for m in ("naive", "bbox")]
        peak = f"{peaks[0]:.0f} / {peaks[1]:.0f}"

    command = "python scripts/bench_weight_maps.py " + " ".join(
        shlex.quote(a)
        for a in [
            "--shape",
            *map(str, shape),
            "--spacing",
            *map(str, spacing),
            "--objects",
            str(args.objects),
            "--sigma-mm",
            str(args.sigma_mm),
            "--seed",
            str(args.seed),
        ]
        + (["--memory"] if args.memory else [])
    )
    machine = (
        f"{os.cpu_count()} cores ({load:.1f}), {platform.machine()}, "
        f"scipy {scipy.__version__}, numpy {np.__version__}"
    )
    row = (
        f"| {'×'.join(map(str, shape))} | {'×'.join(map(str, spacing))} | "
        f"{len(np.unique(labels)) - 1} / {n_objects} | {args.sigma_mm:g} | {t_naive:.1f} ({c_naive:.1f}) | "
        f"{t_bbox:.2f} ({c_bbox:.2f}) | "
        f"{t_naive / t_bbox:.1f}× | {diff:.1e} | {peak} | {machine} | `{command}` |"
    )
    print()
    print(HEADER)
    print(row)
    if not args.no_write:
        update_doc(args.output, row, _row_key(row))
        print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
