"""Atomic file writes, the one way medseg writes a file: write to a temporary sibling with the same
suffixes, then rename it over the target, so a crash never leaves a half-written file under the final
name (and a reader never sees one)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from medseg.errors import DataError


@cache
def host_tag() -> str:
    """A short tag of this machine (and container): process ids mean something only on it, and a
    folder may be shared between hosts (cluster scratch, network file systems) or containers."""
    return hashlib.sha256(socket.gethostname().encode("utf-8")).hexdigest()[:8]


def temp_tag() -> str:
    """``tmp-<pid>-<host>``: what names this process's temporary files and folders."""
    return f"tmp-{os.getpid()}-{host_tag()}"


def process_alive(pid: int) -> bool:
    """Whether a process of this id runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


_TEMP_NAME = re.compile(r"\.tmp-(\d+)-([0-9a-f]{8})")


def sweep_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the hidden temporary files and folders (``.<name>.tmp-<pid>-<host>...``) that a process of
    this host left in ``folder`` when it was killed (SIGKILL cannot clean up); returns what was removed.
    Those of running processes and of other hosts are left alone."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        m = _TEMP_NAME.search(path.name)
        if not path.name.startswith(".") or m is None or m.group(2) != host_tag():
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or process_alive(pid):
            continue
        try:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(path)
        except OSError:  # another process swept it first
            pass
    return removed


def atomic_target(path: Path) -> Path:
    """A temporary sibling path with the same suffixes (so writers pick the right format)."""
    name = path.name
    suffix = "".join(path.suffixes[-2:]) if name.endswith(".nii.gz") else path.suffix
    stem = name[: len(name) - len(suffix)] if suffix else name
    return path.with_name(f".{stem}.{temp_tag()}{suffix}")


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
