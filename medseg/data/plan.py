"""Dataset fingerprint and the preprocessing plan (``plan.json`` in every run directory).

The plan holds everything prediction needs to repeat the training preprocessing on a new scan and
to undo it: target spacing, intensity normalisation, patch size, label names and output mode. The
planning rules follow nnU-Net's: median spacing (the coarse axis of strongly anisotropic data uses
the 10th percentile), CT intensities clipped to the 0.5-99.5 percentiles of the foreground and
z-scored with the foreground mean/std, MR and X-ray z-scored per image.

The patch size is planned against a memory budget (``train.memory_gb``) as nnU-Net plans against a
VRAM target, but with an estimate measured on the configured network (the caller passes the
estimator: training's measures the real network's saved tensors) instead of a static heuristic: start
from the median image shape in the target spacing, and while one training step would not fit, shrink
by one divisor step the axis whose patch is largest relative to the median shape. The estimate and
the budget are recorded in ``plan.json`` (``memory_estimate_bytes``, ``memory_budget_bytes``); they
are not part of the preprocessing cache key.

The plan is also the network's record: ``network`` (a :class:`~medseg.models.spec.NetworkSpec`)
holds the model name, widths and the strides chosen for the planned patch, so prediction and every
script rebuild exactly the trained network instead of choosing its strides again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from tqdm.auto import tqdm

from medseg.config import Config
from medseg.data.datasets import load_case
from medseg.data.geometry import resampled_shape, to_canonical
from medseg.errors import ConfigError, DataError
from medseg.io._atomic import atomic_write
from medseg.labels import LabelLayout, Mode
from medseg.losses.class_weights import binary_class_weights, frequency_class_weights
from medseg.models.spec import NetworkSpec
from medseg.names import check_label_name
from medseg.units import GB, format_bytes

logger = logging.getLogger(__name__)

PREPROCESS_VERSION = 2  # 2: one preprocessing for cache and engine (z-score from the cropped scan)
ANISOTROPY_RATIO = 3.0
SAMPLES_PER_CASE = 10_000


@dataclass(frozen=True)
class ChannelNorm:
    """Intensity normalisation of one input channel.

    ``scheme`` ``"ct"``: clip to ``[lo, hi]`` then ``(x - mean) / std`` with dataset statistics;
    ``"zscore"``: ``(x - mean) / std`` of each image itself (``lo``/``hi``/``mean``/``std`` unused).
    """

    scheme: Literal["ct", "zscore"]
    lo: float = 0.0
    hi: float = 0.0
    mean: float = 0.0
    std: float = 1.0

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32, copy=False)
        if self.scheme == "ct":
            return ((np.clip(x, self.lo, self.hi) - self.mean) / max(self.std, 1e-8)).astype(np.float32)
        mean, std = float(x.mean()), float(x.std())
        return ((x - mean) / max(std, 1e-8)).astype(np.float32)


@dataclass(frozen=True)
class Plan:
    """Preprocessing and label plan of a model (saved as ``plan.json``)."""

    spatial_dims: int
    modality: str
    mode: Mode
    structure_names: tuple[str, ...]
    label_values: tuple[int, ...]
    in_channels: int
    target_spacing_mm: tuple[float, ...]
    patch_size: tuple[int, ...]
    normalization: tuple[ChannelNorm, ...]
    crop_to_body: bool = True
    body_threshold: float | None = None
    left_right_pairs: tuple[tuple[str, str], ...] = ()
    border_weights: dict[str, Any] = field(default_factory=dict)
    class_weights: dict[str, Any] = field(default_factory=dict)
    """``{"method": ..., "weights": ...}`` for the CE/BCE and focal terms (empty: none): softmax, one
    weight per output channel (background first); sigmoid, an ``(outside, inside)`` pair per structure."""
    median_shape: tuple[int, ...] = ()
    memory_estimate_bytes: int | None = None  # one training step at patch_size (None: older plans)
    memory_budget_bytes: int | None = None  # train.memory_gb when planned
    network: NetworkSpec | None = None  # None: a plan written before networks were recorded
    version: int = PREPROCESS_VERSION

    def __post_init__(self) -> None:
        if self.mode not in tuple(Mode):
            raise ConfigError(f"plan: mode {self.mode!r} is neither 'softmax' nor 'sigmoid'")
        object.__setattr__(self, "mode", Mode(self.mode))
        # a plan may come from another site's model folder, and its names become output file names:
        # no separators or leading dots (every output path is also joined with safe_join). Spaces are
        # allowed here, as older configs allowed them (new configs are held to check_name)
        for name in self.structure_names:
            check_label_name(name, where="plan")
        if self.mode is Mode.SOFTMAX and len(self.label_values) != len(self.structure_names):
            raise ConfigError(
                f"plan: {len(self.structure_names)} structure names but {len(self.label_values)} label values"
            )
        self.labels  # noqa: B018 - checks the left/right pairs
        if self.class_weights:
            object.__setattr__(self, "class_weights", _checked_class_weights(self))

    @property
    def labels(self) -> LabelLayout:
        """The model's label layout: mode, names, values, channel order and left/right pairs."""
        values = self.label_values if self.mode is Mode.SOFTMAX else range(1, len(self.structure_names) + 1)
        return LabelLayout(self.mode, self.structure_names, tuple(values), "plan", self.left_right_pairs)

    @property
    def out_channels(self) -> int:
        """Network output channels: background + classes (softmax) or one per structure (sigmoid)."""
        return self.labels.out_channels

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["network"] = self.network.to_dict() if self.network is not None else None
        return json.loads(json.dumps(d))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        d = dict(d)
        d["network"] = NetworkSpec.from_dict(d["network"]) if d.get("network") else None
        d["normalization"] = tuple(ChannelNorm(**n) for n in d["normalization"])
        for key in ("structure_names", "label_values", "target_spacing_mm", "patch_size", "median_shape"):
            d[key] = tuple(d.get(key, ()))
        d["left_right_pairs"] = tuple(tuple(p) for p in d.get("left_right_pairs", ()))
        return cls(**d)

    def save(self, path: str | Path) -> Path:
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as exc:  # ConfigError is a ValueError
            raise DataError(f"{path}: not a valid medseg plan.json ({exc})") from exc

    def preprocess_key(self) -> str:
        """Hash of everything that changes the preprocessed arrays (the cache key).

        The version is the code's (:data:`PREPROCESS_VERSION`), not the plan's: a run planned by an older
        medseg and resumed now is trained on arrays made by today's preprocessing, which is what
        prediction applies, not on what an older version cached.
        """
        d = self.to_dict()
        d["version"] = PREPROCESS_VERSION
        for key in _NOT_PREPROCESSING:
            d.pop(key, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


_NOT_PREPROCESSING = (
    "patch_size",
    "median_shape",
    "memory_estimate_bytes",
    "memory_budget_bytes",
    "network",
    "class_weights",
)
"""Plan fields that do not change the preprocessed arrays (left out of :meth:`Plan.preprocess_key`)."""


def _checked_class_weights(plan: Plan) -> dict[str, Any]:
    """The plan's class weights as JSON-ready lists, or a ConfigError saying what is wrong with them."""
    cw = plan.class_weights
    n = len(plan.structure_names)
    sigmoid = plan.mode is Mode.SIGMOID
    expected = f"{n} (outside, inside) pairs" if sigmoid else f"{n + 1} values (background first)"
    try:
        w = np.asarray(cw["weights"], dtype=np.float64)
        ok = w.shape == ((n, 2) if sigmoid else (n + 1,)) and bool(np.isfinite(w).all() and (w > 0).all())
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok or not isinstance(cw.get("method"), str):
        raise ConfigError(
            f"plan: class_weights must be {{'method': name, 'weights': {expected}}} of positive numbers, "
            f"got {cw!r}"
        )
    return {"method": cw["method"], "weights": w.tolist()}


def plan_class_weights(cfg: Config, fp: Fingerprint) -> dict[str, Any]:
    """``loss.class_weights`` resolved for the plan: computed from the fingerprint's class volumes
    (:mod:`medseg.losses.class_weights`), taken from the config's list, or ``{}`` for none.

    Raises:
        ConfigError: A list of the wrong length for the labels.
        DataError: A structure without a voxel in the training cases (its weight is undefined).
    """
    spec = cfg.loss.class_weights
    if spec == "none":
        return {}
    names = cfg.data.structure_names
    sigmoid = cfg.data.mode is Mode.SIGMOID
    if isinstance(spec, list):
        n = len(names) if sigmoid else len(names) + 1
        if len(spec) != n:
            what = "one per structure, for the voxels inside it" if sigmoid else "background first"
            raise ConfigError(
                f"loss.class_weights has {len(spec)} values; {cfg.data.mode.value} mode with structures "
                f"{names} needs {n} ({what})"
            )
        weights = [[1.0, float(v)] for v in spec] if sigmoid else [float(v) for v in spec]
        return {"method": "given", "weights": weights}
    if not fp.label_volumes:
        raise DataError("cannot compute class weights: the training cases' label volumes were not counted")
    table = np.asarray(fp.label_volumes, dtype=np.float64)
    if sigmoid:
        w = binary_class_weights(table[:, 1:], table[:, 0], spec, names=names)
    else:
        background = np.clip(table[:, 0] - table[:, 1:].sum(axis=1), 0, None)
        w = frequency_class_weights(
            np.column_stack([background, table[:, 1:]]), spec, names=["background", *names]
        )
    weights = [float(f"{v:.6g}") for v in np.ravel(w)]
    shaped = [weights[i : i + 2] for i in range(0, len(weights), 2)] if sigmoid else weights
    logger.info("class weights (%s): %s", spec, shaped)
    return {"method": spec, "weights": shaped}


@dataclass
class Fingerprint:
    """What planning needs to know about the training cases (canonical orientation, mm)."""

    spacings: list[tuple[float, ...]]
    shapes: list[tuple[int, ...]]
    in_channels: int
    foreground_samples: list[np.ndarray]  # one array per channel
    label_volumes: list[tuple[float, ...]] = field(default_factory=list)
    """Per case, in mm³: the case's volume, then each structure's (config order); empty: not counted."""

    @property
    def median_spacing(self) -> tuple[float, ...]:
        return tuple(float(v) for v in np.median(np.asarray(self.spacings), axis=0))


def compute_fingerprint(
    cases: Sequence[Any], data_cfg: Any, *, seed: int = 0, progress: bool = False
) -> Fingerprint:
    """Read every training case once: spacing, shape (canonical orientation) and foreground intensities."""

    rng = np.random.default_rng(seed)
    spacings, shapes = [], []
    volumes: list[tuple[float, ...]] = []
    samples: list[list[np.ndarray]] = []
    in_channels = None
    for case in tqdm(cases, desc="fingerprint", disable=not progress, leave=False):
        image, label = load_case(case, data_cfg)
        image, _ = to_canonical(image)
        if label is not None:
            label, _ = to_canonical(label)
        spacings.append(image.spacing_mm)
        shapes.append(image.spatial_shape)
        if in_channels is None:
            in_channels = image.num_channels
            samples = [[] for _ in range(in_channels)]
        if label is not None:
            volumes.append(_label_volumes(label.array, data_cfg, float(np.prod(image.spacing_mm))))
        fg = label.array.any(axis=0) if label is not None else np.ones(image.spatial_shape, bool)
        idx = np.flatnonzero(fg)
        if idx.size:
            pick = rng.choice(idx, size=min(SAMPLES_PER_CASE, idx.size), replace=False)
            for c in range(image.num_channels):
                samples[c].append(image.array[c].ravel()[pick].astype(np.float32))
    if in_channels is None:
        raise DataError("no training cases to plan from; check data.root and the dataset layout")
    return Fingerprint(
        spacings=spacings,
        shapes=shapes,
        in_channels=in_channels,
        foreground_samples=[np.concatenate(s) if s else np.zeros(1, np.float32) for s in samples],
        label_volumes=volumes if len(volumes) == len(shapes) else [],
    )


def _label_volumes(label: np.ndarray, data_cfg: Any, voxel_mm3: float) -> tuple[float, ...]:
    """The case's volume and each structure's, in mm³ (exclusive label map or one mask per channel)."""
    total = float(label[0].size) * voxel_mm3
    if getattr(data_cfg, "mode", None) is Mode.SOFTMAX and data_cfg.labels:
        counts = np.bincount(label[0].ravel().astype(np.int64, copy=False))
        values = [int(data_cfg.labels[n]) for n in data_cfg.structure_names]
        fg = [float(counts[v]) if v < counts.size else 0.0 for v in values]
    else:
        fg = [float(np.count_nonzero(m)) for m in label]
    return (total, *(c * voxel_mm3 for c in fg))


def plan_target_spacing(
    fp: Fingerprint, spatial_dims: int, patch_size: Sequence[int] | None
) -> tuple[float, ...]:
    """Median spacing; strongly anisotropic data keep the coarse axis at its 10th percentile.

    2D data whose median image is larger than the patch are downsampled so the whole image fits the
    patch ("whole image for 2D").
    """
    spacing = np.asarray(fp.median_spacing, dtype=float)
    if spatial_dims == 3 and spacing.max() / spacing.min() > ANISOTROPY_RATIO:
        ax = int(np.argmax(spacing))
        spacing[ax] = float(np.percentile(np.asarray(fp.spacings)[:, ax], 10))
    if spatial_dims == 2 and patch_size is not None:
        median_shape = np.median(np.asarray(fp.shapes), axis=0)
        factor = float(np.max(median_shape / np.asarray(patch_size, dtype=float)))
        if factor > 1:
            spacing = spacing * factor
    return tuple(float(round(s, 6)) for s in spacing)


def plan_patch_size(
    median_shape: Sequence[int],
    divisor: int | Sequence[int],
    estimate: Callable[[tuple[int, ...]], int],
    budget_bytes: int,
    *,
    spacing: Sequence[float] | None = None,
) -> tuple[tuple[int, ...], int]:
    """The largest patch whose training step fits ``budget_bytes``, nnU-Net style.

    Starts from the median image shape rounded up to a multiple of ``divisor`` (at least one divisor
    per axis), then, while ``estimate(patch) > budget_bytes``, shrinks by one divisor the axis whose
    patch is largest relative to the median shape (ties: the axis longest in mm, then the first).
    A candidate the network cannot take (``estimate`` raises :class:`ConfigError`, e.g. too small for
    the model's levels) stops that axis from shrinking further.

    Args:
        median_shape: Median image shape in the target spacing.
        divisor: Step and multiple for each side (one int for every axis, or one per axis).
        estimate: Bytes of one training step at a patch size (:meth:`TrainingMemory.estimate`).
        budget_bytes: Device memory allowed for one training step.
        spacing: Target spacing (mm), only to break ties.

    Returns:
        ``(patch, estimate_bytes)``.

    Raises:
        ConfigError: If no legal patch fits the budget (naming ``train.memory_gb`` and the fixes).
    """
    nd = len(median_shape)
    div = [int(divisor)] * nd if isinstance(divisor, int) else [int(d) for d in divisor]
    med = np.maximum(np.asarray(median_shape, dtype=float), 1.0)
    sp = np.ones(nd) if spacing is None else np.asarray(spacing, dtype=float)
    shape = [max(k, int(math.ceil(s / k) * k)) for s, k in zip(median_shape, div, strict=True)]
    try:
        est = estimate(tuple(shape))
    except ConfigError as exc:
        raise ConfigError(
            f"the median image ({list(median_shape)} voxels in the target spacing, patch {shape}) is too "
            f"small for this network: {exc}"
        ) from exc
    frozen: set[int] = set()
    while est > budget_bytes:
        axes = [a for a in range(nd) if a not in frozen and shape[a] - div[a] >= div[a]]
        if not axes:
            raise ConfigError(
                f"train.memory_gb = {budget_bytes / GB:.3g} GB is too small: the smallest patch this network "
                f"takes, {shape}, needs about {format_bytes(est)} for one training step. Raise "
                "train.memory_gb, lower train.batch_size, use fewer or narrower model.channels, or set "
                "train.patch_size explicitly (it is then used as given, with a warning)."
            )
        ax = max(axes, key=lambda a: (round(shape[a] / med[a], 9), shape[a] * sp[a], -a))
        trial = list(shape)
        trial[ax] -= div[ax]
        try:
            trial_est = estimate(tuple(trial))
        except ConfigError:
            frozen.add(ax)
            continue
        shape, est = trial, trial_est
    return tuple(int(s) for s in shape), int(est)


def plan_normalization(fp: Fingerprint, modality: str) -> tuple[ChannelNorm, ...]:
    """Per channel: CT clipped to the 0.5-99.5 percentiles of the training foreground and z-scored with
    its clipped mean and std (nnU-Net's CT scheme); other modalities z-scored per image."""
    norms = []
    for c in range(fp.in_channels):
        if modality == "ct":
            s = fp.foreground_samples[c]
            lo, hi = (float(v) for v in np.percentile(s, [0.5, 99.5]))
            clipped = np.clip(s, lo, hi)
            norms.append(ChannelNorm("ct", lo, hi, float(clipped.mean()), float(clipped.std())))
        else:
            norms.append(ChannelNorm("zscore"))
    return tuple(norms)


def _patch_divisor(cfg: Config, divisor: int | None) -> tuple[int, ...]:
    """Multiple each planned patch side must be: the model's fixed strides, or ``2**(levels - 1)``
    (planned strides downsample an axis by at most 2 per level); combined with ``divisor``."""
    dims = cfg.data.spatial_dims
    if cfg.model.strides is not None:
        req = math.prod(int(s) for s in cfg.model.strides)
    else:
        req = 2 ** (len(cfg.model.channels) - 1)
    if divisor is not None:
        req = math.lcm(req, int(divisor))
    return (req,) * dims


class MemoryEstimate(Protocol):
    """What :func:`make_plan` reads of a training-memory estimate."""

    @property
    def total_bytes(self) -> int: ...

    @property
    def total_gb(self) -> float: ...

    def describe(self) -> str: ...


class MemoryEstimator(Protocol):
    """Estimates the memory of one training step at a patch size (e.g. ``TrainingMemory``)."""

    def estimate(self, patch_size: Sequence[int]) -> MemoryEstimate: ...


def make_plan(
    cfg: Config,
    fp: Fingerprint,
    *,
    memory: MemoryEstimator | Callable[[tuple[float, ...], int], MemoryEstimator],
    divisor: int | None = None,
) -> Plan:
    """Turn the config and the dataset fingerprint into a :class:`Plan`.

    Without ``train.patch_size`` the patch is the largest that fits ``train.memory_gb``
    (:func:`plan_patch_size`); with it, that patch is used as given, and a warning is logged when its
    estimate exceeds the budget. Either way the estimate is logged and recorded in the plan, and so is
    the network (:class:`~medseg.models.spec.NetworkSpec` with the strides for the patch).

    Args:
        cfg: The validated config.
        fp: The training cases' fingerprint.
        memory: The training-memory estimator, or a factory ``(target spacing, in_channels) ->
            estimator`` (training passes its estimator of the configured network).
        divisor: Extra multiple for planned patch sides (combined with the model's own requirement).

    Raises:
        ConfigError: If no legal patch fits ``train.memory_gb``, or a configured patch does not fit
            the network's strides.
    """

    data = cfg.data
    dims = data.spatial_dims
    if cfg.train.target_spacing_mm is not None:
        spacing = tuple(float(s) for s in cfg.train.target_spacing_mm)
    else:
        spacing = plan_target_spacing(fp, dims, cfg.train.patch_size)
    new_shapes = [resampled_shape(s, sp, spacing) for s, sp in zip(fp.shapes, fp.spacings, strict=True)]
    median_shape = tuple(int(v) for v in np.median(np.asarray(new_shapes), axis=0))
    budget = round(cfg.train.memory_gb * GB)
    if not hasattr(memory, "estimate"):
        memory = memory(spacing, fp.in_channels)
    if cfg.train.patch_size is not None:
        patch = tuple(int(p) for p in cfg.train.patch_size)
    else:
        patch, _ = plan_patch_size(
            median_shape,
            _patch_divisor(cfg, divisor),
            lambda p: memory.estimate(p).total_bytes,
            budget,
            spacing=spacing,
        )
    network = NetworkSpec.from_config(cfg.model, spatial_dims=dims, patch_size=patch, spacing_mm=spacing)
    network.check_patch_size(patch)
    est = memory.estimate(patch)
    est_bytes = est.total_bytes
    if est_bytes > budget:  # only a patch given in the config can exceed the budget
        logger.warning(
            "train.patch_size %s needs about %.2f GB per training step, more than train.memory_gb = "
            "%g GB; it is used as given (lower train.batch_size or the patch, or raise "
            "train.memory_gb, if training runs out of memory)",
            list(patch),
            est.total_gb,
            cfg.train.memory_gb,
        )
    logger.info(
        "training memory estimate: %s; budget train.memory_gb = %g GB", est.describe(), cfg.train.memory_gb
    )
    norms = plan_normalization(fp, data.modality)
    if data.mode is Mode.SOFTMAX:
        assert data.labels is not None
        names = tuple(data.structure_names)
        values = tuple(int(data.labels[n]) for n in names)
    else:
        names, values = tuple(data.structure_names), ()
    bw = cfg.loss.border_weights
    class_weights = plan_class_weights(cfg, fp)
    border_weights: dict[str, Any] = {"enabled": bw.enabled, "w0": bw.w0, "sigma_mm": bw.sigma_mm}
    if class_weights and bw.enabled:  # the dataset-level weights replace the map's per-case class balance
        border_weights["class_balance"] = False
    return Plan(
        spatial_dims=dims,
        modality=data.modality,
        mode=data.mode,
        structure_names=names,
        label_values=values,
        in_channels=fp.in_channels,
        target_spacing_mm=spacing,
        patch_size=patch,
        normalization=norms,
        crop_to_body=data.modality == "ct" and dims == 3,
        body_threshold=-500.0 if data.modality == "ct" else None,
        left_right_pairs=tuple(tuple(p) for p in data.left_right_pairs),
        border_weights=border_weights,
        class_weights=class_weights,
        median_shape=median_shape,
        memory_estimate_bytes=int(est_bytes),
        memory_budget_bytes=budget,
        network=network,
    )
