"""Atomic file writes, the one way medseg writes a file: write to a temporary sibling with the same
suffixes, then rename it over the target, so a crash never leaves a half-written file under the final
name (and a reader never sees one)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medseg.errors import DataError


def atomic_target(path: Path) -> Path:
    """A temporary sibling path with the same suffixes (so writers pick the right format)."""
    name = path.name
    suffix = "".join(path.suffixes[-2:]) if name.endswith(".nii.gz") else path.suffix
    stem = name[: len(name) - len(suffix)] if suffix else name
    return path.with_name(f".{stem}.tmp-{os.getpid()}{suffix}")


@contextmanager
def atomic_write(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed.

    ``fsync`` flushes the file to disk before the rename, where losing it to a power cut would lose
    work (checkpoints); other outputs can be recreated and skip the cost.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_target(path)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def ensure_writable_folder(folder: str | Path, *, what: str = "--output") -> Path:
    """Create ``folder`` if needed and check that a file can be written in it, before any work.

    Raises:
        DataError: The folder cannot be created or written (naming it, the reason and the fix).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".medseg-write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise DataError(
            f"{what} {folder}: cannot write there ({reason}); choose a folder you can write to"
        ) from None
    return folder
