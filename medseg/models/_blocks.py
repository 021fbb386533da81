"""Small building blocks shared by the networks (private).

Only what MONAI does not provide lives here: a decoder block that upsamples by interpolation
(resize + conv) instead of a transposed convolution, with the same ``forward(inp, skip)`` interface as
MONAI's :class:`~monai.networks.blocks.dynunet_block.UnetUpBlock`, so that it can replace it inside
:class:`~monai.networks.nets.DynUNet`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.blocks.dynunet_block import UnetBasicBlock
from monai.networks.blocks.upsample import UpSample
from torch import nn

from medseg.errors import ConfigError

NORM_LAYERS: dict[str, tuple[str, dict[str, bool]]] = {
    "instance": ("INSTANCE", {"affine": True}),
    "batch": ("BATCH", {"affine": True}),
}
"""Config ``model.norm`` value -> MONAI ``norm_name`` (name, kwargs) for ``get_norm_layer``."""


def norm_spec(norm: str) -> tuple[str, dict[str, Any]]:
    """MONAI's ``(name, kwargs)`` for a ``model.norm`` value.

    Raises:
        ConfigError: An unknown value, naming the known ones.
    """
    if norm not in NORM_LAYERS:
        raise ConfigError(f"unknown norm {norm!r}; expected one of {sorted(NORM_LAYERS)}")
    name, kwargs = NORM_LAYERS[norm]
    return name, dict(kwargs)


class ResizeUpBlock(nn.Module):
    """Decoder block: 1x1 conv, (bi/tri)linear resize, concatenate the skip, two conv-norm-act layers.

    MONAI's DynUNet only upsamples with transposed convolutions, which can leave checkerboard
    artefacts (Odena et al., "Deconvolution and Checkerboard Artifacts", Distill 2016). This block is a
    drop-in replacement for :class:`~monai.networks.blocks.dynunet_block.UnetUpBlock` built from MONAI
    parts: :class:`~monai.networks.blocks.upsample.UpSample` in ``"nontrainable"`` mode (1x1
    projection to ``out_channels``, then linear interpolation) followed by the same
    :class:`~monai.networks.blocks.dynunet_block.UnetBasicBlock` that ``UnetUpBlock`` uses.

    The 1x1 projection runs *before* the interpolation: both are linear and linear interpolation
    weights sum to one, so this equals resize-then-project exactly at 1/2**D of the cost.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Channels of the deeper (coarser) feature map.
        out_channels: Channels of the skip connection and of the block's output.
        kernel_size: Kernel size of the two convolutions after the concatenation.
        scale_factor: Upsampling factor per axis (the stride of the matching encoder level).
        norm_name: MONAI normalisation spec, e.g. ``("INSTANCE", {"affine": True})``.
        act_name: MONAI activation spec.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: Sequence[int] | int,
        scale_factor: Sequence[int] | int,
        norm_name: tuple | str,
        act_name: tuple | str = ("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
    ) -> None:
        super().__init__()
        self.upsample = UpSample(
            spatial_dims,
            in_channels,
            out_channels,
            scale_factor=scale_factor,
            mode="nontrainable",
            pre_conv="default",
            interp_mode="linear",
            align_corners=False,
            bias=False,
        )
        self.conv_block = UnetBasicBlock(
            spatial_dims,
            2 * out_channels,
            out_channels,
            kernel_size=kernel_size,
            stride=1,
            norm_name=norm_name,
            act_name=act_name,
        )

    def forward(self, inp: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Upsample ``inp`` to the size of ``skip``, concatenate along channels, convolve."""
        out = self.upsample(inp)
        return self.conv_block(torch.cat((out, skip), dim=1))
