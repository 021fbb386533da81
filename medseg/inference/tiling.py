"""Where windows go and how their outputs are summed: even window placement, the network runner with
mirror TTA, the ring-buffer accumulator of Gaussian-weighted logits, and the coarse ROI map.

Hand-written because MONAI's ``sliding_window_inference`` keeps the whole ``(K, *spatial)`` output in
memory; these pieces let :func:`medseg.inference.engine.segment` keep only a window-thick slab.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medseg.data.plan import Plan
from medseg.runtime.device import amp_dtype

__all__ = [
    "Accumulator",
    "NetworkRunner",
    "RoiMap",
    "mirror_axes",
    "window_slices",
    "window_starts",
]


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Evenly spaced window starts along one axis (nnU-Net's ``compute_steps_for_sliding_window``).

    ``ceil((size - patch) / (patch * (1 - overlap))) + 1`` windows, the first at 0 and the last at
    ``size - patch``, the others at rounded equal steps in between. MONAI places the same number at
    a fixed step and clamps the last one to the edge, so its last two windows overlap more than the
    others; here every neighbour pair shares about the same amount.
    """
    if size <= patch:
        return [0]
    target = max(patch * (1.0 - overlap), 1.0)
    n = math.ceil((size - patch) / target) + 1
    step = (size - patch) / (n - 1)
    return [int(round(step * i)) for i in range(n)]


def window_slices(
    padded_shape: Sequence[int], patch: Sequence[int], overlap: float
) -> list[tuple[slice, ...]]:
    """All windows over ``padded_shape`` (:func:`window_starts` on every axis), sorted (stably) by their
    start along the last axis."""
    starts = [window_starts(int(n), int(p), overlap) for n, p in zip(padded_shape, patch, strict=True)]
    slices = [
        tuple(slice(a, a + int(p)) for a, p in zip(corner, patch, strict=True))
        for corner in itertools.product(*starts)
    ]
    return sorted(slices, key=lambda s: s[-1].start)


def mirror_axes(spatial_dims: int) -> list[tuple[int, ...]]:
    """The mirrorings TTA averages: the identity and the left-right mirror (spatial axis 0).

    Only the mirror that training augmentation applies (:class:`medseg.data.augment._MirrorLR`): a
    network never shown anatomy flipped front-to-back or head-to-feet would be asked about images
    unlike anything it learned from, which lowers accuracy instead of raising it.
    """
    return [(), (0,)]


class NetworkRunner:
    """Runs batches of windows through the network on its device (AMP on CUDA), with mirror TTA."""

    def __init__(self, model: Any, device: Any, plan: Plan, tta: bool) -> None:
        self.model, self.device = model, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.flips = mirror_axes(plan.spatial_dims) if tta else [()]
        self.perm = plan.labels.lr_channel_permutation()
        self.amp_dtype = amp_dtype(self.device)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``(B, C, *patch)`` float32 -> ``(B, K, *patch)`` float32 logits (on the CPU)."""
        t = torch.from_numpy(x)
        if self.cuda:
            t = t.pin_memory()
        t = t.to(self.device, non_blocking=True)
        total = None
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None),
        ):
            for axes in self.flips:
                dims = [a + 2 for a in axes]
                y = self.model(torch.flip(t, dims) if dims else t)
                if isinstance(y, (list, tuple)):
                    y = y[0]
                y = y.float()
                if dims:
                    y = torch.flip(y, dims)
                    if 0 in axes:
                        y = y[:, self.perm]
                total = y if total is None else total + y
            assert total is not None
            if len(self.flips) > 1:
                total /= len(self.flips)
        return total.cpu().numpy()


def _ring(start: int, length: int, cap: int) -> list[tuple[slice, slice]]:
    """(buffer slice, source slice) pieces of rows ``start:start+length`` in a ring of ``cap`` rows."""
    a = start % cap
    first = min(length, cap - a)
    pieces = [(slice(a, a + first), slice(0, first))]
    if first < length:
        pieces.append((slice(0, length - first), slice(first, length)))
    return pieces


class Accumulator:
    """Gaussian-weighted logit sums of the rows windows are still writing to (a ring buffer)."""

    def __init__(self, capacity: int, channels: int, inplane: Sequence[int], dtype: Any) -> None:
        self.cap = capacity
        self.acc = np.zeros((capacity, channels, *inplane), dtype)
        self.wsum = np.zeros((capacity, *inplane), np.float32)

    def add(self, window: tuple[slice, ...], logits_zfirst: np.ndarray, imp_zfirst: np.ndarray) -> None:
        """Add ``imp * logits`` of one window (``(pz, K, *patch_inplane)``)."""
        zs = window[-1]
        inplane = window[:-1]
        acc, logits = torch.from_numpy(self.acc), torch.from_numpy(np.asarray(logits_zfirst))
        imp = torch.from_numpy(np.asarray(imp_zfirst))
        for buf, src in _ring(zs.start, zs.stop - zs.start, self.cap):
            w = imp[src]
            # torch's in-place ops on the strided window use every core (numpy's do not)
            acc[(buf, slice(None), *inplane)].add_(logits[src] * w[:, None])
            self.wsum[(buf, *inplane)] += imp_zfirst[src]

    def take(self, p0: int, p1: int) -> tuple[np.ndarray, np.ndarray]:
        """Remove rows ``p0:p1`` (weighted sums, weights) from the ring; they are zeroed for reuse."""
        acc = np.empty((p1 - p0, *self.acc.shape[1:]), np.float32)
        w = np.empty((p1 - p0, *self.wsum.shape[1:]), np.float32)
        for buf, dst in _ring(p0, p1 - p0, self.cap):
            acc[dst] = self.acc[buf]
            w[dst] = self.wsum[buf]
            self.acc[buf] = 0
            self.wsum[buf] = 0
        return acc, w


class RoiMap:
    """Where a coarse pass found structures: one flag per block of ``block`` voxels of the padded grid.

    Blocks keep the map small (about 1 MB for a whole-body scan at 0.8 mm; a voxel mask would be 512
    times larger); a window is run when any marked block lies within ``margin`` voxels.
    """

    def __init__(self, padded_shape: Sequence[int], block: int = 8) -> None:
        self.block = block
        self.fg = np.zeros([-(-int(n) // block) for n in padded_shape], bool)

    def mark(self, window: tuple[slice, ...], fg: np.ndarray) -> None:
        """OR the window's voxel mask ``fg`` (window shape, canonical axis order) into the blocks."""
        b = self.block
        lo = [w.start // b for w in window]
        nb = [-(-(w.stop - lo_ * b) // b) for w, lo_ in zip(window, lo, strict=True)]
        canvas = np.zeros([n * b for n in nb], bool)
        offsets = [w.start - lo_ * b for w, lo_ in zip(window, lo, strict=True)]
        canvas[tuple(slice(o, o + n) for o, n in zip(offsets, fg.shape, strict=True))] = fg
        blocks = canvas.reshape([d for n in nb for d in (n, b)]).any(axis=tuple(range(1, 2 * len(nb), 2)))
        self.fg[tuple(slice(a, a + n) for a, n in zip(lo, nb, strict=True))] |= blocks

    def near(self, window: tuple[slice, ...], margin: Sequence[int]) -> bool:
        """Whether a marked block lies within ``margin`` voxels of ``window``."""
        b = self.block
        box = tuple(
            slice(max(0, (w.start - m) // b), -(-(w.stop + m) // b))
            for w, m in zip(window, margin, strict=True)
        )
        return bool(self.fg[box].any())
