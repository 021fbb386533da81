"""``predict.json``: what ``medseg predict`` did in an output folder, kept true after every case.

The manifest is rewritten after each case (and when a run is interrupted), atomically and merged under
an exclusive lock with what is already in the folder: rows of cases this run did not touch are kept
(from earlier or concurrent runs into the same folder), rows of cases it predicted, skipped or failed
replace theirs. So a run killed half-way still lists the cases it finished, and two runs writing into
one folder at the same time both end up in it.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medseg.io._atomic import atomic_write

__all__ = ["Manifest", "row_key"]


def row_key(row: dict[str, Any]) -> tuple[str, str]:
    """Rows are matched by case name and input (a list of channel files is one input)."""
    return str(row.get("case")), str(row.get("input"))


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the folder itself (no lock file is left among the outputs)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


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
        self.failures: dict[str, dict[str, Any]] = {}
        self.t_start = time.perf_counter()
        self._earlier = self._earlier_rows()

    def _earlier_rows(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Rows of the manifest already in the folder; a row predicted by that run gets its time
        (``predicted``), a row it had skipped keeps its own."""
        old = _read(self.path)
        rows = {}
        for r in old.get("cases", []):
            if isinstance(r, dict) and "case" in r:
                stamp = {} if r.get("skipped") or "predicted" in r else {"predicted": old.get("created")}
                rows[row_key(r)] = {**stamp, **r}
        return rows

    def earlier(self, case: str, input_: Any) -> dict[str, Any] | None:
        """What an earlier run recorded for a case (``None`` if nothing)."""
        return self._earlier.get((case, str(input_)))

    def add(self, row: dict[str, Any]) -> None:
        """Record a predicted or skipped case (its failure, if any, is forgotten) and write."""
        self.rows[row_key(row)] = row
        self.failures.pop(str(row.get("input")), None)
        self.write()

    def fail(self, input_: str, error: str) -> None:
        """Record a failed case and write."""
        self.failures[str(input_)] = {"input": str(input_), "error": error}
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
            merged = {row_key(r): r for r in on_disk.get("cases", []) if isinstance(r, dict) and "case" in r}
            for key, r in merged.items():
                if "predicted" not in r and not r.get("skipped") and on_disk.get("created"):
                    merged[key] = {"predicted": on_disk["created"], **r}
            merged.update(self.rows)
            done_inputs = {str(r.get("input")) for r in merged.values()}
            failures = {
                str(f.get("input")): f
                for f in on_disk.get("failures", [])
                if isinstance(f, dict) and str(f.get("input")) not in done_inputs
            }
            failures.update(self.failures)
            document = {**doc, "cases": list(merged.values()), "failures": list(failures.values())}
            with atomic_write(self.path) as tmp:
                tmp.write_text(json.dumps(document, indent=2))
        return doc
