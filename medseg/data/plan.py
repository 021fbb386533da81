"""Dataset fingerprint and the preprocessing plan (``plan.json`` in every run directory).

The plan holds everything prediction needs to repeat the training preprocessing on a new scan and
to undo it: target spacing, intensity normalisation, patch size, label names and output mode. The
planning rules follow nnU-Net's: median spacing (the coarse axis of strongly anisotropic data uses
the 10th percentile), CT intensities clipped to the 0.5-99.5 percentiles of the foreground and
z-scored with the foreground mean/std, MR and X-ray z-scored per image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medseg.config import Config
from medseg.errors import DataError

logger = logging.getLogger(__name__)

PREPROCESS_VERSION = 1
ANISOTROPY_RATIO = 3.0
SAMPLES_PER_CASE = 10_000
# voxel budget for planned patches (a patch size from the config always wins)
PATCH_VOXELS_3D = 128**3
PATCH_VOXELS_2D = 512**2


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
    mode: Literal["softmax", "sigmoid"]
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
    median_shape: tuple[int, ...] = ()
    version: int = PREPROCESS_VERSION

    @property
    def out_channels(self) -> int:
        """Network output channels: background + classes (softmax) or one per structure (sigmoid)."""
        return len(self.structure_names) + (1 if self.mode == "softmax" else 0)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        d = dict(d)
        d["normalization"] = tuple(ChannelNorm(**n) for n in d["normalization"])
        for key in ("structure_names", "label_values", "target_spacing_mm", "patch_size", "median_shape"):
            d[key] = tuple(d.get(key, ()))
        d["left_right_pairs"] = tuple(tuple(p) for p in d.get("left_right_pairs", ()))
        return cls(**d)

    def save(self, path: str | Path) -> Path:
        from medseg.io._atomic import atomic_write

        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise DataError(f"{path}: not a valid medseg plan.json ({exc})") from exc

    def preprocess_key(self) -> str:
        """Hash of everything that changes the preprocessed arrays (the cache key)."""
        d = self.to_dict()
        d.pop("patch_size", None)
        d.pop("median_shape", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Fingerprint:
    """What planning needs to know about the training cases (canonical orientation, mm)."""

    spacings: list[tuple[float, ...]]
    shapes: list[tuple[int, ...]]
    in_channels: int
    foreground_samples: list[np.ndarray]  # one array per channel

    @property
    def median_spacing(self) -> tuple[float, ...]:
        return tuple(float(v) for v in np.median(np.asarray(self.spacings), axis=0))


def compute_fingerprint(
    cases: Sequence[Any], data_cfg: Any, *, seed: int = 0, progress: bool = False
) -> Fingerprint:
    """Read every training case once: spacing, shape (canonical orientation) and foreground intensities."""
    from tqdm.auto import tqdm

    from medseg.data.datasets import load_case
    from medseg.data.geometry import to_canonical

    rng = np.random.default_rng(seed)
    spacings, shapes = [], []
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
    )


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
    median_shape: Sequence[int], spacing: Sequence[float], divisor: int, voxels: int
) -> tuple[int, ...]:
    """Patch no larger than the median image and ``voxels`` in total, shrinking the axis that is longest
    in mm first; each side a multiple of ``divisor``."""
    shape = np.array([max(divisor, int(math.ceil(s / divisor) * divisor)) for s in median_shape], dtype=float)
    sp = np.asarray(spacing, dtype=float)
    while np.prod(shape) > voxels:
        mm = shape * sp
        ax = int(np.argmax(np.where(shape > divisor, mm, -1)))
        if shape[ax] <= divisor:
            break
        shape[ax] -= divisor
    return tuple(int(s) for s in shape)


def make_plan(cfg: Config, fp: Fingerprint, *, divisor: int = 16) -> Plan:
    """Turn the config and the dataset fingerprint into a :class:`Plan`."""
    from medseg.data.geometry import resampled_shape

    data = cfg.data
    dims = data.spatial_dims
    if cfg.train.target_spacing_mm is not None:
        spacing = tuple(float(s) for s in cfg.train.target_spacing_mm)
    else:
        spacing = plan_target_spacing(fp, dims, cfg.train.patch_size)
    new_shapes = [resampled_shape(s, sp, spacing) for s, sp in zip(fp.shapes, fp.spacings, strict=True)]
    median_shape = tuple(int(v) for v in np.median(np.asarray(new_shapes), axis=0))
    if cfg.train.patch_size is not None:
        patch = tuple(int(p) for p in cfg.train.patch_size)
    else:
        patch = plan_patch_size(
            median_shape, spacing, divisor, PATCH_VOXELS_3D if dims == 3 else PATCH_VOXELS_2D
        )
    norms = []
    for c in range(fp.in_channels):
        if data.modality == "ct":
            s = fp.foreground_samples[c]
            lo, hi = (float(v) for v in np.percentile(s, [0.5, 99.5]))
            clipped = np.clip(s, lo, hi)
            norms.append(ChannelNorm("ct", lo, hi, float(clipped.mean()), float(clipped.std())))
        else:
            norms.append(ChannelNorm("zscore"))
    if data.mode == "softmax":
        assert data.labels is not None
        names = tuple(data.structure_names)
        values = tuple(int(data.labels[n]) for n in names)
    else:
        names, values = tuple(data.structure_names), ()
    bw = cfg.loss.border_weights
    return Plan(
        spatial_dims=dims,
        modality=data.modality,
        mode=data.mode,
        structure_names=names,
        label_values=values,
        in_channels=fp.in_channels,
        target_spacing_mm=spacing,
        patch_size=patch,
        normalization=tuple(norms),
        crop_to_body=data.modality == "ct" and dims == 3,
        body_threshold=-500.0 if data.modality == "ct" else None,
        left_right_pairs=tuple(tuple(p) for p in data.left_right_pairs),
        border_weights={"enabled": bw.enabled, "w0": bw.w0, "sigma_mm": bw.sigma_mm},
        median_shape=median_shape,
    )
