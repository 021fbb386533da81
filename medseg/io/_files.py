"""What kind of file a path is, without reading more than its first bytes."""

from __future__ import annotations

from pathlib import Path

__all__ = ["is_dicom_file"]


def is_dicom_file(path: str | Path) -> bool:
    """True if ``path`` is a file with the DICOM preamble (``DICM`` at byte 128) or a .dcm suffix."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"
