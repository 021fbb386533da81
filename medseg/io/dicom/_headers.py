"""DICOM headers: the series record, slice planes read from the (functional-group) headers, value
conversion and the metadata medseg keeps."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DataError

logger = logging.getLogger(__name__)


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


# headers


def _read_header(path: Path, *, damaged: str = "skip") -> Any | None:
    """pydicom dataset without pixel data, or None if ``path`` is not a DICOM file.

    ``damaged="refuse"`` raises :class:`DataError` (naming the file) instead of returning None: for a
    file that says it is DICOM (preamble or suffix), where skipping it would silently drop a slice.
    """
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
        if damaged == "refuse":
            raise DataError(
                f"{path}: a DICOM file of this folder cannot be read ({type(exc).__name__}: {exc}); the "
                "series would be missing it. Replace the file with an intact copy, or remove it from the "
                "folder if it does not belong to the series"
            ) from None
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


def _is_truncated_image(ds: Any) -> bool:
    """An object of an image storage class whose header ends before the image description: a file cut
    short (pydicom returns what it could parse without complaint)."""
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    classes = [_text(ds, "SOPClassUID"), _text(meta, "MediaStorageSOPClassUID") if meta is not None else ""]
    return not _is_image(ds) and any(c and "Image Storage" in UID(c).name for c in classes)


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
