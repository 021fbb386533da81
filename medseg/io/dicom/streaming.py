"""A series decoded once, slice by slice, into a temporary raw file that prediction reads by blocks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DataError
from medseg.io._slabs import CHUNK_BYTES, NotStreamable, RawSlabs, temp_raw_file
from medseg.io.dicom._headers import (
    _meta,
    _whole,
)
from medseg.io.dicom.geometry import _stacked_series
from medseg.io.dicom.pixels import (
    _integer_dtype,
    _is_integral,
    _read_slice,
    _value_range,
)
from medseg.io.dicom.series import (
    _select_series,
)

logger = logging.getLogger(__name__)


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
