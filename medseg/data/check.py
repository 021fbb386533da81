"""``medseg data check``: every problem of a dataset in one pass, as records.

:func:`check_dataset` reads each file of each case exactly once and collects every problem it finds
(it never stops at the first), together with the pairing problems recorded at discovery
(:attr:`~medseg.data.datasets.Dataset.problems`). Each problem is a
:class:`~medseg.data.datasets.Problem` with a short ``check`` name; :data:`CHECKS` lists them all.
The :class:`CheckReport` renders them as a text table or JSON records and gives the exit code: 0
when there are no errors (warnings alone do not fail), 2 otherwise.

Tolerances for image/label grid agreement (the defaults of :func:`check_dataset`): spacing relative
1e-3; origin 0.01 mm, which is far above float32 header rounding (< 1e-4 mm at scanner coordinates)
and far below any real misregistration; direction cosines 1e-3 (about 0.06 degrees).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from medseg.data.datasets import (
    Case,
    Dataset,
    Problem,
    Severity,
    grid_mismatches,
    mask_geometry_problems,
    squeeze_2d,
)
from medseg.io import load_volume
from medseg.types import Volume

if TYPE_CHECKING:
    from medseg.config import DataConfig

__all__ = ["CHECKS", "CheckReport", "Problem", "check_dataset"]

#: Every ``check`` name a problem can carry, with its severity and meaning.
CHECKS: dict[str, str] = {
    "missing_label": "error (warning for test cases): an image without a label map",
    "missing_image": "error: a label map or mask without an image",
    "missing_channel": "error: a channel file (_0001, ...) or list column of a case is missing",
    "missing_mask": "error: a structure mask (or its whole folder/column) is missing",
    "missing_file": "error: a file named in the list file does not exist",
    "duplicate_case": "error: two images or list rows share a case id",
    "bad_split": "error: a list row's split is not train or test",
    "unreadable": "error: a file exists but cannot be read (corrupt, unknown format)",
    "shape_mismatch": "error: label/mask/channel shape differs from the image's",
    "spacing_mismatch": "error: label/mask/channel spacing differs from the image's",
    "origin_mismatch": "error: label/mask/channel origin differs from the image's",
    "direction_mismatch": "error: label/mask/channel orientation differs from the image's",
    "aspect_ratio": "error: a 2D mask at another resolution does not cover the image's field of view",
    "undeclared_label": "error: label values not declared in data.labels / dataset.json labels",
    "non_integer_label": "error: a label map with fractional, NaN or infinite values",
    "label_channels": "error: a label map with more than one volume (4D)",
    "non_finite": "error: NaN or infinite image intensities",
    "image_4d": "error: a 4D image (several volumes) where a 3D image was expected",
    "spatial_dims": "error: a 2D image where 3D was expected (data.spatial_dims) or vice versa",
    "channel_count": "error: number of channels differs from dataset.json channel_names",
    "empty_label": "warning: a label map that is all background",
    "empty_mask": "warning: a structure mask with no foreground",
    "non_binary_mask": "warning: a mask with more than one foreground value (all nonzero = foreground)",
    "unused_label": "warning: a declared label value that appears in no label map",
    "no_label_names": "warning: label maps exist but no label names are declared",
    "label_names": "warning: dataset.json labels differ from the config's data.labels",
    "dataset_json": "warning: a dataset.json entry that medseg ignores (e.g. nnU-Net regions)",
    "unexpected_file": "warning: a file in an image folder that does not fit the layout; ignored",
    "unexpected_column": "warning: a list-file column medseg does not use",
    "undeclared_structure": "warning: a masks/ subfolder not among the structures; ignored",
    "test_split": "warning: held-out ids (test.txt / dataset.json) without an image",
}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass
class CheckReport:
    """The outcome of :func:`check_dataset`.

    Attributes:
        problems: Every problem found, dataset-level ones first, then by case in dataset order.
        n_cases: Number of cases checked.
    """

    problems: list[Problem] = field(default_factory=list)
    n_cases: int = 0

    @property
    def errors(self) -> list[Problem]:
        """Problems with severity ``error``."""
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        """Problems with severity ``warning``."""
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def exit_code(self) -> int:
        """0 when there are no errors (warnings alone do not fail), 2 otherwise."""
        return 2 if self.errors else 0

    def summary(self) -> str:
        """One line such as ``12 cases checked: 2 errors, 1 warning``."""
        return (
            f"{_plural(self.n_cases, 'case')} checked: {_plural(len(self.errors), 'error')}, "
            f"{_plural(len(self.warnings), 'warning')}"
        )

    def to_table(self) -> str:
        """Aligned text table (severity | case | check | message) followed by the summary line.

        The message column starts with the file concerned (relative to the dataset root).
        """
        if not self.problems:
            return f"no problems found\n{self.summary()}"
        rows = [("severity", "case", "check", "message")]
        for p in self.problems:
            rows.append(
                (p.severity, p.case or "-", p.check, f"{p.file}: {p.message}" if p.file else p.message)
            )
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
        return "\n".join([*lines, self.summary()])

    def to_records(self) -> list[dict[str, Any]]:
        """Problems as plain dicts (``severity``, ``case``, ``file``, ``check``, ``message``) for JSON."""
        return [asdict(p) for p in self.problems]


def _rel(path: Path | str, root: Path) -> str:
    p = Path(path)
    for a, b in ((p, root), (p.resolve(), root.resolve())):
        try:
            return str(a.relative_to(b))
        except ValueError:
            pass
    return str(p)


def _values(arr: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an array; a bincount fast path for small non-negative integers."""
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if np.issubdtype(arr.dtype, np.bool_):
        arr = arr.view(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 65535:
            return np.flatnonzero(np.bincount(arr.ravel(), minlength=hi + 1))
    return np.unique(arr)


def _fmt_values(values: np.ndarray | list[Any], limit: int = 10) -> str:
    vals = [v.item() if hasattr(v, "item") else v for v in list(values)[:limit]]
    more = f" ... ({len(values)} in all)" if len(values) > limit else ""
    return "[" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in vals) + "]" + more


class _Checker:
    """Per-case checks; collects problems in one list."""

    def __init__(
        self,
        dataset: Dataset,
        data: DataConfig | None,
        *,
        tol_spacing: float,
        tol_origin_mm: float,
        tol_direction: float,
    ) -> None:
        self.root = Path(dataset.root)
        self.problems: list[Problem] = []
        self.tols = {
            "tol_spacing": tol_spacing,
            "tol_origin_mm": tol_origin_mm,
            "tol_direction": tol_direction,
        }
        if data is not None and data.labels is not None:
            self.declared: dict[str, int] | None = dict(data.labels)
        else:
            self.declared = dict(dataset.label_names) if dataset.label_names else None
        if data is not None and data.structures is not None:
            self.structures = list(data.structures)
        else:
            self.structures = list(dataset.structures or [])
        self.spatial_dims = data.spatial_dims if data is not None else None
        self.channel_names = dataset.channel_names
        self.reported_missing = {p.file for p in dataset.problems if p.check == "missing_file"}
        self.seen_values: set[int] = set()
        self.n_labels_read = 0

    def add(self, severity: Severity, case: str, file: Path | str, check: str, message: str) -> None:
        self.problems.append(Problem(severity, case, _rel(file, self.root) if file else "", check, message))

    def read(self, case: Case, path: Path, what: str) -> Volume | None:

        path = Path(path)
        if not path.exists():
            if _rel(path, self.root) not in self.reported_missing:
                self.add("error", case.case_id, path, "missing_file", f"{what} file does not exist")
            return None
        try:
            return load_volume(path)
        except Exception as exc:  # any reader failure is a finding, never a crash of the whole check
            msg = str(exc)
            if msg.startswith(f"{path}: "):
                msg = msg[len(f"{path}: ") :]
            msg = f"cannot read {what}: {msg}; re-export the file (corrupt or truncated?) or remove the case"
            self.add("error", case.case_id, path, "unreadable", msg)
            return None

    # ---- per-file checks

    def check_image(self, case: Case, path: Path, vol: Volume) -> Volume:
        cid = case.case_id
        if self.spatial_dims == 2:
            vol = squeeze_2d(vol)
        arr = vol.array
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
            self.add(
                "error",
                cid,
                path,
                "non_finite",
                f"image has {n_nan} NaN and {n_inf} infinite voxel(s) of {arr.size}; replace them (e.g. with "
                "the minimum intensity) or re-export the image",
            )
        expected = 1 if len(case.images) > 1 else (len(self.channel_names) if self.channel_names else 1)
        if vol.num_channels != expected:
            declared = f" (dataset.json channel_names: {self.channel_names})" if self.channel_names else ""
            if vol.num_channels > 1 and expected == 1 and vol.spatial_dims == 3:
                self.add(
                    "error",
                    cid,
                    path,
                    "image_4d",
                    f"image is 4D: {vol.num_channels} volumes of shape {vol.spatial_shape} where a 3D image "
                    f"with one channel per file was expected{declared}; split the volumes into "
                    f"{cid}_0000, {cid}_0001, ... files (one per channel, declared in channel_names) or keep "
                    "only the volume you need",
                )
            else:
                self.add(
                    "error",
                    cid,
                    path,
                    "channel_count",
                    f"image has {vol.num_channels} channel(s) but {expected} were expected{declared}",
                )
        if self.spatial_dims is not None and vol.spatial_dims != self.spatial_dims:
            fix = (
                "set data.spatial_dims: 2 for 2D data, or give the 3D volume"
                if self.spatial_dims == 3
                else "set data.spatial_dims: 3 for volumes, or give one 2D image (a 3D file with one slice "
                "is read as 2D)"
            )
            self.add(
                "error",
                cid,
                path,
                "spatial_dims",
                f"image is {vol.spatial_dims}D (shape {vol.spatial_shape}) but data.spatial_dims is "
                f"{self.spatial_dims}; {fix}",
            )
        return vol

    def check_label(self, case: Case, path: Path, vol: Volume, ref: Volume | None) -> None:
        cid = case.case_id
        if self.spatial_dims == 2:
            vol = squeeze_2d(vol)
        arr = vol.array
        if vol.num_channels != 1:
            self.add(
                "error",
                cid,
                path,
                "label_channels",
                f"label map has {vol.num_channels} volumes (array shape {arr.shape}); a label map is one "
                "volume of integer labels: keep one volume or merge them into one map",
            )
        integral = True
        if np.issubdtype(arr.dtype, np.floating):
            finite = np.isfinite(arr)
            if not finite.all():
                n = int((~finite).sum())
                msg = f"label map has {n} NaN/infinite value(s); labels must be whole numbers >= 0"
                self.add("error", cid, path, "non_integer_label", msg)
                arr, integral = np.where(finite, arr, 0), False
            frac = arr != np.round(arr)
            if frac.any():
                integral = False
                self.add(
                    "error",
                    cid,
                    path,
                    "non_integer_label",
                    f"label map has {int(frac.sum())} non-integer value(s), e.g. "
                    f"{_fmt_values(np.unique(arr[frac]), 5)}; "
                    "it was probably resampled with linear interpolation: resample or re-export it with "
                    "nearest-neighbour interpolation",
                )
            arr = np.round(arr).astype(np.int64)
        values = [int(v) for v in _values(arr)]
        self.n_labels_read += 1
        self.seen_values.update(values)
        if self.declared is not None:
            allowed = {0, *self.declared.values()}
            bad = [v for v in values if v not in allowed]
            if bad:
                names = ", ".join(f"{k}={v}" for k, v in sorted(self.declared.items(), key=lambda kv: kv[1]))
                self.add(
                    "error",
                    cid,
                    path,
                    "undeclared_label",
                    f"label values {_fmt_values(bad)} are not declared (declared: background=0, {names}); "
                    "add them to data.labels (or dataset.json labels) or relabel the file",
                )
        if integral and (values == [0] or not values):
            msg = "label map is empty (background only): the case teaches the model nothing about the organs"
            self.add("warning", cid, path, "empty_label", msg)
        if ref is not None:
            for check, msg in grid_mismatches(ref, vol, what="label", **self.tols):
                self.add("error", cid, path, check, msg)

    def check_mask(self, case: Case, structure: str, path: Path, vol: Volume, ref: Volume | None) -> None:
        cid = case.case_id
        values = _values(vol.array)
        nonzero = values[values != 0]
        if nonzero.size == 0:
            msg = (
                f"mask of {structure!r} is empty: the structure is absent in this case (fine if it really is)"
            )
            self.add("warning", cid, path, "empty_mask", msg)
        elif nonzero.size > 1:
            self.add(
                "warning",
                cid,
                path,
                "non_binary_mask",
                f"mask of {structure!r} has values {_fmt_values(values)}; expected 0 and one foreground "
                "value. Every nonzero pixel counts as foreground (JPEG compression or anti-aliased drawing "
                "causes stray values: save masks as PNG)",
            )
        if ref is not None:
            what = f"mask of {structure!r}"
            for check, msg in mask_geometry_problems(ref, vol, what=what, **self.tols):
                self.add("error", cid, path, check, msg)

    # ---- one case

    def check_case(self, case: Case) -> None:
        images: list[tuple[Path, Volume]] = []
        for k, path in enumerate(case.images):
            what = "image" if len(case.images) == 1 else f"image channel {k}"
            vol = self.read(case, path, what)
            if vol is not None:
                images.append((Path(path), self.check_image(case, Path(path), vol)))
        ref = images[0][1] if images else None
        for path, vol in images[1:]:
            assert ref is not None
            for check, msg in grid_mismatches(
                ref, vol, what="channel", ref_what="first channel", **self.tols
            ):
                self.add("error", case.case_id, path, check, msg)
        if case.label is not None:
            vol = self.read(case, case.label, "label map")
            if vol is not None:
                self.check_label(case, Path(case.label), vol, ref)
        for s in self.structures:
            path = case.masks.get(s)
            if path is None:
                continue  # reported at discovery
            vol = self.read(case, path, f"mask of {s!r}")
            if vol is not None:
                self.check_mask(case, s, Path(path), vol, ref)

    def finish(self, dataset: Dataset) -> None:
        if self.n_labels_read == 0:
            return
        if self.declared is None:
            self.add(
                "warning",
                "",
                "",
                "no_label_names",
                f"label maps contain values {_fmt_values(sorted(self.seen_values))} but no label names are "
                "declared; add data.labels to the config (or labels to dataset.json)",
            )
            return
        for name, v in sorted(self.declared.items(), key=lambda kv: kv[1]):
            if v not in self.seen_values:
                self.add(
                    "warning",
                    "",
                    "",
                    "unused_label",
                    f"label {name}={v} is declared but appears in none of the {self.n_labels_read} label "
                    "maps; check the label values in data.labels",
                )


def check_dataset(
    dataset: Dataset,
    data: DataConfig | None = None,
    *,
    progress: bool = False,
    tol_spacing: float = 1e-3,
    tol_origin_mm: float = 1e-2,
    tol_direction: float = 1e-3,
) -> CheckReport:
    """Check every case of a dataset and report every problem in one pass.

    Each file is read once. Checks: missing and unreadable files; missing pairs (image without label,
    label without image, missing channel or structure mask); image/label (and channel/channel) grid
    agreement — shape, spacing, origin, direction — within tolerances, where 2D masks at another
    resolution that cover the same field of view are fine (they are resampled when loaded) but another
    aspect ratio is an error; undeclared, non-integer and empty labels; empty and non-binary masks;
    NaN/Inf intensities; 4D images where 3D was expected; 2D/3D mismatch with ``data.spatial_dims``;
    channel count versus ``dataset.json`` ``channel_names``. :data:`CHECKS` names every check.

    Args:
        dataset: From :func:`~medseg.data.datasets.load_dataset` or
            :func:`~medseg.data.datasets.dataset_from_folder`; its discovery problems are included.
        data: The data config; gives ``spatial_dims`` and the authoritative ``labels``/``structures``.
            Without it the dataset's own label names/structures are used and dimensionality is not
            checked.
        progress: Show a progress bar over cases.
        tol_spacing: Relative spacing tolerance.
        tol_origin_mm: Origin tolerance in mm (distance between the voxel-0 positions).
        tol_direction: Largest allowed difference of direction cosines.

    Returns:
        The report: problems, counts, ``exit_code`` (0 clean or warnings only, 2 on any error).

    Example:
        >>> from medseg.data.datasets import dataset_from_folder  # doctest: +SKIP
        >>> report = check_dataset(dataset_from_folder(Path("data/Task09_Spleen")))  # doctest: +SKIP
        >>> print(report.to_table())  # doctest: +SKIP
    """

    checker = _Checker(
        dataset, data, tol_spacing=tol_spacing, tol_origin_mm=tol_origin_mm, tol_direction=tol_direction
    )
    for case in tqdm(dataset.cases, desc="check-data", unit="case", disable=not progress):
        checker.check_case(case)
    checker.finish(dataset)
    order = {c.case_id: i for i, c in enumerate(dataset.cases)}
    n = len(order)
    problems = [*dataset.problems, *checker.problems]
    problems.sort(key=lambda p: (-1, "") if not p.case else (order.get(p.case, n), p.case))
    return CheckReport(problems=problems, n_cases=len(dataset.cases))
