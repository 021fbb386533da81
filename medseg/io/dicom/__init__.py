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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DataError
from medseg.io.dicom._headers import (
    PROJECTION_MODALITIES,
    DicomSeries,
    _classic_plane,
    _floats,
    _is_image,
    _is_projection,
    _meta,
    _multiframe_planes,
    _n_frames,
    _read_header,
    _rescale,
    _text,
)
from medseg.io.dicom.geometry import (
    _check_stack_memory,
    _stack_geometry,
    _stacked_series,
)
from medseg.io.dicom.pixels import _is_integral, _read_pixels, _read_slice, _stack_to_volume_array
from medseg.io.dicom.series import _select_series, list_dicom_series
from medseg.io.dicom.streaming import DicomSlabs
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
