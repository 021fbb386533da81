"""The classical baseline: intensity windows per structure fitted on the training cases, then connected
components and hole filling. It is the floor every learned model must beat.

:func:`fit_threshold_baseline` (``medseg baseline threshold``) writes a run directory that ``medseg
predict`` and ``medseg evaluate`` take exactly as they take a trained run: the network is
:class:`~medseg.models.threshold.ThresholdNet` (``model.name: threshold``), whose fitted windows are
its options in ``plan.json``, and the checkpoint holds no weights.

Method, in order:

1. **Setup as training** (:func:`medseg.training.setup.prepare`): the dataset, the same
   train/validation split (``train.val_fraction``, ``train.seed``), the plan (target spacing,
   intensity normalisation) and the preprocessing cache, so the windows are fitted on exactly the
   normalised intensities the prediction engine feeds the network. The planned patch is then
   replaced: it spans every training case along the left-right axis (x 1.25, for larger scans) so
   that the lateral prior (step 4) sees the whole scan, and is capped on the other axes.
2. **Windows.** For each structure and input channel, the interval ``[lo, hi]`` of intensities whose
   voxels best match the structure, scored by Dice against everything else (background and other
   structures) over all training voxels. The search is exhaustive over the intervals of a
   :data:`BINS`-bin histogram between the 0.05th and 99.95th percentiles of the training
   intensities (open at both ends): cumulative sums give every interval's Dice at once, so the cost
   is one pass over the voxels plus ``BINS**2`` per structure. Ends that can move through empty
   bins without changing the score are put midway through them, a margin for unseen scans. Each
   structure uses the channel where its window scores best. Why not Otsu: Otsu splits a histogram
   into two classes and fits only what is the darkest or brightest thing in the scan (air, bone);
   most organs lie between other tissues (liver at 60 HU between fat and contrast-filled vessels)
   and need a window with two ends. A window fitted to the labels is the data-driven form of a
   radiologist's HU preset, and Dice is the score the baseline is judged by.
3. **Smoothing.** A Gaussian of :data:`SIGMAS_VOX` voxels on the finest axis (the same millimetres
   on every axis) before the windows, the candidate whose windows have the best mean Dice: CT noise
   (8-18 HU on the phantoms) is as large as the contrast between soft-tissue organs, and averaging a
   few voxels narrows each tissue's histogram. Ties go to less smoothing.
4. **Lateral prior.** The structures of each ``data.left_right_pairs`` pair whose training voxels
   lie (:data:`SIDE_SHARE`) on opposite sides of the scan's centre along the left-right axis are kept
   on their sides: intensities cannot tell a left kidney from a right one. The two share one window,
   fitted on both with the prior applied (mirror images have the same intensities). Only declared
   pairs get a prior: the left-right mirror is a symmetry of the task in this project (training
   augments with it, swapping the pairs, and TTA averages over it); with priors on pairs only, and
   one window per pair, the network commutes with that mirror and ``--tta`` changes nothing. A prior
   for the liver (right) or the spleen (left) would be averaged away by TTA.
5. **Post-processing** (unless turned off), the existing steps of the prediction path
   (:mod:`medseg.inference.postprocess`): the candidates are to keep the largest component of the
   structures that are one connected object in every training case (components under
   :data:`SPECK_SHARE` of the structure ignored) or that ``data.single_component`` names, to remove
   components smaller than half the smallest object in the training labels (or the config's
   ``predict.min_component_mm3``), and to fill holes. A step is kept where it does not lower the
   training Dice (:func:`select_postprocessing`): a threshold mask is not an organ, and the largest
   bright blob of a radiograph is the spine, not a clavicle. The choice is written to the run's
   config (``data.single_component``, ``predict.min_component_mm3``, ``predict.fill_holes``).
6. **Scores.** Training Dice per structure on the preprocessed grid, by the windows alone and after
   the post-processing; validation Dice on the held-out validation cases through the prediction
   path itself (:func:`medseg.training.validation.validate`), as training reports ``val_mean_dice``.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from medseg.config import Config, config_hash
from medseg.data.patches import TrainCase
from medseg.data.plan import ChannelNorm, Plan
from medseg.errors import DataError
from medseg.inference.engine import EngineOptions
from medseg.inference.postprocess import postprocess_label_map, postprocess_masks
from medseg.io._atomic import write_text_atomic
from medseg.labels import Mode
from medseg.metrics.overlap import count_overlaps, count_overlaps_masks, dice
from medseg.models.threshold import gaussian_smooth
from medseg.models.unet import create_network
from medseg.runtime.bundle import PostProcessing
from medseg.runtime.checkpoint import save_checkpoint
from medseg.training.distributed import DistContext
from medseg.training.run_dir import write_bundle_files
from medseg.training.setup import prepare
from medseg.training.validation import validate, validation_bundle

__all__ = [
    "BaselineOptions",
    "BaselineResult",
    "Window",
    "baseline_config",
    "baseline_patch",
    "best_interval",
    "fit_postprocessing",
    "fit_threshold_baseline",
    "fit_windows",
    "histogram_edges",
    "lateral_side",
    "mean_dice",
    "select_postprocessing",
    "training_predictions",
]

logger = logging.getLogger(__name__)

BINS = 512
"""Histogram bins of the window search (about 0.2 % of the intensity range each)."""
SIGMAS_VOX = (0.0, 1.0, 2.0)
"""Smoothing candidates: Gaussian standard deviation in voxels of the finest axis."""
SIDE_SHARE = 0.95
"""Share of a structure's training voxels on one side of the centre that gives it a lateral prior."""
SPECK_SHARE = 0.01
"""Components below this share of a structure's voxels in a case are resampling specks, not objects."""
LATERAL_MARGIN = 1.25
"""The patch spans this times the widest training case along the left-right axis."""
MAX_PATCH = {2: 1024, 3: 128}
"""Cap of the patch on the other axes: the network is cheap, the engine's buffers are not."""
PERCENTILES = (0.05, 99.95)
"""Range of the histogram's inner bins (the outer two are open)."""
_SAMPLES = 100_000  # voxels per case and channel for the histogram range
_TIE = 1e-12


# ------------------------------------------------------------------------------------ fitting


@dataclass(frozen=True)
class Window:
    """A fitted window of one structure, in normalised intensities.

    Attributes:
        channel: Input channel.
        lo, hi: Window ends; ``None``: open (everything below / above).
        scale: Ramp width of the logit (half the width of a closed window).
        dice: Training Dice of the window alone ("lo <= x <= hi", with the lateral prior).
        side: Lateral prior: 1 upper half of the first axis, -1 lower half, 0 none.
    """

    channel: int
    lo: float | None
    hi: float | None
    scale: float
    dice: float
    side: int = 0

    def option(self, name: str) -> dict[str, Any]:
        """The entry of ``model.options.windows`` for this window."""
        return {
            "structure": name,
            "channel": self.channel,
            "lo": self.lo,
            "hi": self.hi,
            "scale": self.scale,
            "side": self.side,
        }


def best_interval(fg: np.ndarray, total: np.ndarray, n_ref: float | None = None) -> tuple[int, int, float]:
    """The bins ``i..j`` (inclusive) whose voxels best match a structure, by Dice.

    Dice of predicting the structure exactly in bins ``i..j``: ``2 TP / (P + G)`` with ``TP`` the
    structure's voxels in those bins, ``P`` all voxels in them and ``G`` the structure's voxels.

    Args:
        fg: Histogram of the structure's voxels, one count per bin.
        total: Histogram of all voxels (the structure's included), same bins.
        n_ref: ``G``; default ``fg.sum()`` (pass more when some of the structure's voxels cannot be
            predicted, e.g. those outside its lateral prior).

    Returns:
        ``(i, j, dice)``; ties go to the first ``i``, then the first ``j``.

    Example:
        >>> i, j, d = best_interval(np.array([0, 5, 5, 0]), np.array([10, 6, 5, 10]))
        >>> i, j, round(d, 4)  # bins 1..2: 2 * 10 / (11 + 10)
        (1, 2, 0.9524)
    """
    fg = np.asarray(fg, dtype=np.float64)
    total = np.asarray(total, dtype=np.float64)
    g = float(fg.sum()) if n_ref is None else float(n_ref)
    if g <= 0:
        raise DataError("best_interval: the structure has no voxels")
    cf = np.concatenate([[0.0], np.cumsum(fg)])
    ct = np.concatenate([[0.0], np.cumsum(total)])
    tp = cf[None, 1:] - cf[:-1, None]  # [i, j]: bins i..j
    p = ct[None, 1:] - ct[:-1, None]
    with np.errstate(divide="ignore", invalid="ignore"):  # below the diagonal: not an interval
        score = np.where(np.triu(np.ones_like(tp, dtype=bool)), 2.0 * tp / (p + g), -1.0)
    i, j = np.unravel_index(int(np.argmax(score)), score.shape)
    return int(i), int(j), float(score[i, j])


def _margins(fg: np.ndarray, total: np.ndarray, n_ref: float) -> tuple[int, int, int, int, float]:
    """The best interval's loosest and tightest ends that give the same Dice: ``(i_loose, i_tight,
    j_tight, j_loose, dice)``; the bins between them are empty."""
    i0, j0, best = best_interval(fg, total, n_ref)
    cf = np.concatenate([[0.0], np.cumsum(np.asarray(fg, np.float64))])
    ct = np.concatenate([[0.0], np.cumsum(np.asarray(total, np.float64))])

    def score(i: int, j: int) -> float:
        return 2.0 * (cf[j + 1] - cf[i]) / (ct[j + 1] - ct[i] + n_ref)

    tol = _TIE * max(1.0, best)
    i_tight = i0
    while i_tight < j0 and score(i_tight + 1, j0) >= best - tol:
        i_tight += 1
    j_tight = j0
    while j_tight > i_tight and score(i_tight, j_tight - 1) >= best - tol:
        j_tight -= 1
    j_loose = j0
    while j_loose + 1 < len(ct) - 1 and score(i_tight, j_loose + 1) >= best - tol:
        j_loose += 1
    return i0, i_tight, j_tight, j_loose, best


def _window_of(
    fg: np.ndarray, total: np.ndarray, edges: np.ndarray, n_ref: float, channel: int, side: int
) -> Window:
    """The best window on one channel's histogram (``edges``: ``BINS + 1`` edges, outer bins open)."""
    n = len(edges) - 1
    i_loose, i_tight, j_tight, j_loose, best = _margins(fg, total, n_ref)
    lo = None if i_tight == 0 else float((edges[i_loose] + edges[i_tight]) / 2)
    hi = None if j_tight == n - 1 else float((edges[j_tight + 1] + edges[j_loose + 1]) / 2)
    a, b = float(edges[0]), float(edges[-1])
    width = (hi if hi is not None else b) - (lo if lo is not None else a)
    scale = max(width / 2.0, 1e-6 * max(b - a, 1e-6))
    return Window(channel, lo, hi, scale, best, side)


def lateral_side(below: float, above: float, *, share: float = SIDE_SHARE) -> int:
    """The lateral prior from a structure's voxel counts strictly below / above the centre of the
    first axis: 1 or -1 when at least ``share`` of them lie on that side, else 0.

    >>> lateral_side(2, 98), lateral_side(98, 2), lateral_side(40, 60), lateral_side(0, 0)
    (1, -1, 0, 0)
    """
    n = below + above
    if n <= 0:
        return 0
    if above >= share * n:
        return 1
    if below >= share * n:
        return -1
    return 0


def _halves(n: int) -> tuple[slice, slice]:
    """Index ranges along the first axis strictly below / above its centre: where side -1 / +1 may
    predict (the rule of :class:`~medseg.models.threshold.ThresholdNet`)."""
    return slice(0, n // 2), slice((n + 1) // 2, n)


def _masks(label: np.ndarray, mode: Mode, n: int) -> list[np.ndarray]:
    """One boolean mask per structure from a cached label (class indices, or masks)."""
    lab = np.asarray(label)
    if mode == Mode.SOFTMAX:
        return [lab[0] == k + 1 for k in range(n)]
    return [lab[k] > 0 for k in range(n)]


class _Histograms:
    """Intensity histograms per channel, region (all / side -1 / side +1) and structure."""

    def __init__(self, edges: np.ndarray, n_structures: int, mode: Mode) -> None:
        self.edges, self.mode = edges, mode
        channels, bins = edges.shape[0], edges.shape[1] - 1
        self.total = np.zeros((channels, 3, bins))
        self.fg = np.zeros((channels, 3, n_structures, bins))
        self.size = np.zeros(n_structures)
        self.halves = np.zeros((n_structures, 2))  # strictly below / above the centre

    def bins(self, x: np.ndarray, channel: int) -> np.ndarray:
        e = self.edges[channel]
        width = (e[-1] - e[0]) / (len(e) - 1)
        return np.clip(np.floor((x - e[0]) / width), 0, len(e) - 2).astype(np.int64)

    def add(self, image: np.ndarray, label: np.ndarray) -> None:
        n_struct = self.fg.shape[2]
        bins = self.total.shape[2]
        masks = _masks(label, self.mode, n_struct)
        below, above = _halves(image.shape[1])
        for k, m in enumerate(masks):
            self.size[k] += m.sum()
            self.halves[k] += (m[below].sum(), m[above].sum())
        codes = np.asarray(label[0]).astype(np.int64) if self.mode == Mode.SOFTMAX else None
        for c in range(image.shape[0]):
            b = self.bins(image[c], c)
            for r, region in enumerate((slice(None), below, above)):
                br = b[region]
                self.total[c, r] += np.bincount(br.ravel(), minlength=bins)
                if codes is not None:
                    joint = np.bincount(
                        (br * (n_struct + 1) + codes[region]).ravel(), minlength=bins * (n_struct + 1)
                    )
                    self.fg[c, r] += joint.reshape(bins, n_struct + 1)[:, 1:].T
                else:
                    for k, m in enumerate(masks):
                        self.fg[c, r, k] += np.bincount(br[m[region]], minlength=bins)

    def sides(self, pairs: Sequence[tuple[int, int]]) -> list[int]:
        """The lateral prior of each structure: for each pair found on opposite sides, those sides."""
        sides = [0] * self.fg.shape[2]
        for a, b in pairs:
            sa, sb = lateral_side(*self.halves[a]), lateral_side(*self.halves[b])
            if sa * sb == -1:
                sides[a], sides[b] = sa, sb
        return sides

    def fit(
        self, *, pairs: Sequence[tuple[int, int]] = (), names: Sequence[str] | None = None
    ) -> list[Window]:
        """The best window per structure (over channels), with the lateral prior of ``pairs``.

        The two structures of a pair with a prior share one window, fitted on both (each on its own
        side): mirror images of each other, they have the same intensities, and the network then
        commutes with the left-right mirror (the pair swapped), so mirror TTA changes nothing."""
        n = self.fg.shape[2]
        for k in range(n):
            if self.size[k] == 0:
                name = names[k] if names is not None else f"number {k + 1}"
                raise DataError(
                    f"structure {name} has no voxels in the training cases; a window cannot be fitted "
                    "(check the labels with `medseg data check`)"
                )
        sides = self.sides(pairs)
        region = {0: 0, -1: 1, 1: 2}
        groups = [(a, b) for a, b in pairs if sides[a]]
        paired = {k for g in groups for k in g}
        groups += [(k,) for k in range(n) if k not in paired]
        out: dict[int, Window] = {}
        for group in groups:
            fits = []
            for c in range(self.fg.shape[0]):
                fg = sum(self.fg[c, region[sides[k]], k] for k in group)
                total = sum(self.total[c, region[sides[k]]] for k in group)
                size = float(sum(self.size[k] for k in group))
                fits.append(_window_of(fg, total, self.edges[c], size, c, 0))
            best = max(fits, key=lambda w: (w.dice, -w.channel))
            for k in group:
                out[k] = replace(best, side=sides[k])
        return [out[k] for k in range(n)]


def histogram_edges(images: Sequence[np.ndarray], *, bins: int = BINS, seed: int = 0) -> np.ndarray:
    """``(C, bins + 1)`` bin edges per channel, uniform between the :data:`PERCENTILES` of the
    intensities of ``images`` (each ``(C, *spatial)``; sampled, at most 100 000 voxels per image)."""
    rng = np.random.default_rng(seed)
    channels = images[0].shape[0]
    edges = np.zeros((channels, bins + 1))
    for c in range(channels):
        samples = []
        for img in images:
            flat = np.asarray(img[c]).ravel()
            pick = rng.choice(flat.size, size=min(_SAMPLES, flat.size), replace=False)
            samples.append(flat[np.sort(pick)].astype(np.float64))
        a, b = np.percentile(np.concatenate(samples), PERCENTILES)
        if not b > a:
            b = a + 1.0
        edges[c] = np.linspace(a, b, bins + 1)
    return edges


def fit_windows(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    mode: Mode | str,
    n_structures: int,
    *,
    sigma_vox: Sequence[float] | None = None,
    pairs: Sequence[tuple[int, int]] = (),
    edges: np.ndarray | None = None,
    names: Sequence[str] | None = None,
    progress: bool = False,
) -> list[Window]:
    """Fit one window per structure on preprocessed cases (module docstring, steps 2 and 4).

    Args:
        images: ``(C, *spatial)`` normalised images (memory-mapped arrays are fine).
        labels: Their labels as the training cache stores them: ``(1, *spatial)`` class indices
            ``1..n_structures`` (softmax), or ``(n_structures, *spatial)`` masks (sigmoid).
        mode: ``softmax`` or ``sigmoid``.
        n_structures: Structures (windows) to fit.
        sigma_vox: Gaussian smoothing per axis in voxels before fitting (none by default).
        pairs: Left/right pairs (structure indices): each pair whose structures lie on opposite sides
            of the centre of the first axis (:func:`lateral_side`) gets the lateral prior.
        edges: Histogram edges per channel (default: :func:`histogram_edges` of ``images``).
        names: Structure names, for messages.
        progress: Show a progress bar over the cases.

    Returns:
        One :class:`Window` per structure, in channel order.

    Raises:
        DataError: A structure without voxels in any case.
    """
    mode = Mode(mode)
    edges = histogram_edges(images) if edges is None else edges
    hist = _Histograms(edges, n_structures, mode)
    for img, lab in tqdm(
        list(zip(images, labels, strict=True)), desc="histograms", disable=not progress, leave=False
    ):
        hist.add(_smoothed(img, sigma_vox), lab)
    return hist.fit(pairs=pairs, names=names)


def _smoothed(image: np.ndarray, sigma_vox: Sequence[float] | None) -> np.ndarray:
    """``image`` smoothed exactly as the network smooths its input."""
    if not sigma_vox or not any(s > 0 for s in sigma_vox):
        return np.asarray(image)
    with torch.inference_mode():
        t = torch.from_numpy(np.array(image, dtype=np.float32))[None]  # a copy: the cache is read-only
        return gaussian_smooth(t, sigma_vox)[0].numpy()


def fit_postprocessing(
    labels: Sequence[np.ndarray], mode: Mode | str, names: Sequence[str], spacing_mm: Sequence[float]
) -> tuple[frozenset[str], float]:
    """Single-object structures and the smallest-object size from training labels (step 5).

    Args:
        labels: Cached labels (class indices or masks, as :func:`fit_windows` takes them).
        mode: ``softmax`` or ``sigmoid``.
        names: Structure names in channel order.
        spacing_mm: Voxel size of the labels' grid.

    Returns:
        ``(single, min_component_mm3)``: the structures that are one connected object (full
        connectivity, specks under :data:`SPECK_SHARE` ignored) in every case where they are present,
        and half the volume of the smallest object of any structure (0 without labels).
    """
    mode = Mode(mode)
    n = len(names)
    multi, present = np.zeros(n, bool), np.zeros(n, bool)
    smallest = math.inf
    for lab in labels:
        for k, mask in enumerate(_masks(lab, mode, n)):
            boxes = ndimage.find_objects(mask.astype(np.uint8))
            if not boxes or boxes[0] is None:
                continue
            crop = mask[boxes[0]]
            comp, count = ndimage.label(
                crop, structure=ndimage.generate_binary_structure(crop.ndim, crop.ndim)
            )
            sizes = np.bincount(comp.ravel())[1:]
            objects = sizes[sizes >= SPECK_SHARE * sizes.sum()]
            present[k] = True
            multi[k] |= len(objects) > 1
            smallest = min(smallest, float(objects.min()))
    single = frozenset(names[k] for k in range(n) if present[k] and not multi[k])
    voxel = float(np.prod(spacing_mm))
    return single, (0.0 if math.isinf(smallest) else 0.5 * smallest * voxel)


# ------------------------------------------------------------------------------------ scoring


def training_predictions(
    net: torch.nn.Module,
    cases: Sequence[TrainCase],
    plan: Plan,
    *,
    threshold: float = 0.5,
    progress: bool = False,
) -> list[np.ndarray]:
    """The network's decisions on the preprocessed training cases, each predicted whole on the plan's
    grid: ``(1, *spatial)`` class indices (softmax) or ``(S, *spatial)`` masks (sigmoid), uint8/uint16."""
    out = []
    net = net.cpu().eval()
    dtype = np.uint8 if plan.out_channels <= 256 else np.uint16
    for case in tqdm(cases, desc="training predictions", disable=not progress, leave=False):
        with torch.inference_mode():
            logits = net(torch.from_numpy(np.array(case.image, dtype=np.float32))[None])[0]
        if plan.mode == Mode.SOFTMAX:
            out.append(logits.argmax(0, keepdim=True).numpy().astype(dtype))
        else:
            out.append((torch.sigmoid(logits) > threshold).numpy().astype(np.uint8))
    return out


def mean_dice(
    preds: Sequence[np.ndarray], labels: Sequence[np.ndarray], plan: Plan, pp: PostProcessing | None = None
) -> np.ndarray:
    """Mean Dice per structure over cases (NaN where a structure is absent from every case and
    prediction), after the post-processing ``pp`` applied on the plan's grid."""
    n = len(plan.structure_names)
    names, spacing = plan.structure_names, plan.target_spacing_mm
    rows = []
    for pred, ref in zip(preds, labels, strict=True):
        if pp is not None and pp.active:
            if plan.mode == Mode.SOFTMAX:
                pred = postprocess_label_map(pred, range(1, n + 1), names, spacing, pp)
            else:
                pred = postprocess_masks(pred, names, spacing, pp)
        ref = np.asarray(ref)
        if plan.mode == Mode.SOFTMAX:
            counts = count_overlaps(pred[0], ref[0], range(1, n + 1))
        else:
            counts = count_overlaps_masks(pred, (ref > 0).astype(np.uint8))
        rows.append([dice(c) for c in counts.values()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: structure never present
        return np.nanmean(np.array(rows, float).reshape(len(rows), n), axis=0)


def _mean(per: np.ndarray) -> float:
    return float(np.nanmean(per)) if np.isfinite(per).any() else math.nan


def select_postprocessing(
    preds: Sequence[np.ndarray], labels: Sequence[np.ndarray], plan: Plan, candidate: PostProcessing
) -> PostProcessing:
    """The steps of ``candidate`` that serve the training Dice best.

    For each combination of the global steps (removal of small components, hole filling: each on as
    in ``candidate`` or off), every structure of ``candidate.single`` keeps its largest component
    where that does not lower its own Dice; the combination with the best mean Dice over structures
    wins. Ties keep a step, as the baseline is thresholds plus connected components and hole filling.
    """
    names = plan.structure_names
    best: tuple[float, int, PostProcessing] | None = None
    mins = {candidate.min_component_mm3, 0.0}
    fills = {candidate.fill_holes, False}
    for min_mm3 in sorted(mins, reverse=True):
        for fill in sorted(fills, reverse=True):
            base = PostProcessing(frozenset(), min_mm3, fill)
            without = mean_dice(preds, labels, plan, base)
            with_single = mean_dice(preds, labels, plan, replace(base, single=candidate.single))
            keep = [n in candidate.single and not with_single[k] < without[k] for k, n in enumerate(names)]
            per = np.where(keep, with_single, without)
            pp = replace(base, single=frozenset(n for n, k in zip(names, keep, strict=True) if k))
            steps = len(pp.single) + (min_mm3 > 0) + fill
            score = _mean(per)
            score = -math.inf if math.isnan(score) else score
            if best is None or (score, steps) > best[:2]:
                best = (score, steps, pp)
    assert best is not None
    return best[2]


# ------------------------------------------------------------------------------------ the baseline


@dataclass(frozen=True)
class BaselineOptions:
    """What :func:`fit_threshold_baseline` fits besides the windows.

    Attributes:
        smoothing: Choose a Gaussian smoothing among :data:`SIGMAS_VOX` (else none).
        side_prior: Fit the lateral prior of the left/right pairs.
        postprocess: Fit the post-processing (else the config's is kept as it is).
    """

    smoothing: bool = True
    side_prior: bool = True
    postprocess: bool = True


@dataclass
class BaselineResult:
    """What was fitted and how well it does (also written to ``baseline.json`` in the run directory)."""

    run_dir: Path
    plan: Plan
    windows: list[Window]
    sigma_vox: tuple[float, ...]
    postprocessing: PostProcessing
    train_dice_windows: np.ndarray  # per structure: the windows alone
    train_dice: np.ndarray  # after the post-processing
    val_dice: np.ndarray | None  # through the prediction path; None without validation cases
    train_cases: list[str] = field(default_factory=list)
    val_cases: list[str] = field(default_factory=list)

    @property
    def sigma_mm(self) -> float:
        """Smoothing in mm (the same on every axis)."""
        return float(self.sigma_vox[0] * self.plan.target_spacing_mm[0])

    def original_window(self, k: int) -> tuple[float | None, float | None, str]:
        """Structure ``k``'s window in the image's own units: ``(lo, hi, units)``. CT windows are in HU
        (an end beyond the normalisation's clipping is open: nothing lies beyond it); per-image
        z-scored intensities have no fixed original value, so they stay z-scores."""
        w = self.windows[k]
        norm: ChannelNorm = self.plan.normalization[w.channel]
        if norm.scheme != "ct":
            return w.lo, w.hi, "z-score"
        lo = None if w.lo is None else w.lo * norm.std + norm.mean
        hi = None if w.hi is None else w.hi * norm.std + norm.mean
        lo = None if lo is not None and lo <= norm.lo else lo
        hi = None if hi is not None and hi >= norm.hi else hi
        return lo, hi, "HU" if self.plan.modality == "ct" else "raw"

    def dices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Dice per structure: training by the windows alone, training after post-processing,
        validation (None without validation cases)."""
        return self.train_dice_windows, self.train_dice, self.val_dice

    def records(self) -> list[dict[str, Any]]:
        """One record per structure: window (normalised and original units), prior and scores."""
        out = []
        for k, name in enumerate(self.plan.structure_names):
            w = self.windows[k]
            lo, hi, units = self.original_window(k)
            out.append(
                {
                    "structure": name,
                    "channel": w.channel,
                    "window": [w.lo, w.hi],
                    "window_original": [lo, hi],
                    "units": units,
                    "side": w.side,
                    "train_dice_windows": _num(self.train_dice_windows[k]),
                    "train_dice": _num(self.train_dice[k]),
                    "val_dice": None if self.val_dice is None else _num(self.val_dice[k]),
                }
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        pp = self.postprocessing
        return {
            "method": "intensity window per structure (Dice-optimal on the training voxels) + connected "
            "components + hole filling",
            "sigma_vox": list(self.sigma_vox),
            "sigma_mm": self.sigma_mm,
            "postprocessing": {
                "single_component": sorted(pp.single),
                "min_component_mm3": pp.min_component_mm3,
                "fill_holes": pp.fill_holes,
            },
            "structures": self.records(),
            "train_cases": self.train_cases,
            "val_cases": self.val_cases,
        }

    def describe(self) -> str:
        """A table of the windows and scores, for the terminal."""
        pp = self.postprocessing
        lines = [
            f"threshold baseline: {len(self.windows)} structures, {self.plan.mode} mode, smoothing "
            f"sigma {self.sigma_mm:.2g} mm, {len(self.train_cases)} training / {len(self.val_cases)} "
            "validation cases",
            f"post-processing: largest component of {', '.join(sorted(pp.single)) or 'none'}; "
            + (
                f"components < {pp.min_component_mm3:.4g} mm3 removed"
                if pp.min_component_mm3
                else "no size filter"
            )
            + f"; holes {'filled' if pp.fill_holes else 'kept'}",
            _row("structure", "ch", "window", "side", "Dice: windows", "+post", "val"),
        ]
        for r in self.records():
            lo, hi = r["window_original"]
            text = f"[{_fmt(lo, '-inf')}, {_fmt(hi, '+inf')}] {r['units']}"
            side = {1: "+x", -1: "-x", 0: "-"}[r["side"]]
            val = "" if r["val_dice"] is None else _fmt(r["val_dice"], "nan", ".3f")
            scores = (_fmt(r[key], "nan", ".3f") for key in ("train_dice_windows", "train_dice"))
            lines.append(_row(r["structure"], str(r["channel"]), text, side, *scores, val))
        means = [_fmt(_mean(a), "nan", ".3f") if a is not None else "" for a in self.dices()]
        lines.append(_row("mean", "", "", "", *means))
        return "\n".join(lines)


def _row(name: str, channel: str, window: str, side: str, *scores: str) -> str:
    a, b, c = scores
    return f"{name:<18}{channel:>3}  {window:<26}{side:>5}  {a:>14}{b:>7}{c:>7}"


def _num(v: float) -> float | None:
    return None if not np.isfinite(v) else round(float(v), 6)


def _fmt(v: float | None, none: str, spec: str = ".4g") -> str:
    return none if v is None or not np.isfinite(v) else format(float(v), spec)


class _WindowMemory:
    """Memory of the threshold network's windows for the planner: one forward pass (input, smoothed
    input and logits, twice for temporaries) per window of a batch; nothing is kept for a backward."""

    def __init__(self, in_channels: int, out_channels: int, batch_size: int) -> None:
        self.per_voxel = 4 * 2 * (2 * in_channels + out_channels) * batch_size
        self.batch_size = batch_size

    def estimate(self, patch_size: Sequence[int]) -> _Estimate:
        return _Estimate(tuple(int(p) for p in patch_size), int(self.per_voxel * math.prod(patch_size)))


@dataclass(frozen=True)
class _Estimate:
    patch_size: tuple[int, ...]
    total_bytes: int

    @property
    def total_gb(self) -> float:
        return self.total_bytes / 2**30

    def describe(self) -> str:
        return (
            f"{self.total_gb:.2f} GB for windows of {list(self.patch_size)} (threshold network, no training)"
        )


def baseline_config(cfg: Config) -> Config:
    """``cfg`` with the threshold network (one level, stride 1, options filled in after fitting)."""
    d = cfg.model_dump(mode="python")
    d["model"] = {"name": "threshold", "channels": [1], "strides": [1], "options": {}}
    return Config.model_validate(d)


def baseline_patch(cases: Sequence[TrainCase], spatial_dims: int) -> tuple[int, ...]:
    """The window the baseline predicts with: :data:`LATERAL_MARGIN` times the widest preprocessed
    training case along the first (left-right) axis, the widest case capped at :data:`MAX_PATCH`
    along the others."""
    extents = np.array([np.asarray(c.image).shape[1:] for c in cases])
    first = math.ceil(LATERAL_MARGIN * int(extents[:, 0].max()))
    rest = [min(int(extents[:, d].max()), MAX_PATCH[spatial_dims]) for d in range(1, spatial_dims)]
    return (first, *rest)


def _fit_smoothed_windows(
    cases: Sequence[TrainCase], plan: Plan, options: BaselineOptions, *, seed: int, progress: bool
) -> tuple[list[Window], tuple[float, ...]]:
    """The windows of the smoothing candidate whose windows score best (module docstring, step 3)."""
    images = [c.image for c in cases]
    labels = [c.label for c in cases]
    edges = histogram_edges(images, seed=seed)
    names = plan.structure_names
    index = {name: k for k, name in enumerate(names)}
    pairs = [(index[a], index[b]) for a, b in plan.left_right_pairs] if options.side_prior else []
    finest = min(plan.target_spacing_mm)
    best: tuple[float, list[Window], tuple[float, ...]] | None = None
    for sigma in SIGMAS_VOX if options.smoothing else (0.0,):
        sigma_vox = tuple(round(sigma * finest / s, 6) for s in plan.target_spacing_mm)
        windows = fit_windows(
            images, labels, plan.mode, len(names), sigma_vox=sigma_vox, pairs=pairs, edges=edges,
            names=names, progress=progress,
        )  # fmt: skip
        score = float(np.mean([w.dice for w in windows]))
        logger.info("smoothing sigma %.2g voxels: mean window Dice %.4f", sigma, score)
        if best is None or score > best[0]:
            best = (score, windows, sigma_vox)
    assert best is not None
    return best[1], best[2]


def fit_threshold_baseline(
    cfg: Config,
    run_dir: str | Path,
    *,
    options: BaselineOptions | None = None,
    progress: bool = False,
) -> BaselineResult:
    """Fit the threshold baseline on ``cfg``'s training cases and write a run directory.

    See the module docstring for the method. ``run_dir`` gets ``config.yaml`` (the config with
    ``model.name: threshold``, its fitted options and the post-processing), ``plan.json``,
    ``env.json``, ``checkpoints/best.pt`` (no weights; ``best_metric`` is the validation mean Dice)
    and ``baseline.json`` (windows in normalised and original units, scores).

    Raises:
        DataError: ``run_dir`` already holds a model, no labelled training cases, a structure absent
            from every training case.
        ConfigError: A config the plan cannot be made from.
    """
    options = options or BaselineOptions()
    run_dir = Path(run_dir)
    if (run_dir / "checkpoints" / "best.pt").exists() or (run_dir / "checkpoints" / "last.pt").exists():
        raise DataError(f"{run_dir} already holds a model; choose a new --run-dir")
    base = baseline_config(cfg)
    n = len(base.data.structure_names)
    out_channels = n + 1 if base.data.mode == Mode.SOFTMAX else n

    def memory(spacing: Sequence[float], in_channels: int) -> _WindowMemory:
        return _WindowMemory(in_channels, out_channels, cfg.predict.batch_size)

    setup = prepare(base, DistContext(), run_dir, resume=False, progress=progress, memory=memory)
    cases = setup.train_cases
    plan = replace(setup.plan, patch_size=baseline_patch(cases, setup.plan.spatial_dims))
    logger.info("threshold baseline: windows of %s voxels", list(plan.patch_size))
    labels = [c.label for c in cases]
    windows, sigma_vox = _fit_smoothed_windows(cases, plan, options, seed=cfg.train.seed, progress=progress)

    model_options = {
        "mode": str(plan.mode.value),
        "windows": [w.option(name) for w, name in zip(windows, plan.structure_names, strict=True)],
        "sigma_vox": list(sigma_vox),
    }
    assert plan.network is not None
    plan = replace(plan, network=replace(plan.network, options=model_options))
    net = create_network(plan.network, in_channels=plan.in_channels, out_channels=plan.out_channels)
    preds = training_predictions(net, cases, plan, threshold=cfg.predict.threshold, progress=progress)
    post = PostProcessing.from_config(base)
    if options.postprocess:
        single, min_mm3 = fit_postprocessing(labels, plan.mode, plan.structure_names, plan.target_spacing_mm)
        candidate = PostProcessing(
            single=post.single | single, min_component_mm3=post.min_component_mm3 or min_mm3, fill_holes=True
        )
        post = select_postprocessing(preds, labels, plan, candidate)
    final = _final_config(base, model_options, post)
    train_windows, train_post = mean_dice(preds, labels, plan), mean_dice(preds, labels, plan, post)
    del preds

    write_bundle_files(run_dir, final, str(setup.device))
    plan.save(run_dir / "plan.json")
    val = None
    if setup.val_cases:
        bundle = validation_bundle(net.to(setup.device), plan, final, setup.device, run_dir)
        val = validate(bundle, setup.val_cases, EngineOptions.from_config(final.predict))
    mean_val = float(np.nanmean(val)) if val is not None and np.isfinite(val).any() else -1.0
    save_checkpoint(
        run_dir / "checkpoints" / "best.pt",
        {
            "model": net.state_dict(),
            "epoch": 0,
            "best_metric": mean_val,
            "config_hash": config_hash(final),
            "plan": plan.to_dict(),
            "model_config": final.model.model_dump(mode="json"),
        },
    )
    result = BaselineResult(
        run_dir=run_dir,
        plan=plan,
        windows=windows,
        sigma_vox=sigma_vox,
        postprocessing=post,
        train_dice_windows=train_windows,
        train_dice=train_post,
        val_dice=val,
        train_cases=[c.case_id for c in cases],
        val_cases=[c.case_id for c in setup.val_cases],
    )
    write_text_atomic(run_dir / "baseline.json", json.dumps(result.to_dict(), indent=2))
    return result


def _final_config(base: Config, model_options: dict[str, Any], post: PostProcessing) -> Config:
    """The run's config: the fitted options and the post-processing prediction will apply."""
    d = base.model_dump(mode="python")
    d["model"]["options"] = model_options
    d["data"]["single_component"] = [s for s in base.data.structure_names if s in post.single]
    d["predict"]["min_component_mm3"] = post.min_component_mm3
    d["predict"]["fill_holes"] = post.fill_holes
    return Config.model_validate(d)
