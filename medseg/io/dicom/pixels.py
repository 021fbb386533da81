"""Pixel data: checked with pydicom before GDCM decodes it (GDCM allocates what a header declares),
then decoded by SimpleITK/GDCM one file at a time."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DataError
from medseg.io.dicom._headers import (
    _n_frames,
)

logger = logging.getLogger(__name__)


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
