"""Checks made before a reader allocates what a file's header declares.

A header is a promise, not a fact: a few bytes can declare terabytes of voxels, and the libraries
(nibabel, ITK, GDCM) allocate the declared image — often zero-filling it — before they notice that the
file holds far less. These functions compare the declared size with what the file can hold and with the
memory available, so that a corrupt or hostile header ends in a :class:`~medseg.errors.DataError` that
names the shape instead of a multi-gigabyte allocation or a blank ``MemoryError``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from medseg.errors import DataError
from medseg.units import format_bytes

#: Deflate (gzip, zlib) cannot expand data more than this: its longest match (258 bytes) costs at least
#: two bits, so a compressed stream of ``n`` bytes never decompresses to more than ``1032 * n``.
DEFLATE_MAX_RATIO = 1032
#: Above this many declared bytes a compressed file's length is counted by decompressing it (without
#: keeping the output) before the library reads it: the gzip trailer's length can be forged, and an
#: allocation this size is worth one extra pass over the data.
LARGE_BYTES = 1 << 30
#: Bytes decompressed at a time when counting.
_COUNT_CHUNK = 16 * 2**20


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (``MemAvailable``), or None off Linux."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def describe_shape(shape: Sequence[int], dtype: np.dtype | str | None = None) -> str:
    """``1500 x 1500 x 500 int16``: a declared shape (and element type) for messages."""
    text = " x ".join(str(int(s)) for s in shape) or "scalar"
    return f"{text} {np.dtype(dtype).name}" if dtype is not None else text


def declared_bytes(shape: Sequence[int], itemsize: int) -> int:
    """Bytes of a ``shape`` array of ``itemsize``-byte elements, in Python integers (never overflows)."""
    return math.prod(int(s) for s in shape) * int(itemsize)


def check_memory(path: Path | str, shape: Sequence[int], dtype: np.dtype | str, *, copies: int = 1) -> None:
    """Refuse an image whose declared voxels (times ``copies`` held at once while reading) do not fit in
    the available memory.

    Raises:
        DataError: The message names the shape, dtype, bytes needed and bytes available.
    """
    dt = np.dtype(dtype)
    need = declared_bytes(shape, dt.itemsize) * max(int(copies), 1)
    avail = available_memory()
    if avail is None or need <= avail:
        return
    held = f" ({copies} copies are held while reading)" if copies > 1 else ""
    raise DataError(
        f"{path}: the header declares a {describe_shape(shape, dt)} image, which needs {need} bytes "
        f"({format_bytes(need)}){held} to read, but only {avail} bytes ({format_bytes(avail)}) of memory "
        "are available. If the header is right, read the file on a machine with more memory (or crop it "
        "first); if not, the header is corrupt: re-export the file."
    )


def refuse_short(
    path: Path | str, shape: Sequence[int], dtype: np.dtype | str, *, need: int, have: int, what: str
) -> None:
    """Raise the DataError for a file that holds fewer voxel bytes (``have``) than declared (``need``)."""
    raise DataError(
        f"{path}: the header declares a {describe_shape(shape, dtype)} image ({need} bytes of voxel data), "
        f"but {what} {have} bytes: the file is truncated or its header is corrupt. Copy, download or "
        "export the file again."
    )


def check_raw_length(
    path: Path | str,
    shape: Sequence[int],
    dtype: np.dtype | str,
    *,
    data_start: int,
    file_size: int | None = None,
) -> None:
    """Refuse an uncompressed file shorter than ``data_start`` plus the declared voxel bytes."""
    size = Path(path).stat().st_size if file_size is None else file_size
    need = declared_bytes(shape, np.dtype(dtype).itemsize)
    have = max(size - int(data_start), 0)
    if have < need:
        refuse_short(
            path, shape, dtype, need=need, have=have, what=f"from byte {data_start} on the file holds"
        )


def count_stream(read: BinaryIO, limit: int) -> int:
    """Bytes ``read`` yields, reading at most ``limit`` of them in chunks (nothing is kept)."""
    total = 0
    while total < limit:
        chunk = read.read(min(_COUNT_CHUNK, limit - total))
        if not chunk:
            break
        total += len(chunk)
    return total


def count_zlib(fh: BinaryIO, limit: int, *, wbits: int = zlib.MAX_WBITS) -> int:
    """Decompressed bytes of the zlib stream at ``fh``'s position, counted up to ``limit`` in chunks."""
    d = zlib.decompressobj(wbits)
    total = 0
    while total < limit and not d.eof:
        data = fh.read(2**20)
        if not data:
            break
        while data and total < limit:
            out = d.decompress(data, min(_COUNT_CHUNK, limit - total))
            total += len(out)
            data = d.unconsumed_tail
    return total


def check_deflate_ratio(
    path: Path | str,
    shape: Sequence[int],
    dtype: np.dtype | str,
    *,
    compressed: int,
    before: int = 0,
    expansion: int = 1,
) -> None:
    """Refuse a deflate stream of ``compressed`` bytes whose declared content (``before`` header bytes
    plus the voxels) is more than deflate can produce from it; ``expansion`` is how many bytes of the
    decoded image one decompressed byte can become (e.g. 32 for 1-bit palette PNG read as RGBA)."""
    need = declared_bytes(shape, np.dtype(dtype).itemsize)
    most = DEFLATE_MAX_RATIO * max(int(expansion), 1) * max(int(compressed), 0)
    if before + need > most:
        raise DataError(
            f"{path}: the header declares a {describe_shape(shape, dtype)} image ({need} bytes of voxel "
            f"data), but its {compressed} bytes of compressed data decompress to at most {most} bytes "
            f"(deflate expands {DEFLATE_MAX_RATIO}:1 at most): the file is truncated or its header is "
            "corrupt. Copy, download or export the file again."
        )


def check_gzip_length(
    path: Path | str,
    shape: Sequence[int],
    dtype: np.dtype | str,
    *,
    start: int = 0,
    before: int = 0,
) -> None:
    """Refuse a gzip stream (from byte ``start`` of ``path`` to its end) that cannot hold ``before``
    decompressed bytes followed by the declared voxels.

    Cheap checks first: deflate's maximum ratio, then the gzip trailer (ISIZE, the last member's length
    modulo 2**32). When the trailer disagrees, or the declared size is above :data:`LARGE_BYTES`, the
    stream is decompressed and counted up to the declared length, keeping nothing.
    """
    import gzip

    path = Path(path)
    need = before + declared_bytes(shape, np.dtype(dtype).itemsize)
    size = path.stat().st_size
    check_deflate_ratio(path, shape, dtype, compressed=size - start, before=before)
    with open(path, "rb") as fh:
        if size - start >= 18:  # a gzip member's smallest size: 10-byte header, empty deflate, trailer
            fh.seek(size - 4)
            isize = int.from_bytes(fh.read(4), "little")
            # the trailer is exact for a single member; more data than declared is allowed (NIfTI may
            # carry bytes after the voxels)
            plausible = isize == need % 2**32 or (need < 2**32 and isize > need)
            if plausible and need - before <= LARGE_BYTES:
                return
        fh.seek(start)
        try:
            with gzip.GzipFile(fileobj=fh, mode="rb") as gz:
                have = count_stream(gz, need)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(
                f"{path}: the compressed data are corrupt ({type(exc).__name__}: {exc}); expected a gzip "
                f"stream holding a {describe_shape(shape, dtype)} image. Copy, download or export the file "
                "again."
            ) from exc
    if have < need:
        refuse_short(
            path,
            shape,
            dtype,
            need=need - before,
            have=max(have - before, 0),
            what="its gzip data decompress to",
        )
