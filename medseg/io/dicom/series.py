"""Series discovery: the DICOM series directly inside a folder, and choosing one."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DataError
from medseg.io._files import is_dicom_file
from medseg.io.dicom._headers import (
    DicomSeries,
    _floats,
    _is_image,
    _is_truncated_image,
    _read_header,
    _text,
)

logger = logging.getLogger(__name__)


def _scan(folder: Path) -> list[tuple[DicomSeries, list[Any]]]:
    """Group the DICOM image files directly inside ``folder`` by SeriesInstanceUID."""
    if not folder.exists():
        raise DataError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder (to read one DICOM file use read_dicom_file)")
    groups: dict[str, list[tuple[Path, Any]]] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        ds = _read_header(path, damaged="refuse" if is_dicom_file(path) else "skip")
        if ds is not None and _is_truncated_image(ds):
            raise DataError(
                f"{path}: a DICOM image file of this folder is cut short (its header ends before the image "
                "description); the series would be missing it. Replace the file with an intact copy"
            )
        if ds is None or not _is_image(ds):
            continue
        groups.setdefault(_text(ds, "SeriesInstanceUID"), []).append((path, ds))
    out = []
    for uid, members in groups.items():
        members = _sort_members(members)
        first = members[0][1]
        series = DicomSeries(
            uid=uid,
            files=tuple(p for p, _ in members),
            modality=_text(first, "Modality"),
            description=_text(first, "SeriesDescription"),
            n_files=len(members),
        )
        out.append((series, [ds for _, ds in members]))
    out.sort(key=lambda item: (item[0].modality, item[0].description, item[0].uid))
    return out


def _sort_members(members: list[tuple[Path, Any]]) -> list[tuple[Path, Any]]:
    """Sort (path, header) pairs by position along the first file's slice normal, else by
    InstanceNumber, then by file name."""

    def instance(ds: Any) -> int:
        try:
            return int(ds.get("InstanceNumber", 0) or 0)
        except (TypeError, ValueError):
            return 0

    try:
        iop = _floats(members[0][1].ImageOrientationPatient, 6, where="", keyword="")
        normal = np.cross(iop[:3], iop[3:])
        keys = [
            float(_floats(ds.ImagePositionPatient, 3, where="", keyword="") @ normal) for _, ds in members
        ]
    except (AttributeError, DataError):
        keys = [0.0] * len(members)
    order = sorted(range(len(members)), key=lambda i: (keys[i], instance(members[i][1]), members[i][0].name))
    return [members[i] for i in order]


def _subfolders_with_dicom(folder: Path, limit: int = 10) -> list[str]:

    found = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = [p for p in sorted(sub.iterdir())[:50] if p.is_file()]
        if any(is_dicom_file(p) for p in files[:20]):
            found.append(sub.name + "/")
            if len(found) >= limit:
                break
    return found


def list_dicom_series(folder: str | Path) -> list[DicomSeries]:
    """List the DICOM image series stored directly in ``folder`` (not in sub-folders).

    Non-DICOM files, ``DICOMDIR`` and DICOM objects without an image (structured reports, RT
    structure sets) are ignored.

    Args:
        folder: A folder of DICOM files.

    Returns:
        One :class:`DicomSeries` per SeriesInstanceUID (files without one form the series with
        ``uid == ""``), sorted by modality, description and UID. Empty if there are no DICOM images.

    Raises:
        DataError: ``folder`` does not exist or is not a folder.
    """
    return [series for series, _ in _scan(Path(folder))]


def _series_listing(series: Sequence[DicomSeries]) -> str:
    return "\n".join(f"  - {s.describe()}" for s in series)


def _select_series(folder: Path, series_uid: str | None) -> tuple[DicomSeries, list[Any]]:
    found = _scan(folder)
    if not found:
        subs = _subfolders_with_dicom(folder)
        hint = (
            f" DICOM files were found in sub-folders {', '.join(subs)}: pass one of them (series are "
            "not searched recursively)."
            if subs
            else " Expected a folder holding the files of one DICOM series (one file per slice, or one "
            "multi-frame file)."
        )
        raise DataError(f"{folder}: no DICOM image files directly in this folder.{hint}")
    if series_uid is not None:
        for series, headers in found:
            if series.uid == series_uid.strip():
                return series, headers
        raise DataError(
            f"{folder}: no series with SeriesInstanceUID {series_uid!r}. Available series:\n"
            f"{_series_listing([s for s, _ in found])}\nPass one of these UIDs with --series-uid."
        )
    if len(found) > 1:
        raise DataError(
            f"{folder}: found {len(found)} DICOM series in one folder; choose one with --series-uid UID "
            f"(series_uid= in Python). Series (UID, modality, description, files):\n"
            f"{_series_listing([s for s, _ in found])}"
        )
    return found[0]
