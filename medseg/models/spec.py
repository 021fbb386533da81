"""The architecture record of a network (:class:`NetworkSpec`) and the stride rules; torch-free.

A :class:`NetworkSpec` is what ``plan.json`` stores under ``network``: the registered model name and
every argument its builder needs, with the per-level, per-axis strides already chosen. Training
resolves it once when it plans (:meth:`NetworkSpec.from_config`); training, prediction, the memory
probe and the scripts build the network from it (:func:`medseg.models.create_network`) and never
choose strides again, so the network that is loaded is the network that was trained.

Strides:
    ``model.strides`` has one entry per level (``len(channels)``); the first is the stride of the
    input block and must be 1, the others downsample, e.g. ``[1, 2, 2, 2]``. When it is omitted and
    a patch size is known, :func:`plan_strides` chooses per-axis strides nnU-Net style (an axis is not
    downsampled while its spacing is 2x coarser than the finest axis, nor when its size would fall
    below 4). Otherwise every level after the first downsamples every axis by 2. The input's spatial
    size must be divisible, per axis, by the product of the strides (:func:`required_divisor`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from medseg.config import ModelConfig
from medseg.errors import ConfigError

__all__ = [
    "AxisStrides",
    "NetworkSpec",
    "check_patch_dims",
    "default_strides",
    "plan_strides",
    "required_divisor",
    "resolve_strides",
]

AxisStrides = tuple[int, ...]
"""Stride of one level, one integer per spatial axis."""


def default_strides(depth: int, spatial_dims: int) -> list[AxisStrides]:
    """Stride 1 for the input block, then 2 on every axis for each further level.

    >>> default_strides(3, 2)
    [(1, 1), (2, 2), (2, 2)]
    """
    return [(1,) * spatial_dims] + [(2,) * spatial_dims] * (depth - 1)


def plan_strides(
    patch_size: Sequence[int],
    spacing_mm: Sequence[float] | None = None,
    *,
    depth: int,
    min_size: int = 4,
    max_spacing_ratio: float = 2.0,
) -> list[AxisStrides]:
    """Per-axis strides for a U-Net of ``depth`` levels, chosen as nnU-Net does.

    At each level after the first, an axis is downsampled by 2 when its current feature-map size is at
    least ``2 * min_size`` and its current spacing is less than ``max_spacing_ratio`` times the finest
    current spacing (so a 5 mm axis of a 0.8 x 0.8 x 5 mm CT is kept until the in-plane axes have
    been pooled to a comparable spacing). Isensee et al., nnU-Net, Nature Methods 2021.

    Args:
        patch_size: Training patch size, one value per spatial axis.
        spacing_mm: Voxel size per axis; ``None`` treats the axes as isotropic.
        depth: Number of levels (``len(model.channels)``).
        min_size: Smallest feature-map size an axis may be pooled down to.
        max_spacing_ratio: Axes this many times coarser than the finest one are not pooled.

    Returns:
        ``depth`` tuples of per-axis strides; the first is all ones (the input block).

    Raises:
        ConfigError: If the arguments are inconsistent, or some level could not downsample any axis
            (the patch is too small for ``depth`` levels).

    Example:
        >>> plan_strides((128, 128, 16), (0.8, 0.8, 5.0), depth=4)
        [(1, 1, 1), (2, 2, 1), (2, 2, 1), (2, 2, 2)]
    """
    nd = len(patch_size)
    if nd not in (2, 3) or any(int(s) < 1 for s in patch_size):
        raise ConfigError(f"patch_size must be 2 or 3 positive integers, got {list(patch_size)}")
    if spacing_mm is not None and (len(spacing_mm) != nd or any(s <= 0 for s in spacing_mm)):
        raise ConfigError(f"spacing_mm must be {nd} positive numbers (one per axis), got {list(spacing_mm)}")
    if depth < 2:
        raise ConfigError(f"a U-Net needs at least 2 levels, got depth={depth}")
    size = [int(s) for s in patch_size]
    spacing = [float(s) for s in spacing_mm] if spacing_mm is not None else [1.0] * nd
    strides: list[AxisStrides] = [(1,) * nd]
    for level in range(1, depth):
        finest = min(spacing)
        stride = tuple(
            2 if size[d] >= 2 * min_size and spacing[d] < max_spacing_ratio * finest else 1 for d in range(nd)
        )
        if stride == (1,) * nd:
            raise ConfigError(
                f"patch_size {list(patch_size)} is too small for {depth} levels: after {level - 1} "
                f"downsamplings the feature map is {size}, and no axis can be halved without falling below "
                f"{min_size} voxels. Use a larger patch, or at most {level} entries in model.channels."
            )
        strides.append(stride)
        size = [s // f for s, f in zip(size, stride, strict=True)]
        spacing = [s * f for s, f in zip(spacing, stride, strict=True)]
    return strides


def resolve_strides(
    cfg: ModelConfig,
    *,
    spatial_dims: int,
    patch_size: Sequence[int] | None = None,
    spacing_mm: Sequence[float] | None = None,
) -> list[AxisStrides]:
    """The per-level, per-axis strides :func:`create_model` uses for ``cfg``.

    ``cfg.strides`` wins when given (the same stride on every axis of a level); otherwise
    :func:`plan_strides` on ``patch_size``/``spacing_mm`` when a patch size is given; otherwise
    :func:`default_strides`.

    Raises:
        ConfigError: If ``cfg.strides`` does not have one entry per level or its first entry is not 1.
    """
    depth = len(cfg.channels)
    if cfg.strides is not None:
        if len(cfg.strides) != depth:
            raise ConfigError(
                f"model.strides has {len(cfg.strides)} values but model.channels has {depth} levels; give "
                f"one stride per level, the first being the input block's (1), e.g. {[1] + [2] * (depth - 1)}"
            )
        if cfg.strides[0] != 1:
            raise ConfigError(
                f"model.strides[0] is the input block's stride and must be 1 (the output must have the "
                f"input's size), got {cfg.strides[0]}; e.g. {[1] + [2] * (depth - 1)}"
            )
        return [(int(s),) * spatial_dims for s in cfg.strides]
    if patch_size is not None:
        return plan_strides(patch_size, spacing_mm, depth=depth)
    return default_strides(depth, spatial_dims)


def required_divisor(strides: Sequence[AxisStrides | int]) -> tuple[int, ...]:
    """Product of the strides per axis: the input size must be a multiple of it on each axis.

    >>> required_divisor([(1, 1, 1), (2, 2, 1), (2, 2, 2)])
    (4, 4, 2)
    """
    per_level = [s if isinstance(s, Sequence) else (s,) for s in strides]
    nd = max(len(s) for s in per_level)
    per_level = [tuple(s) * nd if len(s) == 1 else tuple(s) for s in per_level]
    return tuple(math.prod(s[d] for s in per_level) for d in range(nd))


def check_patch_dims(
    patch_size: Sequence[int], spatial_dims: int, *, what: str = "patch_size"
) -> tuple[int, ...]:
    """``patch_size`` as ints when it has one positive value per spatial axis, else :class:`ConfigError`
    (the one check of a patch's length, for every API that takes a patch)."""
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != spatial_dims or any(p < 1 for p in patch):
        raise ConfigError(
            f"{what} {list(patch_size)} has {len(patch)} values; expected {spatial_dims} positive integers "
            "(one per spatial axis)"
        )
    return patch


def _padded(shape: Sequence[int], divisor: Sequence[int]) -> tuple[int, ...]:
    return tuple(-(-int(s) // k) * k for s, k in zip(shape, divisor, strict=True))


@dataclass(frozen=True)
class NetworkSpec:
    """Everything needed to build a registered network, with its strides resolved.

    Attributes:
        name: Registered model name (``model.name``).
        spatial_dims: 2 or 3.
        channels: Feature width per level.
        strides: Per-level, per-axis strides; the first level's are all 1.
        kernel_size: Convolution kernel size on every level.
        residual, norm, upsample, deep_supervision: As in :class:`~medseg.config.ModelConfig`.
        options: Further arguments of models that take more than these (empty for the U-Nets).
    """

    name: str
    spatial_dims: int
    channels: tuple[int, ...]
    strides: tuple[AxisStrides, ...]
    kernel_size: int = 3
    residual: bool = False
    norm: str = "instance"
    upsample: str = "deconv"
    deep_supervision: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        nd = self.spatial_dims
        if nd not in (2, 3):
            raise ConfigError(f"spatial_dims must be 2 or 3, got {nd}")
        if len(self.strides) != len(self.channels) or any(len(s) != nd for s in self.strides):
            raise ConfigError(
                f"network strides {[list(s) for s in self.strides]} must give one {nd}-axis stride per "
                f"level of channels {list(self.channels)}"
            )
        if tuple(self.strides[0]) != (1,) * nd or any(v < 1 for s in self.strides for v in s):
            raise ConfigError(
                f"network strides {[list(s) for s in self.strides]}: the first level's must be 1 on every "
                "axis and all must be positive"
            )

    @classmethod
    def from_config(
        cls,
        cfg: ModelConfig,
        *,
        spatial_dims: int,
        patch_size: Sequence[int] | None = None,
        spacing_mm: Sequence[float] | None = None,
        strides: Sequence[Sequence[int]] | None = None,
    ) -> NetworkSpec:
        """Resolve ``cfg`` for data of ``spatial_dims``: the strides are ``strides`` when given, else
        :func:`resolve_strides` (``model.strides``, else planned from the patch and spacing).

        Raises:
            ConfigError: Inconsistent strides, or a patch too small for the network's levels.
        """
        if strides is None:
            strides = resolve_strides(
                cfg, spatial_dims=spatial_dims, patch_size=patch_size, spacing_mm=spacing_mm
            )
        return cls(
            name=cfg.name,
            spatial_dims=int(spatial_dims),
            channels=tuple(int(c) for c in cfg.channels),
            strides=tuple(tuple(int(v) for v in s) for s in strides),
            residual=cfg.residual,
            norm=cfg.norm,
            upsample=cfg.upsample,
            deep_supervision=cfg.deep_supervision,
            options=dict(cfg.options),
        )

    @property
    def input_divisor(self) -> tuple[int, ...]:
        """The multiple every input size must be, per axis (:func:`required_divisor`)."""
        return required_divisor(self.strides)

    def check_patch_size(self, patch_size: Sequence[int]) -> None:
        """Raise :class:`ConfigError` unless every side of ``patch_size`` is a multiple of
        :attr:`input_divisor` (naming the padded patch to use instead)."""
        div = self.input_divisor
        if len(patch_size) != len(div) or any(int(p) % k for p, k in zip(patch_size, div, strict=True)):
            raise ConfigError(
                f"patch_size {list(patch_size)} is not divisible by {list(div)} per axis (the product of "
                f"the model's strides {[list(s) for s in self.strides]}); use train.patch_size "
                f"{list(_padded(patch_size, div))}, or fewer levels in model.channels"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the ``network`` entry of ``plan.json``)."""
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["strides"] = [list(s) for s in self.strides]
        d["options"] = dict(self.options)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NetworkSpec:
        """Inverse of :meth:`to_dict`.

        Raises:
            ConfigError: Missing or malformed entries.
        """
        try:
            return cls(
                name=str(d["name"]),
                spatial_dims=int(d["spatial_dims"]),
                channels=tuple(int(c) for c in d["channels"]),
                strides=tuple(tuple(int(v) for v in s) for s in d["strides"]),
                kernel_size=int(d.get("kernel_size", 3)),
                residual=bool(d.get("residual", False)),
                norm=str(d.get("norm", "instance")),
                upsample=str(d.get("upsample", "deconv")),
                deep_supervision=bool(d.get("deep_supervision", False)),
                options=dict(d.get("options") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"network record {dict(d)!r} is malformed ({exc})") from exc
