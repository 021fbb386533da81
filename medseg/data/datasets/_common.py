"""Shared pieces of dataset discovery: the case and dataset records, the problem list, file-name helpers."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medseg.errors import DataError

Layout = Literal["msd", "scr", "list"]
Split = Literal["train", "test"]
Severity = Literal["error", "warning"]

#: Image suffixes recognised when listing folders (``.nii.gz`` before ``.nii``).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".bmp")
IMAGE_SUFFIXES += (".tif", ".tiff", ".dcm")
#: Masks may also be GIF (the original SCR release): medseg cannot read GIF, so check-data reports such
#: masks as unreadable (convert them to PNG) instead of calling them missing.
MASK_SUFFIXES = (*IMAGE_SUFFIXES, ".gif")

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_ASPECT_TOL = 0.01  # relative difference of the per-axis scale factors image size / mask size


@dataclass(frozen=True)
class Problem:
    """One data problem, as recorded by discovery and by ``check-data``.

    Attributes:
        severity: ``"error"`` (training would fail or learn from wrong data) or ``"warning"``.
        case: Case id, or ``""`` for dataset-level problems.
        file: The file concerned, relative to the dataset root where possible (``""`` if none).
        check: Short machine-readable name of the check, e.g. ``"shape_mismatch"``.
        message: What is wrong, expected versus got, and how to fix it.
    """

    severity: Severity
    case: str
    file: str
    check: str
    message: str


@dataclass(frozen=True)
class Case:
    """The files of one case.

    Attributes:
        case_id: Case name (file name without suffix and channel suffix).
        images: One path per channel, in channel order (one path for an MSD 4D file or a 2D image).
        label: Exclusive label map, or ``None`` (overlapping structures, or an unlabelled test case).
        masks: Overlapping structures: structure name -> binary mask file. May be partial; what is
            missing is recorded in :attr:`Dataset.problems`.
        split: ``"train"`` or ``"test"`` (held out).
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path | None = None
    masks: Mapping[str, Path] = field(default_factory=dict, hash=False)
    split: Split = "train"


@dataclass
class Dataset:
    """A discovered dataset: its cases, label names and discovery-time problems.

    Attributes:
        root: Dataset folder.
        layout: ``"msd"``, ``"scr"`` or ``"list"``.
        cases: All cases, train then test, sorted by case id (folder layouts) or in file order (lists).
        label_names: Exclusive classes, foreground name -> value (background 0 is not listed): the
            config's ``data.labels`` when given, else ``dataset.json``'s; ``None`` if unknown.
        structures: Overlapping structure names in channel order, or ``None``.
        problems: Pairing problems found while listing files (reported by ``check-data``).
        channel_names: Channel names from ``dataset.json`` (``channel_names`` or ``modality``) in
            channel order, or ``None`` when not declared.
        file_ending: Image file suffix of an MSD dataset (e.g. ``.nii.gz``); ``None`` for other layouts.
    """

    root: Path
    layout: Layout
    cases: list[Case] = field(default_factory=list)
    label_names: dict[str, int] | None = None
    structures: list[str] | None = None
    problems: list[Problem] = field(default_factory=list)
    channel_names: list[str] | None = None
    file_ending: str | None = None

    @property
    def train_cases(self) -> list[Case]:
        """Cases with ``split == "train"``."""
        return [c for c in self.cases if c.split == "train"]

    @property
    def test_cases(self) -> list[Case]:
        """Held-out cases (``split == "test"``)."""
        return [c for c in self.cases if c.split == "test"]

    def case(self, case_id: str) -> Case:
        """The case named ``case_id``.

        Raises:
            DataError: No such case.
        """
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise DataError(f"{self.root}: no case named {case_id!r} ({len(self.cases)} cases)")


class _Problems(list[Problem]):
    """Problem collector that writes file paths relative to the dataset root."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def add(self, severity: Severity, case: str, file: Path | str, check: str, message: str) -> None:
        self.append(Problem(severity, case, _rel(file, self.root) if file else "", check, message))

    def error(self, case: str, file: Path | str, check: str, message: str) -> None:
        self.add("error", case, file, check, message)

    def warn(self, case: str, file: Path | str, check: str, message: str) -> None:
        self.add("warning", case, file, check, message)


# small helpers


def _split_name(name: str, suffixes: Sequence[str]) -> tuple[str, str] | None:
    """``("case", ".nii.gz")`` for ``case.nii.gz``; ``None`` if no suffix matches (case-insensitive)."""
    low = name.lower()
    for suf in suffixes:
        if low.endswith(suf) and len(name) > len(suf):
            return name[: -len(suf)], name[-len(suf) :]
    return None


def _visible_files(folder: Path) -> list[Path]:
    """Files in ``folder``, sorted, without hidden ones (``.DS_Store``, macOS ``._x.nii.gz``)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())


def _rel(path: Path | str, root: Path) -> str:
    p = Path(path)
    try:
        return str(p.relative_to(root))
    except ValueError:
        try:
            return str(p.resolve().relative_to(root.resolve()))
        except (ValueError, OSError):
            return str(p)


def _read_dataset_json(root: Path) -> dict[str, Any]:
    path = root / "dataset.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); fix the file or remove it") from exc
    if not isinstance(meta, dict):
        raise DataError(
            f"{path}: expected a JSON object with keys such as labels/channel_names, got {meta!r}"
        )
    return meta


def _parse_labels(raw: Any, where: Path, problems: _Problems) -> dict[str, int] | None:
    """Foreground ``{name: value}`` from nnU-Net v2 (``{"liver": 1}``) or MSD (``{"1": "liver"}``) labels."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise DataError(f"{where}: 'labels' must be a mapping, got {raw!r}")
    msd_style = bool(raw) and all(str(k).strip().isdigit() and isinstance(v, str) for k, v in raw.items())
    out: dict[str, int] = {}
    for key, value in raw.items():
        if msd_style:
            name, val = str(value), int(str(key).strip())
        elif isinstance(value, int) and not isinstance(value, bool):
            name, val = str(key), value
        elif isinstance(value, str) and value.strip().isdigit():
            name, val = str(key), int(value)
        elif isinstance(value, list) and all(isinstance(v, int) for v in value):
            problems.warn(
                "",
                where,
                "dataset_json",
                f"labels entry {key!r}: {value} is an nnU-Net region (several label values); regions are "
                "not supported and this entry is ignored: list plain label values in data.labels",
            )
            continue
        else:
            raise DataError(
                f"{where}: labels entry {key!r}: {value!r} is not a label value; expected nnU-Net v2 "
                '{"background": 0, "liver": 1} or MSD {"0": "background", "1": "liver"}'
            )
        if val != 0:
            out[name] = val
    return out or None


def _parse_channels(meta: Mapping[str, Any]) -> list[str] | None:
    raw = meta.get("channel_names", meta.get("modality"))
    if not isinstance(raw, dict) or not raw:
        return None
    try:
        items = sorted(raw.items(), key=lambda kv: int(kv[0]))
    except (TypeError, ValueError):
        items = list(raw.items())
    return [str(v) for _, v in items]


def _read_id_list(path: Path) -> list[str]:
    ids = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            ids.append(line)
    return ids
