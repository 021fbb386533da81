"""Reading DICOM: series folders (classic one-slice-per-file and enhanced multi-frame) and single files.

Who does what:

* **pydicom** reads the headers (``stop_before_pixels``): series grouping, modality/description,
  ``ImagePositionPatient`` / ``ImageOrientationPatient`` / ``PixelSpacing`` of every slice, and the
  per-frame functional groups of enhanced multi-frame objects (``PlanePositionSequence``,
  ``PlaneOrientationSequence``, ``PixelMeasuresSequence``, ``PixelValueTransformationSequence``).
* **SimpleITK/GDCM** decodes the pixel data of each file (all transfer syntaxes GDCM knows, JPEG 2000
  included) and applies the file's rescale slope/intercept. Files are read one by one with
  ``sitk.ReadImage`` in the order computed here rather than with ``ImageSeriesReader``: each slice
  keeps its own rescale, a decoding error names the file, and ITK's own sorting and spacing estimate
  (which does not check uniformity) never decide the geometry. ITK (>= 5.1) also converts MONOCHROME1 to
  the MONOCHROME2 convention (``2**BitsStored - 1 - value`` before rescaling); this module does not
  invert again, it only records the conversion in ``meta``.
* **This module** (hand-written) sorts the slices along the slice normal and builds the voxel-to-RAS
  affine itself, and refuses stacks that a single affine cannot describe. GDCM/ITK only *warn* (on
  stderr) about non-uniform sampling and silently shear or stretch gantry-tilted stacks, so the checks
  are done here, with :class:`~medseg.errors.DataError` messages that say what to do:

  - every slice must share one orientation, pixel spacing and matrix size;
  - gaps between consecutive slice positions (along the normal) must all equal the median gap within
    ``max(SPACING_RTOL * median, SPACING_ATOL_MM)`` (1 %, at least 0.01 mm for positions written with
    two decimals): a missing slice or an irregular stack is refused;
  - two frames at the same position (several echoes/time points in one series) are refused;
  - every slice position must lie on the line through the first one along the image-plane normal,
    within ``max(TILT_TOL_PIXELS * pixel spacing, TILT_ATOL_MM)`` (5 % of a pixel, at least 0.02 mm)
    in-plane; otherwise the stack is gantry-tilted and refused with the tilt angle in degrees. (An
    angular tolerance alone would be wrong both ways: header rounding over a 1 mm stack looks like
    hundredths of a degree, while 0.05 degrees over a 500 mm CT shifts the last slice by 0.4 mm.)

Before GDCM decodes a file, its structure is checked with pydicom (GDCM allocates what a header
declares before it notices that the file holds less): every element must end inside the file, the
pixel data must be stored as the transfer syntax says, uncompressed pixel data must be as long as
Rows x Columns x frames promise, RLE data long enough to expand to them, and the declared image must
fit in the available memory. Header values are converted when the header is read, so that a corrupt
element is reported with the file's name.

Series discovery (:func:`list_dicom_series`) looks at the files directly inside the folder, **not
recursively** (a nested export is reported with the names of the sub-folders that hold DICOM files):
this keeps "one folder = the series I pointed at" predictable, and avoids merging copies of the same
series stored in sibling folders.

Axis convention: see :mod:`medseg.types`. ``i`` runs along image columns (DICOM row direction, first
three ``ImageOrientationPatient`` values, step ``PixelSpacing[1]``), ``j`` along rows (step
``PixelSpacing[0]``), ``k`` along the slice normal ``row x col`` in increasing position.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DataError
from medseg.io._files import is_dicom_file
from medseg.io._limits import check_memory
from medseg.io._slabs import CHUNK_BYTES, NotStreamable, RawSlabs, temp_raw_file
from medseg.types import Volume

logger = logging.getLogger(__name__)

__all__ = [
    "DicomSeries",
    "list_dicom_series",
    "read_dicom_series",
    "DicomSlabs",
    "read_dicom_file",
    "PROJECTION_MODALITIES",
]

#: Modalities read as 2D projection images in the pixel frame (no patient geometry).
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "RG", "PX", "IO", "XA", "RF"})
#: Largest allowed deviation of a slice gap from the median gap, relative to the median gap ...
SPACING_RTOL = 1e-2
#: ... and its absolute floor in mm (positions rounded to two decimals).
SPACING_ATOL_MM = 1e-2
#: Largest allowed in-plane offset of a slice position from the normal line, in pixels ...
TILT_TOL_PIXELS = 0.05
#: ... and its absolute floor in mm.
TILT_ATOL_MM = 0.02
#: Largest allowed difference between direction cosines of slices of one stack.
ORIENTATION_ATOL = 1e-3
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series found in a folder.

    Attributes:
        uid: SeriesInstanceUID; an empty string when the files carry none (anonymised exports).
        files: The series' files, sorted by position along the slice normal (by InstanceNumber when
            the files have no position).
        modality: DICOM Modality (``CT``, ``MR``, ``DX`` ...); empty when absent.
        description: SeriesDescription; empty when absent.
        n_files: Number of files (a multi-frame file counts once).
    """

    uid: str
    files: tuple[Path, ...]
    modality: str
    description: str
    n_files: int

    def describe(self) -> str:
        """One line for listings: UID, modality, description and file count."""
        uid = self.uid or '"" (empty SeriesInstanceUID)'
        desc = f'"{self.description}"' if self.description else "(no description)"
        return f"{uid}  {self.modality or '?'}  {desc}  {self.n_files} file(s)"


@dataclass(frozen=True)
class _Plane:
    """Geometry of one frame (slice) in LPS millimetres."""

    position: np.ndarray  # ImagePositionPatient: centre of the first transmitted pixel
    row: np.ndarray  # unit vector of increasing column index (i)
    col: np.ndarray  # unit vector of increasing row index (j)
    spacing: tuple[float, float]  # (along row = between columns, along col = between rows)
    thickness: float | None  # SpacingBetweenSlices or SliceThickness, for single-slice stacks
    spacing_known: bool = True  # False when PixelSpacing was absent and 1 mm was assumed

    @property
    def normal(self) -> np.ndarray:
        n = np.cross(self.row, self.col)
        return n / np.linalg.norm(n)


# --------------------------------------------------------------------------------------------------
# headers


def _read_header(path: Path) -> Any | None:
    """pydicom dataset without pixel data, or None if ``path`` is not a DICOM file."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        _convert_all(ds, path)
        return ds
    except MemoryError as exc:
        raise DataError(
            f"{path}: out of memory parsing the DICOM header; its element lengths are corrupt"
        ) from exc
    except Exception as exc:  # pydicom raises many types for corrupt files (BytesLengthException, ...)
        logger.debug("skipping %s: not readable as DICOM (%s: %s)", path, type(exc).__name__, exc)
        return None


def _convert_all(ds: Any, path: Path) -> None:
    """Convert every standard element of ``ds`` (in sequences too) and of its file meta information now.

    pydicom converts values on first access, so a corrupt element would otherwise raise wherever it is
    first read, with a message that names no file. An element whose value cannot be converted (e.g. a
    length that does not fit its VR) is dropped, as if absent: a file with a broken element that is
    never read still loads, and one whose Rows or ImagePositionPatient is broken is refused as lacking
    it. An unknown VR, or any error in the file meta information, means the byte stream itself is
    corrupt: that raises, and the file is not handed to GDCM, which can misread such a file badly enough
    to allocate gigabytes. Private elements, which this module never reads and which make up most of a
    vendor's header, are left as they are. Validation warnings are silenced meanwhile: the values this
    module reads are checked where they are used.
    """
    from pydicom import config

    def convert(dataset: Any, strict: bool) -> None:
        for tag in list(dataset.keys()):
            if tag.is_private:
                continue
            try:
                elem = dataset[tag]
            except NotImplementedError:  # pydicom: "Unknown Value Representation"
                raise
            except Exception as exc:  # pydicom raises many types for corrupt values
                if strict:
                    raise
                logger.debug(
                    "%s: ignoring unreadable element %s (%s: %s)", path, tag, type(exc).__name__, exc
                )
                del dataset[tag]
                continue
            if elem.VR == "SQ":
                for item in elem.value:
                    convert(item, strict)

    mode = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    try:
        convert(ds, strict=False)
        if getattr(ds, "file_meta", None) is not None:
            convert(ds.file_meta, strict=True)
    finally:
        config.settings.reading_validation_mode = mode


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _floats(value: Any, n: int, *, where: str, keyword: str) -> np.ndarray:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: {keyword} is not numeric (found {value!r})") from exc
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise DataError(f"{where}: {keyword} must have {n} finite numbers, found {value!r}")
    return out


def _whole(ds: Any, keyword: str, default: int | None = None, *, where: str | Path) -> int:
    """The whole number ``ds.<keyword>`` (``default`` when absent or empty); DataError for anything else
    (several values, a non-number), naming the file."""
    value = ds.get(keyword, default)
    value = default if value in (None, "") else value
    try:
        return int(value)  # TypeError for several values (pydicom MultiValue)
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"{where}: {keyword} must be one whole number, found {value!r}; the header is corrupt (export "
            "the file again)"
        ) from exc


def _n_frames(ds: Any) -> int:
    try:
        return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


def _is_image(ds: Any) -> bool:
    return "Rows" in ds and "Columns" in ds and _text(ds, "SOPClassUID") != _DICOMDIR_SOP_CLASS


def _is_projection(ds: Any) -> bool:
    """True for 2D projection radiographs and for images without any patient geometry."""
    if _text(ds, "Modality").upper() in PROJECTION_MODALITIES:
        return True
    if "ImagePositionPatient" in ds:
        return False
    from pydicom.sequence import Sequence as DicomSequence

    groups = (ds.get("PerFrameFunctionalGroupsSequence"), ds.get("SharedFunctionalGroupsSequence"))
    has_plane = any(
        isinstance(seq, DicomSequence) and len(seq) > 0 and "PlanePositionSequence" in seq[0]
        for seq in groups
    )
    return not has_plane


def _group_item(ds: Any, frame: int, sequence: str) -> Any | None:
    """First item of functional-group ``sequence`` for ``frame`` (per-frame first, then shared); None
    when absent or when a corrupt header holds something other than a sequence there."""
    from pydicom.sequence import Sequence as DicomSequence

    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if not isinstance(seq, DicomSequence) or len(seq) <= index:
            continue
        value = seq[index].get(sequence)
        if isinstance(value, DicomSequence) and len(value) > 0:
            return value[0]
    return None


def _plane_from(position: Any, orientation: Any, spacing: Any, thickness: Any, *, where: str) -> _Plane:
    if position is None or orientation is None:
        missing = "ImagePositionPatient" if position is None else "ImageOrientationPatient"
        raise DataError(
            f"{where}: no {missing}, so the slice cannot be placed in patient space. A 3D series needs "
            "ImagePositionPatient and ImageOrientationPatient in every slice; read 2D images one file "
            "at a time (medseg.io.dicom.read_dicom_file)."
        )
    pos = _floats(position, 3, where=where, keyword="ImagePositionPatient")
    iop = _floats(orientation, 6, where=where, keyword="ImageOrientationPatient")
    row, col = iop[:3], iop[3:]
    nr, nc = np.linalg.norm(row), np.linalg.norm(col)
    if nr < 1e-6 or nc < 1e-6 or abs(float(row @ col)) / (nr * nc) > 1e-2:
        raise DataError(
            f"{where}: ImageOrientationPatient {list(iop)} does not hold two orthogonal unit vectors; "
            "the header is corrupt (re-export the series)"
        )
    if spacing is None:
        ps = (1.0, 1.0)
    else:
        s = _floats(spacing, 2, where=where, keyword="PixelSpacing")
        if np.any(s <= 0):
            raise DataError(f"{where}: PixelSpacing must be positive, found {list(s)}")
        ps = (float(s[1]), float(s[0]))
    thick = None
    if thickness is not None:
        try:
            thick = float(thickness)
        except (TypeError, ValueError):
            thick = None
        if thick is not None and not (math.isfinite(thick) and thick > 0):
            thick = None
    return _Plane(pos, row / nr, col / nc, ps, thick, spacing is not None)


def _slice_thickness(item: Any) -> Any:
    if item is None:
        return None
    sbs = item.get("SpacingBetweenSlices")
    return sbs if sbs not in (None, "") else item.get("SliceThickness")


def _classic_plane(ds: Any, *, where: str) -> _Plane:
    return _plane_from(
        ds.get("ImagePositionPatient"),
        ds.get("ImageOrientationPatient"),
        ds.get("PixelSpacing"),
        _slice_thickness(ds),
        where=where,
    )


def _multiframe_planes(ds: Any, *, where: str) -> list[_Plane]:
    """Per-frame geometry of an enhanced multi-frame object (or a legacy multi-frame with top-level
    IPP/IOP and ``SpacingBetweenSlices``, e.g. NM)."""
    n = _n_frames(ds)
    planes = []
    for f in range(n):
        pos_item = _group_item(ds, f, "PlanePositionSequence")
        ori_item = _group_item(ds, f, "PlaneOrientationSequence")
        pix_item = _group_item(ds, f, "PixelMeasuresSequence")
        position = pos_item.get("ImagePositionPatient") if pos_item is not None else None
        orientation = ori_item.get("ImageOrientationPatient") if ori_item is not None else None
        spacing = pix_item.get("PixelSpacing") if pix_item is not None else None
        thickness = _slice_thickness(pix_item)
        if position is None and n > 1:
            raise DataError(
                f"{where}: multi-frame file with {n} frames but no per-frame PlanePositionSequence, so the "
                "frames cannot be placed in space (a cine or time series, or a legacy NM/RT-dose object). "
                "Only enhanced multi-frame images (CT/MR/PET) are read as 3D volumes; convert others with "
                "dcm2niix first."
            )
        planes.append(
            _plane_from(
                position if position is not None else ds.get("ImagePositionPatient"),
                orientation if orientation is not None else ds.get("ImageOrientationPatient"),
                spacing if spacing is not None else ds.get("PixelSpacing"),
                thickness if thickness is not None else _slice_thickness(ds),
                where=f"{where} (frame {f + 1})",
            )
        )
    return planes


def _rescale(ds: Any, frame: int | None = None) -> tuple[float, float]:
    """(slope, intercept) of a file or of one frame of a multi-frame file; (1, 0) when absent."""
    item = _group_item(ds, frame, "PixelValueTransformationSequence") if frame is not None else None
    src = item if item is not None and "RescaleSlope" in item else ds
    try:
        slope = float(src.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(src.get("RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError):
        return 1.0, 0.0
    return slope, intercept


# --------------------------------------------------------------------------------------------------
# series discovery


def _scan(folder: Path) -> list[tuple[DicomSeries, list[Any]]]:
    """Group the DICOM image files directly inside ``folder`` by SeriesInstanceUID."""
    if not folder.exists():
        raise DataError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder (to read one DICOM file use read_dicom_file)")
    groups: dict[str, list[tuple[Path, Any]]] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        ds = _read_header(path)
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


# --------------------------------------------------------------------------------------------------
# geometry


def _stack_geometry(planes: Sequence[_Plane], *, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Order of the frames along the slice normal and the voxel-to-RAS affine of the sorted stack.

    Raises:
        DataError: mixed orientations/spacings, duplicate positions, uneven gaps or gantry tilt.
    """
    ref = planes[0]
    for k, p in enumerate(planes[1:], start=1):
        if not (
            np.allclose(p.row, ref.row, atol=ORIENTATION_ATOL)
            and np.allclose(p.col, ref.col, atol=ORIENTATION_ATOL)
        ):
            raise DataError(
                f"{where}: slices have different orientations (ImageOrientationPatient "
                f"{np.round(np.r_[ref.row, ref.col], 5).tolist()} in slice 1, "
                f"{np.round(np.r_[p.row, p.col], 5).tolist()} in slice {k + 1}). The series mixes several "
                "stacks (e.g. a 3-plane localizer); export each stack as its own series."
            )
        if not np.allclose(p.spacing, ref.spacing, rtol=1e-4, atol=1e-6):
            raise DataError(
                f"{where}: slices have different PixelSpacing ({ref.spacing[::-1]} mm in slice 1, "
                f"{p.spacing[::-1]} mm in slice {k + 1}); one series must have one in-plane grid."
            )
    if not ref.spacing_known:
        warnings.warn(f"{where}: no PixelSpacing in the header; assuming 1 mm pixels", stacklevel=3)
    normal = ref.normal
    positions = np.stack([p.position for p in planes])
    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    dist_sorted = dist[order]
    pos_sorted = positions[order]
    n = len(planes)
    if n == 1:
        slice_step = normal * (ref.thickness or 1.0)
    else:
        gaps = np.diff(dist_sorted)
        extent = float(dist_sorted[-1] - dist_sorted[0])
        median_gap = float(np.median(gaps))
        tiny = max(1e-3, 1e-3 * float(min(ref.spacing)))
        dupes = np.flatnonzero(gaps < tiny)
        if len(dupes):
            where_dup = ", ".join(f"{dist_sorted[i]:.3f}" for i in dupes[:5])
            raise DataError(
                f"{where}: several frames share a position ({len(planes)} frames at "
                f"{len(planes) - len(dupes)} distinct positions; repeated at {where_dup} mm along the "
                "slice normal): the series holds several volumes (echoes, "
                "time points, b-values) or duplicated files. Split them into one folder per volume, or "
                "convert with dcm2niix, which writes one file per volume."
            )
        # tilt: every slice position must lie on the line through the first along the normal
        rel = pos_sorted - pos_sorted[0]
        off = np.linalg.norm(rel - np.outer(rel @ normal, normal), axis=1)
        tilt_tol = max(TILT_TOL_PIXELS * float(min(ref.spacing)), TILT_ATOL_MM)
        worst = int(np.argmax(off))
        if off[worst] > tilt_tol:
            travel = pos_sorted[-1] - pos_sorted[0]
            tilt = math.degrees(math.acos(float(np.clip(travel @ normal / np.linalg.norm(travel), -1, 1))))
            raise DataError(
                f"{where}: gantry tilt of {tilt:.2f} degrees: the slice positions advance along "
                f"{np.round(travel / np.linalg.norm(travel), 4).tolist()} (LPS) but the image planes' normal "
                f"is {np.round(normal, 4).tolist()}, so slice {worst + 1} lies {off[worst]:.3g} mm off the "
                f"stack axis (tolerance {tilt_tol:.3g} mm) and one affine cannot describe the stack. Convert "
                "with dcm2niix (it corrects gantry tilt by resampling) and load the NIfTI, or re-export the "
                "series without tilt."
            )
        bad = np.flatnonzero(np.abs(gaps - median_gap) > max(SPACING_RTOL * median_gap, SPACING_ATOL_MM))
        if len(bad):
            details = "; ".join(
                f"gap {gaps[i]:.4g} mm between slices at {dist_sorted[i]:.4f} and {dist_sorted[i + 1]:.4f} mm"
                + (
                    f" (~{round(gaps[i] / median_gap) - 1} missing slice(s))"
                    if gaps[i] > 1.5 * median_gap
                    else ""
                )
                for i in bad[:5]
            )
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise DataError(
                f"{where}: slice spacing is not uniform: expected every gap between consecutive slices "
                f"to be {median_gap:.4g} mm (the median gap, +-{100 * SPACING_RTOL:g} %), found "
                f"{details}{more} (positions along the slice normal). Check that the folder holds the "
                "complete series (re-export it), or convert with a tool that resamples irregular stacks "
                "(e.g. dcm2niix)."
            )
        slice_step = normal * (extent / (n - 1))
    lps = np.eye(4)
    lps[:3, 0] = ref.row * ref.spacing[0]
    lps[:3, 1] = ref.col * ref.spacing[1]
    lps[:3, 2] = slice_step
    lps[:3, 3] = pos_sorted[0]
    return order, _LPS_TO_RAS @ lps


# --------------------------------------------------------------------------------------------------
# pixel data


_UNDEFINED_LENGTH = 0xFFFFFFFF
#: PixelData, FloatPixelData, DoubleFloatPixelData
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)


def _transfer_syntax(path: Path, ds: Any) -> tuple[Any, bool, bool]:
    """The file's transfer syntax UID (None when absent) and whether it is compressed and deflated."""
    from pydicom.uid import UID

    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is None:
        return None, False, False
    try:
        if not isinstance(ts, UID):  # e.g. several values
            raise ValueError(f"{ts!r} is not one UID")
        return ts, bool(ts.is_compressed), bool(ts.is_deflated)
    except ValueError as exc:  # pydicom: "UID is not a transfer syntax"
        raise DataError(
            f"{path}: the file meta information names {str(ts)!r} as its transfer syntax, which is not a "
            "DICOM transfer syntax UID (expected e.g. 1.2.840.10008.1.2.1, Explicit VR Little Endian); the "
            "file is corrupt. Copy or export it again."
        ) from exc


#: DICOM RLE expands at most 64:1: its longest run, 128 equal bytes, costs two bytes.
_RLE_MAX_RATIO = 64
_RLE_LOSSLESS = "1.2.840.10008.1.2.5"


def _check_fragments(path: Path, ds: Any, ts: Any, start: int, size: int) -> None:
    """Refuse encapsulated pixel data whose items run past the end of the file or lack the closing
    delimiter (GDCM reads what the item lengths say), and RLE data too short for the image the header
    declares (GDCM allocates the declared image first)."""
    import struct

    pos, total = start, 0
    with open(path, "rb") as fh:
        while True:
            fh.seek(pos)
            head = fh.read(8)
            if len(head) < 8:
                raise DataError(
                    f"{path}: the compressed pixel data end without their closing delimiter (at byte {pos}); "
                    "the file is truncated. Copy or export it again."
                )
            group, element, length = struct.unpack("<HHI", head)
            if (group, element) == (0xFFFE, 0xE0DD):  # sequence delimiter
                break
            if (group, element) != (0xFFFE, 0xE000) or pos + 8 + length > size:
                raise DataError(
                    f"{path}: the compressed pixel data are corrupt at byte {pos} (expected an item of at "
                    f"most {size - pos - 8} bytes, found tag ({group:04X},{element:04X}) with length "
                    f"{length}). Copy or export the file again."
                )
            pos, total = pos + 8 + length, total + length
    if str(ts) != _RLE_LOSSLESS:
        return
    try:
        samples = int(ds.Rows) * int(ds.Columns) * _n_frames(ds) * int(ds.get("SamplesPerPixel", 1) or 1)
        need = samples * ((int(ds.BitsAllocated) + 7) // 8)
    except (AttributeError, TypeError, ValueError):
        return
    if need > _RLE_MAX_RATIO * total:
        raise DataError(
            f"{path}: the header declares {ds.Rows} x {ds.Columns} pixels x {_n_frames(ds)} frame(s) "
            f"({need} bytes), but its {total} bytes of RLE data decode to at most {_RLE_MAX_RATIO * total} "
            "bytes: the file is truncated or its header is corrupt. Copy or export it again."
        )


def _check_pixel_data(path: Path, ds: Any) -> None:
    """Refuse files whose structure GDCM would trust before allocating: an element whose length runs past
    the end of the file (GDCM allocates and reads that length), pixel data stored unlike the transfer
    syntax says (native bytes under a compressed syntax or the reverse), and uncompressed pixel data
    shorter than the header promises (GDCM decodes those without complaint, filling the missing
    pixels with whatever follows in memory)."""
    import pydicom

    ts, compressed, deflated = _transfer_syntax(path, ds)
    if deflated:  # element offsets refer to the inflated stream, not to the file
        return
    try:
        full = pydicom.dcmread(str(path), defer_size=1024)
        # get_item keeps elements raw (with their declared length and position) and deferred values unread
        try:
            elements = [full.get_item(tag, keep_deferred=True) for tag in full.keys()]
        except TypeError:  # pydicom < 3 has no keep_deferred (it reads what the file holds)
            elements = [full.get_item(tag) for tag in full.keys()]
    except MemoryError as exc:
        raise DataError(
            f"{path}: out of memory parsing the DICOM file; its element lengths are corrupt"
        ) from exc
    except Exception as exc:  # pydicom raises many types for corrupt files
        raise DataError(
            f"{path}: the DICOM file cannot be parsed to its end ({type(exc).__name__}: {exc}); it is "
            "truncated or corrupt. Copy or export it again."
        ) from exc
    size = path.stat().st_size
    for elem in elements:
        tell, length = getattr(elem, "value_tell", None), getattr(elem, "length", None)
        if tell is None or length is None or length == _UNDEFINED_LENGTH:
            continue
        if tell + length > size:
            raise DataError(
                f"{path}: element {elem.tag} declares {length} bytes from byte {tell}, but the file ends at "
                f"byte {size}: the file is truncated or corrupt. Copy or export it again."
            )
    if not any(e.tag in _PIXEL_TAGS for e in elements):
        # pydicom drops what it cannot finish reading: encapsulated pixel data cut short leave nothing
        raise DataError(
            f"{path}: no pixel data found when the whole file is read (its header describes an image of "
            f"{ds.get('Rows', '?')} x {ds.get('Columns', '?')} pixels); the file is truncated or corrupt. "
            "Copy or export it again."
        )
    elem = next((e for e in elements if e.tag == 0x7FE00010), None)  # PixelData
    if elem is None:  # float pixel data: stored as they are, no length rule checked here
        return
    length = elem.length if hasattr(elem, "length") else len(elem.value or b"")
    if ts is not None and compressed != (length == _UNDEFINED_LENGTH):
        raise DataError(
            f"{path}: the transfer syntax {getattr(ts, 'name', ts)} says the pixel data are "
            f"{'compressed' if compressed else 'uncompressed'}, but they are stored "
            f"{'as plain bytes' if compressed else 'encapsulated (compressed fragments)'}; the file is "
            "corrupt. Copy or export it again."
        )
    if compressed:
        _check_fragments(path, ds, ts, int(elem.value_tell), size)
        return
    try:
        n_values = int(ds.Rows) * int(ds.Columns) * _n_frames(ds) * int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        return
    expected = (n_values + 7) // 8 if bits == 1 else n_values * bits // 8
    if length < expected:
        raise DataError(
            f"{path}: pixel data is truncated ({length} bytes, expected {expected} for {ds.Rows} x "
            f"{ds.Columns} pixels x {_n_frames(ds)} frame(s) at {bits} bits); the file is incomplete. "
            "Copy or export it again."
        )


def _read_pixels(path: Path, ds: Any) -> np.ndarray:
    """Decoded, rescaled pixels of one file as SimpleITK gives them: ``(F, Y, X)`` or ``(F, Y, X, C)``."""
    import SimpleITK as sitk

    from medseg.io._sitk import read_sitk_image

    def explain(reason: str) -> str:
        ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        ts_name = getattr(ts, "name", str(ts)) if ts is not None else "unknown"
        return (
            f"{path}: cannot decode the pixel data (transfer syntax {ts_name}): {reason}. The file may be "
            "truncated or use a compression GDCM cannot decode; try `gdcmconv --raw` or dcm2niix."
        )

    # before SimpleITK sees the file: GDCM allocates what corrupt element lengths declare while it
    # merely probes the file (ReadImageInformation)
    _check_pixel_data(path, ds)
    img = read_sitk_image(path, what="DICOM", explain=explain)
    arr = sitk.GetArrayFromImage(img)
    ncomp = img.GetNumberOfComponentsPerPixel()
    spatial = arr.ndim - (1 if ncomp > 1 else 0)
    if spatial == 2:
        arr = arr[None]
    elif spatial == 4:  # (1, F, Y, X): some multi-frame objects come back 4D
        arr = arr.reshape(arr.shape[1:])
    return arr


def _read_slice(path: Path, ds: Any) -> np.ndarray:
    """The decoded, rescaled pixels of a single-frame file: ``(Y, X)`` (``(Y, X, C)`` for colour)."""
    px = _read_pixels(path, ds)
    if px.shape[0] != 1:
        raise DataError(f"{path}: expected one frame, SimpleITK decoded {px.shape[0]}")
    return px[0]


def _value_range(values: np.ndarray) -> tuple[float, float]:
    return (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)


def _integer_dtype(lo: float, hi: float, *, colour: bool = False) -> np.dtype | None:
    """The smallest of int16, uint16, int32 (uint8 first for colour) that holds ``[lo, hi]``, or None."""
    candidates = (np.uint8, np.int16, np.uint16, np.int32) if colour else (np.int16, np.uint16, np.int32)
    return next((np.dtype(t) for t in candidates if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max), None)


def _stack_to_volume_array(frames: np.ndarray, integral: bool) -> np.ndarray:
    """``(Z, Y, X[, C])`` SimpleITK frames -> ``(C, X, Y, Z)`` with the output dtype policy:
    integral rescale -> the smallest of int16/uint16/int32 (uint8 for colour) holding the values,
    otherwise float32."""
    if frames.ndim == 4:
        arr = np.transpose(frames, (3, 2, 1, 0))
    else:
        arr = np.transpose(frames, (2, 1, 0))[None]
    if integral:
        if np.issubdtype(arr.dtype, np.floating):
            arr = np.rint(arr)
        dtype = _integer_dtype(*_value_range(arr), colour=arr.shape[0] > 1)
        arr = arr.astype(dtype or np.float64, copy=False)
    else:
        arr = arr.astype(np.float32, copy=False)
    return np.ascontiguousarray(arr)


def _is_integral(rescales: Sequence[tuple[float, float]]) -> bool:
    return all(float(s).is_integer() and float(i).is_integer() for s, i in rescales)


# --------------------------------------------------------------------------------------------------
# meta


def _meta(ds: Any, *, source: Path, n_slices: int, rescales: Sequence[tuple[float, float]]) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "source": str(source),
        "format": "dicom",
        "series_uid": _text(ds, "SeriesInstanceUID"),
        "modality": _text(ds, "Modality"),
        "series_description": _text(ds, "SeriesDescription"),
        "patient_id": _text(ds, "PatientID"),
        "n_slices": int(n_slices),
    }
    optional = {
        "study_uid": "StudyInstanceUID",
        "frame_of_reference_uid": "FrameOfReferenceUID",
        "study_date": "StudyDate",
        "acquisition_date": "AcquisitionDate",
        "manufacturer": "Manufacturer",
        "photometric_interpretation": "PhotometricInterpretation",
    }
    for key, keyword in optional.items():
        value = _text(ds, keyword)
        if value:
            meta[key] = value
    if "acquisition_date" not in meta and _text(ds, "AcquisitionDateTime"):
        meta["acquisition_date"] = _text(ds, "AcquisitionDateTime")[:8]
    if rescales and len(set(rescales)) == 1:
        meta["rescale_slope"], meta["rescale_intercept"] = rescales[0]
    if _text(ds, "PhotometricInterpretation") == "MONOCHROME1":
        meta["monochrome1_inverted"] = True
    return meta


# --------------------------------------------------------------------------------------------------
# public readers


def _stacked_series(
    folder: Path, series: DicomSeries, headers: list[Any]
) -> tuple[list[Path], list[Any], np.ndarray, list[tuple[float, float]]]:
    """Files and headers of a series of single-frame files in stack order, its affine and the
    rescale of every slice; refuses what one affine cannot describe (see the module docstring)."""
    multi = [p.name for p, ds in zip(series.files, headers, strict=True) if _n_frames(ds) > 1]
    if multi:
        raise DataError(
            f"{folder}: the series has {series.n_files} files of which {len(multi)} are multi-frame "
            f"({', '.join(multi[:3])}{'...' if len(multi) > 3 else ''}); series of several multi-frame "
            "files are not supported. Read one file with read_dicom_file, or convert with dcm2niix."
        )
    shapes = {
        (_whole(ds, "Rows", where=p), _whole(ds, "Columns", where=p))
        for p, ds in zip(series.files, headers, strict=True)
    }
    if len(shapes) > 1:
        raise DataError(
            f"{folder}: slices have different matrix sizes (Rows x Columns {sorted(shapes)}); one series "
            "must have one in-plane grid. The folder may mix several series with the same UID."
        )
    planes = [_classic_plane(ds, where=str(p)) for p, ds in zip(series.files, headers, strict=True)]
    order, affine = _stack_geometry(planes, where=str(folder))
    files = [series.files[i] for i in order]
    hdrs = [headers[i] for i in order]
    rescales = [_rescale(ds) for ds in hdrs]
    return files, hdrs, affine, rescales


def _check_stack_memory(folder: Path, headers: Sequence[Any], integral: bool) -> None:
    """Refuse a series whose slices, decoded and stacked, do not fit in the available memory (checked
    before the first slice is decoded; each file's own size is checked when it is read)."""
    ds = headers[0]
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 16) or 16)
    except (AttributeError, TypeError, ValueError):
        return  # decoding the first slice reports the broken header
    # GDCM gives float64 once a fractional rescale is applied
    stored = next((t for t in (np.uint8, np.uint16, np.uint32) if bits <= 8 * np.dtype(t).itemsize), None)
    dtype = np.dtype(stored if integral and stored is not None else np.float64)
    shape = (cols, rows, len(headers)) + ((samples,) if samples > 1 else ())
    # the decoded slices and their stack are held at once
    check_memory(folder, shape, dtype, copies=2)


def read_dicom_series(folder: str | Path, *, series_uid: str | None = None) -> Volume:
    """Read one DICOM series from a folder into a 3D :class:`~medseg.types.Volume`.

    Slices are sorted by position along the slice normal and checked (see the module docstring);
    rescale slope/intercept are applied (CT in HU). The array is integer (int16, uint16 or int32, the
    smallest that holds the values) when every slope and intercept is a whole number, float32
    otherwise. A series of one file is read with :func:`read_dicom_file` (a single slice gives
    ``Z == 1`` with the spacing from SpacingBetweenSlices/SliceThickness, a multi-frame file gives a
    volume, a projection radiograph a 2D image).

    Args:
        folder: Folder holding the series' files (not searched recursively).
        series_uid: SeriesInstanceUID to read when the folder holds several series (``""`` selects
            files without a SeriesInstanceUID).

    Returns:
        A Volume ``(1, X, Y, Z)`` (``(C, X, Y, Z)`` for colour) with a voxel-to-RAS affine. ``meta``
        has ``source``, ``format`` ("dicom"), ``series_uid``, ``modality``, ``series_description``,
        ``patient_id`` (raw), ``n_slices`` and, when present, ``study_date``, ``acquisition_date``,
        ``study_uid``, ``frame_of_reference_uid``, ``rescale_slope``/``rescale_intercept``.

    Raises:
        DataError: No DICOM images, several series and no ``series_uid``, unknown ``series_uid``,
            slices that do not form a regular stack (missing slice, uneven spacing, gantry tilt, mixed
            orientations, several volumes in one series) or undecodable pixel data.
    """
    folder = Path(folder)
    series, headers = _select_series(folder, series_uid)
    if series.n_files == 1:
        vol = read_dicom_file(series.files[0])
        return Volume(
            vol.array, vol.affine, {**vol.meta, "source": str(folder), "file": str(series.files[0])}
        )
    files, hdrs, affine, rescales = _stacked_series(folder, series, headers)
    _check_stack_memory(folder, hdrs, _is_integral(rescales))
    frames = [_read_slice(path, ds) for path, ds in zip(files, hdrs, strict=True)]
    try:
        stacked = np.stack(frames)
    except ValueError as exc:  # decoded sizes disagree with the headers
        raise DataError(f"{folder}: decoded slices have different shapes ({exc})") from exc
    array = _stack_to_volume_array(stacked, _is_integral(rescales))
    meta = _meta(hdrs[0], source=folder, n_slices=len(files), rescales=rescales)
    return Volume(array, affine, meta)


class DicomSlabs(RawSlabs):
    """A DICOM series decoded once, slice by slice, into a temporary raw file and read by blocks.

    Gives what :func:`read_dicom_series` gives (the same affine, voxel values and ``meta``) without
    holding the scan: prediction streams it like a NIfTI file (:class:`~medseg.io.nifti.NiftiSlabs`).
    Loading a series whole costs several copies of the scan at once (decoded slices, the stack, the
    reordered array); here one decoded slice is in memory at a time. Every file is decoded by
    SimpleITK as :func:`read_dicom_series` does, and the same checks refuse irregular stacks. When
    every rescale is whole, the temporary file holds the smallest of int16, uint16 and int32 that
    holds the values (int16 for most CT; rewritten wider if a later slice needs it), float32
    otherwise. Use it as a context manager (or call :meth:`close`).

    Raises:
        DataError: What :func:`read_dicom_series` raises.
        NotStreamable: A series this class does not stream (read it with :func:`read_dicom_series`):
            a single file, colour images, or whole values beyond int32.
    """

    def __init__(self, folder: str | Path, *, series_uid: str | None = None) -> None:
        self._tmp: Path | None = None
        self.path = folder = Path(folder)
        series, headers = _select_series(folder, series_uid)
        if series.n_files == 1:
            raise NotStreamable(f"{folder}: a series of one file is read whole (read_dicom_series)")
        if any(
            _whole(ds, "SamplesPerPixel", 1, where=p) > 1 for p, ds in zip(series.files, headers, strict=True)
        ):
            raise NotStreamable(f"{folder}: colour series are read whole (read_dicom_series)")
        files, hdrs, self.affine, rescales = _stacked_series(folder, series, headers)
        integral = _is_integral(rescales)
        self.meta = _meta(hdrs[0], source=folder, n_slices=len(files), rescales=rescales)
        self.scale, self.offset = None, 0
        self.dtype = np.dtype(np.float32)
        first: tuple[int, ...] = ()
        self._tmp = self.raw = temp_raw_file("dicom")
        try:
            fh = open(self.raw, "wb")  # noqa: SIM115 (reopened when the type widens)
            try:
                for k, (path, ds) in enumerate(zip(files, hdrs, strict=True)):
                    px = _read_slice(path, ds)
                    first = first or px.shape
                    if px.shape != first:
                        raise DataError(
                            f"{path}: decoded slice shape {px.shape} differs from {first} of {files[0]}"
                        )
                    if integral:
                        px = np.rint(px) if np.issubdtype(px.dtype, np.floating) else px
                        lo, hi = _value_range(px)
                        need = _integer_dtype(lo, hi)
                        if need is None:
                            raise NotStreamable(f"{path}: values exceed int32; the series is read whole")
                        if k == 0:
                            self.dtype = need
                        elif not np.iinfo(self.dtype).min <= lo <= hi <= np.iinfo(self.dtype).max:
                            fh = self._widen(fh, np.promote_types(self.dtype, need))
                    # (Y, X) in C order is (X, Y) in Fortran order: the slice's bytes as stored
                    np.ascontiguousarray(px, dtype=self.dtype).tofile(fh)
            finally:
                fh.close()
        except BaseException:
            self.close()
            raise
        self.shape = (int(first[1]), int(first[0]), len(files))

    def _widen(self, fh: Any, dtype: np.dtype) -> Any:
        """Rewrite the slices written so far as ``dtype`` (a later slice needs a wider integer type
        than the first); returns the handle to append to."""
        fh.close()
        old, self._tmp = self._tmp, temp_raw_file("dicom")
        self.raw = self._tmp
        try:
            with open(old, "rb") as src, open(self.raw, "wb") as dst:
                while chunk := src.read(CHUNK_BYTES - CHUNK_BYTES % self.dtype.itemsize):
                    np.frombuffer(chunk, self.dtype).astype(dtype).tofile(dst)
        finally:
            old.unlink(missing_ok=True)
        self.dtype = np.dtype(dtype)
        return open(self.raw, "ab")  # noqa: SIM115


def read_dicom_file(path: str | Path) -> Volume:
    """Read a single DICOM file.

    * 2D projection radiographs (Modality CR/DX/MG/RG/PX/IO/XA/RF, or no ImagePositionPatient):
      a 2D Volume ``(C, X, Y)`` in the pixel frame with affine ``diag(sx, sy, 1, 1)`` — ``sx`` the
      spacing between columns, ``sy`` between rows, from PixelSpacing, else ImagerPixelSpacing, else
      1 (``meta['spacing_source']`` says which). MONOCHROME1 images come back in the MONOCHROME2
      convention (high = bright; ``meta['monochrome1_inverted']``).
    * A single CT/MR slice: a 3D Volume with ``Z == 1``.
    * An (enhanced) multi-frame image: a 3D Volume built from the per-frame functional groups,
      frames sorted along the slice normal and checked like a series.

    Args:
        path: The DICOM file.

    Returns:
        The Volume; ``meta`` as in :func:`read_dicom_series` plus ``file``.

    Raises:
        DataError: Not a DICOM image, geometry that one affine cannot describe, or undecodable pixels.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: no such file" + (" (it is a folder: use read_dicom_series)" if path.is_dir() else "")
        )
    ds = _read_header(path)
    if ds is None:
        raise DataError(f"{path}: not a DICOM file (pydicom cannot parse it); expected a DICOM image file")
    if not _is_image(ds):
        raise DataError(
            f"{path}: DICOM object without an image (Modality {_text(ds, 'Modality') or '?'}, SOP class "
            f"{_text(ds, 'SOPClassUID') or '?'}); expected an image such as CT, MR or a radiograph"
        )
    n = _n_frames(ds)
    if _is_projection(ds):
        if n > 1:
            raise DataError(
                f"{path}: {n}-frame projection image (cine/fluoroscopy, Modality {_text(ds, 'Modality')}); "
                "only single-frame 2D images are supported. Export the frame you need as its own file."
            )
        return _read_projection(path, ds)
    if n > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        planes = _multiframe_planes(ds, where=str(path))
        rescales = [_rescale(ds, f) for f in range(n)]
    else:
        planes = [_classic_plane(ds, where=str(path))]
        rescales = [_rescale(ds)]
    order, affine = _stack_geometry(planes, where=str(path))
    px = _read_pixels(path, ds)
    if px.shape[0] != n:
        raise DataError(f"{path}: header says {n} frame(s), SimpleITK decoded {px.shape[0]}")
    if len(set(rescales)) > 1:
        px = _per_frame_rescale(path, ds, rescales, px)
    array = _stack_to_volume_array(px[order], _is_integral(rescales))
    meta = _meta(ds, source=path, n_slices=n, rescales=rescales)
    meta["file"] = str(path)
    return Volume(array, affine, meta)


def _per_frame_rescale(
    path: Path, ds: Any, rescales: Sequence[tuple[float, float]], px: np.ndarray
) -> np.ndarray:
    """Frames with different slope/intercept. GDCM applies the first frame's rescale to every frame,
    so take the stored values from pydicom instead and apply each frame's own rescale."""
    import pydicom

    if _text(ds, "PhotometricInterpretation") != "MONOCHROME2" or px.ndim != 3:
        raise DataError(
            f"{path}: frames with different rescale slopes/intercepts are only supported for MONOCHROME2 "
            f"images (found {_text(ds, 'PhotometricInterpretation') or '?'})"
        )
    try:
        stored = np.asarray(pydicom.dcmread(str(path)).pixel_array, dtype=np.float64)
    except Exception as exc:  # pydicom raises many types for missing decoders
        raise DataError(
            f"{path}: its frames have different rescale slopes/intercepts and pydicom cannot decode the "
            f"pixel data to apply them ({type(exc).__name__}: {exc}). Decompress it first (`gdcmconv --raw`) "
            "or install a pydicom pixel-data plugin (pylibjpeg)."
        ) from exc
    if stored.size != px.size:  # a header the two decoders read differently (e.g. BitsAllocated)
        raise DataError(
            f"{path}: pydicom decodes {stored.size} pixel values where GDCM decodes {px.size} "
            f"({' x '.join(str(n) for n in px.shape)}); the header's pixel description is inconsistent "
            "(Rows, Columns, NumberOfFrames, BitsAllocated). Export the file again."
        )
    stored = stored.reshape(px.shape)
    slopes = np.array([s for s, _ in rescales])[:, None, None]
    icpts = np.array([i for _, i in rescales])[:, None, None]
    return stored * slopes + icpts


def _read_projection(path: Path, ds: Any) -> Volume:
    spacing, source = None, "default"
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if ds.get(keyword) not in (None, ""):
            s = _floats(ds.get(keyword), 2, where=str(path), keyword=keyword)
            if np.all(s > 0):
                spacing, source = s, keyword
                break
    sy, sx = (float(spacing[0]), float(spacing[1])) if spacing is not None else (1.0, 1.0)
    px = _read_pixels(path, ds)
    if px.shape[0] != 1:
        raise DataError(f"{path}: expected one frame, SimpleITK decoded {px.shape[0]}")
    rescale = _rescale(ds)
    arr3 = _stack_to_volume_array(px, _is_integral([rescale]))  # (C, X, Y, 1)
    meta = _meta(ds, source=path, n_slices=1, rescales=[rescale])
    meta.update({"file": str(path), "spacing_source": source})
    return Volume(np.ascontiguousarray(arr3[..., 0]), np.diag([sx, sy, 1.0, 1.0]), meta)
