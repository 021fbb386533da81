"""The model registry and the input check every registered network shares (private; the public names
are re-exported by :mod:`medseg.models.unet` and :mod:`medseg.models`).

Apart from the networks so that each family of networks (:mod:`medseg.models.unet`,
:mod:`medseg.models.classic`) can register itself without importing another."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from medseg.errors import ShapeError
from medseg.models.spec import AxisStrides, NetworkSpec, _padded
from medseg.registry import Registry

__all__ = ["MODELS", "ModelBuilder", "check_input", "check_input_shape"]


class ModelBuilder(Protocol):
    """Signature of the functions registered in :data:`MODELS`: a network from its resolved record."""

    def __call__(self, spec: NetworkSpec, *, in_channels: int, out_channels: int) -> nn.Module: ...


MODELS: Registry[ModelBuilder] = Registry("model")
"""Model name (``model.name``) -> builder; use :func:`create_network` / :func:`create_model`."""


def check_input_shape(spatial_shape: Sequence[int], divisor: Sequence[int] | nn.Module) -> None:
    """Raise if ``spatial_shape`` is not a multiple of ``divisor`` on every axis.

    Args:
        spatial_shape: Input size without batch and channel axes, e.g. ``x.shape[2:]``.
        divisor: Per-axis divisor (:func:`required_divisor`), or a model from :func:`create_model`
            (its ``input_divisor`` attribute is used).

    Raises:
        ShapeError: Naming the divisor and the padded size the input should have.
    """
    div = tuple(getattr(divisor, "input_divisor", divisor))
    shape = tuple(int(s) for s in spatial_shape)
    if len(shape) != len(div):
        raise ShapeError(
            f"input has {len(shape)} spatial axes but the model is {len(div)}D; pass a tensor of shape "
            f"(B, C, {', '.join('...' for _ in div)})",
            expected=div,
            actual=shape,
        )
    if any(s % k for s, k in zip(shape, div, strict=True)):
        raise ShapeError(
            f"input spatial size must be divisible by {div} per axis (the product of the model's strides); "
            f"pad it to the padded size (e.g. monai.transforms.DivisiblePad(k={div})) or choose a patch size "
            f"that is a multiple of {div}",
            expected=_padded(shape, div),
            actual=shape,
        )


def check_input(x: torch.Tensor, net: nn.Module, spatial_dims: int, in_channels: int) -> None:
    """Raise :class:`ShapeError` unless ``x`` is ``(B, in_channels, *spatial)`` with ``spatial_dims``
    axes, each a multiple of ``net.input_divisor`` (the check at the top of every network's forward)."""
    if x.ndim != spatial_dims + 2 or x.shape[1] != in_channels:
        raise ShapeError(
            f"{type(net).__name__} ({spatial_dims}D) expects input (B, in_channels, *spatial) (-1: any size)",
            expected=(-1, in_channels) + (-1,) * spatial_dims,
            actual=tuple(x.shape),
        )
    check_input_shape(x.shape[2:], net)


def _cumulative(strides: Sequence[AxisStrides]) -> list[AxisStrides]:
    """Total downsampling factor per axis at the output of each level."""
    out: list[AxisStrides] = []
    acc = (1,) * len(strides[0])
    for s in strides:
        acc = tuple(a * b for a, b in zip(acc, s, strict=True))
        out.append(acc)
    return out
