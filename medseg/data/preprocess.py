"""The one definition of preprocessing: used eagerly by the training cache and lazily, slab by slab, by
the prediction engine, so both give the same arrays.

Steps, for an image and a :class:`~medseg.data.plan.Plan`:

1. the input is checked against the model (:func:`check_input`: dimensions and channels);
2. it is viewed (not copied) in the canonical RAS order (:class:`~medseg.data.canonical.CanonicalSlabs`);
3. CT is cropped to the body: channel 0 above the plan's body threshold, grown by
   :data:`BODY_MARGIN_VOXELS` (:func:`body_box`, slab-wise);
4. each channel's normalisation is fixed for the scan (:func:`channel_stats`,
   :func:`fixed_normalization`: a per-image z-score uses the cropped channel's mean and std);
5. the crop is resampled linearly to the target spacing, rows along the last axis first and then the
   in-plane axes (separable, the same mapping as ``F.interpolate(..., align_corners=False)``), and
   normalised (:class:`LazyInput`, which the engine reads row by row and :meth:`Preprocessing.array`
   reads whole, so the training cache and prediction never differ);
6. (training) labels are cropped with the same box and resampled per class, never with nearest
   neighbour; border-weight maps are computed on the result.

The :class:`Layout` records every grid the scan passes through (``props``): what prediction needs to
map results back onto the scan's own grid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medseg.data.canonical import SLAB_BYTES, CanonicalSlabs, canonical_grid
from medseg.data.geometry import (
    crop_affine,
    oriented_affine,
    resample_labels,
    resample_masks,
    resampled_affine,
    resampled_shape,
    to_canonical,
)
from medseg.data.plan import ChannelNorm, Plan
from medseg.errors import DataError
from medseg.labels import Mode, label_dtype_for
from medseg.losses.weight_maps import unet_border_weight_map, unet_border_weight_map_multichannel
from medseg.types import Volume

__all__ = [
    "BODY_MARGIN_VOXELS",
    "LazyInput",
    "Layout",
    "PreprocessedCase",
    "Preprocessing",
    "ScanStats",
    "body_box",
    "channel_stats",
    "check_input",
    "compute_weights",
    "fixed_normalization",
    "input_warnings",
    "label_to_indices",
    "linear_taps",
    "plan_layout",
    "preprocess_case",
    "preprocess_volume",
]

BODY_MARGIN_VOXELS = 3


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


def resize_inplane(x: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Linear resize of the trailing in-plane axes of ``(n, C, *inplane)`` (float32)."""

    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = "bilinear" if len(size) == 2 else "linear"
    t = torch.from_numpy(np.ascontiguousarray(x))
    return F.interpolate(t, size=tuple(int(s) for s in size), mode=mode, align_corners=False).numpy()


def zinterp(rows: np.ndarray, i0: np.ndarray, i1: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """``(1 - lam) * rows[i0] + lam * rows[i1]`` along axis 0 (exact copy where ``lam`` is 0)."""
    out = rows[i0].astype(np.float32, copy=True)
    mix = lam > 0
    if mix.any():
        w = lam[mix].reshape(-1, *([1] * (rows.ndim - 1)))
        out[mix] = (1 - w) * out[mix] + w * rows[i1[mix]].astype(np.float32, copy=False)
    return out


def zfirst(x: np.ndarray) -> np.ndarray:
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
    original_affine: np.ndarray | None = None

    @property
    def crop_shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.crop)

    @property
    def padded_shape(self) -> tuple[int, ...]:
        return tuple(n + a + b for n, (a, b) in zip(self.resampled_shape, self.pad, strict=True))

    def resampled_affine(self) -> np.ndarray:
        """Voxel -> world affine of the resampled grid (needs ``original_affine``)."""
        if self.original_affine is None:
            raise ValueError("this layout was made without the scan's affine")
        canonical = oriented_affine(self.original_affine, self.ornt, self.original_shape)
        return resampled_affine(crop_affine(canonical, self.crop), self.crop_shape, self.resampled_shape)

    def props(self) -> dict[str, Any]:
        """The geometry record of a preprocessed case (``<case>_props.json`` in the training cache):
        enough to map results on the resampled grid back to the scan (:meth:`from_props`)."""
        out: dict[str, Any] = {
            "original_shape": list(self.original_shape),
            "ornt": np.asarray(self.ornt).tolist(),
            "canonical_shape": list(self.canonical_shape),
            "crop": [[s.start, s.stop] for s in self.crop],
            "resampled_shape": list(self.resampled_shape),
        }
        if self.original_affine is not None:
            out["original_affine"] = np.asarray(self.original_affine).tolist()
            out["affine"] = self.resampled_affine().tolist()
        return out

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
            np.asarray(props["original_affine"]) if "original_affine" in props else None,
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

    Same result as ``bbox_of(canonical[0] > threshold, margin=margin)``; an image without body voxels
    gives the whole grid.
    """
    shape = src.shape
    hits = [np.zeros(n, bool) for n in shape]
    for z0, slab in src.slabs():
        m = slab[0] > threshold
        if m.dtype == bool and slab.dtype.kind == "f":
            m &= np.isfinite(slab[0])  # an infinite voxel is not body
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
    ornt, canonical_shape, spacing = canonical_grid(image)
    src = CanonicalSlabs(image, ornt, canonical_shape)
    box = tuple(slice(0, s) for s in canonical_shape)
    if plan.crop_to_body and plan.body_threshold is not None:
        box = body_box(src, plan.body_threshold)
    crop_shape = tuple(s.stop - s.start for s in box)
    res = resampled_shape(crop_shape, spacing, plan.target_spacing_mm)
    layout = Layout(
        image.spatial_shape, ornt, canonical_shape, box, res, _padding(res, plan.patch_size), image.affine
    )
    return layout, src


@dataclass(frozen=True)
class ScanStats:
    """Statistics of the cropped (not resampled) scan, from one slab-wise pass.

    Per channel: the lowest and highest finite value, the mean and std of the finite values (for the
    channels a per-image z-score needs; others 0 and 1) and the count of NaN/infinite voxels; for channel 0
    the count of voxels below -500 (air, in a CT in Hounsfield units).
    """

    voxels: int
    lowest: tuple[float, ...]
    highest: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    nonfinite: tuple[int, ...]
    below_air: int


AIR_HU = -500.0
"""Channel-0 values below this are air in a CT in Hounsfield units (the CT body threshold too)."""


def channel_stats(
    src: CanonicalSlabs, inplane: Sequence[slice], z: slice, zscore: Sequence[bool]
) -> ScanStats:
    """:class:`ScanStats` of the cropped scan (``inplane`` and rows ``z``) in one slab-wise pass."""
    nc = src.channels
    lo, hi = [math.inf] * nc, [-math.inf] * nc
    total, total_sq, count, bad = [0.0] * nc, [0.0] * nc, [0] * nc, [0] * nc
    n = air = 0
    for _, slab in src.slabs(inplane, z):
        for c in range(nc):
            v = np.asarray(slab[c])
            if v.dtype.kind == "f":
                finite = np.isfinite(v)
                if not finite.all():
                    bad[c] += int(v.size - finite.sum())
                    v = v[finite]
            if v.size:
                lo[c], hi[c] = min(lo[c], float(v.min())), max(hi[c], float(v.max()))
            count[c] += v.size
            if zscore[c]:
                w = np.asarray(v, np.float64)
                total[c] += float(w.sum())
                total_sq[c] += float((w * w).sum())
            if c == 0:
                air += int(np.count_nonzero(v < AIR_HU))
        n += slab[0].size
    means = [t / max(k, 1) for t, k in zip(total, count, strict=True)]
    stds = [
        math.sqrt(max(q / max(k, 1) - m * m, 0.0)) if zs else 1.0
        for q, m, k, zs in zip(total_sq, means, count, zscore, strict=True)
    ]
    return ScanStats(
        voxels=n,
        lowest=tuple(v if math.isfinite(v) else 0.0 for v in lo),
        highest=tuple(v if math.isfinite(v) else 0.0 for v in hi),
        mean=tuple(means),
        std=tuple(stds),
        nonfinite=tuple(bad),
        below_air=air,
    )


_DICOM_MODALITY = {"CT": "ct", "MR": "mr", "CR": "xray", "DX": "xray", "RG": "xray", "PX": "xray"}
"""DICOM Modality -> the modality of a medseg model; any other DICOM modality (PT, NM, US, SC, ...)
matches no model."""


def input_warnings(stats: ScanStats, plan: Plan, meta: Mapping[str, Any]) -> list[str]:
    """Why an input may lie outside what the model was trained on (empty when nothing is noticed).

    Checked: NaN/infinite voxels (they are replaced by the channel's lowest finite value); a DICOM
    Modality other than the model's; for CT models, a scan with no air below -500 HU (an MR scan, or a CT
    rescaled or cropped to the body) or with intensities spanning less than 50 (rescaled, e.g. to
    0..1), since CT in Hounsfield units spans air (-1000) to bone (> 300).
    """
    out = []
    for c, k in enumerate(stats.nonfinite):
        if k:
            out.append(
                f"{k} voxel(s) of channel {c} are NaN or infinite; they were replaced by the channel's "
                f"lowest value ({stats.lowest[c]:.6g})"
            )
    dicom = str(meta.get("modality") or "").strip().upper()
    if dicom and _DICOM_MODALITY.get(dicom) != plan.modality:
        out.append(f"the DICOM image is {dicom}, but the model was trained on {plan.modality}")
    if plan.modality == "ct" and stats.voxels:
        lo, hi = stats.lowest[0], stats.highest[0]
        if hi - lo < 50:
            out.append(
                f"intensities span only {lo:.4g}..{hi:.4g}, but a CT in Hounsfield units spans air (-1000) "
                "to bone (> 300): the scan looks rescaled (e.g. to 0..1)"
            )
        elif stats.below_air == 0:
            out.append(
                f"no voxel below {AIR_HU:.0f} HU (air; lowest {lo:.4g}): not a CT in Hounsfield units (an MR "
                "scan, or a CT rescaled or cropped to the body?)"
            )
    return out


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


class LazyInput:
    """The preprocessed (resampled, normalised, padded) image, produced slab by slab on demand.

    Rows (slices along the last axis, in padded coordinates) must be requested in non-decreasing
    order of their start; rows before the latest request's start are dropped.
    """

    def __init__(
        self,
        src: CanonicalSlabs,
        layout: Layout,
        norms: Sequence[ChannelNorm],
        cval: float,
        fill: Sequence[float] | None = None,
    ) -> None:
        self.src, self.layout, self.norms, self.cval = src, layout, list(norms), float(cval)
        self.fill = None if fill is None else np.asarray(fill, np.float32)
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
            keep = np.concatenate([keep, self.make(max(b1, p0), p1)])
        self.buf, self.b0 = keep, max(p0, self.b0)
        return self.buf[p0 - self.b0 : p1 - self.b0]

    def make(self, p0: int, p1: int) -> np.ndarray:
        """Padded rows ``p0:p1``, made afresh (nothing is kept)."""
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
        raw = zfirst(self.src.slab(c0 + lo, c0 + hi, lay.crop[:-1]))  # (n, C, *inplane_crop), source dtype
        if self.fill is not None:  # NaN/inf would spread through the network far beyond their voxels
            shape = (1, -1) + (1,) * (raw.ndim - 2)
            raw = np.where(np.isfinite(raw), raw, self.fill.reshape(shape))
        x = zinterp(raw, i0 - lo, i1 - lo, lam)
        x = resize_inplane(x, lay.resampled_shape[:-1])
        for c, norm in enumerate(self.norms):
            x[:, c] = norm.apply(x[:, c])
        inner = tuple(
            slice(a, a + n) for (a, _), n in zip(lay.pad[:-1], lay.resampled_shape[:-1], strict=True)
        )
        out[(slice(r0 + before - p0, r1 + before - p0), slice(None), *inner)] = x
        return out


@dataclass
class Preprocessing:
    """One scan under a plan: the grids it passes through, slab access to its voxels, and the
    normalisation fixed for it. :meth:`lazy` is what the prediction engine reads; :meth:`array` is the
    same rows made whole, what the training cache stores.
    """

    layout: Layout
    source: CanonicalSlabs
    norms: tuple[ChannelNorm, ...]
    pad_value: float
    stats: ScanStats
    warnings: tuple[str, ...] = ()

    @classmethod
    def of(cls, image: Any, plan: Plan) -> Preprocessing:
        """Check ``image`` against the model, find its body box and fix its normalisation (one slab-wise
        pass over the scan). ``image`` is a :class:`~medseg.types.Volume` or a slab reader.

        Raises:
            DataError: An image the model cannot take (:func:`check_input`).
        """
        check_input(image, plan)
        layout, src = plan_layout(image, plan)
        zscore = [n.scheme != "ct" for n in plan.normalization]
        stats = channel_stats(src, layout.crop[:-1], layout.crop[-1], zscore)
        norms = tuple(
            fixed_normalization(*a) for a in zip(plan.normalization, stats.mean, stats.std, strict=True)
        )
        pad = min(
            float(n.apply(np.array([lo], np.float32))[0]) for lo, n in zip(stats.lowest, norms, strict=True)
        )
        warnings = tuple(input_warnings(stats, plan, getattr(image, "meta", {}) or {}))
        return cls(layout, src, norms, pad, stats, warnings)

    @property
    def _fill(self) -> tuple[float, ...] | None:
        """Replacement values of NaN/infinite voxels (the channels' lowest), or None when there are none."""
        return self.stats.lowest if any(self.stats.nonfinite) else None

    def lazy(self) -> LazyInput:
        """The padded, resampled, normalised image, made row by row on demand."""
        return LazyInput(self.source, self.layout, self.norms, self.pad_value, self._fill)

    def array(self) -> np.ndarray:
        """The whole resampled, normalised image ``(C, *resampled_shape)`` float32 (not padded): the
        rows :meth:`lazy` gives, made in chunks of about :data:`SLAB_BYTES`."""
        lay = replace(self.layout, pad=tuple((0, 0) for _ in self.layout.pad))
        maker = LazyInput(self.source, lay, self.norms, self.pad_value, self._fill)
        n = lay.resampled_shape[-1]
        out = np.empty((self.source.channels, *lay.resampled_shape), np.float32)
        step = max(1, SLAB_BYTES // max(1, 4 * self.source.channels * math.prod(lay.resampled_shape[:-1])))
        for z0 in range(0, n, step):
            rows = maker.make(z0, min(n, z0 + step))  # (rows, C, *inplane)
            out[..., z0 : z0 + len(rows)] = np.moveaxis(rows, 0, -1)
        return out


@dataclass
class PreprocessedCase:
    """Arrays on the plan's grid plus what is needed to map results back to the original grid.

    Attributes:
        image: ``(C, *spatial)`` float32, normalised.
        label: softmax: ``(1, *spatial)`` uint8/uint16 class indices (0 background, i+1 = structure i);
            sigmoid: ``(S, *spatial)`` uint8 0/1 masks; ``None`` for unlabelled cases.
        weights: ``(1, *spatial)`` float16 border-weight map or ``None``.
        props: JSON-able geometry (:meth:`Layout.props`) and ``spacing_mm``.
    """

    image: np.ndarray
    label: np.ndarray | None
    weights: np.ndarray | None
    props: dict[str, Any]


def label_to_indices(label: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Map label values (e.g. AMOS ids) to class indices ``1..K`` in plan order; other values -> 0."""
    lut_size = max(int(label.max()) + 1 if label.size else 1, max(values, default=0) + 1)
    lut = np.zeros(lut_size, dtype=label_dtype_for(len(values)))
    for i, v in enumerate(values):
        lut[int(v)] = i + 1
    return lut[label.astype(np.int64, copy=False)]


def preprocess_volume(image: Volume, plan: Plan) -> tuple[np.ndarray, dict[str, Any]]:
    """Preprocess an image only; returns the array and the geometry props."""
    prep = Preprocessing.of(image, plan)
    return prep.array(), {**prep.layout.props(), "spacing_mm": list(plan.target_spacing_mm)}


def preprocess_case(image: Volume, label: Volume | None, plan: Plan) -> PreprocessedCase:
    """Preprocess an image and its label with the plan (labels resampled per class, not nearest)."""
    prep = Preprocessing.of(image, plan)
    lay = prep.layout
    lab_arr = weights = None
    if label is not None:
        canonical, _ = to_canonical(label)
        lab_arr = canonical.array[(slice(None), *lay.crop)]
        if plan.mode == Mode.SOFTMAX:
            idx = label_to_indices(lab_arr, plan.label_values)
            lab_arr = resample_labels(idx, lay.resampled_shape, values=range(1, len(plan.label_values) + 1))
            lab_arr = lab_arr.astype(label_dtype_for(len(plan.label_values)))
        else:
            lab_arr = resample_masks(lab_arr, lay.resampled_shape)
        weights = compute_weights(lab_arr, plan)
    props = {**lay.props(), "spacing_mm": list(plan.target_spacing_mm)}
    return PreprocessedCase(prep.array(), lab_arr, weights, props)


def compute_weights(label: np.ndarray, plan: Plan) -> np.ndarray | None:
    """Border-weight map ``(1, *spatial)`` float16 for a preprocessed label (None when disabled)."""
    bw = plan.border_weights or {}
    if not bw.get("enabled", False):
        return None

    kwargs = {
        "w0": float(bw["w0"]),
        "sigma_mm": float(bw["sigma_mm"]),
        "spacing_mm": plan.target_spacing_mm,
        "class_balance": bool(bw.get("class_balance", True)),
    }
    if plan.mode == Mode.SOFTMAX:
        w = unet_border_weight_map(label[0], **kwargs)
    else:
        w = unet_border_weight_map_multichannel(label, **kwargs)
    return w[None].astype(np.float16)
