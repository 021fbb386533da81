"""Per-case preprocessing (canonical orientation, crop to the body, resampling, normalisation, border
weights) and the on-disk cache of its results.

Preprocessing is done once per case and cached as ``.npy`` files that training memory-maps, keyed by
a hash of the plan's preprocessing settings and of the source files (size and modification time), so
training never decompresses NIfTI per sample and the cache is reused across runs (DESIGN §7, §11).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.geometry import (
    bbox_of,
    crop_affine,
    resample_image,
    resample_labels,
    resample_masks,
    resampled_affine,
    resampled_shape,
    to_canonical,
)
from medseg.data.plan import Plan
from medseg.errors import DataError
from medseg.io._atomic import atomic_write
from medseg.types import Volume

logger = logging.getLogger(__name__)

BODY_MARGIN_VOXELS = 3


@dataclass
class PreprocessedCase:
    """Arrays on the plan's grid plus what is needed to map results back to the original grid.

    Attributes:
        image: ``(C, *spatial)`` float32, normalised.
        label: softmax: ``(1, *spatial)`` uint8 class indices (0 background, i+1 = structure i);
            sigmoid: ``(S, *spatial)`` uint8 0/1 masks; ``None`` for unlabelled cases.
        weights: ``(1, *spatial)`` float16 border-weight map or ``None``.
        props: JSON-able geometry: ``original_shape``, ``original_affine``, ``ornt``,
            ``canonical_shape``, ``crop`` (start/stop per axis on the canonical grid),
            ``resampled_shape``, ``affine`` (of the preprocessed grid), ``spacing_mm``.
    """

    image: np.ndarray
    label: np.ndarray | None
    weights: np.ndarray | None
    props: dict[str, Any]


def label_to_indices(label: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Map label values (e.g. AMOS ids) to class indices ``1..K`` in plan order; other values -> 0."""
    lut_size = max(int(label.max()) + 1 if label.size else 1, max(values, default=0) + 1)
    lut = np.zeros(lut_size, dtype=np.uint8 if len(values) < 256 else np.uint16)
    for i, v in enumerate(values):
        lut[int(v)] = i + 1
    return lut[label.astype(np.int64, copy=False)]


def preprocess_volume(image: Volume, plan: Plan) -> tuple[np.ndarray, dict[str, Any]]:
    """Preprocess an image only (the prediction path); returns the array and the geometry props."""
    arr, _, _, props = _preprocess(image, None, plan)
    return arr, props


def preprocess_case(image: Volume, label: Volume | None, plan: Plan) -> PreprocessedCase:
    """Preprocess an image and its label with the plan (labels resampled per class, not nearest)."""
    arr, lab, weights, props = _preprocess(image, label, plan)
    return PreprocessedCase(arr, lab, weights, props)


def _preprocess(
    image: Volume, label: Volume | None, plan: Plan
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, dict[str, Any]]:
    if image.spatial_dims != plan.spatial_dims:
        raise DataError(
            f"{image.meta.get('source', 'image')}: {image.spatial_dims}D image, but the model is "
            f"{plan.spatial_dims}D"
        )
    if image.num_channels != plan.in_channels:
        raise DataError(
            f"{image.meta.get('source', 'image')}: {image.num_channels} channels, the model expects "
            f"{plan.in_channels}"
        )
    original_shape, original_affine = image.spatial_shape, image.affine.copy()
    image, ornt = to_canonical(image)
    lab_arr = None
    if label is not None:
        label, _ = to_canonical(label)
        lab_arr = label.array
    canonical_shape = image.spatial_shape
    arr = image.array
    # crop to the body (CT): voxels above the threshold, with a small margin
    box = tuple(slice(0, s) for s in canonical_shape)
    if plan.crop_to_body and plan.body_threshold is not None:
        body = arr[0] > plan.body_threshold
        if body.any():
            box = bbox_of(body, margin=BODY_MARGIN_VOXELS)
    arr = arr[(slice(None), *box)]
    affine = crop_affine(image.affine, box)
    spacing = Volume(arr[:1], affine).spacing_mm
    new_shape = resampled_shape(arr.shape[1:], spacing, plan.target_spacing_mm)
    out = resample_image(arr.astype(np.float32, copy=False), new_shape)
    out = np.stack([norm.apply(c) for norm, c in zip(plan.normalization, out, strict=True)])
    new_affine = resampled_affine(affine, arr.shape[1:], new_shape)
    weights = None
    if lab_arr is not None:
        lab_arr = lab_arr[(slice(None), *box)]
        if plan.mode == "softmax":
            idx = label_to_indices(lab_arr, plan.label_values)
            lab_arr = resample_labels(idx, new_shape, values=range(1, len(plan.label_values) + 1))
            lab_arr = lab_arr.astype(np.uint8 if len(plan.label_values) < 256 else np.uint16)
        else:
            lab_arr = resample_masks(lab_arr, new_shape)
        weights = compute_weights(lab_arr, plan)
    props = {
        "original_shape": list(original_shape),
        "original_affine": original_affine.tolist(),
        "ornt": np.asarray(ornt).tolist(),
        "canonical_shape": list(canonical_shape),
        "crop": [[s.start, s.stop] for s in box],
        "resampled_shape": list(new_shape),
        "affine": new_affine.tolist(),
        "spacing_mm": list(plan.target_spacing_mm),
    }
    return out.astype(np.float32, copy=False), lab_arr, weights, props


def compute_weights(label: np.ndarray, plan: Plan) -> np.ndarray | None:
    """Border-weight map ``(1, *spatial)`` float16 for a preprocessed label (None when disabled)."""
    bw = plan.border_weights or {}
    if not bw.get("enabled", False):
        return None
    from medseg.losses.weight_maps import unet_border_weight_map, unet_border_weight_map_multichannel

    kwargs = {"w0": float(bw["w0"]), "sigma_mm": float(bw["sigma_mm"]), "spacing_mm": plan.target_spacing_mm}
    if plan.mode == "softmax":
        w = unet_border_weight_map(label[0], **kwargs)
    else:
        w = unet_border_weight_map_multichannel(label, **kwargs)
    return w[None].astype(np.float16)


# --------------------------------------------------------------------------------------------
# cache


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
        from medseg.data.sampling import class_locations

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
        from medseg.data.sampling import class_locations

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
