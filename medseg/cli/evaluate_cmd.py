"""``medseg evaluate``: Dice, volumes and (optionally) surface distances of predictions vs references."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """\
Compare predictions with reference segmentations, per case and structure.

PRED and REF are folders matched by case name (<case>.nii.gz label maps, or <case>/<structure>.nii.gz
mask folders as `medseg predict` writes for overlapping structures; either layout on either side), or
two files (one case). Both must lie on the same voxel grid (shape, spacing, origin, direction); other
grids are refused with both files named.

Per (case, structure): Dice, volumes of prediction and reference in mL (n_voxels * voxel volume, from
each file's spacing), their difference in mL and %, and with --distances HD95 (mm) and normalised
surface Dice at --nsd-tolerance-mm (exact Euclidean distances in mm between surface voxels, computed
on each structure's bounding box; the same definition as MONAI's metrics with spacing=).

Empty structures: absent from both -> Dice, HD95, NSD are NaN, left out of statistics and counted;
absent from one side only -> Dice 0, NSD 0, HD95 inf (left out of HD95 statistics, counted).

Writes into --output: metrics.csv (one row per case x structure), summary.json (mean, median, std,
min, max per structure with counts of valid cases, the empty policy, missing cases) and
dice_boxplot.png; prints a summary table.

Examples:
  medseg evaluate --pred preds/ --ref labelsTs/ --output eval/ --labels runs/liver-2024.../
  medseg evaluate --pred seg.nii.gz --ref gt.nii.gz --output eval/ --labels class_map.json:total --distances
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="Dice, volumes (mL) and optional HD95/NSD of predictions vs references",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pred", required=True, type=Path, help="prediction folder or file")
    p.add_argument("--ref", required=True, type=Path, help="reference folder or file")
    p.add_argument(
        "--output", required=True, type=Path, help="output folder (not inside the --pred/--ref folders)"
    )
    p.add_argument(
        "--labels",
        metavar="CONFIG_OR_RUN_DIR",
        help="structure names: a run directory, a config .yaml, a dataset.json or a JSON map of values to "
        "names (FILE.json:KEY for a nested map). Default: label_<value> for the values present, or the "
        "mask file names",
    )
    p.add_argument("--distances", action="store_true", help="also compute HD95 (mm) and NSD (slower)")
    p.add_argument(
        "--nsd-tolerance-mm",
        type=float,
        default=2.0,
        metavar="MM",
        help="tolerance of the normalised surface Dice, in mm (default 2)",
    )
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="score reference cases without a prediction as empty predictions (default: refuse, list them)",
    )
    p.add_argument("--no-plot", action="store_true", help="do not draw dice_boxplot.png")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medseg.evaluation import EvaluateOptions, evaluate, format_table

    options = EvaluateOptions(
        labels=args.labels,
        distances=args.distances,
        nsd_tolerance_mm=args.nsd_tolerance_mm,
        allow_missing=args.allow_missing,
        plot=not args.no_plot,
    )
    result = evaluate(args.pred, args.ref, args.output, options)
    print(format_table(result.summary))
    s = result.summary
    if s["missing_predictions"]:
        print(f"missing predictions scored as empty: {', '.join(s['missing_predictions'])}")
    if s["predictions_without_reference"]:
        extra = ", ".join(s["predictions_without_reference"])
        print(f"predictions without a reference (not evaluated): {extra}")
    if s["unexpected_labels"]:
        listing = "; ".join(f"{c}: {v}" for c, v in s["unexpected_labels"].items())
        print(f"label values not named in --labels (not evaluated): {listing}")
    print("wrote " + ", ".join(str(p) for p in result.outputs.values()))
    return 0
