"""Compound segmentation loss: ``λ_dice·SoftDice + λ_ce·(weighted CE or BCE) + λ_focal·focal``.

Two output modes:

* ``"softmax"`` (exclusive classes): logits ``(B, C+1, *spatial)`` with channel 0 = background,
  target = class indices; soft Dice on the softmax + cross-entropy.
* ``"sigmoid"`` (overlapping structures): logits ``(B, C, *spatial)``, one channel per structure,
  target = one binary mask per channel; soft Dice per channel on the sigmoid + binary cross-entropy.

Why the CE/BCE/focal reductions are written here rather than taken from MONAI: ``monai.losses.DiceCELoss``
and ``DiceFocalLoss`` have no per-voxel weight map, and the border weight map of Ronneberger et al. (2015,
eq. 2; :mod:`medseg.losses.weight_maps`) must enter as a normalised weighted mean
``sum(w * ce) / sum(w)``. The per-voxel focal terms come from MONAI (``softmax_focal_loss`` and
``sigmoid_focal_loss``), but not :class:`monai.losses.FocalLoss` itself: its ``"mean"`` reduction also
averages over the class channels, so in softmax mode ``gamma=0`` gives ``CE / C`` instead of CE, and it
takes no weight map. Soft Dice is MONAI's ``DiceLoss`` (see :mod:`medseg.losses.dice`).

Class weights (``loss.class_weights``, :mod:`medseg.losses.class_weights`) enter the same way as the
weight map: a voxel of class ``c`` gets ``w(x)·cw[c]`` in the weighted mean, which for ``w ≡ 1`` is
exactly ``torch.nn.functional.cross_entropy(weight=cw)``.

Weighting conventions:

* Weighted CE is normalised **globally over the batch**: ``sum_{b,x} w·ce / sum_{b,x} w`` (not a mean of
  per-sample weighted means), so every voxel of the batch counts with its own weight. With ``w ≡ 1`` it is
  exactly the usual mean CE.
* Weighted BCE takes a weight map shared by all channels ``(B, 1, *spatial)`` (broadcast) or one per
  channel ``(B, C, *spatial)``, and returns ``sum_{b,c,x} w·bce / sum_{b,c,x} w``. For a shared map this is
  the same as averaging the BCE over the channels first and then taking the weighted mean over voxels.
* The weight map weights every voxel-wise term (CE/BCE and focal). Soft Dice is a region overlap and is
  not weighted. Weights must be non-negative; this is not checked (it would cost a device sync per step).
  If all weights are 0 the term is 0.

Deep supervision (nnU-Net style): pass a list/tuple of logits, highest resolution first. Level ``i`` gets
weight ``2**-i``, normalised to sum 1 (override with ``ds_weights``; a level weighted 0 is still
computed, times 0, so that DDP sees a gradient for every output head). The highest-resolution level must
match the target's size; for coarser levels the target is downsampled with ``"nearest-exact"``
interpolation (class indices and binary masks stay exact labels, no invented classes) and the weight map
with ``"area"`` interpolation (local mean, which keeps the average weight). For MONAI ``DynUNet``'s stacked
output ``(B, L, C, *spatial)`` pass ``torch.unbind(out, dim=1)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from monai.losses.focal_loss import sigmoid_focal_loss, softmax_focal_loss
from torch import nn

from medseg.config import LossConfig
from medseg.errors import ConfigError, ShapeError
from medseg.labels import Mode
from medseg.losses.dice import soft_dice_loss
from medseg.registry import Registry

__all__ = [
    "LOSSES",
    "LossMode",
    "SegmentationLoss",
    "create_loss",
    "focal_loss",
    "weighted_bce",
    "weighted_cross_entropy",
]

LossMode = Mode | Literal["softmax", "sigmoid"]
"""A :class:`~medseg.labels.Mode` (its string value is accepted too)."""
_MODES = tuple(Mode)

# --------------------------------------------------------------------------------------------
# input checks (shapes only: value checks such as "indices < C" would need a device sync)


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_logits(logits: torch.Tensor, where: str) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{where}: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.ndim not in (4, 5):
        raise ShapeError(
            f"{where}: logits must be (B, C, X, Y) or (B, C, X, Y, Z)",
            expected=("B", "C", "X", "Y", "[Z]"),
            actual=tuple(logits.shape),
        )
    if not logits.is_floating_point():
        raise TypeError(f"{where}: logits must be a float tensor, got {logits.dtype}")


def _index_target(target: torch.Tensor, logits: torch.Tensor, where: str) -> torch.Tensor:
    """Class indices ``(B, *spatial)`` or ``(B, 1, *spatial)`` -> int64 ``(B, 1, *spatial)``."""
    b, c, *spatial = logits.shape
    expected = (b, 1, *spatial)
    given = tuple(target.shape)
    if target.ndim == logits.ndim - 1:
        target = target.unsqueeze(1)
    if target.ndim == logits.ndim and target.shape[1] == c and c > 1 and tuple(target.shape) != expected:
        raise ShapeError(
            f"{where}: got a one-hot target, but softmax mode takes class indices "
            "(pass target.argmax(1, keepdim=True))",
            expected=expected,
            actual=given,
        )
    if tuple(target.shape) != expected:
        raise ShapeError(
            f"{where}: target class indices must be (B, 1, *spatial) or (B, *spatial) matching the "
            f"logits {tuple(logits.shape)}",
            expected=expected,
            actual=given,
        )
    if target.is_floating_point():
        target = target.round()
    return target.long()


def _binary_target(target: torch.Tensor, logits: torch.Tensor, where: str) -> torch.Tensor:
    """Binary masks ``(B, C, *spatial)`` (float/uint8/bool) -> float ``(B, C, *spatial)``."""
    if tuple(target.shape) != tuple(logits.shape):
        raise ShapeError(
            f"{where}: sigmoid mode takes one binary mask per logit channel, (B, C, *spatial)",
            expected=tuple(logits.shape),
            actual=tuple(target.shape),
        )
    return target.to(_as_float(logits).dtype)


def _weight_map(
    weight_map: torch.Tensor | None, logits: torch.Tensor, where: str, *, per_channel: bool
) -> torch.Tensor | None:
    """``(B, *spatial)``, ``(B, 1, *spatial)`` [or ``(B, C, *spatial)``] -> float ``(B, 1|C, *spatial)``."""
    if weight_map is None:
        return None
    b, c, *spatial = logits.shape
    w = weight_map.unsqueeze(1) if weight_map.ndim == logits.ndim - 1 else weight_map
    ok = w.ndim == logits.ndim and w.shape[0] == b and list(w.shape[2:]) == spatial
    ok = ok and (w.shape[1] == 1 or (per_channel and w.shape[1] == c))
    if not ok:
        shapes = f"(B, 1, *spatial) or (B, *spatial){' or (B, C, *spatial)' if per_channel else ''}"
        raise ShapeError(
            f"{where}: weight_map must be {shapes} matching the logits {tuple(logits.shape)}",
            expected=(b, c if per_channel else 1, *spatial),
            actual=tuple(weight_map.shape),
        )
    return w.to(_as_float(logits).dtype)


def _weighted_mean(loss: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """``mean(loss)``, or ``sum(w * loss) / sum(w)`` with ``w`` broadcast to ``loss``."""
    if w is None:
        return loss.mean()
    total_w = w.sum() * (loss.numel() // w.numel())  # sum of w broadcast to loss's shape
    return (w * loss).sum() / total_w.clamp_min(1e-12)


# --------------------------------------------------------------------------------------------
# voxel-wise terms


def weighted_cross_entropy(
    logits: torch.Tensor, target_idx: torch.Tensor, weight_map: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy over softmax channels, optionally weighted per voxel: ``sum(w·ce) / sum(w)``.

    Hand-written because ``torch.nn.functional.cross_entropy`` and MONAI's ``DiceCELoss`` take per-class,
    not per-voxel, weights. The normalisation is global over the batch (see the module docstring).

    Args:
        logits: Raw scores ``(B, C, *spatial)`` with 2 or 3 spatial dims (C includes the background).
        target_idx: Class indices in ``[0, C)``, ``(B, 1, *spatial)`` or ``(B, *spatial)``; integer dtype
            (float is rounded).
        weight_map: Non-negative per-voxel weights ``(B, 1, *spatial)`` or ``(B, *spatial)``, or ``None``
            for the plain mean.

    Returns:
        Scalar float tensor (float32 unless the logits are float64).

    Raises:
        ShapeError: If the shapes do not match.

    Example:
        >>> import torch
        >>> logits = torch.zeros(1, 2, 2, 2)  # p = 1/2 everywhere
        >>> target = torch.zeros(1, 2, 2, dtype=torch.long)
        >>> round(float(weighted_cross_entropy(logits, target, torch.rand(1, 2, 2))), 4)  # ln 2
        0.6931
    """
    where = "weighted_cross_entropy"
    _check_logits(logits, where)
    idx = _index_target(target_idx, logits, where)
    w = _weight_map(weight_map, logits, where, per_channel=False)
    ce = F.cross_entropy(_as_float(logits), idx[:, 0], reduction="none")  # (B, *spatial)
    return _weighted_mean(ce, None if w is None else w[:, 0])


def weighted_bce(
    logits: torch.Tensor, target: torch.Tensor, weight_map: torch.Tensor | None = None
) -> torch.Tensor:
    """Binary cross-entropy per sigmoid channel, optionally weighted per voxel: ``sum(w·bce) / sum(w)``.

    Args:
        logits: Raw scores ``(B, C, *spatial)``, one channel per structure.
        target: Binary masks of the same shape (float, uint8 or bool; values in ``{0, 1}``, soft labels in
            ``[0, 1]`` also work).
        weight_map: Non-negative weights shared by the channels, ``(B, 1, *spatial)`` or ``(B, *spatial)``,
            or one map per channel ``(B, C, *spatial)``; ``None`` for the plain mean.

    Returns:
        Scalar float tensor: ``sum_{b,c,x} w·bce / sum_{b,c,x} w`` (a shared map is broadcast over the
        channels, which equals the channel-averaged BCE weighted per voxel).

    Raises:
        ShapeError: If the shapes do not match.
    """
    where = "weighted_bce"
    _check_logits(logits, where)
    g = _binary_target(target, logits, where)
    w = _weight_map(weight_map, logits, where, per_channel=True)
    bce = F.binary_cross_entropy_with_logits(_as_float(logits), g, reduction="none")
    return _weighted_mean(bce, w)


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    mode: LossMode,
    gamma: float = 2.0,
    alpha: float | Sequence[float] | None = None,
    weight_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Focal loss (Lin et al., ICCV 2017), ``-alpha·(1 - p_t)**gamma·log(p_t)``, per voxel.

    Softmax mode sums MONAI's per-class terms over the channels, so each voxel contributes
    ``-(1 - p_t)**gamma·log p_t`` of its true class and ``gamma=0`` is exactly cross-entropy (MONAI's
    ``FocalLoss`` would give ``CE / C``). Sigmoid mode is the per-channel binary focal loss; ``gamma=0`` is
    exactly BCE. The reduction is the weighted mean of :func:`weighted_cross_entropy` /
    :func:`weighted_bce`.

    Args:
        logits: Raw scores ``(B, C, *spatial)``.
        target: Softmax mode: class indices ``(B, 1, *spatial)`` or ``(B, *spatial)``. Sigmoid mode: binary
            masks ``(B, C, *spatial)``.
        mode: ``"softmax"`` or ``"sigmoid"``.
        gamma: Focusing exponent (>= 0); 0 gives plain CE/BCE.
        alpha: Class balance as in MONAI: softmax, a float gives ``1 - alpha`` to the background and
            ``alpha`` to the other classes, a sequence gives one weight per class; sigmoid, a float gives
            ``alpha`` to positives and ``1 - alpha`` to negatives. ``None``: no balancing.
        weight_map: Per-voxel weights as in :func:`weighted_cross_entropy` / :func:`weighted_bce`.

    Returns:
        Scalar float tensor.

    Raises:
        ShapeError: If the shapes do not match.
        ValueError: If ``mode`` is unknown or ``gamma < 0``.
    """
    where = "focal_loss"
    if mode not in _MODES:
        raise ValueError(f"{where}: mode must be 'softmax' or 'sigmoid', got {mode!r}")
    if gamma < 0:
        raise ValueError(f"{where}: gamma must be >= 0, got {gamma}")
    _check_logits(logits, where)
    x = _as_float(logits)
    a: float | torch.Tensor | None = None
    if isinstance(alpha, int | float):
        a = float(alpha)
    elif alpha is not None:
        a = torch.as_tensor(list(alpha), dtype=x.dtype, device=x.device)
    if mode == Mode.SOFTMAX:
        idx = _index_target(target, logits, where)
        w = _weight_map(weight_map, logits, where, per_channel=False)
        onehot = torch.zeros_like(x).scatter_(1, idx, 1.0)
        fl = softmax_focal_loss(x, onehot, gamma, a).sum(dim=1, keepdim=True)  # (B, 1, *spatial)
    else:
        g = _binary_target(target, logits, where)
        w = _weight_map(weight_map, logits, where, per_channel=True)
        fl = sigmoid_focal_loss(x, g, gamma, a)
    return _weighted_mean(fl, w)


# --------------------------------------------------------------------------------------------
# compound loss and registry

LOSSES: Registry[type[SegmentationLoss]] = Registry("loss")
"""Loss classes by name; each has ``from_config(loss_cfg, *, mode, num_classes)``."""


def _resize(x: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    if tuple(x.shape[2:]) == tuple(size):
        return x
    out = F.interpolate(_as_float(x), size=tuple(size), mode=mode)
    return out.to(x.dtype) if not x.is_floating_point() else out


@LOSSES.register("dice_ce")
class SegmentationLoss(nn.Module):
    """``dice_weight·SoftDice + ce_weight·(weighted CE or BCE) + focal_weight·focal``, with deep supervision.

    Takes raw logits (the activation is applied inside). See the module docstring for the modes, the
    weight-map normalisation and deep supervision.

    Args:
        mode: ``"softmax"`` (exclusive classes; CE + Dice on the softmax) or ``"sigmoid"`` (overlapping
            structures; BCE + Dice per sigmoid channel).
        num_classes: Number of logit channels: ``len(labels) + 1`` in softmax mode (background included),
            ``len(structures)`` in sigmoid mode.
        dice_weight: λ_dice.
        ce_weight: λ_ce (CE in softmax mode, BCE in sigmoid mode).
        focal_weight: λ_focal; 0 (default) skips the focal term.
        focal_gamma: Focusing exponent of the focal term.
        include_background: Softmax mode only: include channel 0 in the Dice. Default ``False``: the
            background dominates the voxel count and its near-perfect Dice would dilute the signal from
            small organs. Ignored in sigmoid mode, where every channel is a structure.
        batch_dice: One Dice per channel over the whole batch (nnU-Net ``batch_dice``). Default ``True``:
            stable for small structures that are absent from some patches, where a per-sample Dice is
            0/0-like and noisy.
        squared: Squared Dice denominator. Default ``False`` (plain ``sum(p) + sum(g)``, as nnU-Net and
            MONAI's default): gradients do not vanish for low-confidence predictions.
        smooth: Dice smoothing, default 1e-5 (nnU-Net v2, MONAI): small enough not to bias the Dice of
            small structures, large enough to make an empty-target-empty-prediction channel score 0 loss.
        ds_weights: Deep-supervision weights per level (highest resolution first); ``None`` = ``2**-i``.
            Normalised to sum 1; the length must match the number of levels passed.
        class_weights: Class weights of the CE/BCE and focal terms (see
            :mod:`medseg.losses.class_weights`): softmax, one per channel (background first), so a voxel
            of class ``c`` counts ``class_weights[c]`` times; sigmoid, an ``(outside, inside)`` pair per
            channel. They multiply the per-voxel weight map; ``None``: all 1.
        focal_alpha: The focal term's class balance (see :func:`focal_loss`); ``None``: none.

    Raises:
        ConfigError: If ``mode`` is unknown, ``num_classes`` is too small for the mode, every term
            weight is 0, or the class weights or ``focal_alpha`` do not fit the channels.

    Example:
        >>> import torch
        >>> loss = SegmentationLoss("softmax", num_classes=3)
        >>> target = torch.randint(0, 3, (2, 1, 8, 8))
        >>> perfect = 30.0 * (2 * torch.zeros(2, 3, 8, 8).scatter_(1, target, 1.0) - 1)
        >>> float(loss(perfect, target)) < 1e-3
        True
    """

    def __init__(
        self,
        mode: LossMode,
        num_classes: int,
        *,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        focal_weight: float = 0.0,
        focal_gamma: float = 2.0,
        include_background: bool = False,
        batch_dice: bool = True,
        squared: bool = False,
        smooth: float = 1e-5,
        ds_weights: Sequence[float] | None = None,
        class_weights: Sequence[float] | Sequence[Sequence[float]] | None = None,
        focal_alpha: float | Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ConfigError(f"loss mode must be 'softmax' or 'sigmoid', got {mode!r}")
        min_classes = 2 if mode == Mode.SOFTMAX else 1
        if num_classes < min_classes:
            what = "background + at least one class" if mode == Mode.SOFTMAX else "at least one structure"
            raise ConfigError(f"{mode} loss needs num_classes >= {min_classes} ({what}), got {num_classes}")
        weights = {"dice_weight": dice_weight, "ce_weight": ce_weight, "focal_weight": focal_weight}
        negative = {k: v for k, v in weights.items() if v < 0}
        if negative:
            raise ConfigError(f"loss term weights must be >= 0, got {negative}")
        if not any(v > 0 for v in weights.values()):
            raise ConfigError(
                "loss.dice_weight, loss.ce_weight and loss.focal_weight are all 0; set at least one > 0"
            )
        bad_ds = ds_weights is not None and (any(v < 0 for v in ds_weights) or sum(ds_weights) <= 0)
        if bad_ds:
            raise ConfigError(f"ds_weights must be non-negative with a positive sum, got {ds_weights}")
        self.mode = Mode(mode)
        self.num_classes = num_classes
        self.dice_weight = float(dice_weight)
        self.ce_weight = float(ce_weight)
        self.focal_weight = float(focal_weight)
        self.focal_gamma = float(focal_gamma)
        self.include_background = include_background if mode == Mode.SOFTMAX else True
        self.batch_dice = batch_dice
        self.squared = squared
        self.smooth = smooth
        self.ds_weights = None if ds_weights is None else [float(v) for v in ds_weights]
        self.class_weights = _check_class_weights(class_weights, self.mode, num_classes)
        self.focal_alpha = _check_focal_alpha(focal_alpha, num_classes)

    @classmethod
    def from_config(
        cls,
        loss_cfg: LossConfig,
        *,
        mode: LossMode,
        num_classes: int,
        class_weights: Sequence[float] | Sequence[Sequence[float]] | None = None,
    ) -> SegmentationLoss:
        """Build from the ``loss:`` section of the config (``border_weights`` is used by the data side).

        ``class_weights`` are the plan's (``loss.class_weights`` resolved from the training cases at
        planning); the config only names the method.
        """
        return cls(
            mode,
            num_classes,
            dice_weight=loss_cfg.dice_weight,
            ce_weight=loss_cfg.ce_weight,
            focal_weight=loss_cfg.focal_weight,
            focal_gamma=loss_cfg.focal_gamma,
            include_background=loss_cfg.dice_include_background,
            batch_dice=loss_cfg.dice_batch,
            squared=loss_cfg.dice_squared,
            class_weights=class_weights,
            focal_alpha=loss_cfg.focal_alpha,
        )

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, num_classes={self.num_classes}, dice_weight={self.dice_weight}, "
            f"ce_weight={self.ce_weight}, focal_weight={self.focal_weight}, "
            f"include_background={self.include_background}, batch_dice={self.batch_dice}, "
            f"squared={self.squared}, smooth={self.smooth}, class_weights={self.class_weights}, "
            f"focal_alpha={self.focal_alpha}"
        )

    # ---------------------------------------------------------------- public entry points

    def forward(
        self,
        logits: torch.Tensor | Sequence[torch.Tensor],
        target: torch.Tensor,
        weight_map: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compound loss.

        Args:
            logits: Raw scores ``(B, num_classes, *spatial)`` (2 or 3 spatial dims), or a list/tuple of
                them at decreasing resolution for deep supervision (the first matches the target).
            target: Softmax mode: class indices ``(B, 1, *spatial)`` or ``(B, *spatial)``, integer dtype.
                Sigmoid mode: binary masks ``(B, num_classes, *spatial)``, float/uint8/bool.
            weight_map: Optional per-voxel weights for the CE/BCE and focal terms, ``(B, 1, *spatial)`` or
                ``(B, *spatial)`` (sigmoid mode also ``(B, num_classes, *spatial)``), e.g. the U-Net
                border weight map.

        Returns:
            Scalar float tensor.

        Raises:
            ShapeError: If logits, target or weight map shapes do not fit together.
        """
        terms = self.terms(logits, target, weight_map)
        lam = {"dice": self.dice_weight, "ce": self.ce_weight, "focal": self.focal_weight}
        return sum((lam[k] * v for k, v in terms.items()), start=torch.zeros((), device=_device(logits)))

    def terms(
        self,
        logits: torch.Tensor | Sequence[torch.Tensor],
        target: torch.Tensor,
        weight_map: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The unweighted terms (``"dice"``, ``"ce"``, ``"focal"``; only those with a weight > 0).

        Same arguments as :meth:`forward`; with deep supervision each term is the level-weighted mean.
        Useful for logging the parts of the loss separately.
        """
        levels = list(logits) if isinstance(logits, list | tuple) else [logits]
        if not levels:
            raise ValueError("SegmentationLoss: got an empty list of logits")
        where = f"SegmentationLoss({self.mode!r})"
        for lg in levels:
            _check_logits(lg, where)
        top = levels[0]
        full_target, full_w = self._prepare(top, target, weight_map, where)
        level_w = self._level_weights(len(levels))
        out: dict[str, torch.Tensor] = {}
        for i, (lw, lg) in enumerate(zip(level_w, levels, strict=True)):
            size = tuple(lg.shape[2:])
            same_kind = lg.ndim == top.ndim and lg.shape[0] == top.shape[0]
            if not same_kind or any(s > t for s, t in zip(size, top.shape[2:], strict=False)):
                raise ShapeError(
                    f"{where}: deep-supervision level {i} must have the batch size and dimensionality of "
                    "level 0 and a spatial size no larger than it (levels go from highest to lowest "
                    "resolution)",
                    expected=(top.shape[0], self.num_classes, *("<=" + str(s) for s in top.shape[2:])),
                    actual=tuple(lg.shape),
                )
            tgt = _resize(full_target, size, "nearest-exact")
            w = None if full_w is None else _resize(full_w, size, "area")
            for k, v in self._single(lg, tgt, w, where).items():
                out[k] = out[k] + lw * v if k in out else lw * v
        return out

    # ---------------------------------------------------------------- helpers

    def _prepare(
        self, logits: torch.Tensor, target: torch.Tensor, weight_map: torch.Tensor | None, where: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._check_channels(logits, where)
        if self.mode == Mode.SOFTMAX:
            tgt = _index_target(target, logits, where)
        else:
            tgt = _binary_target(target, logits, where)
        w = _weight_map(weight_map, logits, where, per_channel=self.mode == Mode.SIGMOID)
        if self.class_weights is not None:
            cw = torch.as_tensor(self.class_weights, dtype=_as_float(logits).dtype, device=logits.device)
            if self.mode == Mode.SOFTMAX:
                voxel_w = cw[tgt]  # (B, 1, *spatial): the weight of each voxel's true class
            else:  # per channel: outside + (inside - outside) * mask
                shape = (1, -1) + (1,) * (logits.ndim - 2)
                voxel_w = cw[:, 0].view(shape) + (cw[:, 1] - cw[:, 0]).view(shape) * tgt
            w = voxel_w if w is None else w * voxel_w
        return tgt, w

    def _check_channels(self, logits: torch.Tensor, where: str) -> None:
        if logits.shape[1] != self.num_classes:
            raise ShapeError(
                f"{where}: logits have {logits.shape[1]} channels but the loss was built for "
                f"num_classes={self.num_classes}",
                expected=(logits.shape[0], self.num_classes, *logits.shape[2:]),
                actual=tuple(logits.shape),
            )

    def _level_weights(self, n: int) -> list[float]:
        raw = self.ds_weights if self.ds_weights is not None else [2.0**-i for i in range(n)]
        if len(raw) != n:
            raise ValueError(f"SegmentationLoss: ds_weights has {len(raw)} entries but got {n} logit levels")
        total = sum(raw)
        return [v / total for v in raw]

    def _single(
        self, logits: torch.Tensor, target: torch.Tensor, w: torch.Tensor | None, where: str
    ) -> dict[str, torch.Tensor]:
        self._check_channels(logits, where)
        x = _as_float(logits)
        out: dict[str, torch.Tensor] = {}
        if self.mode == Mode.SOFTMAX:
            if self.dice_weight > 0:
                onehot = torch.zeros_like(x).scatter_(1, target, 1.0)
                out["dice"] = self._dice(torch.softmax(x, dim=1), onehot)
            if self.ce_weight > 0:
                out["ce"] = weighted_cross_entropy(x, target, w)
        else:
            if self.dice_weight > 0:
                out["dice"] = self._dice(torch.sigmoid(x), target)
            if self.ce_weight > 0:
                out["ce"] = weighted_bce(x, target, w)
        if self.focal_weight > 0:
            out["focal"] = focal_loss(
                x, target, mode=self.mode, gamma=self.focal_gamma, alpha=self.focal_alpha, weight_map=w
            )
        return out

    def _dice(self, probs: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        return soft_dice_loss(
            probs,
            onehot,
            include_background=self.include_background,
            batch=self.batch_dice,
            squared=self.squared,
            smooth=self.smooth,
        )


def _check_class_weights(
    weights: Sequence[float] | Sequence[Sequence[float]] | None, mode: Mode, num_classes: int
) -> list[float] | list[list[float]] | None:
    if weights is None:
        return None
    try:
        w = torch.as_tensor(weights, dtype=torch.float64)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"class_weights must be numbers, got {weights!r}") from exc
    shape = (num_classes,) if mode == Mode.SOFTMAX else (num_classes, 2)
    if tuple(w.shape) != shape or not bool(torch.isfinite(w).all() and (w >= 0).all()):
        what = "one per channel" if mode == Mode.SOFTMAX else "an (outside, inside) pair per channel"
        raise ConfigError(
            f"{mode.value} loss with {num_classes} channels needs class_weights of shape {shape} ({what}, "
            f"non-negative), got {weights!r}"
        )
    return w.tolist()


def _check_focal_alpha(alpha: float | Sequence[float] | None, num_classes: int) -> float | list[float] | None:
    if alpha is None:
        return None
    if isinstance(alpha, int | float):
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"loss.focal_alpha must lie in [0, 1], got {alpha}")
        return float(alpha)
    values = [float(a) for a in alpha]
    if len(values) != num_classes or any(a < 0 for a in values):
        raise ConfigError(
            f"loss.focal_alpha as a list needs one non-negative weight per output channel ({num_classes}, "
            f"background first in softmax mode), got {values}"
        )
    return values


def _device(logits: torch.Tensor | Sequence[torch.Tensor]) -> torch.device:
    return logits.device if isinstance(logits, torch.Tensor) else logits[0].device


def create_loss(
    loss_cfg: LossConfig,
    mode: LossMode,
    num_classes: int,
    *,
    name: str = "dice_ce",
    class_weights: Sequence[float] | Sequence[Sequence[float]] | None = None,
) -> nn.Module:
    """Build the training loss from the ``loss:`` config section (the one path from config to loss).

    Args:
        loss_cfg: The validated ``loss:`` section (:class:`medseg.config.LossConfig`).
        mode: ``"softmax"`` or ``"sigmoid"``, i.e. ``cfg.data.mode``.
        num_classes: Number of logit channels (softmax: ``len(labels) + 1``; sigmoid: ``len(structures)``).
        name: Entry of :data:`LOSSES`.
        class_weights: The plan's class weights (``plan.class_weights["weights"]``), or ``None``.

    Returns:
        An ``nn.Module`` called as ``loss(logits, target, weight_map=None)``.

    Raises:
        ConfigError: Unknown ``name`` (with a did-you-mean hint), unknown ``mode``, too few classes, or all
            term weights 0.

    Example:
        >>> from medseg.config import LossConfig
        >>> loss = create_loss(LossConfig(), "softmax", num_classes=3)
        >>> loss.include_background, loss.batch_dice, loss.squared
        (False, True, False)
    """
    return LOSSES.get(name).from_config(
        loss_cfg, mode=mode, num_classes=num_classes, class_weights=class_weights
    )
