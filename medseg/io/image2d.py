"""2D raster images (PNG/JPEG/BMP/TIFF) via SimpleITK, in a pixel frame.

Raster files have no patient geometry: the Volume's affine is ``diag(sx, sy, 1, 1)`` with ``x``
along image columns and ``y`` along rows (spacing 1 unless the file records one). RGB(A) images
whose colour channels are equal (the usual grey X-ray saved as RGB) become one channel; true
colour images are converted to luminance (ITU-R BT.601 weights) with a note in ``meta``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.errors import DataError
from medseg.types import Volume

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def is_raster(path: str | Path) -> bool:
    return str(path).lower().endswith(RASTER_SUFFIXES)


def read_raster(path: str | Path) -> Volume:
    """Read a 2D PNG/JPEG/BMP/TIFF image as a single-channel ``(1, X, Y)`` Volume."""
    import SimpleITK as sitk

    from medseg.io._sitk import sitk_to_volume

    path = Path(path)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DataError(f"{path}: cannot read as a 2D image ({str(exc).strip().splitlines()[-1]})") from exc
    if img.GetDimension() != 2:
        raise DataError(f"{path}: expected a 2D image, found {img.GetDimension()} dimensions {img.GetSize()}")
    vol = sitk_to_volume(img, meta={"source": str(path), "format": "raster"})
    arr = vol.array
    meta = dict(vol.meta)
    if arr.shape[0] == 4:  # drop alpha
        arr = arr[:3]
    if arr.shape[0] == 3:
        if np.array_equal(arr[0], arr[1]) and np.array_equal(arr[0], arr[2]):
            arr = arr[:1]
        else:
            w = np.array([0.299, 0.587, 0.114], dtype=np.float32)[:, None, None]
            arr = (arr.astype(np.float32) * w).sum(axis=0, keepdims=True)
            meta["converted"] = "RGB to luminance (BT.601)"
    elif arr.shape[0] == 2:  # grey + alpha
        arr = arr[:1]
    return Volume(np.ascontiguousarray(arr), vol.affine, meta)


def write_raster(vol: Volume, path: str | Path) -> Path:
    """Write a single-channel 2D Volume as PNG (uint8 or uint16), atomically."""
    import SimpleITK as sitk

    from medseg.io._atomic import atomic_write
    from medseg.io._sitk import volume_to_sitk

    path = Path(path)
    if vol.spatial_dims != 2 or vol.num_channels != 1:
        raise DataError(f"{path}: PNG needs a single-channel 2D volume, got array shape {vol.array.shape}")
    arr = vol.array
    if arr.dtype not in (np.uint8, np.uint16):
        if arr.min() < 0 or arr.max() > 65535 or not np.all(np.equal(np.mod(arr, 1), 0)):
            raise DataError(f"{path}: PNG stores integers 0..65535; got values {arr.min()}..{arr.max()}")
        arr = arr.astype(np.uint8 if arr.max() <= 255 else np.uint16)
    img = volume_to_sitk(vol.with_array(arr))
    with atomic_write(path) as tmp:
        sitk.WriteImage(img, str(tmp))
    return path
