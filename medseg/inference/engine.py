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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from monai.data.utils import compute_importance_map
from scipy import ndimage
from tqdm.auto import tqdm

from medseg.config import CRFConfig, PredictConfig
from medseg.data.canonical import SLAB_BYTES, canonical_grid, oriented_view
from medseg.data.geometry import resampled_shape
from medseg.data.plan import ChannelNorm, Plan
from medseg.data.preprocess import Layout, LazyInput, Preprocessing, zfirst
from medseg.errors import ConfigError
from medseg.inference.crf import crf_for_scan, crf_memory_bytes
from medseg.inference.restore import Finaliser, ProbabilitySink, Restorer, logit, new_output
from medseg.inference.tiling import Accumulator, NetworkRunner, RoiMap, window_slices
from medseg.labels import Mode
from medseg.types import Volume

__all__ = ["EngineOptions", "EngineStats", "ProbabilitySink", "coarse_pass", "estimate_memory", "segment"]

logger = logging.getLogger(__name__)


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
        crf: Dense CRF refinement of the probabilities on the scan's own grid before the decision
            (:mod:`medseg.inference.crf`), when ``crf.enabled``.
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
    crf: CRFConfig = field(default_factory=CRFConfig)
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
            "crf": predict.crf,
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


def coarse_pass(
    lazy: LazyInput,
    padded: Sequence[int],
    patch: Sequence[int],
    runner: NetworkRunner,
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
    names = plan.structure_names
    maps = [RoiMap(padded) for _ in names]
    cut = logit(opts.threshold)
    batch: list[tuple[tuple[slice, ...], np.ndarray]] = []
    run = 0

    def flush() -> None:
        nonlocal run
        if batch:
            for (w, _), logits in zip(batch, runner(np.stack([x for _, x in batch])), strict=True):
                hits = logits.argmax(0) if plan.mode == Mode.SOFTMAX else logits > cut
                for k, m in enumerate(maps):
                    fg = hits == k + 1 if plan.mode == Mode.SOFTMAX else hits[k]
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
    input_warnings: tuple[str, ...] = ()  # why the input may lie outside the model's training range


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
    opts = opts or EngineOptions()
    stats = stats if stats is not None else EngineStats()
    prep = Preprocessing.of(image, plan)
    layout, norms = prep.layout, prep.norms
    stats.input_warnings = prep.warnings
    for text in prep.warnings:
        logger.warning("%s: %s", image.meta.get("source", "input"), text)
    air = _air_level(norms, plan) if opts.skip_air else None
    out = new_output(layout, plan)
    view = oriented_view(out, layout.ornt)
    crf = crf_for_scan(image, prep, plan.mode, opts.crf, device=device) if opts.crf.enabled else None
    restorer = Restorer(
        layout, view, plan, threshold=opts.threshold, sink=sink, space=opts.resample, refine=crf
    )

    patch = tuple(int(p) for p in plan.patch_size)
    padded = layout.padded_shape
    windows = window_slices(padded, patch, opts.overlap)
    cap = _ring_rows(windows, patch[-1], opts.batch_size)
    acc_dtype = np.float16 if opts.accumulator_dtype == "float16" else np.float32
    accum = Accumulator(cap, plan.out_channels, padded[:-1], acc_dtype)
    stats.windows, stats.layout = len(windows), layout
    stats.accumulator_bytes = accum.acc.nbytes + accum.wsum.nbytes
    imp = compute_importance_map(patch, mode="gaussian", sigma_scale=0.125, device="cpu").numpy()
    imp_z = zfirst(imp[None])[:, 0]  # (pz, *patch_inplane)
    runner = NetworkRunner(model, device, plan, opts.tta)
    final = Finaliser(layout, restorer, plan.mode)
    roi, margin = None, [p // 4 for p in patch]
    if opts.coarse_roi:
        coarse_runner = NetworkRunner(model, device, plan, tta=False)
        roi, stats.coarse_windows_run = coarse_pass(
            prep.lazy(), padded, patch, coarse_runner, plan, opts, air, single
        )
    lazy = prep.lazy()

    batch: list[tuple[tuple[slice, ...], np.ndarray]] = []
    bar = tqdm(total=len(windows), desc="windows", disable=not opts.progress, leave=False)

    def flush() -> None:
        if batch:
            y = runner(np.stack([x for _, x in batch]))
            for (w, _), logits in zip(batch, y, strict=True):
                accum.add(w, zfirst(logits), imp_z)
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


def _air_level(norms: Sequence[ChannelNorm], plan: Plan) -> float | None:
    """The normalised body threshold of channel 0 (as for the body box; other channels may be normalised
    differently): windows at or below it everywhere are air and need not run. None without one."""
    if plan.body_threshold is None:
        return None
    return float(norms[0].apply(np.array([plan.body_threshold], np.float32))[0])


def _ring_rows(windows: Sequence[tuple[slice, ...]], patch_z: int, batch_size: int) -> int:
    """Rows the accumulator ring must hold: a window, plus the steps a batch of windows can reach
    ahead of the first row that is not final yet."""
    starts = [w[-1].start for w in windows]
    step = max((b - a for a, b in zip(starts, starts[1:], strict=False)), default=0)
    per_start = max(1, sum(1 for s in starts if s == starts[0]))
    return patch_z + step * max(1, math.ceil((batch_size - 1) / per_start))


def _window_input(lazy: LazyInput, w: tuple[slice, ...]) -> np.ndarray:
    """``(C, *patch)`` input of one window."""
    rows = lazy.rows(w[-1].start, w[-1].stop)  # (pz, C, *inplane_padded)
    x = rows[(slice(None), slice(None), *w[:-1])]
    return np.ascontiguousarray(np.moveaxis(x, 0, -1))


# ------------------------------------------------------------------------------------ memory


def estimate_memory(image: Volume, plan: Plan, opts: EngineOptions, *, params: int = 0) -> dict[str, int]:
    """Bytes :func:`segment` will hold for ``image`` beyond the loaded scan, by component.

    ``accumulator``: the ring of blended logits and weights; ``output``: the label map (Fortran
    order, written without a copy); ``input_slabs``: lazy preprocessing and window batches;
    ``restore``: finalisation chunks; ``network``: parameters and activations (a rough bound of
    ``batch × patch voxels × 64 channels × 4 bytes × 4``); ``crf``: the dense CRF's rows, when on.
    Sizes of the canonical crop are taken as the whole grid (the body box is not known before reading
    the data).
    """
    _, canon_shape, spacing = canonical_grid(image)
    res = resampled_shape(canon_shape, spacing, plan.target_spacing_mm)
    patch = [int(p) for p in plan.patch_size]
    padded = [max(r, p) for r, p in zip(res, patch, strict=True)]
    k = plan.out_channels
    inplane = math.prod(padded[:-1])
    step = max(math.ceil(patch[-1] * (1 - opts.overlap)), 1)  # even steps are at most this
    cap = patch[-1] + step * max(1, opts.batch_size - 1)
    acc_item = 2 if opts.accumulator_dtype == "float16" else 4
    n_out = 1 if plan.mode == Mode.SOFTMAX else len(plan.structure_names)
    out_item = plan.labels.dtype.itemsize
    est = {
        "accumulator": cap * inplane * (k * acc_item + 4),
        "output": n_out * math.prod(image.spatial_shape) * out_item,
        "input_slabs": 4 * plan.in_channels * inplane * (patch[-1] + step) * 2
        + 4 * opts.batch_size * plan.in_channels * math.prod(patch) * 2,
        "restore": 4 * SLAB_BYTES,
        "network": 4 * params + opts.batch_size * math.prod(patch) * 64 * 4 * 4,
    }
    if opts.crf.enabled:
        plane = canon_shape[:-1]
        chunk = max(1, int(SLAB_BYTES // max(1, 4 * k * math.prod(plane) * 3)))  # the Restorer's rows
        est["crf"] = crf_memory_bytes(plane, k, plan.in_channels, opts.crf, spacing, chunk)
    est["total"] = sum(est.values())
    return est
