"""``predict.json``: what ``medseg predict`` did in an output folder, kept true after every case.

The manifest is rewritten after each case (and when a run is interrupted), atomically and merged under
an exclusive lock with what is already in the folder: rows of cases this run did not touch are kept
(from earlier or concurrent runs into the same folder), rows of cases it predicted, skipped or failed
replace theirs. So a run killed half-way still lists the cases it finished, and two runs writing into
one folder at the same time both end up in it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medseg.io._atomic import atomic_write

__all__ = ["LOCK_NAME", "Manifest", "row_key"]

logger = logging.getLogger(__name__)


def row_key(row: dict[str, Any]) -> tuple[str, str]:
    """Rows (and failures) are matched by case name and input (a list of channel files is one input)."""
    return str(row.get("case")), str(row.get("input"))


LOCK_NAME = ".predict.json.lock"
_NO_LOCKS = (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder/.predict.json.lock`` (a file opened for writing, as network file
    systems need for an exclusive lock); where the file system has no locks, the write goes on unlocked
    with a warning."""
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise
            logger.warning("%s: no file locks here (%s); predict.json is written unlocked", folder, exc)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _stamped(rows: list[Any], created: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """Case rows of a manifest by key; a row its run predicted gets that run's time (``predicted``),
    a row it skipped keeps its own."""
    out = {}
    for r in rows:
        if isinstance(r, dict) and "case" in r:
            stamp = {} if r.get("skipped") or "predicted" in r or not created else {"predicted": created}
            out[row_key(r)] = {**stamp, **r}
    return out


def _read(path: Path) -> dict[str, Any]:
    """``predict.json`` as a mapping with list-valued ``cases`` and ``failures``; an unreadable one is
    reported and treated as empty (it is then replaced)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        logger.warning("%s: not readable (%s); it is replaced and its earlier rows are lost", path, exc)
        return {}
    if not isinstance(data, dict):
        data = {}
    for key in ("cases", "failures"):
        if not isinstance(data.get(key, []), list):
            logger.warning("%s: %r is not a list; left out", path, key)
            data[key] = []
    return data


class Manifest:
    """The rows of one ``medseg predict`` run and the run's header (model, options, versions).

    Args:
        out_dir: The output folder; ``predict.json`` is written there.
        header: Run-level entries (model, checkpoint, options, post-processing, versions, ...).
    """

    def __init__(self, out_dir: Path, header: dict[str, Any]) -> None:
        self.path = Path(out_dir) / "predict.json"
        self.header = header
        self.rows: dict[tuple[str, str], dict[str, Any]] = {}
        self.failures: dict[tuple[str, str], dict[str, Any]] = {}
        self.t_start = time.perf_counter()
        old = _read(self.path)
        self._earlier = _stamped(old.get("cases", []), old.get("created"))

    def earlier(self, case: str, input_: Any) -> dict[str, Any] | None:
        """What an earlier run recorded for a case (``None`` if nothing)."""
        return self._earlier.get((case, str(input_)))

    def add(self, row: dict[str, Any]) -> None:
        """Record a predicted or skipped case (its failure, if any, is forgotten) and write."""
        self.rows[row_key(row)] = row
        self.failures.pop(row_key(row), None)
        self.write()

    def fail(self, case: str, input_: Any, error: str) -> None:
        """Record a failed case (an earlier row of it is dropped) and write."""
        failure = {"case": case, "input": input_, "error": error}
        self.failures[row_key(failure)] = failure
        self.rows.pop(row_key(failure), None)
        self.write()

    @property
    def cases(self) -> list[dict[str, Any]]:
        return list(self.rows.values())

    def document(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """This run's manifest (without other runs' rows)."""
        return {
            **self.header,
            **(extra or {}),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "seconds": round(time.perf_counter() - self.t_start, 3),
            "cases": self.cases,
            "failures": list(self.failures.values()),
        }

    def write(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Merge this run's rows into ``predict.json`` under the folder's lock and replace it atomically;
        returns this run's manifest."""
        doc = self.document(extra)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path.parent):
            on_disk = _read(self.path)
            merged = _stamped(on_disk.get("cases", []), on_disk.get("created"))
            for key in self.failures:
                merged.pop(key, None)
            merged.update(self.rows)
            done = set(merged)
            done_inputs = {key[1] for key in done}
            failures = {}
            for f in on_disk.get("failures", []):
                if not isinstance(f, dict):
                    continue
                key = row_key(f)
                # a failure of an earlier run is over once the case has a row (older manifests name only
                # the input of a failure)
                if key not in done and not ("case" not in f and key[1] in done_inputs):
                    failures[key] = f
            failures.update(self.failures)
            document = {**doc, "cases": list(merged.values()), "failures": list(failures.values())}
            with atomic_write(self.path) as tmp:
                tmp.write_text(json.dumps(document, indent=2))
        return doc
