"""The explicit list layout: a CSV or YAML file naming each case's image(s) and label or masks."""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg.errors import DataError
from medseg.io import case_id as case_id_of

if TYPE_CHECKING:
    from medseg.config import DataConfig
from medseg.data.datasets._common import (
    Case,
    Dataset,
    _Problems,
)

# explicit list


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"data.list_file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the list file ({exc})") from exc
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise DataError(f"{path}: not valid YAML ({exc})") from exc
        if isinstance(raw, dict) and isinstance(raw.get("cases"), list):
            raw = raw["cases"]
        if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
            example = "- {image: a.nii.gz, label: a_seg.nii.gz}"
            raise DataError(f"{path}: expected a YAML list of mappings such as '{example}'")
        return [{str(k).strip(): v for k, v in r.items()} for r in raw]
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), dialect="excel-tab" if suffix == ".tsv" else "excel")
        if not reader.fieldnames:
            raise DataError(f"{path}: empty CSV; the first row must name the columns (image,label or ...)")
        return [{(k or "").strip(): v for k, v in row.items()} for row in reader]
    raise DataError(f"{path}: list file must be .csv, .tsv or .yaml, got {path.suffix or 'no suffix'}")


def _cell(row: Mapping[str, Any], key: str) -> str | None:
    v = row.get(key)
    v = "" if v is None else str(v).strip()
    return v or None


def _resolve(p: str, root: Path, list_dir: Path) -> Path:
    path = Path(p).expanduser()
    if path.is_absolute() or (root / path).exists() or not (list_dir / path).exists():
        return path if path.is_absolute() else root / path
    return list_dir / path


@dataclass
class _ListColumns:
    images: list[str]
    masks: dict[str, str]  # structure -> column
    has_label: bool


def _list_columns(
    rows: list[dict[str, Any]], data: DataConfig, where: Path, problems: _Problems
) -> _ListColumns:
    columns: set[str] = set().union(*[set(r) for r in rows]) if rows else set()
    image_cols = sorted(c for c in columns if re.fullmatch(r"image_\d{4}", c)) or ["image"]
    if "image" not in columns and image_cols == ["image"]:
        raise DataError(f"{where}: no 'image' column (or image_0000, image_0001, ... for channels)")
    masks = {s: (f"mask_{s}" if f"mask_{s}" in columns else s) for s in data.structures or []}
    if data.labels is not None and "label" not in columns:
        problems.error("", where, "missing_label", "list file has no 'label' column (needed for data.labels)")
    for s, col in masks.items():
        if col not in columns:
            problems.error("", where, "missing_mask", f"list file has no column {s!r} or 'mask_{s}'")
    for col in sorted(columns - {"image", "label", "case", "split", *image_cols, *masks.values()}):
        problems.warn("", where, "unexpected_column", f"column {col!r} is not used; ignored")
    return _ListColumns(image_cols, {s: c for s, c in masks.items() if c in columns}, "label" in columns)


def _list_case(
    row: dict[str, Any], what: str, cols: _ListColumns, data: DataConfig, list_file: Path, problems: _Problems
) -> Case | None:

    root, list_dir = Path(data.root), list_file.parent
    raw_images = [_cell(row, c) for c in cols.images]
    first = next((p for p in raw_images if p), None)
    if first is None:
        problems.error("", list_file, "missing_image", f"{what}: no image path")
        return None
    cid = _cell(row, "case") or case_id_of(first)
    split = (_cell(row, "split") or "train").lower()
    if split not in ("train", "test"):
        problems.error(
            cid, list_file, "bad_split", f"{what}: split {split!r} must be train or test; using train"
        )
        split = "train"
    images = []
    for col, raw in zip(cols.images, raw_images, strict=True):
        if raw is None:
            problems.error(cid, list_file, "missing_channel", f"{what}: no path in column {col}")
        else:
            images.append(_resolve(raw, root, list_dir))
    label_raw = _cell(row, "label") if data.labels is not None else None
    label = _resolve(label_raw, root, list_dir) if label_raw else None
    if label is None and cols.has_label and data.labels is not None and split == "train":
        problems.error(cid, list_file, "missing_label", f"{what}: no label path")
    masks = {s: _resolve(raw, root, list_dir) for s, col in cols.masks.items() if (raw := _cell(row, col))}
    if split == "train" or masks:
        for s in cols.masks:
            if s not in masks:
                problems.error(cid, list_file, "missing_mask", f"{what}: no mask path for structure {s!r}")
    case = Case(cid, tuple(images), label, masks, split)  # type: ignore[arg-type]
    for p in (*case.images, *([case.label] if case.label else []), *case.masks.values()):
        if not p.exists():
            problems.error(
                cid,
                p,
                "missing_file",
                f"{what}: {p} does not exist (relative paths resolve against data.root {root}, then "
                "against the list file's folder)",
            )
    return case


def _discover_list(data: DataConfig) -> Dataset:
    assert data.list_file is not None  # enforced by DataConfig
    root, list_file = Path(data.root), Path(data.list_file)
    if not list_file.is_absolute() and not list_file.exists() and (root / list_file).exists():
        list_file = root / list_file
    rows = _read_rows(list_file)
    problems = _Problems(root)
    cols = _list_columns(rows, data, list_file, problems)
    is_yaml = list_file.suffix.lower() in (".yaml", ".yml")
    cases: list[Case] = []
    seen: dict[str, str] = {}
    for n, row in enumerate(rows, start=1 if is_yaml else 2):
        what = f"{list_file.name} {'entry' if is_yaml else 'row'} {n}"
        case = _list_case(row, what, cols, data, list_file, problems)
        if case is None:
            continue
        if case.case_id in seen:
            msg = f"{what}: case id {case.case_id!r} is already used by {seen[case.case_id]}"
            problems.error(case.case_id, list_file, "duplicate_case", msg)
        seen[case.case_id] = what
        cases.append(case)
    return Dataset(
        root=root,
        layout="list",
        cases=cases,
        label_names=dict(data.labels) if data.labels else None,
        structures=list(data.structures) if data.structures else None,
        problems=list(problems),
    )
