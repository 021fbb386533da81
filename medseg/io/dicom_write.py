"""Write a 3D :class:`~medseg.types.Volume` as a DICOM series (one single-frame file per slice).

The series uses explicit VR little endian and the Image Plane module with the exact geometry of the
Volume: ``ImageOrientationPatient`` and ``ImagePositionPatient`` are the affine's first two columns and
per-slice origins converted from RAS to DICOM's LPS frame. Pixel data are stored as integers with
``RescaleSlope``/``RescaleIntercept`` (identity for integer-valued data such as HU).

Geometry mapping (``Volume.array`` is ``(1, X, Y, Z)``, voxel ``(i, j, k)``):

* DICOM ``Columns`` = X (index ``i`` runs along a row), ``Rows`` = Y (index ``j`` runs down a column);
  the pixel matrix of slice ``k`` is ``array[0, :, :, k].T``.
* ``ImageOrientationPatient`` = (direction of ``i``, direction of ``j``) in LPS.
* ``PixelSpacing`` = (spacing between rows = step along ``j``, spacing between columns = step along ``i``).
* ``ImagePositionPatient`` of slice ``k`` = LPS position of voxel ``(0, 0, k)``.

DICOM readers stack slices by their position along the normal ``row x column`` direction, which
always gives a right-handed grid. A left-handed Volume (e.g. ``LAS``) is therefore written with its
slice axis reversed so that ``InstanceNumber`` order agrees with the position order; readers then
return the same voxels at the same world positions, with the slice axis pointing the other way.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np

from medseg.errors import DataError
from medseg.io._atomic import temp_tag
from medseg.types import Volume

__all__ = ["write_dicom_series"]

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
_SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters) for ``value``."""
    from pydicom.valuerep import format_number_as_ds

    v = float(value)
    if abs(v) < 5e-13:
        v = 0.0
    return str(format_number_as_ds(v))


def _pixel_encoding(arr: np.ndarray, where: str) -> tuple[np.ndarray, int, float, float]:
    """Integer pixel array, PixelRepresentation, RescaleSlope and RescaleIntercept for ``arr``.

    Integer-valued data within int16 (or uint16) are stored as they are (slope 1, intercept 0);
    other data are scaled linearly onto the int16 range.
    """
    if arr.dtype == np.bool_:
        arr = arr.astype(np.int16)
    if arr.size == 0:
        raise DataError(f"{where}: cannot write an empty volume as DICOM")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise DataError(f"{where}: the volume has NaN or infinite values; DICOM pixel data are integers")
    lo, hi = float(arr.min()), float(arr.max())
    integral = np.issubdtype(arr.dtype, np.integer) or bool(np.all(np.mod(arr, 1) == 0))
    if integral and lo >= -32768 and hi <= 32767:
        return arr.astype(np.int16), 1, 1.0, 0.0
    if integral and lo >= 0 and hi <= 65535:
        return arr.astype(np.uint16), 0, 1.0, 0.0
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    intercept = lo + 32768.0 * slope
    scaled = np.clip(np.rint((arr.astype(np.float64) - intercept) / slope), -32768, 32767)
    return scaled.astype(np.int16), 1, slope, intercept


def _default_uid(kind: str, *parts: object) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[f"medseg-dicom-{kind}", *[str(p) for p in parts]]))


def _content_hash(vol: Volume) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(vol.array).tobytes())
    h.update(np.ascontiguousarray(vol.affine).tobytes())
    h.update(str(vol.array.dtype).encode())
    return h.hexdigest()


def _prepare_target(folder: Path) -> None:
    """Refuse to replace a folder that holds anything but a series this writer could have made."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise DataError(
            f"{folder}: exists and is not a folder; choose another output path for the DICOM series"
        )
    foreign = [
        p.name
        for p in folder.iterdir()
        if not (p.is_file() and p.name.startswith("IM") and p.suffix == ".dcm")
    ]
    if foreign:
        raise DataError(
            f"{folder}: the folder exists and holds other files ({', '.join(sorted(foreign)[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); write the DICOM series to a new or empty folder"
        )


def write_dicom_series(
    vol: Volume,
    folder: str | Path,
    *,
    modality: str = "CT",
    patient_id: str = "PHANTOM",
    patient_name: str = "Phantom^Synthetic",
    series_description: str = "",
    study_uid: str | None = None,
    series_uid: str | None = None,
    study_date: str | None = None,
) -> Path:
    """Write a single-channel 3D Volume as a DICOM series ``folder/IM0001.dcm, IM0002.dcm, ...``.

    The files are written to a temporary sibling folder that is renamed into place at the end, so a
    reader never sees half a series. An existing ``folder`` that holds only ``IM*.dcm`` files (an
    earlier run) is replaced; any other existing content makes the call fail.

    Args:
        vol: ``(1, X, Y, Z)`` Volume; values are stored as integers (HU for CT). Shear-free affines only.
        folder: Output folder (created).
        modality: DICOM modality; ``CT`` and ``MR`` use CT/MR Image Storage, anything else Secondary
            Capture.
        patient_id: ``PatientID``.
        patient_name: ``PatientName`` (DICOM person name, ``Family^Given``).
        series_description: ``SeriesDescription``.
        study_uid: ``StudyInstanceUID``; by default derived from the patient id, so series of one
            patient share a study.
        series_uid: ``SeriesInstanceUID``; by default derived from the pixel data and geometry, so
            writing the same Volume twice gives the same UIDs. SOP instance UIDs derive from it.
        study_date: ``YYYYMMDD``; default today (with the current time). With an explicit date the
            time is ``120000`` and the output is fully reproducible.

    Returns:
        ``folder``.

    Raises:
        DataError: The Volume is not single-channel 3D, has shear, NaNs, or the folder holds other files.

    Long because it writes a DICOM object's modules attribute by attribute, in the standard's order.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    folder = Path(folder)
    if vol.spatial_dims != 3 or vol.num_channels != 1:
        raise DataError(
            f"{folder}: a DICOM series needs a single-channel 3D volume, got array shape {vol.array.shape}"
        )
    affine = vol.affine
    lin = affine[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    if np.any(spacing <= 0):
        raise DataError(f"{folder}: the affine has a zero-length voxel axis: {affine.tolist()}")
    unit = lin / spacing
    if not np.allclose(unit.T @ unit, np.eye(3), atol=1e-4):
        raise DataError(f"{folder}: the affine has shear, which DICOM cannot represent; write NIfTI instead")
    arr = vol.array[0]
    if np.linalg.det(unit) < 0:  # left-handed: reverse the slice axis (see module docstring)
        arr = arr[:, :, ::-1]
        affine = affine.copy()
        affine[:3, 3] = affine[:3, 3] + lin[:, 2] * (arr.shape[2] - 1)
        affine[:3, 2] = -lin[:, 2]
        lin = affine[:3, :3]
        unit = lin / spacing
    pixels, pixel_rep, slope, intercept = _pixel_encoding(arr, str(folder))

    m_lps = _RAS_TO_LPS @ lin
    t_lps = _RAS_TO_LPS @ affine[:3, 3]
    row_dir = m_lps[:, 0] / spacing[0]  # direction of increasing column index i
    col_dir = m_lps[:, 1] / spacing[1]  # direction of increasing row index j
    normal = np.cross(row_dir, col_dir)
    nx, ny, nz = arr.shape

    modality = modality.upper()
    sop_class = _SOP_CLASSES.get(modality, _SECONDARY_CAPTURE)
    if study_uid is None:
        study_uid = _default_uid("study", patient_id, patient_name)
    if series_uid is None:
        series_uid = _default_uid("series", study_uid, series_description, modality, _content_hash(vol))
    frame_uid = _default_uid("frame", series_uid)
    if study_date is None:
        now = _dt.datetime.now()
        study_date, study_time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    else:
        study_time = "120000"

    _prepare_target(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{temp_tag()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    width = max(4, len(str(nz)))
    try:
        for k in range(nz):
            pos = t_lps + m_lps[:, 2] * k
            meta = FileMetaDataset()
            sop_uid = _default_uid("instance", series_uid, k)
            meta.MediaStorageSOPClassUID = sop_class
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID = sop_class
            ds.SOPInstanceUID = sop_uid
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.FrameOfReferenceUID = frame_uid
            ds.Modality = modality
            ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
            ds.Manufacturer = "medseg"
            ds.PatientName = patient_name
            ds.PatientID = patient_id
            ds.PatientBirthDate = ""
            ds.PatientSex = ""
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = study_time
            ds.StudyID = "1"
            ds.AccessionNumber = ""
            ds.ReferringPhysicianName = ""
            ds.SeriesNumber = 1
            ds.SeriesDescription = series_description
            ds.InstanceNumber = k + 1
            ds.PositionReferenceIndicator = ""
            ds.ImagePositionPatient = [_ds(v) for v in pos]
            ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
            ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]
            ds.SliceThickness = _ds(spacing[2])
            ds.SpacingBetweenSlices = _ds(spacing[2])
            ds.SliceLocation = _ds(float(np.dot(pos, normal)))
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = ny
            ds.Columns = nx
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = pixel_rep
            ds.RescaleIntercept = _ds(intercept)
            ds.RescaleSlope = _ds(slope)
            if modality == "CT":
                ds.RescaleType = "HU"
                ds.WindowCenter = "40"
                ds.WindowWidth = "400"
            plane = np.ascontiguousarray(pixels[:, :, k].T)  # (rows=Y, columns=X)
            ds.PixelData = plane.astype(plane.dtype.newbyteorder("<"), copy=False).tobytes()
            ds.save_as(tmp / f"IM{k + 1:0{width}d}.dcm", enforce_file_format=True)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
