"""From blended logits to labels on the scan's own grid: blending, the decision space (logits or
probabilities), linear resampling back to the input's spacing, and the argmax/threshold, written
straight into the output in the input's storage order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, Protocol

import numpy as np
import torch

from medseg.data.canonical import SLAB_BYTES, oriented_view
from medseg.data.plan import Plan
from medseg.data.preprocess import Layout, linear_taps, resize_inplane, zinterp
from medseg.inference.tiling import Accumulator
from medseg.labels import Mode

__all__ = [
    "Finaliser",
    "ProbabilitySink",
    "Restorer",
    "blended",
    "logit",
    "new_output",
    "restore_to_original",
]

ProbabilitySink = Callable[[tuple[slice, ...], np.ndarray], None]
"""Receives ``(box, probs)``: probabilities ``(n, K, *inplane)`` of the canonical-grid region ``box``
(in-plane slices, then the ``n`` rows along the last axis)."""


class RowRefiner(Protocol):
    """Refines probabilities of crop rows pushed in order (e.g. :class:`medseg.inference.crf.StreamingCRF`):
    ``push(z0, probs)`` returns ``(row, probs)`` blocks that are final, every row once the last is pushed."""

    finished: bool

    def push(self, z0: int, probs: np.ndarray) -> list[tuple[int, np.ndarray]]: ...


class Restorer:
    """Takes finalised probabilities (or logits, ``space="logits"``) of resampled-grid rows (in order)
    and writes decided labels of canonical-crop rows into ``out`` (a canonical view of the output),
    resampling them linearly first when the spacing changed.

    softmax: ``out`` is ``(1, *canonical)`` and receives label values (argmax, first maximum wins);
    sigmoid: ``out`` is ``(S, *canonical)`` and receives 0/1 (``p >= threshold``, i.e. ``logit >=
    logit(threshold)``).

    ``refine`` (the dense CRF) receives the probabilities of the crop rows before the decision; the
    rows it returns are decided (and given to ``sink``) in probability space.
    """

    def __init__(
        self,
        layout: Layout,
        out: np.ndarray,
        plan: Plan,
        *,
        threshold: float = 0.5,
        sink: ProbabilitySink | None = None,
        space: Literal["probabilities", "logits"] = "probabilities",
        refine: RowRefiner | None = None,
    ) -> None:
        self.layout, self.out, self.mode, self.threshold, self.sink = layout, out, plan.mode, threshold, sink
        self.space, self.refine = space, refine
        self.lut = np.array([0, *plan.label_values], dtype=out.dtype) if plan.mode == Mode.SOFTMAX else None
        self.buf: np.ndarray | None = None
        self.q0 = 0  # resampled row of buf[0]
        self.next = 0  # next crop row to emit
        k = plan.out_channels
        per_row = 4 * k * math.prod(layout.crop_shape[:-1]) * 3
        self.chunk = max(1, int(SLAB_BYTES // max(per_row, 1)))

    def push(self, r0: int, probs: np.ndarray) -> None:
        """Add finalised rows ``r0:r0+len(probs)`` (``(n, K, *inplane_resampled)``) and emit what can be."""
        if self.buf is None or len(self.buf) == 0:
            self.buf, self.q0 = probs, r0
        else:
            if r0 != self.q0 + len(self.buf):
                raise AssertionError(f"rows pushed out of order: {r0} after {self.q0 + len(self.buf)}")
            self.buf = np.concatenate([self.buf, probs])
        self._emit()

    def _emit(self) -> None:
        lay = self.layout
        n_out, n_in = lay.crop_shape[-1], lay.resampled_shape[-1]
        have = self.q0 + len(self.buf)
        while self.next < n_out:
            stop = min(n_out, self.next + self.chunk)
            i0, i1, lam = linear_taps(n_out, n_in, self.next, stop)
            ready = np.flatnonzero(i1 < have)
            if len(ready) == 0:
                break
            stop = self.next + int(ready[-1]) + 1
            i0, i1, lam = i0[: stop - self.next], i1[: stop - self.next], lam[: stop - self.next]
            probs = resize_inplane(zinterp(self.buf, i0 - self.q0, i1 - self.q0, lam), lay.crop_shape[:-1])
            self._decide(self.next, stop, probs)
            self.next = stop
        if self.next < n_out:
            first_needed = int(linear_taps(n_out, n_in, self.next, self.next + 1)[0][0])
            drop = first_needed - self.q0
            if drop > 0:
                self.buf, self.q0 = self.buf[drop:], first_needed
        else:
            self.buf = self.buf[:0]

    def _decide(self, z0: int, z1: int, values: np.ndarray) -> None:
        if self.refine is None:
            self._write(z0, z1, values, logits=self.space == "logits")
            return
        probs = _activate(values, self.mode) if self.space == "logits" else values
        for r0, refined in self.refine.push(z0, probs):
            self._write(r0, r0 + len(refined), refined, logits=False)

    def _write(self, z0: int, z1: int, values: np.ndarray, *, logits: bool) -> None:
        c0 = self.layout.crop[-1].start
        inplane = self.layout.crop[:-1]
        if self.sink is not None:
            self.sink((*inplane, slice(c0 + z0, c0 + z1)), _activate(values, self.mode) if logits else values)
        if self.mode == Mode.SOFTMAX:  # the argmax of the logits is the argmax of their softmax
            lab = self.lut[_argmax_channels(values)]  # (n, *inplane)
            self.out[(0, *inplane, slice(c0 + z0, c0 + z1))] = np.moveaxis(lab, 0, -1)
        else:
            cut = logit(self.threshold) if logits else self.threshold
            masks = (values >= cut).astype(self.out.dtype)  # (n, S, *inplane)
            self.out[(slice(None), *inplane, slice(c0 + z0, c0 + z1))] = np.moveaxis(masks, 0, -1)

    @property
    def done(self) -> bool:
        return self.next >= self.layout.crop_shape[-1] and (self.refine is None or self.refine.finished)


def _argmax_channels(probs: np.ndarray) -> np.ndarray:
    """``probs.argmax(axis=1)`` (first maximum wins) as a running maximum over the channels: each
    step reads contiguous planes, several times faster than numpy's or torch's strided argmax."""
    best = probs[:, 0].copy()
    idx = np.zeros(best.shape, np.int64)
    for k in range(1, probs.shape[1]):
        upd = probs[:, k] > best
        np.copyto(best, probs[:, k], where=upd)
        idx[upd] = k
    return idx


def new_output(layout: Layout, plan: Plan) -> np.ndarray:
    """Zero-filled output in the input's storage order: ``(1, *shape)`` labels or ``(S, *shape)`` masks.

    Fortran order, as NIfTI stores voxels: slabs along the last axis are contiguous, and the writer
    needs no reordered copy of the label map.
    """
    channels = 1 if plan.mode == Mode.SOFTMAX else len(plan.structure_names)
    return np.zeros((channels, *layout.original_shape), plan.labels.dtype, order="F")


def restore_to_original(
    probs: np.ndarray,
    props: dict[str, Any],
    plan: Plan,
    *,
    threshold: float = 0.5,
    space: Literal["probabilities", "logits"] = "probabilities",
) -> np.ndarray:
    """Map preprocessed-grid probabilities (or logits, ``space``) ``(K, *resampled)`` back to the input
    grid and decide there.

    The one-shot form of what :func:`segment` does slab by slab (used for oracle tests): softmax gives
    ``(1, *original)`` label values, sigmoid ``(S, *original)`` masks.
    """
    layout = Layout.from_props(props)
    out = new_output(layout, plan)
    rest = Restorer(layout, oriented_view(out, layout.ornt), plan, threshold=threshold, space=space)
    rest.push(0, np.moveaxis(np.asarray(probs, np.float32), -1, 0))
    if not rest.done:
        raise AssertionError("restoration did not cover the grid")
    return out


def logit(p: float) -> float:
    """``log(p / (1 - p))``: a sigmoid threshold on probabilities as a threshold on logits."""
    return math.log(p / (1.0 - p))


_EMPTY_LOGIT = 20.0
"""Logit magnitude given to voxels no window covered (skipped): background, p(other) ~ 2e-9."""


def _activate(logits: np.ndarray, mode: str) -> np.ndarray:
    """Softmax (over axis 1) or sigmoid of ``(n, K, ...)`` logits, float32."""
    t = torch.from_numpy(np.ascontiguousarray(logits, np.float32))
    return (torch.softmax(t, 1) if mode == Mode.SOFTMAX else torch.sigmoid(t)).numpy()


def blended(
    acc: np.ndarray, w: np.ndarray, mode: str, space: str = "probabilities", threshold: float = 0.5
) -> np.ndarray:
    """Blended logits (``acc / w``) as probabilities or logits (``space``); voxels no window covered
    (skipped air or outside the coarse ROI) are background: in logit space ``_EMPTY_LOGIT`` below
    the decision (sigmoid: below ``logit(threshold)``, whatever the threshold)."""
    empty = w <= 0
    logits = (acc / np.maximum(w, 1e-12)[:, None]).astype(np.float32, copy=False)
    if space == "logits":
        if empty.any():
            low = min(-_EMPTY_LOGIT, logit(threshold) - _EMPTY_LOGIT)
            for k in range(logits.shape[1]):
                logits[:, k][empty] = _EMPTY_LOGIT if (mode == Mode.SOFTMAX and k == 0) else low
        return logits
    probs = _activate(logits, mode)
    if empty.any():
        for k in range(probs.shape[1]):
            probs[:, k][empty] = 1.0 if (mode == Mode.SOFTMAX and k == 0) else 0.0
    return probs


class Finaliser:
    """Finalises padded rows no window will touch again: blend, probabilities, un-pad, restore."""

    def __init__(self, layout: Layout, restorer: Restorer, mode: str) -> None:
        self.layout, self.restorer, self.mode = layout, restorer, mode
        self.done_to = 0
        k = restorer.lut.size if restorer.lut is not None else restorer.out.shape[0]
        self.rows_per_chunk = max(1, int(SLAB_BYTES // max(1, 8 * k * math.prod(layout.padded_shape[:-1]))))

    def advance(self, accum: Accumulator, upto: int) -> None:
        lay = self.layout
        before = lay.pad[-1][0]
        n_res = lay.resampled_shape[-1]
        inner = tuple(
            slice(a, a + n) for (a, _), n in zip(lay.pad[:-1], lay.resampled_shape[:-1], strict=True)
        )
        while self.done_to < upto:
            p1 = min(upto, self.done_to + self.rows_per_chunk)
            acc, w = accum.take(self.done_to, p1)
            r0, r1 = max(self.done_to - before, 0), min(p1 - before, n_res)
            if r1 > r0:
                sel = slice(r0 + before - self.done_to, r1 + before - self.done_to)
                probs = blended(acc[sel], w[sel], self.mode, self.restorer.space, self.restorer.threshold)
                self.restorer.push(r0, np.ascontiguousarray(probs[(slice(None), slice(None), *inner)]))
            self.done_to = p1
