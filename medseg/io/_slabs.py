"""Block reading from a raw voxel file, for scans that prediction streams instead of loading whole.

:class:`RawSlabs` is the part shared by :class:`medseg.io.nifti.NiftiSlabs` (a NIfTI file's voxels,
decompressed to a temporary file when gzipped) and :class:`medseg.io.dicom.DicomSlabs` (a DICOM
series decoded once, slice by slice, into a temporary file): a 3D single-channel image stored in
Fortran order (x fastest, then y, then z) at a byte offset in a file. Any box of voxels can be read,
along any axis, with memory bounded by the box: the file is mapped ``_MAP_BYTES`` of z-slices at a
time (a mapped page counts in the process's resident memory until it is unmapped), so reading
``[:, j0:j1, :]`` of a sagittally stored scan touches only the rows it needs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DataError
from medseg.io._atomic import host_tag, process_alive
from medseg.types import Volume

#: Bytes mapped (or copied) at a time when reading and writing the raw files.
CHUNK_BYTES = 64 * 2**20
_MAP_BYTES = CHUNK_BYTES


def temp_raw_file(kind: str) -> Path:
    """A new empty temporary file ``medseg-<kind>-<pid>-<host>-*.raw`` in the system temp dir
    (``TMPDIR``).

    The files hold decoded patient images; a process killed with SIGKILL cannot remove its own, so
    each new one first removes those of processes of this host that no longer exist
    (:func:`sweep_stale_temp_files`).
    """
    sweep_stale_temp_files()
    fd, name = tempfile.mkstemp(prefix=f"medseg-{kind}-{os.getpid()}-{host_tag()}-", suffix=".raw")
    os.close(fd)
    return Path(name)


def sweep_stale_temp_files(folder: str | Path | None = None) -> list[Path]:
    """Remove ``medseg-<kind>-<pid>-<host>-*.raw`` files in ``folder`` (default: the system temp dir)
    made on this host by a process that no longer runs; returns the files removed."""
    removed = []
    host = host_tag()
    for path in Path(folder or tempfile.gettempdir()).glob("medseg-*-*-*-*.raw"):
        parts = path.name.split("-")
        if len(parts) < 5 or not parts[2].isdigit() or parts[3] != host:
            continue
        pid = int(parts[2])
        if pid == os.getpid() or process_alive(pid):
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError:  # another process swept it first, or it is not ours to remove
            pass
    return removed


class NotStreamable(DataError):
    """The input is valid but is not read by blocks (e.g. a 4D NIfTI, a one-file DICOM series): load
    it whole instead."""


class RawSlabs:
    """A 3D single-channel image in a raw Fortran-order file, read by blocks (never held whole).

    Subclasses set ``path``, ``raw``, ``offset``, ``shape``, ``dtype``, ``scale`` (``None`` or
    ``(slope, intercept)``), ``affine`` and ``meta``, and may own a temporary file ``_tmp`` that
    :meth:`close` removes. The object has the geometry attributes of :class:`~medseg.types.Volume`
    (``affine``, ``meta``, ``spatial_shape``, ``spacing_mm``, ``spatial_dims``, ``num_channels``).
    """

    spatial_dims = 3
    num_channels = 1
    _tmp: Path | None = None
    path: Path
    raw: Path
    offset: int
    shape: tuple[int, int, int]
    dtype: np.dtype
    scale: tuple[float, float] | None
    affine: np.ndarray
    meta: dict[str, Any]

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.shape

    @property
    def spacing_mm(self) -> tuple[float, ...]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    def read_block(self, index: tuple[slice, slice, slice]) -> np.ndarray:
        """Voxels ``[index]`` (three unit-step slices) as ``(1, nx, ny, nz)``; float32 when scaled."""
        (i0, i1, _), (j0, j1, _), (k0, k1, _) = (s.indices(n) for s, n in zip(index, self.shape, strict=True))
        nx, ny, _ = self.shape
        out = np.empty((max(i1 - i0, 0), max(j1 - j0, 0), max(k1 - k0, 0)), self.dtype, order="F")
        plane = nx * ny * self.dtype.itemsize
        step = max(1, _MAP_BYTES // max(plane, 1))
        for a in range(k0, k1, step):
            b = min(k1, a + step)
            mm = np.memmap(
                self.raw, self.dtype, "r", offset=self.offset + a * plane, shape=(nx, ny, b - a), order="F"
            )
            out[:, :, a - k0 : b - k0] = mm[i0:i1, j0:j1]
            del mm  # unmap: its pages leave the resident set
        if self.scale is not None:
            out = out.astype(np.float32) * np.float32(self.scale[0]) + np.float32(self.scale[1])
        return out[None]

    def read_slab(self, z0: int, z1: int) -> np.ndarray:
        """Slices ``z0:z1`` as ``(1, X, Y, z1 - z0)``."""
        return self.read_block((slice(None), slice(None), slice(z0, z1)))

    def load(self) -> Volume:
        """The whole image as a Volume."""
        return Volume(self.read_slab(0, self.shape[-1]), self.affine.copy(), dict(self.meta))

    def close(self) -> None:
        """Remove the temporary file (if any)."""
        if getattr(self, "_tmp", None) is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def __enter__(self) -> RawSlabs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
