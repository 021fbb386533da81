"""U-Net family for 2D and 3D segmentation, the ``MODELS`` registry, :func:`create_network` and
:func:`create_model`.

One code path serves ``spatial_dims`` 2 and 3. A network is built from its record, a
:class:`~medseg.models.spec.NetworkSpec` (:func:`create_network`: what a plan stores, strides
included); :func:`create_model` resolves a :class:`~medseg.config.ModelConfig` for a patch into
that record first. Registered models:

``unet`` (:class:`UNet`, the default)
    MONAI's :class:`~monai.networks.nets.DynUNet` (nnU-Net's architecture) with three changes, all
    in this module or :mod:`medseg.models._blocks`: an explicit loop in ``forward`` instead of
    DynUNet's recursive ``skip_layers`` (which stores every weight a second time in the state dict
    under ``skip_layers.next_layer.next_layer...``), deep-supervision heads returned at their own
    resolution (below), and optional resize+conv upsampling (:class:`~medseg.models._blocks.ResizeUpBlock`)
    in place of transposed convolutions. Every :class:`ModelConfig` field applies.
``monai_unet``
    MONAI's :class:`~monai.networks.nets.UNet` (strided-conv encoder, residual units when
    ``residual: true``), cheaper per voxel than ``unet``. Transposed-conv upsampling only and no
    deep supervision: ``upsample: resize`` or ``deep_supervision: true`` raise :class:`ConfigError`.
    Its state-dict keys are MONAI's recursive ``model.1.submodule.1...`` names.

``fcn``, ``dense_unet``, ``deeplab``, ``pspnet``
    The classic networks, in :mod:`medseg.models.classic` (their own settings go in
    ``model.options``).
``threshold``
    The classical baseline (fitted intensity windows, no trainable weights), in
    :mod:`medseg.models.threshold`; fitted by ``medseg baseline threshold``, not trained.

Strides: see :mod:`medseg.models.spec`. The input's spatial size must be divisible, per axis, by the
product of the strides (:func:`required_divisor`); otherwise the forward pass raises
:class:`~medseg.errors.ShapeError` naming the padded size.

Output convention (all models return logits, never probabilities):
    * ``model.eval()``, or any model built with ``deep_supervision: false``: one tensor of shape
      ``(B, out_channels, *spatial)``, the input's spatial size.
    * ``model.train()`` with ``deep_supervision: true`` (``unet`` only): a ``list`` of
      ``len(channels) - 1`` logit tensors, highest resolution first. Element 0 is the full-resolution
      output (the same head as in eval mode); element ``i`` comes from decoder level ``i`` and has
      shape ``(B, out_channels, *(s // f for s, f in zip(spatial, model.output_strides[i])))``, e.g.
      for 4 levels with strides 2: full, 1/2 and 1/4 size. The heads are *not* interpolated to full
      size (unlike MONAI's DynUNet, which stacks nearest-upsampled heads into one tensor): as in
      nnU-Net, the loss downsamples the target to each output's shape and weights the terms (nnU-Net
      uses weights proportional to 1/2**i). The lowest decoder level (just above the bottleneck) has
      no head, as in DynUNet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets import DynUNet
from monai.networks.nets import UNet as _MonaiUNetBase
from torch import nn

from medseg.config import ModelConfig
from medseg.errors import ConfigError
from medseg.models import classic as _classic  # noqa: F401  (registers fcn, dense_unet, deeplab, pspnet)
from medseg.models import threshold as _threshold  # noqa: F401  (registers threshold)
from medseg.models._blocks import ResizeUpBlock, norm_spec
from medseg.models._registry import MODELS, _cumulative, check_input, check_input_shape
from medseg.models.spec import (
    AxisStrides,
    NetworkSpec,
    check_patch_dims,
    default_strides,
    plan_strides,
    required_divisor,
    resolve_strides,
)

__all__ = [
    "MODELS",
    "MonaiUNet",
    "UNet",
    "check_input_shape",
    "create_model",
    "create_network",
    "default_strides",
    "plan_strides",
    "required_divisor",
    "resolve_strides",
]


def _axis_strides(strides: Sequence[int | Sequence[int]] | None, depth: int, nd: int) -> list[AxisStrides]:
    if strides is None:
        return default_strides(depth, nd)
    out = [(int(s),) * nd if isinstance(s, int) else tuple(int(v) for v in s) for s in strides]
    if len(out) != depth or any(len(s) != nd for s in out) or any(v < 1 for s in out for v in s):
        raise ConfigError(
            f"strides must give {depth} levels (one per channels entry) of positive ints or {nd}-tuples, "
            f"got {list(strides)}"
        )
    if out[0] != (1,) * nd:
        raise ConfigError(f"the first stride (input block) must be 1 on every axis, got {out[0]}")
    return out


# --------------------------------------------------------------------------------------------
# models


class UNet(DynUNet):
    """nnU-Net-style U-Net for 2D or 3D: MONAI's DynUNet with readable keys and native-size heads.

    Each level has two conv-norm-LeakyReLU layers (or a residual block); the first conv of levels
    after the first is strided. Decoder levels upsample by a transposed convolution (``"deconv"``,
    nnU-Net's choice) or by a 1x1 conv plus linear resize (``"resize"``), concatenate the skip, and
    apply two conv-norm-act layers (plain, as in DynUNet and nnU-Net's residual-encoder U-Net, even
    when ``residual`` is set). The head is a 1x1 conv producing logits. See the module docstring for
    the deep-supervision output convention.

    State-dict keys are DynUNet's (``input_block``, ``downsamples.i``, ``bottleneck``,
    ``upsamples.i`` from deepest to shallowest, ``output_block``, ``deep_supervision_heads.i``) without
    the duplicated ``skip_layers.*`` copies, so MONAI DynUNet checkpoints of the same architecture load
    with ``strict=True`` (their ``skip_layers.*`` keys are dropped on load).

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        out_channels: Logit channels (classes + background for softmax, structures for sigmoid).
        channels: Feature width per level; at least 3 levels (input, >= 1 downsampling, bottleneck).
        strides: One stride per level (an int, or one int per axis); the first must be 1. Defaults to
            1 then 2 for every further level.
        kernel_size: Convolution kernel size on every level.
        residual: Residual blocks in the encoder and bottleneck.
        norm: ``"instance"`` or ``"batch"`` (both with affine parameters).
        upsample: ``"deconv"`` (transposed conv) or ``"resize"`` (1x1 conv + linear interpolation).
        deep_supervision: In train mode, also return logits from the decoder levels 1 .. depth-2.

    Example:
        >>> net = UNet(2, 1, 3, channels=(4, 8, 16)).eval()
        >>> net(torch.zeros(1, 1, 16, 16)).shape
        torch.Size([1, 3, 16, 16])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (32, 64, 128, 256),
        strides: Sequence[int | Sequence[int]] | None = None,
        *,
        kernel_size: int = 3,
        residual: bool = False,
        norm: str = "instance",
        upsample: str = "deconv",
        deep_supervision: bool = False,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        depth = len(channels)
        if depth < 3:
            raise ConfigError(
                f"unet needs at least 3 levels in channels (input block, >= 1 downsampling, bottleneck), "
                f"got {list(channels)}"
            )
        if upsample not in ("deconv", "resize"):
            raise ConfigError(f"unknown upsample {upsample!r}; expected 'deconv' or 'resize'")
        level_strides = _axis_strides(strides, depth, spatial_dims)
        super().__init__(
            spatial_dims,
            in_channels,
            out_channels,
            kernel_size=[kernel_size] * depth,
            strides=level_strides,
            upsample_kernel_size=level_strides[1:],
            filters=list(channels),
            norm_name=norm_spec(norm),
            deep_supervision=deep_supervision,
            deep_supr_num=max(depth - 2, 1),
            res_block=residual,
        )
        # DynUNet registers every block a second time inside the recursive `skip_layers`; forward()
        # below loops over the named lists instead, so the copy only duplicated state-dict keys.
        del self.skip_layers
        self.heads = []
        if upsample == "resize":
            self.upsamples = self._resize_upsamples(level_strides, kernel_size)
            self.upsamples.apply(self.initialize_weights)
        self.upsample_mode = upsample
        self.level_strides: list[AxisStrides] = level_strides
        self.input_divisor: tuple[int, ...] = required_divisor(level_strides)
        n_out = depth - 1 if deep_supervision else 1
        self.output_strides: list[AxisStrides] = _cumulative(level_strides)[:n_out]
        self._register_load_state_dict_pre_hook(_drop_skip_layer_keys)

    def _resize_upsamples(self, level_strides: list[AxisStrides], kernel_size: int) -> nn.ModuleList:
        """Decoder blocks with resize+conv upsampling, in DynUNet's order (deepest first)."""
        filters = list(self.filters)
        ins, outs = filters[1:][::-1], filters[:-1][::-1]
        scales = level_strides[1:][::-1]
        return nn.ModuleList(
            ResizeUpBlock(
                self.spatial_dims,
                i,
                o,
                kernel_size=kernel_size,
                scale_factor=s,
                norm_name=self.norm_name,
                act_name=self.act_name,
            )
            for i, o, s in zip(ins, outs, scales, strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:  # type: ignore[override]
        """Logits ``(B, out_channels, *spatial)``, or the deep-supervision list in train mode.

        Raises:
            ShapeError: If ``x`` is not ``(B, in_channels, *spatial)`` with each spatial size a multiple
                of ``input_divisor``.
        """
        check_input(x, self, self.spatial_dims, self.in_channels)
        out = self.input_block(x)
        skips = [out]
        for block in self.downsamples:
            out = block(out)
            skips.append(out)
        out = self.bottleneck(out)
        decoded: list[torch.Tensor] = []
        for block, skip in zip(self.upsamples, reversed(skips), strict=True):
            out = block(out, skip)
            decoded.append(out)
        logits = self.output_block(out)
        if not (self.training and self.deep_supervision):
            return logits
        # decoded[-1] is level 0 (full size), decoded[-1 - k] is level k; head i sits on level i + 1
        aux = [head(decoded[-2 - i]) for i, head in enumerate(self.deep_supervision_heads)]
        return [logits, *aux]


def _drop_skip_layer_keys(
    state_dict: dict[str, Any], prefix: str, _meta: Any, _strict: bool, _missing: Any, _unexp: Any, _err: Any
) -> None:
    """Load-time hook: ignore DynUNet's duplicated ``skip_layers.*`` entries."""
    for key in [k for k in state_dict if k.startswith(prefix + "skip_layers.")]:
        del state_dict[key]


class MonaiUNet(_MonaiUNetBase):
    """MONAI's :class:`~monai.networks.nets.UNet` with medseg's input check and attributes.

    Adds ``input_divisor``/``output_strides`` and a clear :class:`ShapeError` for input sizes that are
    not multiples of the strides' product (MONAI fails later with a tensor-concatenation error).

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        out_channels: Logit channels.
        channels: Feature width per level (at least 2).
        strides: One stride per level as in :class:`UNet` (the first must be 1); MONAI's own
            ``strides`` attribute holds the remaining ``len(channels) - 1``.
        residual: Use MONAI residual units (2 per level) instead of single convolutions.
        norm: ``"instance"`` or ``"batch"``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (32, 64, 128, 256),
        strides: Sequence[int | Sequence[int]] | None = None,
        *,
        residual: bool = False,
        norm: str = "instance",
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(channels) < 2:
            raise ConfigError(f"monai_unet needs at least 2 levels in channels, got {list(channels)}")
        level_strides = _axis_strides(strides, len(channels), spatial_dims)
        super().__init__(
            spatial_dims,
            in_channels,
            out_channels,
            channels=list(channels),
            strides=level_strides[1:],
            num_res_units=2 if residual else 0,
            norm=norm_spec(norm),
        )
        self.level_strides: list[AxisStrides] = level_strides
        self.input_divisor: tuple[int, ...] = required_divisor(level_strides)
        self.output_strides: list[AxisStrides] = [(1,) * spatial_dims]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, out_channels, *spatial)``.

        Raises:
            ShapeError: If a spatial size is not a multiple of ``input_divisor``.
        """
        check_input(x, self, self.dimensions, self.in_channels)
        return super().forward(x)


# --------------------------------------------------------------------------------------------
# registry entries and the factory


@MODELS.register("unet")
def _build_unet(spec: NetworkSpec, *, in_channels: int, out_channels: int) -> nn.Module:
    _no_options(spec)
    return UNet(
        spec.spatial_dims,
        in_channels,
        out_channels,
        channels=spec.channels,
        strides=spec.strides,
        kernel_size=spec.kernel_size,
        residual=spec.residual,
        norm=spec.norm,
        upsample=spec.upsample,
        deep_supervision=spec.deep_supervision,
    )


@MODELS.register("monai_unet")
def _build_monai_unet(spec: NetworkSpec, *, in_channels: int, out_channels: int) -> nn.Module:
    _no_options(spec)
    unsupported = []
    if spec.upsample != "deconv":
        unsupported.append(
            f"upsample: {spec.upsample} (MONAI UNet upsamples with transposed convolutions only)"
        )
    if spec.deep_supervision:
        unsupported.append("deep_supervision: true (MONAI UNet has no auxiliary heads)")
    if spec.kernel_size != 3:
        unsupported.append(f"kernel_size {spec.kernel_size} (MONAI UNet uses 3)")
    if unsupported:
        raise ConfigError(
            "model.name 'monai_unet' does not support " + "; ".join(unsupported) + ". Use model.name: unet, "
            "which supports both, or remove the setting."
        )
    return MonaiUNet(
        spec.spatial_dims,
        in_channels,
        out_channels,
        channels=spec.channels,
        strides=spec.strides,
        residual=spec.residual,
        norm=spec.norm,
    )


def _no_options(spec: NetworkSpec) -> None:
    if spec.options:
        raise ConfigError(
            f"model.options {dict(spec.options)} are not used by {spec.name!r}, which takes none; remove "
            "them (they are options of fcn, dense_unet, deeplab and pspnet)"
        )


def create_network(spec: NetworkSpec, *, in_channels: int, out_channels: int) -> nn.Module:
    """Build the network a :class:`~medseg.models.spec.NetworkSpec` records (e.g. a plan's ``network``).

    The returned module has the attributes ``level_strides`` (per-level, per-axis strides),
    ``input_divisor`` (see :func:`check_input_shape`) and ``output_strides`` (downsampling factor per
    axis of each output; one entry unless deep supervision is on). Outputs are logits; see the module
    docstring for the exact convention.

    Raises:
        ConfigError: Unknown model name (with a did-you-mean hint), a setting the model does not
            support, or channel counts below 1.
    """
    builder = MODELS.get(spec.name)
    if in_channels < 1 or out_channels < 1:
        raise ConfigError(f"in_channels and out_channels must be >= 1, got {in_channels} and {out_channels}")
    return builder(spec, in_channels=in_channels, out_channels=out_channels)


def create_model(
    model_cfg: ModelConfig,
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    patch_size: Sequence[int] | None = None,
    spacing_mm: Sequence[float] | None = None,
) -> nn.Module:
    """Build the network ``model_cfg`` describes for a patch: :meth:`NetworkSpec.from_config`, then
    :func:`create_network`.

    The strides are chosen from ``patch_size``/``spacing_mm`` when ``model_cfg.strides`` is unset (see
    :func:`resolve_strides`). A trained model is rebuilt from its plan's recorded ``network``
    instead, never through this function, so that no one chooses its strides again.

    Args:
        model_cfg: The config's ``model`` section.
        spatial_dims: 2 or 3 (``data.spatial_dims``).
        in_channels: Image channels.
        out_channels: Logit channels: ``len(labels) + 1`` (softmax) or ``len(structures)`` (sigmoid).
        patch_size: Training patch size; checked for divisibility and used to plan strides.
        spacing_mm: Target voxel spacing; used with ``patch_size`` to plan anisotropic strides.

    Raises:
        ConfigError: Unknown model name (with a did-you-mean hint), a field the model does not
            support, inconsistent strides, or a patch size that is not a multiple of the strides'
            product (the message gives the padded size).

    Example:
        >>> cfg = ModelConfig(channels=[4, 8, 16])
        >>> net = create_model(cfg, spatial_dims=3, in_channels=1, out_channels=2)
        >>> net.input_divisor
        (4, 4, 4)
    """
    MODELS.get(model_cfg.name)  # an unknown name is reported before anything else
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if patch_size is not None:
        check_patch_dims(patch_size, spatial_dims)
    if spacing_mm is not None and len(spacing_mm) != spatial_dims:
        raise ConfigError(
            f"spacing_mm {list(spacing_mm)} has {len(spacing_mm)} values; expected {spatial_dims}"
        )
    spec = NetworkSpec.from_config(
        model_cfg, spatial_dims=spatial_dims, patch_size=patch_size, spacing_mm=spacing_mm
    )
    if patch_size is not None:
        spec.check_patch_size(patch_size)
    return create_network(spec, in_channels=in_channels, out_channels=out_channels)
