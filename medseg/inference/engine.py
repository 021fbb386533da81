"""Memory-bounded sliding-window segmentation of whole scans, slab by slab along the last axis.

What it does, in data-flow order (3D; a 2D image is the same with one in-plane axis):

1. The input is viewed (not copied) in the canonical RAS order; the body box is found slab-wise.
2. Preprocessing is *lazy*: the resampled, normalised image is produced only for the slabs the
   current windows read (linear resampling, separable and identical in effect to ``F.interpolate(...,
   mode="trilinear", align_corners=False)`` used by training), so no full-size float copy of the scan
   exists.
3. Windows are spaced evenly along each axis (nnU-Net's rule, :func:`window_starts`: as many windows
   as MONAI's placement when ``patch * (1 - overlap)`` is whole, but the overlap is shared equally
   instead of piling up between the last two)
   and are blended with MONAI's Gaussian importance map, visited in order of their start along the
   last axis. The network runs on ``device``; the blended logits are
   accumulated on the CPU in a ring buffer only ``patch + step`` slices thick. Windows whose input is
   entirely air (below the plan's body threshold) can be skipped: their voxels are background.
   With ``coarse_roi``, a first pass of non-overlapping windows marks (in 8-voxel blocks) where any
   structure is predicted, and the overlapping windows run only within a quarter patch of a mark.
4. As soon as no remaining window touches a slice, it is finalised: the blended logits (or, with
   ``resample="probabilities"``, their softmax/sigmoid) are resampled back to the input's slice
   spacing a few slices at a time and decided there (argmax or threshold — never the labels are
   resampled), straight into the uint8/uint16 output, which is a view of the result in the input's
   own storage order.

Why hand-written: MONAI's ``sliding_window_inference`` keeps the full ``(K, *spatial)`` float output in
memory (its ``buffer_steps`` option only bounds *device* memory), which for a 512×512×1000 CT with 20+
classes is tens of GB. Where MONAI's placement and the even one coincide (``(size - patch)`` a multiple
of the step), results equal MONAI's up to float rounding (tested); the even placement makes them
agree with nnU-Net's predictor given the same network (``scripts/bench_inference.py``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from medseg.config import PredictConfig
from medseg.data.plan import ChannelNorm, Plan
from medseg.data.preprocess import BODY_MARGIN_VOXELS
from medseg.errors import ConfigError, DataError
from medseg.runtime.device import amp_dtype
from medseg.types import Volume

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 128 * 2**20  # working-set target of one finalisation / restoration chunk

ProbabilitySink = Callable[[tuple[slice, ...], np.ndarray], None]
"""Receives ``(box, probs)``: probabilities ``(n, K, *inplane)`` of the canonical-grid region ``box``
(in-plane slices, then the ``n`` rows along the last axis)."""


@dataclass(frozen=True)
class EngineOptions:
    """How windows are run and accumulated.

    Attributes:
        overlap: Fraction of a window shared with its neighbour (MONAI's ``overlap``): windows are
            spaced evenly with steps of ``patch * (1 - overlap)`` or less, up to rounding
            (:func:`window_starts`).
        batch_size: Windows per forward pass.
        tta: Average the logits of each window and of its left-right mirror (the mirror training
            uses), with paired left/right channels swapped back.
        skip_air: Do not run windows whose first channel lies entirely at or below the normalised body
            threshold (CT; when the plan clips above the threshold, "at the clip floor": voxels the
            network cannot tell from air). Their voxels are background.
        coarse_roi: First run non-overlapping windows over the scan (on large 3D scans at overlap 0.5
            about an eighth as many as the overlapping ones; on small scans a third or more), then
            run the overlapping windows only where that pass found a structure within a quarter
            patch; the others are background. Can save time when the structures fill a small part
            of the scan (one organ in a whole-body CT) and the raw output has no scattered false
            positives (every blob is marked); costs time when they fill most of it.
        resample: What is resampled linearly to the input's grid when the spacing changed, before the
            decision: ``logits`` (the blended network outputs, as nnU-Net v2 exports, the default; the
            decision is then argmax / ``logit > logit(threshold)``, and saved probabilities are the
            softmax/sigmoid of the resampled logits) or ``probabilities`` (softmax/sigmoid outputs).
            Either way labels are never resampled; the two differ only near boundaries. Logits are
            the default because on the inference benchmark they agreed with nnU-Net's output at Dice
            >= 0.996 per structure (probabilities: 0.975) and scored as well or better against the
            reference.
        accumulator_dtype: ``float32``, or ``float16`` to halve the accumulator (argmax ties may change).
        threshold: Probability threshold of sigmoid (overlapping-structure) models.
        progress: Show a progress bar over windows.
    """

    overlap: float = 0.5
    batch_size: int = 2
    tta: bool = False
    skip_air: bool = True
    coarse_roi: bool = False
    resample: Literal["logits", "probabilities"] = "logits"
    accumulator_dtype: Literal["float32", "float16"] = "float32"
    threshold: float = 0.5
    progress: bool = False

    @classmethod
    def from_config(cls, predict: PredictConfig, **changes: Any) -> EngineOptions:
        """Options from a config's ``predict`` section (a model's defaults), with ``changes`` applied."""
        base = {
            "overlap": predict.overlap,
            "batch_size": predict.batch_size,
            "tta": predict.tta,
            "threshold": predict.threshold,
            "resample": predict.resample,
        }
        return cls(**{**base, **changes})

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.resample not in ("probabilities", "logits"):
            raise ConfigError(f"resample must be 'probabilities' or 'logits', got {self.resample!r}")


# ------------------------------------------------------------------------------------------ geometry


def oriented_view(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """A view of a ``(C, *spatial)`` array reoriented by a nibabel orientation transform (no copy).

    Writing into the view writes into ``array``: this is how results are placed into the input's
    storage order without a reoriented copy.
    """
    import nibabel as nib

    if array.ndim - 1 == 2:
        return array
    moved = np.moveaxis(array, 0, -1)
    return np.moveaxis(nib.orientations.apply_orientation(moved, ornt), -1, 0)


class CanonicalSlabs:
    """Slabs along the canonical (RAS) last axis of a scan, from memory or lazily from its file.

    ``image`` is a :class:`~medseg.types.Volume` or a 3D object with the same geometry attributes and
    a ``read_block(index)`` method giving the voxels ``[index]`` (three slices in storage order) as
    ``(1, nx, ny, nz)`` (:class:`medseg.io.nifti.NiftiSlabs`, :class:`medseg.io.dicom.DicomSlabs`,
    which never hold the whole scan). A canonical slab is read as the matching box of the stored
    scan, whichever storage axis is the canonical last one (axial, sagittal or coronal storage).
    """

    def __init__(self, image: Any, ornt: np.ndarray, canonical_shape: Sequence[int]) -> None:
        self.ornt = np.asarray(ornt)
        self.channels = image.num_channels
        self.shape = tuple(int(n) for n in canonical_shape)
        self.stored_shape = tuple(int(n) for n in image.spatial_shape)
        reader = getattr(image, "read_block", None)
        self.reader = reader if image.spatial_dims == 3 else None
        self.view = None
        if self.reader is None:
            array = image.array if reader is None else image.load().array
            self.view = oriented_view(array, self.ornt)

    def slab(self, z0: int, z1: int, inplane: Sequence[slice] | None = None) -> np.ndarray:
        """Canonical rows ``z0:z1`` as ``(C, *inplane, z1 - z0)`` (a view when held in memory)."""
        if self.view is not None:
            out = self.view[..., z0:z1]
            return out if inplane is None else out[(slice(None), *inplane, slice(None))]
        wanted = [*(inplane or (slice(0, n) for n in self.shape[:-1])), slice(z0, z1)]
        index = []
        for (axis, flip), n in zip(self.ornt, self.stored_shape, strict=True):
            start, stop, _ = wanted[int(axis)].indices(self.shape[int(axis)])
            want = slice(start, stop)
            index.append(slice(n - want.stop, n - want.start) if flip < 0 else want)
        return oriented_view(self.reader(tuple(index)), self.ornt)

    def slabs(
        self, inplane: Sequence[slice] | None = None, z: slice | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(z0, slab)`` over rows ``z`` (default all) in chunks of about ``_CHUNK_BYTES`` as float32."""
        z = z or slice(0, self.shape[-1])
        plane = math.prod(s.stop - s.start for s in inplane) if inplane else math.prod(self.shape[:-1])
        step = max(1, int(_CHUNK_BYTES // max(1, 4 * plane * self.channels)))
        for z0 in range(z.start, z.stop, step):
            yield z0, self.slab(z0, min(z.stop, z0 + step), inplane)


def canonical_grid(image: Any) -> tuple[np.ndarray, tuple[int, ...], tuple[float, ...]]:
    """``(ornt, shape, spacing_mm)`` of ``image``'s grid in the canonical (closest to RAS) order."""
    from medseg.data.geometry import canonical_ornt, oriented_affine

    ornt = np.asarray(canonical_ornt(image.affine, image.spatial_dims))
    shape = [0] * image.spatial_dims
    for i, (j, _) in enumerate(ornt):
        shape[int(j)] = int(image.spatial_shape[i])
    aff = oriented_affine(image.affine, ornt, image.spatial_shape)
    spacing = tuple(float(np.linalg.norm(aff[:3, i])) for i in range(image.spatial_dims))
    return ornt, tuple(shape), spacing


def linear_taps(n_out: int, n_in: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of linear resampling ``n_in -> n_out`` for output rows ``start:stop``.

    Same mapping as ``torch.nn.functional.interpolate(..., align_corners=False)``: output row ``o``
    reads ``c = max((o + 0.5) * n_in / n_out - 0.5, 0)``, i.e. ``(1 - lam) * in[i0] + lam * in[i1]``.
    """
    o = np.arange(start, stop, dtype=np.float64)
    c = np.maximum((o + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(c).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (c - i0).astype(np.float32)


def _resize_inplane(x: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Linear resize of the trailing in-plane axes of ``(n, C, *inplane)`` (float32)."""
    import torch
    import torch.nn.functional as F

    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = "bilinear" if len(size) == 2 else "linear"
    t = torch.from_numpy(np.ascontiguousarray(x))
    return F.interpolate(t, size=tuple(int(s) for s in size), mode=mode, align_corners=False).numpy()


def _zinterp(rows: np.ndarray, i0: np.ndarray, i1: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """``(1 - lam) * rows[i0] + lam * rows[i1]`` along axis 0 (exact copy where ``lam`` is 0)."""
    out = rows[i0].astype(np.float32, copy=True)
    mix = lam > 0
    if mix.any():
        w = lam[mix].reshape(-1, *([1] * (rows.ndim - 1)))
        out[mix] = (1 - w) * out[mix] + w * rows[i1[mix]].astype(np.float32, copy=False)
    return out


def _zfirst(x: np.ndarray) -> np.ndarray:
    """``(C, *inplane, Z)`` -> ``(Z, C, *inplane)`` view."""
    return np.moveaxis(x, -1, 0)


@dataclass
class Layout:
    """The grids a scan passes through: storage -> canonical -> body crop -> resampled -> padded.

    ``crop`` is in canonical voxels; ``pad`` is ``(before, after)`` per axis of the resampled grid
    (images smaller than the patch are padded, as MONAI does).
    """

    original_shape: tuple[int, ...]
    ornt: np.ndarray
    canonical_shape: tuple[int, ...]
    crop: tuple[slice, ...]
    resampled_shape: tuple[int, ...]
    pad: tuple[tuple[int, int], ...]

    @property
    def crop_shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.crop)

    @property
    def padded_shape(self) -> tuple[int, ...]:
        return tuple(n + a + b for n, (a, b) in zip(self.resampled_shape, self.pad, strict=True))

    def props(self) -> dict[str, Any]:
        """The geometry part of the preprocessing properties (as :func:`preprocess_volume` gives)."""
        return {
            "original_shape": list(self.original_shape),
            "ornt": np.asarray(self.ornt).tolist(),
            "canonical_shape": list(self.canonical_shape),
            "crop": [[s.start, s.stop] for s in self.crop],
            "resampled_shape": list(self.resampled_shape),
        }

    @classmethod
    def from_props(cls, props: dict[str, Any], patch_size: Sequence[int] | None = None) -> Layout:
        res = tuple(int(s) for s in props["resampled_shape"])
        return cls(
            tuple(props["original_shape"]),
            np.asarray(props["ornt"]),
            tuple(props["canonical_shape"]),
            tuple(slice(int(a), int(b)) for a, b in props["crop"]),
            res,
            _padding(res, patch_size or res),
        )


def _padding(shape: Sequence[int], patch: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """MONAI's padding of an image smaller than the window: ``diff // 2`` before, the rest after."""
    out = []
    for n, p in zip(shape, patch, strict=True):
        diff = max(int(p) - int(n), 0)
        out.append((diff // 2, diff - diff // 2))
    return tuple(out)


def body_box(src: CanonicalSlabs, threshold: float, margin: int = BODY_MARGIN_VOXELS) -> tuple[slice, ...]:
    """Bounding box of ``channel 0 > threshold`` grown by ``margin``, computed slab-wise (no full mask).

    Same result as training's ``bbox_of(canonical[0] > threshold, margin=margin)``; an image without
    body voxels gives the whole grid.
    """
    shape = src.shape
    hits = [np.zeros(n, bool) for n in shape]
    for z0, slab in src.slabs():
        m = slab[0] > threshold
        for ax in range(len(shape)):
            other = tuple(a for a in range(len(shape)) if a != ax)
            proj = m.any(axis=other)
            if ax == len(shape) - 1:
                hits[ax][z0 : z0 + len(proj)] |= proj
            else:
                hits[ax] |= proj
    if not hits[0].any():
        return tuple(slice(0, n) for n in shape)
    box = []
    for ax, h in enumerate(hits):
        idx = np.flatnonzero(h)
        box.append(slice(max(0, int(idx[0]) - margin), min(shape[ax], int(idx[-1]) + 1 + margin)))
    return tuple(box)


def plan_layout(image: Any, plan: Plan) -> tuple[Layout, CanonicalSlabs]:
    """The :class:`Layout` of ``image`` under ``plan`` and canonical slab access to its voxels."""
    from medseg.data.geometry import resampled_shape

    ornt, canonical_shape, spacing = canonical_grid(image)
    src = CanonicalSlabs(image, ornt, canonical_shape)
    box = tuple(slice(0, s) for s in canonical_shape)
    if plan.crop_to_body and plan.body_threshold is not None:
        box = body_box(src, plan.body_threshold)
    crop_shape = tuple(s.stop - s.start for s in box)
    res = resampled_shape(crop_shape, spacing, plan.target_spacing_mm)
    layout = Layout(image.spatial_shape, ornt, canonical_shape, box, res, _padding(res, plan.patch_size))
    return layout, src


def channel_stats(
    src: CanonicalSlabs, inplane: Sequence[slice], z: slice, zscore: Sequence[bool]
) -> tuple[list[float], list[float], list[float]]:
    """Minimum of every channel of the cropped (not resampled) scan, and mean and std of the channels
    flagged in ``zscore`` (others: 0 and 1), in one slab-wise pass over the scan."""
    lo = [math.inf] * src.channels
    total, total_sq, n = [0.0] * src.channels, [0.0] * src.channels, 0
    for _, slab in src.slabs(inplane, z):
        for c in range(src.channels):
            lo[c] = min(lo[c], float(slab[c].min()))
            if zscore[c]:
                v = np.asarray(slab[c], np.float64)
                total[c] += float(v.sum())
                total_sq[c] += float((v * v).sum())
        n += slab[0].size
    means = [t / max(n, 1) for t in total]
    stds = [
        math.sqrt(max(q / max(n, 1) - m * m, 0.0)) if zs else 1.0
        for q, m, zs in zip(total_sq, means, zscore, strict=True)
    ]
    return lo, means, stds


def fixed_normalization(norm: ChannelNorm, mean: float, std: float) -> ChannelNorm:
    """A per-image z-score turned into a fixed affine map with the image's ``mean`` and ``std``
    (:func:`channel_stats` of the cropped, not resampled, channel); CT normalisation is returned
    unchanged.

    Lazy preprocessing needs the statistics before the first slab is made. Linear resampling
    preserves the mean to within interpolation error, so this matches training's z-score of the
    resampled image to a few 1e-4.
    """
    if norm.scheme == "ct":
        return norm
    return ChannelNorm("ct", -math.inf, math.inf, mean, std)


# ------------------------------------------------------------------------------------ lazy input


class LazyInput:
    """The preprocessed (resampled, normalised, padded) image, produced slab by slab on demand.

    Rows (slices along the last axis, in padded coordinates) must be requested in non-decreasing
    order of their start; rows before the latest request's start are dropped.
    """

    def __init__(
        self, src: CanonicalSlabs, layout: Layout, norms: Sequence[ChannelNorm], cval: float
    ) -> None:
        self.src, self.layout, self.norms, self.cval = src, layout, list(norms), float(cval)
        self.inplane_padded = layout.padded_shape[:-1]
        self.buf = np.empty((0, src.channels, *self.inplane_padded), np.float32)
        self.b0 = 0

    def rows(self, p0: int, p1: int) -> np.ndarray:
        """Padded rows ``p0:p1`` as ``(p1 - p0, C, *inplane_padded)`` float32."""
        if p0 < self.b0:
            raise AssertionError(f"rows {p0}:{p1} requested after rows from {self.b0} were dropped")
        b1 = self.b0 + len(self.buf)
        keep = self.buf[max(0, p0 - self.b0) :]
        if p1 > b1:
            keep = np.concatenate([keep, self._make(max(b1, p0), p1)])
        self.buf, self.b0 = keep, max(p0, self.b0)
        return self.buf[p0 - self.b0 : p1 - self.b0]

    def _make(self, p0: int, p1: int) -> np.ndarray:
        lay = self.layout
        before = lay.pad[-1][0]
        z_res = lay.resampled_shape[-1]
        out = np.full((p1 - p0, self.src.channels, *self.inplane_padded), self.cval, np.float32)
        r0, r1 = max(p0 - before, 0), min(p1 - before, z_res)
        if r1 <= r0:
            return out
        i0, i1, lam = linear_taps(z_res, lay.crop_shape[-1], r0, r1)
        lo, hi = int(i0.min()), int(i1.max()) + 1
        c0 = lay.crop[-1].start
        raw = _zfirst(self.src.slab(c0 + lo, c0 + hi, lay.crop[:-1]))  # (n, C, *inplane_crop), source dtype
        x = _zinterp(raw, i0 - lo, i1 - lo, lam)
        x = _resize_inplane(x, lay.resampled_shape[:-1])
        for c, norm in enumerate(self.norms):
            x[:, c] = norm.apply(x[:, c])
        inner = tuple(
            slice(a, a + n) for (a, _), n in zip(lay.pad[:-1], lay.resampled_shape[:-1], strict=True)
        )
        out[(slice(r0 + before - p0, r1 + before - p0), slice(None), *inner)] = x
        return out


# ------------------------------------------------------------------------------------ restoration


class Restorer:
    """Takes finalised probabilities (or logits, ``space="logits"``) of resampled-grid rows (in order)
    and writes decided labels of canonical-crop rows into ``out`` (a canonical view of the output),
    resampling them linearly first when the spacing changed.

    softmax: ``out`` is ``(1, *canonical)`` and receives label values (argmax, first maximum wins);
    sigmoid: ``out`` is ``(S, *canonical)`` and receives 0/1 (``p >= threshold``, i.e. ``logit >=
    logit(threshold)``).
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
    ) -> None:
        self.layout, self.out, self.mode, self.threshold, self.sink = layout, out, plan.mode, threshold, sink
        self.space = space
        self.lut = np.array([0, *plan.label_values], dtype=out.dtype) if plan.mode == "softmax" else None
        self.buf: np.ndarray | None = None
        self.q0 = 0  # resampled row of buf[0]
        self.next = 0  # next crop row to emit
        k = plan.out_channels
        per_row = 4 * k * math.prod(layout.crop_shape[:-1]) * 3
        self.chunk = max(1, int(_CHUNK_BYTES // max(per_row, 1)))

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
            probs = _resize_inplane(_zinterp(self.buf, i0 - self.q0, i1 - self.q0, lam), lay.crop_shape[:-1])
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
        c0 = self.layout.crop[-1].start
        inplane = self.layout.crop[:-1]
        logits = self.space == "logits"
        if self.sink is not None:
            self.sink((*inplane, slice(c0 + z0, c0 + z1)), _activate(values, self.mode) if logits else values)
        if self.mode == "softmax":  # the argmax of the logits is the argmax of their softmax
            lab = self.lut[_argmax_channels(values)]  # (n, *inplane)
            self.out[(0, *inplane, slice(c0 + z0, c0 + z1))] = np.moveaxis(lab, 0, -1)
        else:
            cut = _logit(self.threshold) if logits else self.threshold
            masks = (values >= cut).astype(self.out.dtype)  # (n, S, *inplane)
            self.out[(slice(None), *inplane, slice(c0 + z0, c0 + z1))] = np.moveaxis(masks, 0, -1)

    @property
    def done(self) -> bool:
        return self.next >= self.layout.crop_shape[-1]


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
    if plan.mode == "softmax":
        dtype = np.uint16 if max(plan.label_values, default=0) > 255 else np.uint8
        return np.zeros((1, *layout.original_shape), dtype, order="F")
    return np.zeros((len(plan.structure_names), *layout.original_shape), np.uint8, order="F")


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


# ------------------------------------------------------------------------------------ the engine


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
    import itertools

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


def lr_channel_permutation(plan: Plan) -> list[int]:
    """Output-channel order after mirroring the left-right axis: paired left/right structures swap."""
    off = 1 if plan.mode == "softmax" else 0
    perm = list(range(plan.out_channels))
    names = list(plan.structure_names)
    for a, b in plan.left_right_pairs:
        ia, ib = names.index(a) + off, names.index(b) + off
        perm[ia], perm[ib] = ib, ia
    return perm


class _Runner:
    """Runs batches of windows through the network on its device (AMP on CUDA), with mirror TTA."""

    def __init__(self, model: Any, device: Any, plan: Plan, tta: bool) -> None:
        import torch

        self.model, self.device = model, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.flips = mirror_axes(plan.spatial_dims) if tta else [()]
        self.perm = lr_channel_permutation(plan)
        self.amp_dtype = amp_dtype(self.device)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``(B, C, *patch)`` float32 -> ``(B, K, *patch)`` float32 logits (on the CPU)."""
        import torch

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
        import torch

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


def _logit(p: float) -> float:
    """``log(p / (1 - p))``: a sigmoid threshold on probabilities as a threshold on logits."""
    return math.log(p / (1.0 - p))


_EMPTY_LOGIT = 20.0
"""Logit magnitude given to voxels no window covered (skipped): background, p(other) ~ 2e-9."""


def _activate(logits: np.ndarray, mode: str) -> np.ndarray:
    """Softmax (over axis 1) or sigmoid of ``(n, K, ...)`` logits, float32."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(logits, np.float32))
    return (torch.softmax(t, 1) if mode == "softmax" else torch.sigmoid(t)).numpy()


def _blended(
    acc: np.ndarray, w: np.ndarray, mode: str, space: str = "probabilities", threshold: float = 0.5
) -> np.ndarray:
    """Blended logits (``acc / w``) as probabilities or logits (``space``); voxels no window covered
    (skipped air or outside the coarse ROI) are background: in logit space ``_EMPTY_LOGIT`` below
    the decision (sigmoid: below ``logit(threshold)``, whatever the threshold)."""
    empty = w <= 0
    logits = (acc / np.maximum(w, 1e-12)[:, None]).astype(np.float32, copy=False)
    if space == "logits":
        if empty.any():
            low = min(-_EMPTY_LOGIT, _logit(threshold) - _EMPTY_LOGIT)
            for k in range(logits.shape[1]):
                logits[:, k][empty] = _EMPTY_LOGIT if (mode == "softmax" and k == 0) else low
        return logits
    probs = _activate(logits, mode)
    if empty.any():
        for k in range(probs.shape[1]):
            probs[:, k][empty] = 1.0 if (mode == "softmax" and k == 0) else 0.0
    return probs


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


def coarse_pass(
    lazy: LazyInput,
    padded: Sequence[int],
    patch: Sequence[int],
    runner: _Runner,
    plan: Plan,
    opts: EngineOptions,
    air: float | None,
    single: frozenset[str] = frozenset(),
) -> tuple[RoiMap, int]:
    """Run non-overlapping windows (no blending) and mark where each structure is predicted.

    Softmax models mark voxels whose argmax is the structure; sigmoid models voxels where it passes
    ``opts.threshold``. For structures named in ``single`` (one connected object, e.g. the liver)
    only the largest connected group of marked blocks is kept, so scattered false-positive blobs of
    a raw output do not pull the whole scan into the region of interest. Returns the union of the
    structures' maps and the number of windows run.
    """
    from scipy import ndimage

    names = plan.structure_names
    maps = [RoiMap(padded) for _ in names]
    cut = _logit(opts.threshold)
    batch: list[tuple[tuple[slice, ...], np.ndarray]] = []
    run = 0

    def flush() -> None:
        nonlocal run
        if batch:
            for (w, _), logits in zip(batch, runner(np.stack([x for _, x in batch])), strict=True):
                hits = logits.argmax(0) if plan.mode == "softmax" else logits > cut
                for k, m in enumerate(maps):
                    fg = hits == k + 1 if plan.mode == "softmax" else hits[k]
                    if fg.any():
                        m.mark(w, fg)
            run += len(batch)
            batch.clear()

    for w in window_slices(padded, patch, 0.0):
        x = _window_input(lazy, w)
        if air is None or float(x[0].max()) > air:
            batch.append((w, x))
        if len(batch) == opts.batch_size:
            flush()
    flush()
    roi = RoiMap(padded)
    for name, m in zip(names, maps, strict=True):
        if name in single and m.fg.any():
            comp, n = ndimage.label(m.fg, structure=np.ones((3,) * m.fg.ndim, bool))
            if n > 1:
                sizes = np.bincount(comp.ravel())[1:]
                m.fg = comp == 1 + int(np.argmax(sizes))
        roi.fg |= m.fg
    return roi, run


@dataclass
class EngineStats:
    """What one :func:`segment` call did."""

    windows: int = 0
    windows_run: int = 0
    coarse_windows_run: int = 0
    accumulator_bytes: int = 0
    layout: Layout | None = None


def check_input(image: Any, plan: Plan) -> None:
    """Refuse (:class:`DataError`, naming the file) an image the model cannot take: other spatial
    dimensions or another number of channels."""
    where = image.meta.get("source", "image")
    shape = "x".join(map(str, image.spatial_shape))
    if image.spatial_dims != plan.spatial_dims and plan.spatial_dims == 3:
        raise DataError(
            f"{where}: a 2D image ({shape}), but the model is 3D (trained on volumes); pass a 3D scan "
            "(NIfTI, NRRD or a DICOM series folder), or use a 2D model"
        )
    if image.spatial_dims != plan.spatial_dims:
        raise DataError(
            f"{where}: a 3D scan ({shape}), but the model is 2D; pass 2D images (PNG, a DICOM "
            "radiograph, or a NIfTI with one slice), or use a 3D model"
        )
    if image.num_channels != plan.in_channels:
        raise DataError(
            f"{where}: {image.num_channels} channel(s), the model expects {plan.in_channels} "
            "(one file per channel: <case>_0000, <case>_0001, ...)"
        )


def segment(
    image: Volume,
    plan: Plan,
    model: Any,
    device: Any,
    opts: EngineOptions | None = None,
    *,
    sink: ProbabilitySink | None = None,
    stats: EngineStats | None = None,
    single: frozenset[str] = frozenset(),
) -> np.ndarray:
    """Labels of ``image`` on exactly its grid: ``(1, *shape)`` label values (softmax models) or
    ``(S, *shape)`` 0/1 masks (sigmoid models), in the input's storage order.

    ``sink`` receives the probabilities of each finalised block of canonical crop rows (e.g. to save
    them); ``stats`` is filled with window counts and the accumulator size; ``single`` names the
    structures that are one connected object (the coarse pass keeps their largest component).
    """
    from monai.data.utils import compute_importance_map
    from tqdm.auto import tqdm

    opts = opts or EngineOptions()
    stats = stats if stats is not None else EngineStats()
    check_input(image, plan)
    layout, src = plan_layout(image, plan)
    inplane, zc = layout.crop[:-1], layout.crop[-1]
    lowest, means, stds = channel_stats(src, inplane, zc, [n.scheme != "ct" for n in plan.normalization])
    norms = [fixed_normalization(*a) for a in zip(plan.normalization, means, stds, strict=True)]
    cval = min(float(n.apply(np.array([lo], np.float32))[0]) for lo, n in zip(lowest, norms, strict=True))
    air = None
    if opts.skip_air and plan.body_threshold is not None:
        # channel 0 decides, as for the body box (other channels may be normalised differently)
        air = float(norms[0].apply(np.array([plan.body_threshold], np.float32))[0])
    out = new_output(layout, plan)
    view = oriented_view(out, layout.ornt)
    restorer = Restorer(layout, view, plan, threshold=opts.threshold, sink=sink, space=opts.resample)

    patch = tuple(int(p) for p in plan.patch_size)
    padded = layout.padded_shape
    windows = window_slices(padded, patch, opts.overlap)
    starts = [w[-1].start for w in windows]
    step = max((b - a for a, b in zip(starts, starts[1:], strict=False)), default=0)
    per_start = max(1, sum(1 for s in starts if s == starts[0]))
    cap = patch[-1] + step * max(1, math.ceil((opts.batch_size - 1) / per_start))
    acc_dtype = np.float16 if opts.accumulator_dtype == "float16" else np.float32
    accum = Accumulator(cap, plan.out_channels, padded[:-1], acc_dtype)
    stats.windows, stats.layout = len(windows), layout
    stats.accumulator_bytes = accum.acc.nbytes + accum.wsum.nbytes
    imp = compute_importance_map(patch, mode="gaussian", sigma_scale=0.125, device="cpu").numpy()
    imp_z = _zfirst(imp[None])[:, 0]  # (pz, *patch_inplane)
    runner = _Runner(model, device, plan, opts.tta)
    final = _Finaliser(layout, restorer, plan.mode)
    roi, margin = None, [p // 4 for p in patch]
    if opts.coarse_roi:
        coarse_runner = _Runner(model, device, plan, tta=False)
        roi, stats.coarse_windows_run = coarse_pass(
            LazyInput(src, layout, norms, cval), padded, patch, coarse_runner, plan, opts, air, single
        )
    lazy = LazyInput(src, layout, norms, cval)

    batch: list[tuple[tuple[slice, ...], np.ndarray]] = []
    bar = tqdm(total=len(windows), desc="windows", disable=not opts.progress, leave=False)

    def flush() -> None:
        if batch:
            y = runner(np.stack([x for _, x in batch]))
            for (w, _), logits in zip(batch, y, strict=True):
                accum.add(w, _zfirst(logits), imp_z)
            stats.windows_run += len(batch)
            bar.update(len(batch))
            batch.clear()

    for i, w in enumerate(windows):
        start = w[-1].start
        if start + patch[-1] > final.done_to + cap:
            flush()
            final.advance(accum, start)
        if roi is not None and not roi.near(w, margin):
            bar.update(1)  # nothing near it in the coarse pass: background
        else:
            x = _window_input(lazy, w)  # read now: the lazy input drops rows behind the latest window
            if air is not None and float(x[0].max()) <= air:
                bar.update(1)
            else:
                batch.append((w, x))
        if len(batch) == opts.batch_size:
            flush()
            final.advance(accum, windows[i + 1][-1].start if i + 1 < len(windows) else padded[-1])
    flush()
    final.advance(accum, padded[-1])
    bar.close()
    if not restorer.done:
        raise AssertionError("sliding windows did not cover the scan")
    return out


def _window_input(lazy: LazyInput, w: tuple[slice, ...]) -> np.ndarray:
    """``(C, *patch)`` input of one window."""
    rows = lazy.rows(w[-1].start, w[-1].stop)  # (pz, C, *inplane_padded)
    x = rows[(slice(None), slice(None), *w[:-1])]
    return np.ascontiguousarray(np.moveaxis(x, 0, -1))


class _Finaliser:
    """Finalises padded rows no window will touch again: blend, probabilities, un-pad, restore."""

    def __init__(self, layout: Layout, restorer: Restorer, mode: str) -> None:
        self.layout, self.restorer, self.mode = layout, restorer, mode
        self.done_to = 0
        k = restorer.lut.size if restorer.lut is not None else restorer.out.shape[0]
        self.rows_per_chunk = max(1, int(_CHUNK_BYTES // max(1, 8 * k * math.prod(layout.padded_shape[:-1]))))

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
                probs = _blended(acc[sel], w[sel], self.mode, self.restorer.space, self.restorer.threshold)
                self.restorer.push(r0, np.ascontiguousarray(probs[(slice(None), slice(None), *inner)]))
            self.done_to = p1


# ------------------------------------------------------------------------------------ memory


def estimate_memory(image: Volume, plan: Plan, opts: EngineOptions, *, params: int = 0) -> dict[str, int]:
    """Bytes :func:`segment` will hold for ``image`` beyond the loaded scan, by component.

    ``accumulator``: the ring of blended logits and weights; ``output``: the label map (Fortran
    order, written without a copy); ``input_slabs``: lazy preprocessing and window batches;
    ``restore``: finalisation chunks; ``network``: parameters and activations (a rough bound of
    ``batch × patch voxels × 64 channels × 4 bytes × 4``). Sizes of the canonical crop are taken as the
    whole grid (the body box is not known before reading the data).
    """
    from medseg.data.geometry import resampled_shape

    _, canon_shape, spacing = canonical_grid(image)
    res = resampled_shape(canon_shape, spacing, plan.target_spacing_mm)
    patch = [int(p) for p in plan.patch_size]
    padded = [max(r, p) for r, p in zip(res, patch, strict=True)]
    k = plan.out_channels
    inplane = math.prod(padded[:-1])
    step = max(math.ceil(patch[-1] * (1 - opts.overlap)), 1)  # even steps are at most this
    cap = patch[-1] + step * max(1, opts.batch_size - 1)
    acc_item = 2 if opts.accumulator_dtype == "float16" else 4
    n_out = 1 if plan.mode == "softmax" else len(plan.structure_names)
    out_item = 2 if max(plan.label_values, default=0) > 255 else 1
    est = {
        "accumulator": cap * inplane * (k * acc_item + 4),
        "output": n_out * math.prod(image.spatial_shape) * out_item,
        "input_slabs": 4 * plan.in_channels * inplane * (patch[-1] + step) * 2
        + 4 * opts.batch_size * plan.in_channels * math.prod(patch) * 2,
        "restore": 4 * _CHUNK_BYTES,
        "network": 4 * params + opts.batch_size * math.prod(patch) * 64 * 4 * 4,
    }
    est["total"] = sum(est.values())
    return est
