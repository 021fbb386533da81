"""The on-disk cache of training cases.

Preprocessing is done once per case and cached as ``.npy`` files that training memory-maps, keyed by
a hash of the plan's preprocessing settings and of the source files (size and modification time), so
training never decompresses NIfTI per sample and the cache is reused across runs. Validation cases
are also cached as read (:func:`cache_original`): validation predicts them on their own grids, as
``medseg predict`` would, without decoding their files at every validation.
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

from medseg.data.datasets import load_case
from medseg.data.plan import Plan
from medseg.data.preprocess import preprocess_case
from medseg.data.sampling import class_locations
from medseg.io._atomic import atomic_write
from medseg.types import Volume

__all__ = ["CachedCase", "OriginalCase", "cache_case", "cache_original", "default_cache_dir"]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/medseg/preprocessed`` (``~/.cache/medseg/preprocessed``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medseg" / "preprocessed"


def _sources(case: Any) -> list[Path]:
    """Every file a case is read from: its images, its label map or its masks."""
    return [*case.images, *([case.label] if case.label else []), *case.masks.values()]


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

    sources = _sources(case)
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


@dataclass
class OriginalCase:
    """A case as :func:`~medseg.data.datasets.load_case` reads it (channels stacked, masks on the image
    grid), stored on first use as memory-mapped ``.npy`` so that validation reads it without decoding
    its files again. Made by :func:`cache_original`."""

    case: Any
    data_cfg: Any
    folder: Path

    @property
    def case_id(self) -> str:
        return str(self.case.case_id)

    def _meta_path(self) -> Path:
        return self.folder / f"{self.case_id}_meta.json"

    def _store(self) -> None:

        self.folder.mkdir(parents=True, exist_ok=True)
        image, label = load_case(self.case, self.data_cfg)
        _save_npy(self.folder / f"{self.case_id}_image.npy", image.array)
        if label is not None:
            _save_npy(self.folder / f"{self.case_id}_label.npy", label.array)
        keep = {k: v for k, v in image.meta.items() if isinstance(v, (str, int, float, bool, type(None)))}
        with atomic_write(self._meta_path()) as tmp:  # written last: its presence marks a complete entry
            tmp.write_text(json.dumps({"affine": image.affine.tolist(), "meta": keep}))

    def _volume(self, name: str) -> Volume | None:
        if not self._meta_path().exists():
            self._store()
        path = self.folder / f"{self.case_id}_{name}.npy"
        if not path.exists():
            return None
        meta = json.loads(self._meta_path().read_text())
        return Volume(np.load(path, mmap_mode="r"), np.asarray(meta["affine"]), meta["meta"])

    def image(self) -> Volume:
        vol = self._volume("image")
        assert vol is not None
        return vol

    def label(self) -> Volume | None:
        return self._volume("label")


def cache_original(case: Any, data_cfg: Any, cache_dir: Path) -> OriginalCase:
    """The cache entry of ``case`` as read with ``data_cfg``; its files are read (once) when the image
    or label is first asked for, so a process touches only the cases it uses."""
    sources = _sources(case)
    # what load_case returns depends on the files and on how the config reads them
    reading = [_file_stamp(sources), data_cfg.spatial_dims, data_cfg.mode, data_cfg.structure_names]
    key = hashlib.sha256(json.dumps(reading).encode()).hexdigest()[:16]
    return OriginalCase(case, data_cfg, Path(cache_dir) / "originals" / key)
