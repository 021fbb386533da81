"""The on-disk cache of preprocessed training cases.

Preprocessing is done once per case and cached as ``.npy`` files that training memory-maps, keyed by
a hash of the plan's preprocessing settings and of the source files (size and modification time), so
training never decompresses NIfTI per sample and the cache is reused across runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.plan import Plan
from medseg.data.preprocess import preprocess_case
from medseg.data.sampling import class_locations
from medseg.io._atomic import atomic_write

__all__ = ["CachedCase", "cache_case", "default_cache_dir"]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/medseg/preprocessed`` (``~/.cache/medseg/preprocessed``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medseg" / "preprocessed"


def _file_stamp(paths: Sequence[Path]) -> str:
    parts = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
            st = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        else:
            s = p.stat()
            st = [(p.name, s.st_size, s.st_mtime_ns)]
        parts.append([str(p.resolve()), st])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


@dataclass
class CachedCase:
    """Paths of one cached preprocessed case; arrays open memory-mapped."""

    case_id: str
    folder: Path

    def image(self) -> np.ndarray:
        return np.load(self.folder / f"{self.case_id}_image.npy", mmap_mode="r")

    def label(self) -> np.ndarray | None:
        p = self.folder / f"{self.case_id}_label.npy"
        return np.load(p, mmap_mode="r") if p.exists() else None

    def weights(self) -> np.ndarray | None:
        p = self.folder / f"{self.case_id}_weights.npy"
        return np.load(p, mmap_mode="r") if p.exists() else None

    def locations(self, mode: str) -> dict[int, np.ndarray]:
        """Voxel coordinates per present class (see :func:`~medseg.data.sampling.class_locations`),
        stored at preprocessing time so training never scans a label volume; computed if missing."""
        p = self.folder / f"{self.case_id}_locations.npz"
        if p.exists():
            with np.load(p) as z:
                return {int(k): z[k] for k in z.files}
        label = self.label()
        if label is None:
            return {}
        return class_locations(label, mode)

    def props(self) -> dict[str, Any]:
        return json.loads((self.folder / f"{self.case_id}_props.json").read_text())


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_write(path) as tmp:
        np.save(tmp, np.ascontiguousarray(arr))


def cache_case(case: Any, plan: Plan, data_cfg: Any, cache_dir: Path) -> CachedCase:
    """Preprocess ``case`` unless a valid cached copy exists; returns the cached case."""
    from medseg.data.datasets import load_case

    sources = [*case.images, *([case.label] if case.label else []), *case.masks.values()]
    folder = Path(cache_dir) / plan.preprocess_key()
    folder.mkdir(parents=True, exist_ok=True)
    stamp = _file_stamp(sources)
    cached = CachedCase(case.case_id, folder)
    props_path = folder / f"{case.case_id}_props.json"
    if props_path.exists():
        try:
            if json.loads(props_path.read_text()).get("source_stamp") == stamp:
                return cached
        except ValueError:
            pass
    image, label = load_case(case, data_cfg)
    pre = preprocess_case(image, label, plan)
    _save_npy(folder / f"{case.case_id}_image.npy", pre.image)
    for name, arr in (("label", pre.label), ("weights", pre.weights)):
        path = folder / f"{case.case_id}_{name}.npy"
        if arr is not None:
            _save_npy(path, arr)
        elif path.exists():
            path.unlink()
    locations_path = folder / f"{case.case_id}_locations.npz"
    if pre.label is not None:
        locs = class_locations(pre.label, plan.mode)
        with atomic_write(locations_path) as tmp:
            np.savez(tmp, **{str(k): v for k, v in locs.items()})
    elif locations_path.exists():
        locations_path.unlink()
    props = {
        **pre.props,
        "source_stamp": stamp,
        "case_id": case.case_id,
        "pad_value": float(pre.image[0].min()) if pre.image.size else 0.0,
    }
    with atomic_write(props_path) as tmp:  # written last: its presence marks a complete entry
        tmp.write_text(json.dumps(props))
    return cached
