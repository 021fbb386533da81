"""Dice per structure of a trained run on a dataset's held-out (test) cases, on the original grids.

Usage:
    python scripts/heldout_dice.py --model demo_out/runs/ct [--data DIR] [--json OUT.json]

The dataset is the run's own (``config.yaml``'s ``data`` section; ``--data`` replaces ``data.root``).
Each test case is predicted with ``medseg.inference.predict.predict_volume`` (the same code path as
``medseg predict``) and compared with its reference label map (exclusive classes) or masks
(overlapping structures) on the input grid. Dice is NaN where both are empty (excluded from means).
A stop-gap until ``medseg evaluate`` exists.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, type=Path, help="run directory written by `medseg train`")
    parser.add_argument("--data", type=Path, help="dataset folder (default: the run config's data.root)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="also write the per-case table as JSON here")
    args = parser.parse_args(argv)

    from medseg.config import load_config
    from medseg.data.datasets import load_case, load_dataset
    from medseg.inference.predict import predict_volume
    from medseg.metrics.overlap import count_overlaps, count_overlaps_masks, dice
    from medseg.runtime.bundle import load_bundle

    overrides = [f"data.root={args.data}"] if args.data else []
    cfg = load_config(args.model / "config.yaml", overrides)
    dataset = load_dataset(cfg.data)
    bundle = load_bundle(args.model, device=args.device)
    plan = bundle.plan
    rows = []
    for case in dataset.test_cases:
        image, ref = load_case(case, cfg.data)
        if ref is None:
            continue
        pred = predict_volume(bundle, image, threshold=cfg.predict.threshold)
        if plan.mode == "softmax":
            counts = count_overlaps(pred.array[0], ref.array[0], plan.label_values)
        else:
            counts = count_overlaps_masks(pred.array > 0, ref.array > 0)
        scores = {name: dice(c) for name, c in zip(plan.structure_names, counts.values(), strict=True)}
        rows.append({"case": case.case_id, **scores})
    if not rows:
        print(f"no labelled held-out cases in {cfg.data.root}", file=sys.stderr)
        return 2
    names = list(plan.structure_names)
    table = np.array([[r[n] for n in names] for r in rows], dtype=float)
    means = np.nanmean(table, axis=0)
    width = max(len(n) for n in names)
    print(f"Dice on {len(rows)} held-out case(s), original grids ({args.model}):")
    for n, m in zip(names, means, strict=True):
        print(f"  {n:<{width}}  {m:.4f}")
    print(f"  {'mean':<{width}}  {np.nanmean(means):.4f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "cases": rows,
                    "mean": dict(zip(names, means.tolist(), strict=True)),
                    "mean_dice": float(np.nanmean(means)),
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
