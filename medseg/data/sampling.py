"""Patch sampling with foreground oversampling (a share of patches centred on a present class).

A configurable share of the patches is centred on a voxel of a randomly chosen class *present* in
the case, so small organs are seen; the rest are placed uniformly at random. Patches reaching past
the image are padded (image with its minimum, label with background, weights with 1). Voxel
locations of each class are precomputed once per case (:func:`class_locations`) so sampling never
scans a volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medseg.labels import Mode

MAX_LOCATIONS_PER_CLASS = 10_000


def class_locations(label: np.ndarray, mode: str, *, seed: int = 0) -> dict[int, np.ndarray]:
    """Up to 10 000 voxel coordinates ``(N, ndim)`` per present class.

    softmax: keys are class indices ``1..K`` of a ``(1, *spatial)`` index map; sigmoid: keys are
    channel indices ``0..S-1`` of ``(S, *spatial)`` masks.
    """
    rng = np.random.default_rng(seed)
    out: dict[int, np.ndarray] = {}
    if mode == Mode.SOFTMAX:
        flat = np.asarray(label[0]).ravel()
        present = [int(v) for v in np.unique(flat) if v != 0]
        for v in present:
            idx = np.flatnonzero(flat == v)
            if idx.size > MAX_LOCATIONS_PER_CLASS:
                idx = rng.choice(idx, MAX_LOCATIONS_PER_CLASS, replace=False)
            out[v] = np.stack(np.unravel_index(idx, label.shape[1:]), axis=1).astype(np.int32)
    else:
        for c in range(label.shape[0]):
            idx = np.flatnonzero(np.asarray(label[c]).ravel())
            if idx.size == 0:
                continue
            if idx.size > MAX_LOCATIONS_PER_CLASS:
                idx = rng.choice(idx, MAX_LOCATIONS_PER_CLASS, replace=False)
            out[c] = np.stack(np.unravel_index(idx, label.shape[1:]), axis=1).astype(np.int32)
    return out


@dataclass
class Patch:
    """One sampled patch: arrays of ``size`` and where it came from."""

    image: np.ndarray
    label: np.ndarray
    weights: np.ndarray | None
    start: tuple[int, ...]
    forced_class: int | None


def crop_padded(arr: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float) -> np.ndarray:
    """``arr[:, start:start+size]`` with out-of-bounds parts filled with ``fill``."""
    spatial = arr.shape[1:]
    out = np.full((arr.shape[0], *size), fill, dtype=arr.dtype)
    src, dst = [], []
    for s, n, dim in zip(start, size, spatial, strict=True):
        lo, hi = max(s, 0), min(s + n, dim)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[(slice(None), *dst)] = arr[(slice(None), *src)]
    return out


def sample_patch(
    image: np.ndarray,
    label: np.ndarray,
    weights: np.ndarray | None,
    locations: dict[int, np.ndarray],
    size: Sequence[int],
    rng: np.random.Generator,
    *,
    force_foreground: bool,
    pad_value: float = 0.0,
) -> Patch:
    """Cut one patch of ``size``; centred on a random present class's voxel when ``force_foreground``.

    ``pad_value`` fills image voxels outside the volume (the normalised minimum, i.e. air for CT).
    """
    spatial = image.shape[1:]
    size = tuple(int(s) for s in size)
    forced = None
    if force_foreground and locations:
        forced = int(rng.choice(sorted(locations)))
        locs = locations[forced]
        centre = locs[rng.integers(len(locs))]
        start = tuple(int(c) - n // 2 for c, n in zip(centre, size, strict=True))
    else:
        start = tuple(
            int(rng.integers(min(0, d - n), max(0, d - n) + 1)) for d, n in zip(spatial, size, strict=True)
        )
    img = crop_padded(image, start, size, pad_value)
    lab = crop_padded(label, start, size, 0)
    w = crop_padded(weights, start, size, 1.0) if weights is not None else None
    return Patch(img, lab, w, start, forced)
