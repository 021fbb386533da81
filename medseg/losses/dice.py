"""Soft Dice loss (Milletari et al., V-Net, 3DV 2016) for softmax and sigmoid outputs.

For every channel ``c`` (and every sample ``b`` unless ``batch=True``) the soft Dice coefficient is::

    D_c = (2 * sum(p * g) + smooth) / (sum(p) + sum(g) + smooth)          # plain denominator
    D_c = (2 * sum(p * g) + smooth) / (sum(p**2) + sum(g**2) + smooth)    # squared=True

and the loss is ``mean(1 - D_c)`` over the channels (and samples). The sums run over the spatial
axes, plus the batch axis when ``batch=True`` (nnU-Net's ``batch_dice``).

The arithmetic is :class:`monai.losses.DiceLoss` (``smooth_nr = smooth_dr = smooth``,
``squared_pred=squared``, ``batch=batch``, ``reduction="mean"``); this module adds the medseg
contract around it: probabilities and a one-hot target in, shape checks with expected-versus-got
messages, float32 arithmetic under AMP, and an error (rather than MONAI's warning-and-ignore) when
``include_background=False`` would leave no channel.
"""

from __future__ import annotations

import torch
from monai.losses import DiceLoss as _MonaiDiceLoss
from torch import nn

from medseg.errors import ShapeError

__all__ = ["SoftDiceLoss", "soft_dice_loss"]


def _check_probs_target(probs: torch.Tensor, target: torch.Tensor, where: str) -> None:
    if probs.ndim not in (4, 5):
        raise ShapeError(
            f"{where}: probs must be (B, C, X, Y) or (B, C, X, Y, Z)",
            expected=("B", "C", "X", "Y", "[Z]"),
            actual=tuple(probs.shape),
        )
    if tuple(target.shape) != tuple(probs.shape):
        hint = ""
        if target.ndim == probs.ndim and target.shape[1] == 1 and probs.shape[1] > 1:
            hint = " (this looks like class indices; one-hot encode them first)"
        raise ShapeError(
            f"{where}: target_onehot must have the same shape as probs{hint}",
            expected=tuple(probs.shape),
            actual=tuple(target.shape),
        )


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """float32 unless already float64 (the loss is summed over many voxels: no fp16/bf16 sums)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def soft_dice_loss(
    probs: torch.Tensor,
    target_onehot: torch.Tensor,
    *,
    include_background: bool = True,
    batch: bool = True,
    squared: bool = False,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """Soft Dice loss between probabilities and a one-hot (or multi-label binary) target.

    Args:
        probs: Probabilities of shape ``(B, C, X, Y)`` or ``(B, C, X, Y, Z)``: a softmax over the
            channels (exclusive classes, channel 0 = background) or a sigmoid per channel
            (overlapping structures). Any float dtype; computed in float32.
        target_onehot: Same shape as ``probs``; one-hot class indicators or binary masks, values in
            ``[0, 1]``, any numeric dtype.
        include_background: Keep channel 0. Set ``False`` for softmax outputs whose channel 0 is the
            background (it dominates the voxel count and would swamp small organs); leave ``True``
            for sigmoid outputs, where every channel is a structure.
        batch: Sum over the batch before dividing (one Dice per channel, nnU-Net's ``batch_dice``)
            instead of one Dice per (sample, channel). Stable when a small structure is absent from
            some patches.
        squared: Use ``sum(p**2) + sum(g**2)`` in the denominator (Milletari et al.) instead of
            ``sum(p) + sum(g)``.
        smooth: Added to numerator and denominator. A channel that is empty in both the target and the
            prediction gets Dice 1 (loss 0); an empty target with a non-empty prediction gets loss ~1.

    Returns:
        Scalar float tensor: ``mean(1 - D)`` over channels (and samples when ``batch=False``).

    Raises:
        ShapeError: If ``probs`` is not 4D/5D or the shapes differ.
        ValueError: If ``include_background=False`` and there is only one channel.

    Example:
        >>> import torch
        >>> p = torch.tensor([0.9, 0.5, 0.3, 0.1]).reshape(1, 1, 2, 2)
        >>> g = torch.tensor([1.0, 1.0, 0.0, 0.0]).reshape(1, 1, 2, 2)
        >>> round(float(soft_dice_loss(p, g, smooth=0.0)), 4)  # 1 - 2 * 1.4 / (1.8 + 2)
        0.2632
    """
    _check_probs_target(probs, target_onehot, "soft_dice_loss")
    if not include_background:
        if probs.shape[1] < 2:
            raise ValueError(
                "soft_dice_loss: include_background=False drops channel 0, but probs has only "
                f"{probs.shape[1]} channel (shape {tuple(probs.shape)}); use include_background=True "
                "for sigmoid outputs, where every channel is a structure"
            )
        probs = probs[:, 1:]
        target_onehot = target_onehot[:, 1:]
    p = _as_float(probs)
    g = target_onehot.to(p.dtype)
    dice = _MonaiDiceLoss(
        include_background=True,
        squared_pred=squared,
        smooth_nr=smooth,
        smooth_dr=smooth,
        batch=batch,
        reduction="mean",
    )
    return dice(p, g)


class SoftDiceLoss(nn.Module):
    """Module form of :func:`soft_dice_loss`; see there for the formula, shapes and options.

    Args:
        include_background: Keep channel 0 (``False`` for softmax outputs with a background channel).
        batch: One Dice per channel over the whole batch (nnU-Net ``batch_dice``) instead of per sample.
        squared: Squared denominator ``sum(p**2) + sum(g**2)``.
        smooth: Added to numerator and denominator.

    Example:
        >>> import torch
        >>> loss = SoftDiceLoss(include_background=True)
        >>> g = torch.zeros(2, 3, 4, 4).scatter_(1, torch.randint(0, 3, (2, 1, 4, 4)), 1.0)
        >>> float(loss(g, g)) < 1e-6
        True
    """

    def __init__(
        self,
        *,
        include_background: bool = True,
        batch: bool = True,
        squared: bool = False,
        smooth: float = 1e-5,
    ) -> None:
        super().__init__()
        self.include_background = include_background
        self.batch = batch
        self.squared = squared
        self.smooth = smooth

    def forward(self, probs: torch.Tensor, target_onehot: torch.Tensor) -> torch.Tensor:
        """Args: ``probs`` and ``target_onehot`` of shape ``(B, C, *spatial)``. Returns a scalar."""
        return soft_dice_loss(
            probs,
            target_onehot,
            include_background=self.include_background,
            batch=self.batch,
            squared=self.squared,
            smooth=self.smooth,
        )

    def extra_repr(self) -> str:
        return (
            f"include_background={self.include_background}, batch={self.batch}, "
            f"squared={self.squared}, smooth={self.smooth}"
        )
