"""Outputs of ``medseg evaluate``: statistics per structure, metrics.csv, summary.json, box plot, table."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from medseg._version import __version__
from medseg.io._atomic import atomic_write
from medseg.labels import LabelLayout
from medseg.metrics import EMPTY_POLICY, dice
from medseg.metrics.overlap import Counts
from medseg.names import spreadsheet_safe

COLUMNS = (
    "case",
    "structure",
    "label",
    "dice",
    "volume_pred_ml",
    "volume_ref_ml",
    "volume_diff_ml",
    "volume_diff_pct",
    "n_pred",
    "n_ref",
    "tp",
    "fp",
    "fn",
    "ref_touches_border",
)
"""Columns of ``metrics.csv``, one row per (case, structure)."""
DISTANCE_COLUMNS = ("hd95_mm", "nsd")
"""Columns added with ``--distances``."""

STATISTICS = (
    "mean, median, std (population, ddof=0), min and max over the cases where the value is finite; "
    "n_valid counts those cases, n_nan the cases where it is undefined (structure empty in both; "
    "volume_diff_pct: empty reference) and n_inf the HD95 values with only one side empty"
)
_STAT_METRICS = ("dice", "volume_pred_ml", "volume_ref_ml", "volume_diff_ml", "volume_diff_pct")
_DIST_METHOD = (
    "medseg.metrics.distances: surface voxels (6-connected erosion), exact Euclidean distances in mm "
    "(scipy distance_transform_edt with the file's spacing) on each structure's bounding box; same "
    "definition as MONAI compute_hausdorff_distance(percentile=95) / compute_surface_dice"
)


def stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean, median, std (ddof=0), min, max of the finite values, plus how many were NaN or inf."""
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    out: dict[str, Any] = {}
    for key, fn in (
        ("mean", np.mean),
        ("median", np.median),
        ("std", np.std),
        ("min", np.min),
        ("max", np.max),
    ):
        out[key] = float(fn(finite)) if finite.size else None
    out.update(n_valid=int(finite.size), n_nan=int(np.isnan(arr).sum()), n_inf=int(np.isinf(arr).sum()))
    return out


def _structure_summary(rows: list[dict[str, Any]], distances: bool) -> dict[str, Any]:

    pooled = Counts(
        sum(r["tp"] for r in rows), sum(r["fp"] for r in rows), sum(r["fn"] for r in rows), 0
    )  # tn is not needed for Dice
    out: dict[str, Any] = {
        "label": rows[0]["label"],
        "n_cases": len(rows),
        "n_both_empty": sum(1 for r in rows if r["n_pred"] == 0 and r["n_ref"] == 0),
        "n_missed": sum(1 for r in rows if r["n_pred"] == 0 and r["n_ref"] > 0),
        "n_false_positive": sum(1 for r in rows if r["n_pred"] > 0 and r["n_ref"] == 0),
        "n_ref_touches_border": sum(1 for r in rows if r["ref_touches_border"]),
        "global_dice": _json_float(dice(pooled)),
    }
    for key in _STAT_METRICS + (("hd95_mm", "nsd") if distances else ()):
        out[key] = stats([r[key] for r in rows])
    return out


def build_summary(
    rows: list[dict[str, Any]],
    *,
    pred: Path,
    ref: Path,
    spec: LabelLayout | None,
    options: Any,
    missing: list[str],
    extra: list[str],
    unexpected: dict[str, list[int]],
    seconds: float,
) -> dict[str, Any]:
    """The content of ``summary.json`` (NaN/inf never appear: statistics skip them and count them)."""

    by_structure: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_structure.setdefault(r["structure"], []).append(r)
    structures = {name: _structure_summary(rs, options.distances) for name, rs in by_structure.items()}
    means = [s["dice"]["mean"] for s in structures.values() if s["dice"]["mean"] is not None]
    return {
        "medseg_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "pred": str(pred),
        "ref": str(ref),
        "labels": spec.source if spec is not None else None,
        "empty_policy": EMPTY_POLICY,
        "statistics": STATISTICS,
        "volumes": "n_voxels * prod(spacing_mm) / 1000 (mL) on each file's own grid; NaN for 2D images",
        "distances": {
            "computed": bool(options.distances),
            "nsd_tolerance_mm": float(options.nsd_tolerance_mm) if options.distances else None,
            "hd_percentile": 95 if options.distances else None,
            "method": _DIST_METHOD if options.distances else None,
        },
        "n_cases": len({r["case"] for r in rows}),
        "n_structures": len(structures),
        "cases": sorted({r["case"] for r in rows}),
        "missing_predictions": missing,
        "predictions_without_reference": extra,
        "unexpected_labels": unexpected,
        "mean_dice": float(np.mean(means)) if means else None,
        "seconds": round(seconds, 3),
        "structures": structures,
    }


def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return format(v, ".10g")  # nan and inf are written as 'nan' and 'inf'
    if isinstance(v, str):  # case and structure names come from file names and label maps
        return spreadsheet_safe(v)
    return v


def write_outputs(
    rows: list[dict[str, Any]], summary: dict[str, Any], output: Path, *, distances: bool, plot: bool
) -> dict[str, Path]:
    """Write metrics.csv, summary.json and (with `plot`) dice_boxplot.png atomically into `output`."""
    output.mkdir(parents=True, exist_ok=True)
    columns = list(COLUMNS) + (list(DISTANCE_COLUMNS) if distances else [])
    paths = {"metrics_csv": output / "metrics.csv", "summary_json": output / "summary.json"}
    with atomic_write(paths["metrics_csv"]) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for r in rows:
            writer.writerow([_csv_value(r[c]) for c in columns])
    with atomic_write(paths["summary_json"]) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    if plot:
        paths["dice_boxplot"] = output / "dice_boxplot.png"
        write_boxplot(rows, paths["dice_boxplot"])
    return paths


def write_boxplot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Horizontal box plot of Dice per structure (finite values only; n valid in each label)."""

    values: dict[str, list[float]] = {}
    for r in rows:
        values.setdefault(r["structure"], [])
        if math.isfinite(r["dice"]):
            values[r["structure"]].append(r["dice"])
    names = [n for n, v in values.items() if v][::-1]  # first structure on top
    fig = Figure(figsize=(8, max(2.5, 0.22 * len(names) + 1.2)))
    ax = fig.subplots()
    if names:
        ax.boxplot([values[n] for n in names], orientation="horizontal", widths=0.6)
        ax.set_yticks(range(1, len(names) + 1), [f"{n} (n={len(values[n])})" for n in names], fontsize=7)
    else:
        ax.text(0.5, 0.5, "no structure has a defined Dice", ha="center", va="center")
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("Dice")
    ax.set_title("Dice per structure (cases where the structure is empty in both are left out)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100)
    return path


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text table of the summary, one line per structure, with the empty-structure policy."""
    dist = summary["distances"]["computed"]
    head = ["structure", "valid/n", "Dice mean", "median", "min"]
    if dist:
        head += ["HD95 median mm", "NSD mean"]
    head += ["vol diff mean %"]
    lines = []
    for name, s in summary["structures"].items():
        d = s["dice"]
        cells = [name, f"{d['n_valid']}/{s['n_cases']}", _fmt(d["mean"]), _fmt(d["median"]), _fmt(d["min"])]
        if dist:
            cells += [_fmt(s["hd95_mm"]["median"], 2), _fmt(s["nsd"]["mean"])]
        cells.append(_fmt(s["volume_diff_pct"]["mean"], 1))
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*head), fmt.format(*["-" * w for w in widths])]
    out += [fmt.format(*c) for c in lines]
    mean = summary["mean_dice"]
    out.append(
        f"\n{summary['n_cases']} case(s), {summary['n_structures']} structure(s); mean Dice over structures "
        f"{_fmt(mean)}"
    )
    if dist:
        out.append(f"NSD tolerance {summary['distances']['nsd_tolerance_mm']} mm")
    out.append(f"Empty structures: {summary['empty_policy']}")
    return "\n".join(out)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
