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
    header = img.header
    meta: dict[str, Any] = {
        "source": str(path),
        "format": "nifti",
        "ndim_on_disk": ndim,
        "sform_code": int(header["sform_code"]),
        "qform_code": int(header["qform_code"]),
    }
    # no ascontiguousarray: nibabel gives Fortran order, and a C-order copy would double the peak memory
    return Volume(arr, np.asarray(img.affine, dtype=np.float64), meta)


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
