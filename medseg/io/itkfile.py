"""NRRD / MetaImage (.nrrd, .nhdr, .mha, .mhd) via SimpleITK.

SimpleITK parses the files and decodes the voxels. Before it does, the size the header declares is
checked against the data the file holds: ITK allocates and zero-fills the declared image before it
reads a voxel (NRRD), or returns it with the missing voxels unset (compressed MetaImage). SimpleITK
does not expose a file's encoding or where its data start, so the few header fields that say so
(NRRD ``encoding``/``data file``/``byte skip``, MetaImage ``CompressedData``/``ElementDataFile``/
``HeaderSize``) are read here; everything else comes from ``ReadImageInformation``. A header line
holding binary bytes, or a data file name with a ``%`` that is not a numbered file pattern, is refused
as corrupt before ITK reads the voxels: its MetaImage reader can crash the process on such headers.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np

from medseg.errors import DataError
from medseg.io._limits import (
    check_deflate_ratio,
    check_gzip_length,
    check_raw_length,
    count_stream,
    count_zlib,
    declared_bytes,
    describe_shape,
    refuse_short,
)
from medseg.types import Volume

ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
#: The longest header read when looking for the data's encoding and start.
_HEADER_LIMIT = 2**20


def is_itk_file(path: str | Path) -> bool:
    return str(path).lower().endswith(ITK_SUFFIXES)


def read_itk_file(path: str | Path) -> Volume:
    """Read an NRRD/MetaImage file (2D or 3D, scalar or vector) into a Volume.

    Raises:
        DataError: The file cannot be parsed or decoded, it is 4D, it holds fewer voxels than its
            header declares, or the declared image does not fit in the available memory.
    """
    from medseg.io._sitk import read_sitk_image, sitk_to_volume

    path = Path(path)
    img = read_sitk_image(path, what="NRRD/MetaImage", check=check_itk_data_length)
    if img.GetDimension() == 4:
        raise DataError(
            f"{path}: 4D images are not supported here (size {img.GetSize()}); split the 4th axis"
        )
    if img.GetDimension() not in (2, 3):
        raise DataError(
            f"{path}: expected a 2D or 3D image, found {img.GetDimension()}D size {img.GetSize()}"
        )
    return sitk_to_volume(img, meta={"source": str(path), "format": "itk"})


def check_itk_data_length(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Refuse an NRRD or MetaImage file whose data cannot hold the declared voxels.

    Files whose data this does not locate (a list of data files, unknown encodings, a header longer
    than 1 MiB) pass unchecked; the memory check still bounds what ITK allocates for them.
    """
    head = _read_head(path)
    if head.startswith(b"NRRD"):
        _check_nrrd(path, head, shape, dtype)
    elif str(path).lower().endswith((".mha", ".mhd")):
        _check_metaimage(path, head, shape, dtype)


def _read_head(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(_HEADER_LIMIT)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc


#: Bytes that never occur in a text header (controls other than tab, CR, LF, form feed; DEL).
_BINARY = re.compile(rb"[\x00-\x08\x0b\x0e-\x1f\x7f]")
#: A numbered series of data files: ``slice%03d.raw <first> <last> <step> [<sub-dimension>]``.
_FILE_PATTERN = re.compile(r"[^%\s]*%0?\d*d[^%\s]*( +-?\d+){3,4}")


def _header_fields(
    path: Path, head: bytes, sep: bytes, last: str | None
) -> tuple[dict[str, str], int | None]:
    """``key<sep>value`` lines of a text header and the byte where the data start (None if unknown).

    The header ends at an empty line (NRRD) or after the line whose key is ``last`` (MetaImage).

    Raises:
        DataError: A header line holds binary bytes: the header is corrupt, e.g. its last line ran
            into the data (ITK's MetaImage reader can then crash the process).
    """
    fields: dict[str, str] = {}
    pos, number = 0, 0
    while pos < len(head):
        end = head.find(b"\n", pos)
        end = len(head) if end < 0 else end  # the last line may lack its newline (a detached header)
        line = head[pos:end].rstrip(b"\r")
        pos, number = end + 1, number + 1
        if not line and last is None:
            return fields, pos
        if (bad := _BINARY.search(line)) is not None:
            raise DataError(
                f"{path}: header line {number} holds the binary byte 0x{line[bad.start()]:02x} "
                f"({line[:60]!r}...); expected text lines up to the data. The header is corrupt: export "
                "the file again."
            )
        key, found, value = line.partition(sep)
        if found and not line.startswith(b"#"):
            name = key.strip().decode("latin-1")
            fields[name] = value.strip().decode("latin-1")
            if last is not None and name == last:
                return fields, min(pos, len(head))
    return fields, None


def _data_file(path: Path, name: str | None) -> Path | None:
    """The detached data file a header names (relative to the header's folder); None for several
    files (a list or a numbered pattern), which are not checked.

    Raises:
        DataError: A ``%`` that is not a numbered file pattern (the readers pass it to ``sprintf``).
    """
    if name is None:
        return path
    if "%" in name and not _FILE_PATTERN.fullmatch(name):
        raise DataError(
            f"{path}: the data file {name!r} holds a '%' but is not a numbered file pattern "
            "(e.g. 'slice%03d.raw 1 40 1'); the header is corrupt. Export the file again."
        )
    if name.upper().startswith("LIST") or "%" in name or len(name.split()) > 1:
        return None
    return path.parent / name


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _check_nrrd(path: Path, head: bytes, shape: tuple[int, ...], dtype: np.dtype) -> None:
    fields, start = _header_fields(path, head, b":", None)
    name = fields.get("data file", fields.get("datafile"))
    data = _data_file(path, name)
    if data is None:
        return
    if data == path:
        if start is None:  # no end of header within the limit: ITK reports what is wrong
            return
    else:
        start = 0
        if not data.is_file():
            raise DataError(f"{path}: its data file {data} does not exist; expected it next to the header")
    encoding = fields.get("encoding", "").lower()
    skip = _int(fields.get("byte skip", fields.get("byteskip")), 0)
    size = data.stat().st_size
    if encoding == "raw":
        # byte skip -1: the data are the file's last bytes, so any file at least that long holds them
        check_raw_length(
            data, shape, dtype, data_start=start + max(skip, 0) if skip >= 0 else 0, file_size=size
        )
    elif encoding in ("gz", "gzip"):
        check_gzip_length(data, shape, dtype, start=start, before=max(skip, 0))
    elif encoding in ("bz2", "bzip2"):
        import bz2

        need = max(skip, 0) + declared_bytes(shape, dtype.itemsize)
        with open(data, "rb") as fh:
            fh.seek(start)
            try:
                with bz2.BZ2File(fh) as bz:
                    have = count_stream(bz, need)
            except (OSError, EOFError, ValueError) as exc:
                raise DataError(f"{data}: the bzip2 data are corrupt ({type(exc).__name__}: {exc})") from exc
        if have < need:
            refuse_short(data, shape, dtype, need=need, have=have, what="its bzip2 data decompress to")
    elif encoding in ("txt", "text", "ascii", "hex"):
        n = declared_bytes(shape, 1)
        # each text value takes a digit and a separator at least; hex takes two digits per byte
        least = 2 * n * dtype.itemsize if encoding == "hex" else 2 * n - 1
        if size - start < least:
            raise DataError(
                f"{data}: the header declares a {describe_shape(shape, dtype)} image in {encoding} "
                f"encoding, which takes at least {least} bytes, but the file holds {max(size - start, 0)} "
                "bytes after its header: the file is truncated or its header is corrupt. Export the file "
                "again."
            )


def _check_metaimage(path: Path, head: bytes, shape: tuple[int, ...], dtype: np.dtype) -> None:
    fields, start = _header_fields(path, head, b"=", "ElementDataFile")
    name = fields.get("ElementDataFile")
    if name is None or start is None:
        return
    data = _data_file(path, None if name.upper() == "LOCAL" else name)
    if data is None:
        return
    if data != path:
        if not data.is_file():
            raise DataError(f"{path}: its data file {data} does not exist; expected it next to the header")
        start = max(_int(fields.get("HeaderSize"), 0), 0)
    size = data.stat().st_size
    if fields.get("CompressedData", "").lower() != "true":
        if _int(fields.get("HeaderSize"), 0) == -1:  # the data are the file's last bytes
            start = 0
        check_raw_length(data, shape, dtype, data_start=start, file_size=size)
        return
    compressed = _int(fields.get("CompressedDataSize"), size - start)
    compressed = min(max(compressed, 0), size - start)
    check_deflate_ratio(data, shape, dtype, compressed=compressed)
    need = declared_bytes(shape, dtype.itemsize)
    # counted always: ITK's MetaImage reader only prints a warning when the data end early
    with open(data, "rb") as fh:
        fh.seek(start)
        try:
            have = count_zlib(fh, need, wbits=47)  # 32 + 15: zlib or gzip header, as MetaIO accepts
        except zlib.error as exc:
            raise DataError(f"{data}: the compressed data are corrupt ({type(exc).__name__}: {exc})") from exc
    if have < need:
        refuse_short(data, shape, dtype, need=need, have=have, what="its compressed data decompress to")


def write_itk_file(vol: Volume, path: str | Path) -> Path:
    """Write a single-channel Volume as NRRD/MetaImage (compressed), atomically."""
    import SimpleITK as sitk

    from medseg.io._atomic import atomic_write
    from medseg.io._sitk import volume_to_sitk

    path = Path(path)
    img = volume_to_sitk(vol)
    with atomic_write(path) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=True)
    return path
