"""Dataset discovery for the three on-disk layouts, and loading one case.

Layouts (``data.layout``):

* ``msd`` — Medical Segmentation Decathlon / nnU-Net v2 raw layout: ``dataset.json``, ``imagesTr/``,
  ``labelsTr/``, ``imagesTs/`` and optionally ``labelsTs/``. Image files are ``<case>_0000.nii.gz``,
  ``<case>_0001.nii.gz``, ... (one file per channel, nnU-Net v2) or ``<case>.nii.gz`` (MSD Task folders,
  where a multi-modal case is one 4D file). Label maps are ``<case>.nii.gz``. ``dataset.json`` labels
  may be nnU-Net v2 style (``{"background": 0, "liver": 1}``) or MSD style (``{"0": "background",
  "1": "liver"}``); ``channel_names`` (v2) or ``modality`` (MSD) give the channels, ``file_ending`` the
  file suffix (default: the suffix most common in ``imagesTr/``, else ``.nii.gz``). ``_0000`` is taken
  as a channel suffix when every image name ends in ``_NNNN`` and the label names match the names
  without it (an MSD case may itself be called ``patient_0001``).
* ``scr`` — 2D chest X-ray layout of the SCR database: ``images/<case>.png`` (or .jpg/.dcm/.nii.gz ...)
  and ``masks/<structure>/<case>.png`` (any image suffix; masks may be stored at a lower resolution
  than the image and are resampled onto it by :func:`load_case_masks`). Held-out cases are listed in
  ``test.txt`` (one id per line, ``#`` comments), in ``dataset.json`` ``{"test": [...]}``, or live in a
  ``test/`` subfolder with the same ``images/`` + ``masks/`` structure.
* ``list`` — an explicit CSV (header row) or YAML (list of mappings) file, ``data.list_file``, with
  columns ``image`` (or ``image_0000``, ``image_0001``, ... for channels), ``label`` (exclusive classes)
  or one column per structure named ``<structure>`` or ``mask_<structure>`` (overlapping structures),
  optional ``case`` (default: the image file name without suffix and ``_0000``) and ``split``
  (``train``/``test``, default ``train``). Relative paths resolve against ``data.root``, then against
  the list file's folder.

Discovery lists and pairs files but never reads image data. What does not pair up (an image without
a label, a label without an image, a missing channel or structure mask) is recorded as a
:class:`Problem` in :attr:`Dataset.problems` rather than raised, so that ``medseg data check`` can
report every problem in one pass. :func:`load_case` reads one case and raises
:class:`~medseg.errors.DataError` naming the case and the file.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from medseg.errors import DataError
from medseg.io import case_id as case_id_of
from medseg.io import label_dtype, load_volume
from medseg.labels import Mode
from medseg.types import Volume, same_physical_grid

if TYPE_CHECKING:
    from medseg.config import DataConfig

__all__ = [
    "Case",
    "Dataset",
    "Problem",
    "load_dataset",
    "dataset_from_folder",
    "detect_layout",
    "load_case",
    "load_case_masks",
    "grid_mismatches",
    "mask_geometry_problems",
    "squeeze_2d",
]

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


# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# layout detection and entry points


def detect_layout(root: Path) -> Layout:
    """Guess the layout of a dataset folder.

    ``"msd"`` if ``imagesTr/`` exists, ``"scr"`` if ``images/`` and ``masks/`` exist, else ``"msd"`` if
    a ``dataset.json`` exists (an SCR folder may carry a ``dataset.json`` too, so it is checked last).

    Raises:
        DataError: ``root`` is not a folder or matches neither layout; the message describes both.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    if (root / "imagesTr").is_dir():
        return "msd"
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "scr"
    if (root / "dataset.json").is_file():
        return "msd"
    raise DataError(
        f"{root}: not a recognised dataset layout. Expected either MSD/nnU-Net (dataset.json, imagesTr/, "
        "labelsTr/, imagesTs/) or SCR (images/<case>.png and masks/<structure>/<case>.png); for any "
        "other arrangement write a CSV/YAML list of image/label paths and set data.layout: list and "
        "data.list_file"
    )


def dataset_from_folder(root: Path) -> Dataset:
    """Discover a dataset folder without a config: layout detected, names from ``dataset.json``.

    For SCR folders the structures come from ``dataset.json`` ``structures`` if present, else from
    the sorted subfolder names of ``masks/``.

    Raises:
        DataError: The folder matches no layout, or ``dataset.json`` is invalid.
    """
    root = Path(root)
    return _discover_msd(root) if detect_layout(root) == "msd" else _discover_scr(root, None)


def load_dataset(data: DataConfig) -> Dataset:
    """Discover the dataset a config describes (``data.layout``, ``data.root``, ``data.list_file``).

    The config's ``labels``/``structures`` are authoritative; ``dataset.json``'s labels are used only
    when the config has none, and a disagreement is recorded as a ``label_names`` warning.

    Raises:
        DataError: The root or list file does not exist, the folder does not match the layout (the
            message names the layout it does look like), or a list/JSON file cannot be parsed.
    """
    root = Path(data.root)
    if data.layout == "list":
        ds = _discover_list(data)
    else:
        if not root.is_dir():
            raise DataError(f"data.root {root} does not exist or is not a folder")
        if data.layout == "msd":
            looks_right = (root / "imagesTr").is_dir() or (root / "dataset.json").is_file()
            expected = "dataset.json and imagesTr/"
        else:
            looks_right = (root / "images").is_dir()
            expected = "images/<case>.png and masks/<structure>/<case>.png"
        if not looks_right:
            try:
                found: str | None = detect_layout(root)
            except DataError:
                found = None
            hint = f" It looks like the {found} layout: set data.layout: {found}." if found else ""
            raise DataError(f"{root}: data.layout is {data.layout} but {expected} were not found.{hint}")
        ds = _discover_msd(root) if data.layout == "msd" else _discover_scr(root, data.structures)
    if data.labels is not None:
        if ds.label_names is not None and ds.label_names != dict(data.labels):
            ds.problems.append(
                Problem(
                    "warning",
                    "",
                    "dataset.json",
                    "label_names",
                    f"dataset.json labels {ds.label_names} differ from data.labels {dict(data.labels)}; "
                    "using data.labels from the config",
                )
            )
        ds.label_names, ds.structures = dict(data.labels), None
    else:
        ds.label_names, ds.structures = None, list(data.structures or [])
    return ds


# --------------------------------------------------------------------------------------------
# MSD / nnU-Net v2


def _guess_ending(root: Path) -> str:
    counts: dict[str, int] = {}
    for folder in ("imagesTr", "imagesTs"):
        for p in _visible_files(root / folder):
            parts = _split_name(p.name, IMAGE_SUFFIXES)
            if parts:
                counts[parts[1].lower()] = counts.get(parts[1].lower(), 0) + 1
    return max(counts, key=lambda k: counts[k]) if counts else ".nii.gz"


def _files_by_stem(folder: Path, ending: str, problems: _Problems) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in _visible_files(folder):
        if p.name.lower().endswith(ending.lower()) and len(p.name) > len(ending):
            out[p.name[: -len(ending)]] = p
        else:
            problems.warn("", p, "unexpected_file", f"file does not end with {ending} (file_ending); ignored")
    return out


def _uses_channel_suffix(image_stems: set[str], label_stems: set[str], has_channel_names: bool) -> bool:
    matches = [_CHANNEL_RE.match(s) for s in image_stems]
    if not matches or not all(matches):
        return False
    if not label_stems:
        return True
    stripped = {m.group("case") for m in matches if m}
    n_stripped, n_raw = len(label_stems & stripped), len(label_stems & image_stems)
    if n_stripped == n_raw == 0:
        return has_channel_names
    return n_stripped >= n_raw


def _discover_msd(root: Path) -> Dataset:
    problems = _Problems(root)
    meta = _read_dataset_json(root)
    ending = str(meta.get("file_ending") or _guess_ending(root))
    channel_names = _parse_channels(meta)
    label_names = _parse_labels(meta.get("labels"), root / "dataset.json", problems)
    folders = {
        n: _files_by_stem(root / n, ending, problems)
        for n in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")
    }
    image_stems = set(folders["imagesTr"]) | set(folders["imagesTs"])
    label_stems = set(folders["labelsTr"]) | set(folders["labelsTs"])
    suffixed = _uses_channel_suffix(image_stems, label_stems, channel_names is not None)
    n_channels = len(channel_names) if channel_names else None
    if suffixed and n_channels is None:
        n_channels = 1 + max(int(s[-4:]) for s in image_stems)

    cases: list[Case] = []
    for split, img_dir, lab_dir in (("train", "imagesTr", "labelsTr"), ("test", "imagesTs", "labelsTs")):
        images, labels = folders[img_dir], folders[lab_dir]
        if suffixed:
            grouped = _group_channels(images, n_channels or 1, channel_names is not None, problems)
        else:
            grouped = {stem: (path,) for stem, path in images.items()}
        # a label is required for training cases, and for test cases when labelsTs/ exists
        label_required = split == "train" or (root / lab_dir).is_dir()
        severity: Severity = "error" if split == "train" else "warning"
        for cid in sorted(grouped):
            label = labels.get(cid)
            if label is None and label_required:
                msg = f"image has no label map: expected {lab_dir}/{cid}{ending}"
                problems.add(severity, cid, grouped[cid][0], "missing_label", msg)
            cases.append(Case(cid, grouped[cid], label, {}, split))  # type: ignore[arg-type]
        for cid in sorted(set(labels) - set(grouped)):
            want = f"{img_dir}/{cid}_0000{ending}" if suffixed else f"{img_dir}/{cid}{ending}"
            problems.add(
                severity, cid, labels[cid], "missing_image", f"label map has no image: expected {want}"
            )
    return Dataset(
        root=root,
        layout="msd",
        cases=cases,
        label_names=label_names,
        problems=list(problems),
        channel_names=channel_names,
        file_ending=ending,
    )


def _group_channels(
    images: dict[str, Path], n_channels: int, declared: bool, problems: _Problems
) -> dict[str, tuple[Path, ...]]:
    """Case id -> channel files in channel order; records missing and undeclared channels."""
    channels: dict[str, dict[int, Path]] = {}
    for stem, path in images.items():
        channels.setdefault(stem[:-5], {})[int(stem[-4:])] = path
    out: dict[str, tuple[Path, ...]] = {}
    for cid, chans in channels.items():
        missing = [i for i in range(n_channels) if i not in chans]
        if missing:
            names = ", ".join(f"{cid}_{i:04d}" for i in missing)
            problems.error(
                cid,
                chans[min(chans)],
                "missing_channel",
                f"channel file(s) {names} missing: every case needs {n_channels} channel file(s) "
                f"_0000.._{n_channels - 1:04d}",
            )
        extra = sorted(i for i in chans if i >= n_channels)
        if extra and declared:
            problems.error(
                cid,
                chans[extra[0]],
                "channel_count",
                f"case has channel file(s) {', '.join(f'_{i:04d}' for i in extra)} but dataset.json "
                f"channel_names declares {n_channels} channel(s); remove the extra files or declare them",
            )
        out[cid] = tuple(chans[i] for i in sorted(chans))
    return out


# --------------------------------------------------------------------------------------------
# SCR


def _discover_scr(root: Path, structures: Sequence[str] | None) -> Dataset:
    problems = _Problems(root)
    meta = _read_dataset_json(root)
    if structures is None and isinstance(meta.get("structures"), list):
        structures = [str(s) for s in meta["structures"]]
    if structures is None:
        folders = (root / "masks").iterdir() if (root / "masks").is_dir() else []
        structures = sorted(p.name for p in folders if p.is_dir() and not p.name.startswith("."))
    structures = list(structures)

    test_ids: set[str] = set()
    sources: list[str] = []
    if (root / "test.txt").is_file():
        test_ids |= set(_read_id_list(root / "test.txt"))
        sources.append("test.txt")
    if isinstance(meta.get("test"), list):
        for t in meta["test"]:
            parts = _split_name(Path(str(t)).name, IMAGE_SUFFIXES)
            test_ids.add(parts[0] if parts else Path(str(t)).name)
        sources.append("dataset.json")

    cases = _scan_scr(root, structures, test_ids, "train", problems)
    if (root / "test" / "images").is_dir():
        cases += _scan_scr(root / "test", structures, set(), "test", problems)
    unknown = sorted(test_ids - {c.case_id for c in cases})
    if unknown:
        more = " ..." if len(unknown) > 10 else ""
        problems.warn(
            "",
            " + ".join(sources),
            "test_split",
            f"{len(unknown)} held-out case id(s) have no image in images/: {', '.join(unknown[:10])}{more}",
        )
    return Dataset(root=root, layout="scr", cases=cases, structures=structures, problems=list(problems))


def _scr_images(base: Path, problems: _Problems) -> dict[str, Path]:
    images: dict[str, Path] = {}
    for p in _visible_files(base / "images"):
        parts = _split_name(p.name, IMAGE_SUFFIXES)
        if parts is None:
            problems.warn("", p, "unexpected_file", "not an image file; ignored")
        elif parts[0] in images:
            msg = f"two images for case {parts[0]}: {images[parts[0]].name} and {p.name}; keep one"
            problems.error(parts[0], p, "duplicate_case", msg)
        else:
            images[parts[0]] = p
    return images


def _scr_masks(base: Path, structures: list[str], problems: _Problems) -> dict[str, dict[str, Path]]:
    masks: dict[str, dict[str, Path]] = {}
    for s in structures:
        folder = base / "masks" / s
        if not folder.is_dir():
            msg = f"mask folder for structure {s!r} does not exist; expected masks/{s}/<case>.png"
            problems.error("", folder, "missing_mask", msg)
            continue
        masks[s] = {}
        for p in _visible_files(folder):
            parts = _split_name(p.name, MASK_SUFFIXES)
            if parts is not None:
                masks[s][parts[0]] = p
    if (base / "masks").is_dir():
        for p in sorted((base / "masks").iterdir()):
            if p.is_dir() and not p.name.startswith(".") and p.name not in structures:
                msg = f"mask folder {p.name!r} is not among the structures {structures}; ignored"
                problems.warn("", p, "undeclared_structure", msg)
    return masks


def _scan_scr(
    base: Path, structures: list[str], test_ids: set[str], split: Split, problems: _Problems
) -> list[Case]:
    images = _scr_images(base, problems)
    masks = _scr_masks(base, structures, problems)
    cases = []
    for cid in sorted(images):
        case_masks = {s: masks[s][cid] for s in masks if cid in masks[s]}
        case_split: Split = "test" if (split == "test" or cid in test_ids) else "train"
        if case_split == "train" or case_masks:  # unlabelled held-out images are fine
            for s in masks:
                if s not in case_masks:
                    want = f"{_rel(base / 'masks' / s, problems.root)}/{cid}.png"
                    problems.error(cid, images[cid], "missing_mask", f"no mask for {s!r}: expected {want}")
        cases.append(Case(cid, (images[cid],), None, case_masks, case_split))
    for files in masks.values():
        for cid in sorted(set(files) - set(images)):
            want = f"{_rel(base / 'images', problems.root)}/{cid}.png (or .jpg/.dcm/.nii.gz)"
            problems.error(cid, files[cid], "missing_image", f"mask has no image: expected {want}")
    return cases


# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# geometry comparison (shared by load_case and check-data)

_FIX_RESAMPLE = (
    "resample it onto the image grid with nearest-neighbour interpolation (e.g. SimpleITK.Resample(label, "
    "image, sitk.Transform(), sitk.sitkNearestNeighbor)), or pair it with the image it was drawn on"
)
_FIX_HEADER = (
    "if it was drawn on this image and only the header is off, copy the image's geometry into its "
    "header; otherwise resample it onto the image grid with nearest-neighbour interpolation"
)


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def _pixel_frame(vol: Volume) -> bool:
    """2D raster images (PNG/JPEG) have no physical geometry: they are compared by pixel grid only."""
    return vol.spatial_dims == 2 and vol.meta.get("format") == "raster"


def grid_mismatches(
    reference: Volume,
    other: Volume,
    *,
    what: str = "label",
    ref_what: str = "image",
    tol_spacing: float = 1e-3,
    tol_origin_mm: float = 1e-2,
    tol_direction: float = 1e-3,
) -> list[tuple[str, str]]:
    """Ways in which ``other``'s voxel grid differs from ``reference``'s.

    The shape must match exactly; the spacing within ``tol_spacing`` (relative), the origin (world
    position of voxel 0) within ``tol_origin_mm`` (Euclidean distance) and the axis directions within
    ``tol_direction`` (largest absolute difference of the unit direction vectors). The default origin
    tolerance, 0.01 mm, is far above float32 header rounding (< 1e-4 mm) and far below any real
    misregistration. When either volume is a 2D raster (pixel frame, no physical geometry) only the
    shape is compared.

    Args:
        reference: The image.
        other: The label map or mask that must lie on the image's grid.
        what: Name of ``other`` in messages.
        ref_what: Name of ``reference`` in messages.
        tol_spacing: Relative spacing tolerance.
        tol_origin_mm: Origin tolerance in mm.
        tol_direction: Direction-cosine tolerance.

    Returns:
        ``(check, message)`` pairs with check ``shape_mismatch``, ``spacing_mismatch``,
        ``origin_mismatch`` or ``direction_mismatch``; empty when the grids agree.
    """
    out: list[tuple[str, str]] = []
    rs, os_ = reference.spatial_shape, other.spatial_shape
    if rs != os_:
        out.append(
            ("shape_mismatch", f"{what} shape {os_} differs from {ref_what} shape {rs}; {_FIX_RESAMPLE}")
        )
    if _pixel_frame(reference) or _pixel_frame(other) or reference.spatial_dims != other.spatial_dims:
        return out
    sp_r, sp_o = np.asarray(reference.spacing_mm), np.asarray(other.spacing_mm)
    if np.any(np.abs(sp_r - sp_o) > tol_spacing * np.maximum(np.abs(sp_r), np.abs(sp_o))):
        msg = (
            f"{what} spacing {_fmt(sp_o)} mm differs from {ref_what} spacing {_fmt(sp_r)} mm "
            f"(relative tolerance {tol_spacing:g}); {_FIX_HEADER}"
        )
        out.append(("spacing_mismatch", msg))
    dist = float(np.linalg.norm(np.subtract(reference.origin_mm, other.origin_mm)))
    if dist > tol_origin_mm:
        msg = (
            f"{what} origin {_fmt(other.origin_mm)} mm differs from {ref_what} origin "
            f"{_fmt(reference.origin_mm)} mm by {dist:.4g} mm (tolerance {tol_origin_mm:g} mm); {_FIX_HEADER}"
        )
        out.append(("origin_mismatch", msg))
    nd = reference.spatial_dims
    ddiff = float(np.abs(reference.direction[:, :nd] - other.direction[:, :nd]).max())
    if ddiff > tol_direction:
        msg = (
            f"{what} orientation {other.orientation} differs from {ref_what} orientation "
            f"{reference.orientation} (largest direction-cosine difference {ddiff:.3g}, "
            f"tolerance {tol_direction:g}); "
        )
        atol = max(tol_origin_mm, 1e-3)
        if rs == os_ and same_physical_grid(rs, reference.affine, os_, other.affine, atol_mm=atol):
            msg += (
                "it covers the same voxels stored in another axis order/direction: reorient it to the "
                f"{ref_what}'s orientation (e.g. nibabel as_reoriented) so that voxel indices match"
            )
        else:
            msg += _FIX_HEADER
        out.append(("direction_mismatch", msg))
    return out


def squeeze_2d(vol: Volume) -> Volume:
    """A 3D volume with one slice as a 2D volume (nnU-Net stores 2D data as X x Y x 1 NIfTI).

    Other volumes are returned unchanged.
    """
    if vol.spatial_dims != 3 or vol.spatial_shape[-1] != 1:
        return vol
    affine = vol.affine.copy()
    n = np.linalg.norm(affine[:3, 2])
    if n > 0:
        affine[:3, 2] /= n
    return Volume(vol.array[..., 0], affine, vol.meta)


def mask_geometry_problems(
    reference: Volume,
    mask: Volume,
    *,
    what: str = "mask",
    tol_spacing: float = 1e-3,
    tol_origin_mm: float = 1e-2,
    tol_direction: float = 1e-3,
) -> list[tuple[str, str]]:
    """Geometry problems of an overlapping-structure mask relative to its image.

    A 2D mask with another pixel grid size is taken to cover the image's field of view (SCR masks
    are stored at half resolution) and is fine when the aspect ratio matches within 1 %; otherwise
    ``aspect_ratio`` is returned. Same-size 2D masks and 3D masks are compared with
    :func:`grid_mismatches` (same tolerances).

    Returns:
        ``(check, message)`` pairs; empty when the mask can be placed on the image grid.
    """
    if reference.spatial_dims == 2:
        mask = squeeze_2d(mask)
    if reference.spatial_dims == mask.spatial_dims == 2 and mask.spatial_shape != reference.spatial_shape:
        (ix, iy), (mx, my) = reference.spatial_shape, mask.spatial_shape
        fx, fy = ix / mx, iy / my
        if abs(fx - fy) <= _ASPECT_TOL * max(fx, fy):
            return []
        msg = (
            f"{what} is {mx}x{my} pixels (width x height) but the image is {ix}x{iy}: the aspect ratios "
            f"differ (scale {fx:.4g} across, {fy:.4g} down), so the mask cannot cover the image's field "
            "of view; re-export the mask at the image's size or with the image's aspect ratio"
        )
        return [("aspect_ratio", msg)]
    return grid_mismatches(
        reference,
        mask,
        what=what,
        tol_spacing=tol_spacing,
        tol_origin_mm=tol_origin_mm,
        tol_direction=tol_direction,
    )


def _nearest_resize(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest neighbour on pixel-frame geometry: output pixel ``i`` (centre at ``(i + 0.5) / n`` of
    the field of view) takes the input pixel containing that point; a half-resolution mask pixel
    thus covers exactly 2 x 2 output pixels."""
    index = []
    for n_out, n_in in zip(shape, mask.shape, strict=True):
        idx = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.intp)
        index.append(np.minimum(idx, n_in - 1))
    return mask[np.ix_(*index)]


# --------------------------------------------------------------------------------------------
# loading


def _read(case: Case, path: Path, what: str) -> Volume:

    try:
        return load_volume(path)
    except DataError as exc:
        raise DataError(f"case {case.case_id}: cannot read {what}: {exc}") from exc


def load_case_masks(case: Case, structures: Sequence[str], reference: Volume) -> np.ndarray:
    """Read a case's structure masks as one stack on the image grid.

    Any nonzero value is foreground (SCR masks use 255). A 2D mask with another pixel grid size than
    the image (same field of view, e.g. half resolution) is resampled with nearest neighbour on the
    pixel-frame geometry: image pixel ``i`` takes mask pixel ``floor((i + 0.5) * mask_size / image_size)``.

    Args:
        case: The case.
        structures: Structure names, in channel order.
        reference: The case's image; defines the output grid.

    Returns:
        uint8 array of shape ``(S, *reference.spatial_shape)`` with values 0 and 1.

    Raises:
        DataError: A mask is missing or unreadable, its aspect ratio differs from the image's by more
            than 1 %, or (3D, or same size) its grid differs from the image's; names the case and file.
    """
    out = np.zeros((len(structures), *reference.spatial_shape), dtype=np.uint8)
    for i, s in enumerate(structures):
        path = case.masks.get(s)
        if path is None:
            raise DataError(
                f"case {case.case_id}: no mask for structure {s!r} (expected masks/{s}/{case.case_id}.png); "
                "run `medseg data check` to list every missing mask"
            )
        mask = _read(case, Path(path), f"mask of {s!r}")
        if reference.spatial_dims == 2:
            mask = squeeze_2d(mask)
        issues = mask_geometry_problems(reference, mask, what=f"mask {Path(path).name}")
        if issues:
            raise DataError(f"case {case.case_id}: {path}: {issues[0][1]}")
        fg = np.any(mask.array != 0, axis=0)
        out[i] = fg if fg.shape == reference.spatial_shape else _nearest_resize(fg, reference.spatial_shape)
    return out


def _stack_channels(case: Case, vols: list[Volume]) -> Volume:
    first = vols[0]
    if len(vols) == 1:
        return first
    for k, v in enumerate(vols[1:], start=1):
        issues = grid_mismatches(first, v, what=f"channel {k}", ref_what="channel 0")
        if issues:
            raise DataError(f"case {case.case_id}: {case.images[k]}: {issues[0][1]}")
    arr = np.concatenate([v.array for v in vols], axis=0)
    return Volume(arr, first.affine, {**first.meta, "source": [str(p) for p in case.images]})


def load_case(case: Case, data: DataConfig | None = None) -> tuple[Volume, Volume | None]:
    """Read a case: the image (channels stacked) and its label.

    Args:
        case: The case to read.
        data: The data config: ``spatial_dims`` (a 3D file with one slice is read as 2D when 2D is
            expected) and ``labels``/``structures`` (which kind of label to return). Without it the
            case's files decide: its label map if it has one, else its masks in sorted name order.

    Returns:
        ``(image, label)``. ``image`` is ``(C, X, Y[, Z])``. ``label`` is the exclusive label map
        ``(1, X, Y[, Z])`` (uint8/uint16), or for overlapping structures a uint8 0/1 stack
        ``(S, X, Y[, Z])`` in structure order on the image grid (``meta["structures"]`` names them);
        ``None`` for an unlabelled held-out (``split == "test"``) case.

    Raises:
        DataError: A training case has no label/masks, a file is unreadable or missing, channels or
            label lie on different grids, the label has non-integer values, or the image is not
            ``data.spatial_dims``-D; the message names the case and the file.
    """

    if not case.images:
        raise DataError(f"case {case.case_id}: no image files")
    vols = [_read(case, Path(p), f"image channel {k}") for k, p in enumerate(case.images)]
    if data is not None and data.spatial_dims == 2:
        vols = [squeeze_2d(v) for v in vols]
    image = _stack_channels(case, vols)
    if data is not None and image.spatial_dims != data.spatial_dims:
        raise DataError(
            f"case {case.case_id}: {case.images[0]}: image is {image.spatial_dims}D with shape "
            f"{image.spatial_shape} but data.spatial_dims is {data.spatial_dims}"
        )
    sigmoid = data.mode == Mode.SIGMOID if data is not None else (case.label is None and bool(case.masks))
    if sigmoid:
        if not case.masks and case.label is not None:
            raise DataError(
                f"case {case.case_id}: has a label map {case.label} but data.structures (overlapping "
                "masks) is configured; use data.labels for label maps"
            )
        if not case.masks and case.split == "test":
            return image, None  # unlabelled held-out case
        structures = list(data.structures or []) if data is not None else sorted(case.masks)
        stack = load_case_masks(case, structures, image)
        return image, Volume(stack, image.affine.copy(), {"structures": structures, "case": case.case_id})
    if case.label is None:
        if case.split == "test":
            return image, None  # unlabelled held-out case
        raise DataError(
            f"case {case.case_id}: training case without a label map; add it or move the case to the "
            "test split (run `medseg data check` to list every unpaired case)"
        )
    label = _read(case, Path(case.label), "label")
    if data is not None and data.spatial_dims == 2:
        label = squeeze_2d(label)
    if label.num_channels != 1:
        raise DataError(
            f"case {case.case_id}: {case.label}: a label map has one channel, got {label.num_channels} "
            f"(array shape {label.array.shape})"
        )
    issues = grid_mismatches(image, label)
    if issues:
        raise DataError(
            f"case {case.case_id}: {case.label}: {issues[0][1]}. "
            "Run `medseg data check` to list every affected case"
        )
    dtype = label_dtype(label.array, where=f"case {case.case_id}: {case.label}")
    if label.array.dtype != dtype:
        label = label.with_array(label.array.astype(dtype))
    return image, label
