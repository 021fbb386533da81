"""Names that come from configs, model folders and label maps are data, never paths or formulas.

Structure names become file and folder names (``<case>/<structure>.nii.gz``, ``masks/<structure>/``)
and CSV cells; model folders come from other sites. :func:`check_name` keeps names to a safe set of
characters, :func:`check_label_name` accepts display names from label maps, and
:func:`spreadsheet_safe` keeps a CSV cell from being read as a formula.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
from pathlib import Path

from medseg.errors import ConfigError, DataError

__all__ = [
    "MAX_NAME_LENGTH",
    "PSEUDONYM_KEY_ENV",
    "check_label_name",
    "check_name",
    "pseudonym",
    "safe_join",
    "spreadsheet_safe",
]

logger = logging.getLogger(__name__)

PSEUDONYM_KEY_ENV = "MEDSEG_PSEUDONYM_KEY"
"""Environment variable holding a site secret that keys patient pseudonyms (stable across runs)."""
_PROCESS_KEY = secrets.token_bytes(32)
_said_random = False

MAX_NAME_LENGTH = 128
_NAME = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.-]{{0,{MAX_NAME_LENGTH - 1}}}")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def check_name(name: object, *, what: str = "structure name", where: str = "") -> str:
    """``name`` if it is safe as a file or folder name, else :class:`ConfigError`.

    Structure names of a config or a model become file and folder names (``<case>/<structure>.nii.gz``,
    ``masks/<structure>/``), so they may only use letters, digits, ``_``, ``.`` and ``-``, start with a
    letter, digit or ``_`` (no hidden files, no ``..``, nothing a shell or spreadsheet reads as an
    option or formula) and be at most 128 characters. Model folders come from other sites: a name is
    data, never a path.
    """
    if isinstance(name, str) and _NAME.fullmatch(name):
        return name
    text = str(name)
    fixed = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:MAX_NAME_LENGTH] or "structure"
    prefix = f"{where}: " if where else ""
    raise ConfigError(
        f"{prefix}{what} {text[:80]!r} is not allowed: names become file and folder names, so they may only "
        f"use letters, digits, '_', '.' and '-', start with a letter, digit or '_', and be at most "
        f"{MAX_NAME_LENGTH} characters (e.g. {fixed!r})"
    )


def check_label_name(name: object, *, where: str = "") -> str:
    """``name`` if it is acceptable as a structure's display name (``--labels`` maps, ``dataset.json``):
    any printable text (spaces allowed, as in AMOS's ``right kidney``) without path separators or a
    leading dot, at most 128 characters; else :class:`ConfigError`.

    Display names are looked up as mask files (``<case>/<name>.nii.gz``) by ``medseg evaluate``, which
    is why separators and ``..`` are refused.
    """
    ok = (
        isinstance(name, str)
        and 0 < len(name) <= MAX_NAME_LENGTH
        and name.isprintable()
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
    )
    if ok:
        return name  # type: ignore[return-value]
    prefix = f"{where}: " if where else ""
    raise ConfigError(
        f"{prefix}label name {str(name)[:80]!r} is not allowed: use printable text of at most "
        f"{MAX_NAME_LENGTH} characters without '/' or '\\' that does not start with '.'"
    )


def spreadsheet_safe(text: str) -> str:
    """``text`` for a CSV cell: a leading ``'`` when it starts like a spreadsheet formula (``=``, ``+``,
    ``-``, ``@``, tab, carriage return), so that opening the file cannot run a formula from a name."""
    return "'" + text if text.startswith(_FORMULA_START) else text


def safe_join(base: str | Path, *parts: str) -> Path:
    """``base / part / ...`` for names that come from data (case and structure names), refusing
    (:class:`DataError`) a part that is empty, ``.`` or ``..``, holds a path separator, or a result that
    does not lie inside ``base``; every path medseg writes under an output folder is made this way."""
    out = Path(base)
    for part in parts:
        if part in ("", ".", "..") or "/" in part or "\\" in part or "\x00" in part:
            raise DataError(f"{base}: refusing to write {part!r}: a name from the data may not be a path")
        out = out / part
    root = Path(base).resolve()
    if root != out.resolve() and root not in out.resolve().parents:
        raise DataError(f"{out}: refusing to write outside the output folder {base}")
    return out


def pseudonym(patient_id: str) -> str:
    """A patient's pseudonym: the first 16 hex digits of the HMAC-SHA256 of the (whitespace-stripped)
    patient ID.

    The key is the site secret in ``MEDSEG_PSEUDONYM_KEY`` (the same patient gets the same pseudonym in
    every run of that site), else a random key of this process (the same within one run only). An
    unkeyed hash would not do: an ID of a few digits is recovered by hashing every candidate.
    """
    global _said_random
    secret = os.environ.get(PSEUDONYM_KEY_ENV, "")
    if not secret and not _said_random:
        logger.info(
            "patient pseudonyms are keyed by a random key of this run (set %s to a site secret for "
            "pseudonyms that stay the same across runs)",
            PSEUDONYM_KEY_ENV,
        )
        _said_random = True
    key = secret.encode("utf-8") if secret else _PROCESS_KEY
    return hmac.new(key, patient_id.strip().encode("utf-8"), hashlib.sha256).hexdigest()[:16]
