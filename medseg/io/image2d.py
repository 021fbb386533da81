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
from medseg.io._limits import check_deflate_ratio
from medseg.types import Volume

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def is_raster(path: str | Path) -> bool:
    return str(path).lower().endswith(RASTER_SUFFIXES)


def read_raster(path: str | Path) -> Volume:
    """Read a 2D PNG/JPEG/BMP/TIFF image as a single-channel ``(1, X, Y)`` Volume."""
    from medseg.io._sitk import read_sitk_image, sitk_to_volume

    path = Path(path)
    png = str(path).lower().endswith(".png")
    _check_with_pillow(path, strict=png)
    img = read_sitk_image(path, what="a 2D image", check=_check_png_length if png else None)
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


def _check_with_pillow(path: Path, *, strict: bool) -> None:
    """Refuse a decompression bomb (Pillow's limit on the pixel count) and, with ``strict``, a file whose
    structure Pillow finds broken (PNG: a chunk running past the end of the file, a bad checksum).

    ITK's PNG reader allocates what a corrupt chunk length declares while it reads the header, before
    any size can be checked; Pillow reads chunks in bounded blocks. Pillow is not strict for other
    formats, where it may not know a variant ITK decodes (e.g. some JPEG processes): only its size
    limit applies to them.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            if strict:
                im.verify()
    except Image.DecompressionBombError as exc:
        raise DataError(
            f"{path}: {exc} The file declares more pixels than any radiograph has; if it is right, "
            "downsample it first (its header may be corrupt)."
        ) from exc
    except MemoryError as exc:
        raise DataError(f"{path}: out of memory checking the image; its header is corrupt") from exc
    except Exception as exc:  # Pillow raises many types for broken files (SyntaxError, OSError, ...)
        if strict:
            raise DataError(
                f"{path}: cannot read as a 2D image: the file is corrupt ({type(exc).__name__}: {exc}); "
                "expected a complete PNG file. Copy or export it again."
            ) from exc


def _check_png_length(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Refuse a PNG whose declared pixels are more than its deflate-compressed data can hold: a bomb
    or a corrupt header, refused before the pixel buffer is allocated (libpng checks only after)."""
    # a 1-bit palette pixel becomes four 8-bit RGBA bytes: 32 bytes of image per decompressed byte
    check_deflate_ratio(path, shape, dtype, compressed=path.stat().st_size, expansion=32)


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
