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
from medseg.io._limits import (
    available_memory,
    check_deflate_ratio,
    check_gzip_length,
    check_memory,
    check_raw_length,
    declared_bytes,
    describe_shape,
    refuse_short,
)
from medseg.io._slabs import CHUNK_BYTES, NotStreamable, RawSlabs, temp_raw_file
from medseg.types import Volume, affine_problem

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | Path) -> bool:
    name = str(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def read_nifti(path: str | Path) -> Volume:
    """Read a 2D, 3D or 4D NIfTI file.

    3D files give ``(1, X, Y, Z)``; 2D files ``(1, X, Y)``; 4D files ``(T, X, Y, Z)`` (the fourth
    axis becomes the channel axis; ``meta['ndim_on_disk']`` records 4). Scaled data
    (``scl_slope``) come back as float; unscaled data keep their on-disk dtype.

    Raises:
        DataError: The file cannot be parsed, its affine is unusable, it holds fewer voxels than its
            header declares, or the declared image does not fit in the available memory (all checked
            before the voxels are read).
    """
    path = Path(path)
    img = _load_header(path)
    shape, dtype, offset = _declared(img)
    ndim = len(shape)
    if not (ndim in (2, 3, 4) or (ndim == 5 and shape[3] == 1)):  # (X, Y, Z, 1, C): vector images
        raise DataError(f"{path}: expected a 2D, 3D or 4D image, found {ndim} dimensions {shape}")
    _check_not_empty(path, shape)
    _check_scalar_dtype(path, dtype)
    affine = _checked_affine(path, img, 2 if ndim == 2 else 3)
    check_memory(path, shape, dtype)
    _check_data_length(path, shape, dtype, offset)
    try:
        arr = np.asanyarray(img.dataobj)
    except MemoryError as exc:  # e.g. the float copy of scaled data
        need = declared_bytes(shape, dtype.itemsize)
        raise DataError(
            f"{path}: out of memory reading the {describe_shape(shape, dtype)} image ({need} bytes on "
            f"disk, more once scaled to float); {available_memory()} bytes were available. Free memory or "
            "use a machine with more."
        ) from exc
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise DataError(f"{path}: cannot read as NIfTI ({type(exc).__name__}: {exc})") from exc
    if ndim == 2 or ndim == 3:
        arr = arr[None]
    elif ndim == 4:
        arr = np.moveaxis(arr, -1, 0)
    else:
        arr = np.moveaxis(arr[:, :, :, 0, :], -1, 0)
    # no ascontiguousarray: nibabel gives Fortran order, and a C-order copy would double the peak memory
    return Volume(arr, affine, _meta(path, img.header, ndim))


def _load_header(path: Path) -> Any:
    """``nib.load`` (which reads the header only), with its errors as DataError."""
    import nibabel as nib

    try:
        # nibabel computes the affine while loading; a corrupt header makes numpy warn about NaN or
        # overflow, which means nothing to a user (an unusable affine is refused with a message instead)
        with np.errstate(all="ignore"):
            return nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise DataError(f"{path}: cannot read as NIfTI ({type(exc).__name__}: {exc})") from exc


def _declared(img: Any) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, on-disk dtype and byte offset of the voxels, as the header declares them."""
    # the proxy's offset, not the header field: vox_offset may read 0 ("default") in single files
    return tuple(int(s) for s in img.shape), img.header.get_data_dtype(), int(img.dataobj.offset)


def _check_not_empty(path: Path, shape: tuple[int, ...]) -> None:
    bad = [i for i, n in enumerate(shape) if n <= 0]
    if bad:
        raise DataError(
            f"{path}: the header declares an empty image (shape {shape}, {shape[bad[0]]} voxels along axis "
            f"{bad[0]}); expected at least one voxel along every axis. The header's dim field is corrupt: "
            "export the image again."
        )


def _check_scalar_dtype(path: Path, dtype: np.dtype) -> None:
    """Refuse colour (RGB24/RGBA32, numpy records) and complex voxels: images here are real scalars."""
    if dtype.fields is not None or dtype.kind == "c":
        kind = "colour (RGB/RGBA)" if dtype.fields is not None else "complex"
        raise DataError(
            f"{path}: the voxels are {kind} ({dtype}); expected real scalar voxels (integer or float). "
            "Convert the image first, e.g. to one channel per colour or to magnitude, and save it again."
        )


def _check_data_length(path: Path, shape: tuple[int, ...], dtype: np.dtype, offset: int) -> None:
    """Refuse a file that cannot hold the declared voxels, before nibabel allocates them (it allocates
    and zero-fills the whole image, then finds the file short)."""
    if str(path).lower().endswith(".gz"):
        check_gzip_length(path, shape, dtype, before=offset)
    else:
        check_raw_length(path, shape, dtype, data_start=offset)


def _affine_source(header: Any) -> tuple[str, str | None]:
    """Which header fields nibabel took the affine from, and the other coded transform (if any)."""
    sform, qform = int(header["sform_code"]), int(header["qform_code"])
    if sform != 0:  # nibabel's order: sform, then qform, then pixdim
        return f"sform (sform_code {sform}: srow_x/y/z)", "qform" if qform != 0 else None
    if qform != 0:
        return f"qform (qform_code {qform}: quatern_b/c/d, qoffset and pixdim)", None
    return "pixdim (sform_code and qform_code are both 0)", None


def _stored_pixdim_ok(path: Path, img: Any, spatial_dims: int) -> bool:
    """True if the file's own pixdim (before nibabel's load-time fix, which turns zeros into ones) has
    positive finite voxel sizes, so that a qform built from it describes a real grid."""
    from nibabel.openers import Opener

    try:
        with Opener(str(path)) as fh:
            raw = type(img.header).from_fileobj(fh, check=False)
        sizes = np.asarray(raw["pixdim"][1 : 1 + spatial_dims], dtype=np.float64)
    except Exception:  # unreadable a second time: offer no alternative
        return False
    return bool(np.all(np.isfinite(sizes)) and np.all(sizes > 0))


def _checked_affine(path: Path, img: Any, spatial_dims: int) -> np.ndarray:
    """The image's voxel-to-RAS affine (nibabel's choice, unchanged), refused when unusable."""
    affine = np.asarray(img.affine, dtype=np.float64)
    problem = affine_problem(affine, spatial_dims)
    if problem is None:
        return affine
    used, other = _affine_source(img.header)
    hint = ""
    if other == "qform" and _stored_pixdim_ok(path, img, spatial_dims):
        try:
            with np.errstate(all="ignore"):
                qform = img.header.get_qform()
        except Exception:  # a corrupt quaternion or pixdim: no better transform to offer
            qform = None
        if qform is not None and affine_problem(qform, spatial_dims) is None:
            hint = (
                " The header's qform is usable: if it is right, copy it to the sform "
                "(nibabel: img.set_sform(img.get_qform(), code=1)) and save the image."
            )
    raise DataError(
        f"{path}: the voxel-to-world affine from the header's {used} {problem}; expected finite values "
        "and non-zero voxel axes pointing in independent directions. Fix the header, e.g. with nibabel "
        "img.set_sform(A, code=1) and img.set_qform(A, code=1) for the right matrix A, or export the image "
        f"again.{hint}"
    )


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
        import zlib

        self._tmp: Path | None = None
        self.path = Path(path)
        img = _load_header(self.path)
        if len(img.shape) != 3:
            raise NotStreamable(f"{self.path}: slab reading needs a 3D image, found shape {img.shape}")
        hdr = img.header
        self.shape, self.dtype, offset = _declared(img)
        _check_not_empty(self.path, self.shape)
        _check_scalar_dtype(self.path, self.dtype)
        self.affine = _checked_affine(self.path, img, 3)
        # the proxy's scaling is what nibabel applies (the header's get_slope_inter() can say None)
        slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
        self.scale = None if (slope == 1.0 and inter == 0.0) else (slope, inter)
        self.meta = _meta(self.path, hdr, 3)
        need = declared_bytes(self.shape, self.dtype.itemsize)
        if not str(self.path).lower().endswith(".gz"):
            check_raw_length(self.path, self.shape, self.dtype, data_start=offset)
            self.raw, self.offset = self.path, offset
            return
        # the copy stops at the declared length, so the temporary file never outgrows the image (a
        # corrupt header cannot make it fill the disk); the ratio check refuses hopeless files at once
        check_deflate_ratio(
            self.path, self.shape, self.dtype, compressed=self.path.stat().st_size, before=offset
        )
        self._tmp = temp_raw_file("nifti")
        try:
            with gzip.open(self.path, "rb") as src, open(self._tmp, "wb") as dst:
                src.seek(offset)
                copied = 0
                while copied < need and (chunk := src.read(min(CHUNK_BYTES, need - copied))):
                    dst.write(chunk)
                    copied += len(chunk)
        except (OSError, EOFError, zlib.error) as exc:
            self.close()
            if isinstance(exc, OSError) and not isinstance(exc, gzip.BadGzipFile):
                raise  # e.g. no space for the temporary file: the caller may fall back
            raise DataError(f"{self.path}: cannot decompress ({type(exc).__name__}: {exc})") from exc
        self.raw, self.offset = self._tmp, 0
        if copied < need:
            self.close()
            refuse_short(self.path, self.shape, self.dtype, need=need, have=copied, what="its gzip data hold")
