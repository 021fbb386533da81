"""NIfTI reading and writing with nibabel, keeping the voxel-to-world affine exactly.

NIfTI stores the sform in float32; an affine that came from a NIfTI file therefore round-trips
bit-for-bit. Affines from DICOM (float64) are rounded to float32 precision (< 1e-4 mm for usual
scanner coordinates) — the format's own limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DataError
from medseg.io._atomic import atomic_write
from medseg.io._slabs import CHUNK_BYTES, NotStreamable, RawSlabs, temp_raw_file
from medseg.types import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | Path) -> bool:
    name = str(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def read_nifti(path: str | Path) -> Volume:
    """Read a 2D, 3D or 4D NIfTI file.

    3D files give ``(1, X, Y, Z)``; 2D files ``(1, X, Y)``; 4D files ``(T, X, Y, Z)`` (the fourth
    axis becomes the channel axis; ``meta['ndim_on_disk']`` records 4). Scaled data
    (``scl_slope``) come back as float; unscaled data keep their on-disk dtype.
    """
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        arr = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise DataError(f"{path}: cannot read as NIfTI ({type(exc).__name__}: {exc})") from exc
    ndim = arr.ndim
    if ndim == 2 or ndim == 3:
        arr = arr[None]
    elif ndim == 4:
        arr = np.moveaxis(arr, -1, 0)
    elif ndim == 5 and arr.shape[3] == 1:  # (X, Y, Z, 1, C) vector images
        arr = np.moveaxis(arr[:, :, :, 0, :], -1, 0)
    else:
        raise DataError(f"{path}: expected a 2D, 3D or 4D image, found {ndim} dimensions {arr.shape}")
    # no ascontiguousarray: nibabel gives Fortran order, and a C-order copy would double the peak memory
    return Volume(arr, np.asarray(img.affine, dtype=np.float64), _meta(path, img.header, ndim))


def _meta(path: Path, header: Any, ndim: int) -> dict[str, Any]:
    return {
        "source": str(path),
        "format": "nifti",
        "ndim_on_disk": ndim,
        "sform_code": int(header["sform_code"]),
        "qform_code": int(header["qform_code"]),
    }


def write_nifti(vol: Volume, path: str | Path, *, dtype: Any | None = None) -> Path:
    """Write a Volume as NIfTI atomically (temp file + rename). sform and qform both carry the affine."""
    import nibabel as nib

    path = Path(path)
    arr = vol.array
    if vol.num_channels == 1:
        arr = arr[0]
    else:
        arr = np.moveaxis(arr, 0, -1)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    img = nib.Nifti1Image(arr, vol.affine)
    code = int(vol.meta.get("sform_code", 1) or 1)
    qcode = int(vol.meta.get("qform_code", code) or code)
    img.set_sform(vol.affine, code=code)
    img.set_qform(vol.affine, code=qcode)
    img.header.set_xyzt_units("mm", "sec")
    with atomic_write(path) as tmp:
        nib.save(img, str(tmp))
    return path


class NiftiSlabs(RawSlabs):
    """A 3D single-channel NIfTI opened for reading blocks of voxels, never the whole image.

    Prediction uses it so that memory does not grow with the scan (the label map is the only
    scan-sized array). NIfTI stores voxels in Fortran order: an uncompressed file is read in place; a
    ``.nii.gz`` is decompressed once into a temporary file next to the system temp dir (streamed in
    64 MB chunks), then read the same way. nibabel's ``ArrayProxy`` could slice the gzip stream
    directly, but every backward seek would restart decompression from the file's beginning.

    Has the geometry attributes of :class:`~medseg.types.Volume` (``affine``, ``meta``,
    ``spatial_shape``, ``spacing_mm``, ...) plus :meth:`read_block`, :meth:`read_slab` and
    :meth:`load` (see :class:`~medseg.io._slabs.RawSlabs`); use it as a context manager (or call
    :meth:`close`) to remove the temporary file.
    """

    def __init__(self, path: str | Path) -> None:
        import gzip
        import shutil
        import zlib

        import nibabel as nib

        self._tmp: Path | None = None
        self.path = Path(path)
        try:
            img = nib.load(str(self.path))
        except Exception as exc:  # nibabel raises many types for corrupt files
            raise DataError(f"{self.path}: cannot read as NIfTI ({type(exc).__name__}: {exc})") from exc
        if len(img.shape) != 3:
            raise NotStreamable(f"{self.path}: slab reading needs a 3D image, found shape {img.shape}")
        hdr = img.header
        self.shape = tuple(int(s) for s in img.shape)
        self.dtype = hdr.get_data_dtype()
        # the proxy's scaling is what nibabel applies (the header's get_slope_inter() can say None)
        slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
        self.scale = None if (slope == 1.0 and inter == 0.0) else (slope, inter)
        self.affine = np.asarray(img.affine, dtype=np.float64)
        self.meta = _meta(self.path, hdr, 3)
        offset = int(img.dataobj.offset)  # the header field may read 0 ("default") for single files
        if str(self.path).lower().endswith(".gz"):
            self._tmp = temp_raw_file("nifti")
            try:
                with gzip.open(self.path, "rb") as src, open(self._tmp, "wb") as dst:
                    src.seek(offset)
                    shutil.copyfileobj(src, dst, CHUNK_BYTES)
            except (OSError, EOFError, zlib.error) as exc:
                self.close()
                if isinstance(exc, OSError) and not isinstance(exc, gzip.BadGzipFile):
                    raise  # e.g. no space for the temporary file: the caller may fall back
                raise DataError(f"{self.path}: cannot decompress ({type(exc).__name__}: {exc})") from exc
            self.raw, self.offset = self._tmp, 0
        else:
            self.raw, self.offset = self.path, offset
        need = self.offset + int(np.prod(self.shape)) * self.dtype.itemsize
        if self.raw.stat().st_size < need:
            self.close()
            raise DataError(f"{self.path}: truncated image data ({self.raw.stat().st_size} of {need} bytes)")
