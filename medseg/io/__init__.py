"""Reading and writing images with exact geometry. The only package that knows file formats.

:func:`load_volume` accepts NIfTI (``.nii``/``.nii.gz``), NRRD/MetaImage, DICOM series folders,
single DICOM files (2D radiographs), and PNG/JPEG; :func:`save_volume` / :func:`save_label_map`
write NIfTI, NRRD/MHA or PNG by the target's suffix, atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DataError
from medseg.io._files import is_dicom_file
from medseg.labels import label_dtype_for
from medseg.types import Volume

__all__ = ["load_volume", "save_volume", "save_label_map", "describe_volume", "is_dicom_file", "case_id"]


def case_id(path: str | Path, *, channels: int = 1) -> str:
    """Case name of an input: file name without extension(s) and without its nnU-Net channel suffix.

    Only ``_0000`` is a channel suffix for single-channel data (``amos_0500.nii.gz`` is case
    ``amos_0500``, not ``amos``); with ``channels=C`` the suffixes ``_0000`` ... ``_{C-1:04d}`` are.
    """
    import re

    p = Path(path)
    name = p.name
    for suf in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".dcm"):
        if name.lower().endswith(suf):
            name = name[: -len(suf)]
            break
    m = re.search(r"_(\d{4})$", name)
    if m and int(m.group(1)) < max(1, channels):
        name = name[: m.start()]
    return name


def load_volume(path: str | Path, *, series_uid: str | None = None) -> Volume:
    """Read an image or label map into a :class:`~medseg.types.Volume`.

    Args:
        path: NIfTI/NRRD/MHA/PNG/JPEG file, single DICOM file, or DICOM series folder.
        series_uid: For folders holding several DICOM series, which one to read.

    Raises:
        DataError: The file does not exist, has an unknown format or cannot be read, its header
            declares more voxels than the file holds or than fit in the available memory (checked
            before the voxels are allocated), or its voxel-to-world affine is unusable (non-finite,
            zero or singular); the message names the file and what to do.
    """
    from medseg.io.image2d import is_raster, read_raster
    from medseg.io.itkfile import is_itk_file, read_itk_file
    from medseg.io.nifti import is_nifti, read_nifti

    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_dir():
        from medseg.io.dicom import read_dicom_series

        return read_dicom_series(p, series_uid=series_uid)
    if is_nifti(p):
        return read_nifti(p)
    if is_itk_file(p):
        return read_itk_file(p)
    if is_raster(p):
        return read_raster(p)
    if is_dicom_file(p):
        from medseg.io.dicom import read_dicom_file

        return read_dicom_file(p)
    raise DataError(
        f"{p}: unknown image format (suffix {''.join(p.suffixes) or 'none'}); expected .nii/.nii.gz, "
        ".nrrd/.mha, .png/.jpg, a DICOM file, or a DICOM series folder"
    )


def save_volume(vol: Volume, path: str | Path, *, dtype: Any | None = None) -> Path:
    """Write a Volume by the suffix of ``path`` (NIfTI, NRRD/MHA, PNG), atomically.

    Refuses to write over the Volume's own source file, so outputs never overwrite inputs.
    """
    from medseg.io.image2d import is_raster, write_raster
    from medseg.io.itkfile import is_itk_file, write_itk_file
    from medseg.io.nifti import is_nifti, write_nifti

    p = Path(path)
    src = vol.meta.get("source")
    if src is not None and Path(src).exists() and p.exists() and p.resolve() == Path(src).resolve():
        raise DataError(f"{p}: refusing to overwrite the input file this volume was read from")
    if is_nifti(p):
        return write_nifti(vol, p, dtype=dtype)
    if dtype is not None:
        vol = vol.with_array(vol.array.astype(dtype))
    if is_itk_file(p):
        return write_itk_file(vol, p)
    if is_raster(p):
        return write_raster(vol, p)
    raise DataError(f"{p}: cannot write this format; use .nii.gz, .nrrd, .mha or .png")


def label_dtype(array: np.ndarray, *, where: str = "label map") -> np.dtype:
    """uint8 if all labels fit in 0..255, else uint16; raises for negative, fractional or > 65535."""
    if array.size == 0:
        return np.dtype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer) and not np.issubdtype(array.dtype, np.bool_):
        if not np.all(np.isfinite(array)) or not np.all(np.mod(array, 1) == 0):
            raise DataError(f"{where}: label values must be whole numbers, found fractional/NaN values")
    lo, hi = array.min(), array.max()
    if lo < 0 or hi > 65535:
        raise DataError(f"{where}: label values must be in 0..65535, found {lo}..{hi}")
    return label_dtype_for(int(hi))


def save_label_map(vol: Volume, path: str | Path) -> Path:
    """Write an integer label map as uint8 (labels <= 255) or uint16, keeping the affine exactly."""
    if vol.num_channels != 1:
        raise DataError(f"{path}: a label map has one channel, got {vol.num_channels}")
    dtype = label_dtype(vol.array, where=str(path))
    return save_volume(vol.with_array(vol.array.astype(dtype, copy=False)), path, dtype=dtype)


def describe_volume(vol: Volume) -> dict[str, Any]:
    """Geometry and intensity summary used by ``medseg info``.

    Keys: ``shape`` (spatial shape; a trailing channel count when C > 1), ``spacing`` (mm),
    ``orientation`` (e.g. ``RAS``), ``origin`` (RAS mm of voxel 0), ``affine`` (4x4 voxel->RAS),
    ``dtype``, ``min``, ``max``.
    """
    arr = vol.array
    shape = list(vol.spatial_shape) + ([vol.num_channels] if vol.num_channels > 1 else [])
    finite = arr[np.isfinite(arr)] if np.issubdtype(arr.dtype, np.floating) else arr
    lo = finite.min().item() if finite.size else float("nan")
    hi = finite.max().item() if finite.size else float("nan")
    return {
        "shape": shape,
        "spacing": [round(s, 6) for s in vol.spacing_mm],
        "orientation": vol.orientation,
        "origin": [round(v, 6) for v in vol.origin_mm],
        "affine": [[round(float(v), 6) for v in row] for row in vol.affine],
        "dtype": str(arr.dtype),
        "min": lo,
        "max": hi,
    }
