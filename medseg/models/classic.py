"""The classic segmentation networks users know by name, in 2D and 3D from the same code, built from a
plan's :class:`~medseg.models.spec.NetworkSpec` like the U-Nets and returning logits the same way.

``fcn``
    FCN-8s style (Long et al. 2015): an encoder of conv levels with max-pool downsampling, class score
    maps (1x1 convolutions) on the three deepest levels, fused coarse to fine by learned upsampling
    (transposed convolutions) and summation, then upsampled to the input's size.
``dense_unet``
    FC-DenseNet, "Tiramisu" (Jegou et al. 2017): dense blocks (each layer norm-act-conv, its output
    concatenated to its input), transitions down (norm-act-1x1 conv, max pool) and up (transposed
    convolution of the *new* features of the block below only, not of its input), skip connections
    from the down path. ``options.efficient: true`` recomputes each dense layer in the backward pass
    instead of keeping its concatenated input (torch.utils.checkpoint): less memory, more time.
``deeplab``
    DeepLabv3+ style (Chen et al. 2017/2018): an encoder whose downsampling stops at
    ``options.output_stride`` and continues with dilated (atrous) convolutions, atrous spatial pyramid
    pooling (MONAI's :class:`~monai.networks.blocks.SimpleASPP`, rates ``options.atrous_rates``) with
    an image-pooling branch, and a light decoder that joins level-1 features before the classifier.
``pspnet``
    PSPNet (Zhao et al. 2017): the same dilated encoder and a pyramid pooling module (average pooling
    to ``options.pool_sizes`` bins, 1x1 convolution, upsampling, concatenation) before the classifier.

Every network takes ``upsample: deconv`` (transposed convolutions) or ``upsample: resize`` (linear
interpolation, then a convolution where a learned upsampling stood), ``norm`` and, for the encoders of
``fcn``, ``deeplab`` and ``pspnet``, ``residual`` (two convolutions plus a shortcut per level). Deep
supervision is a U-Net feature: asking for it here is a :class:`~medseg.errors.ConfigError`.

Written here because MONAI has the blocks (convolutions, residual units, ASPP, upsampling) but none of
these networks for 2D and 3D, and torchvision's 2D-only versions are not a dependency.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, SimpleASPP
from monai.networks.layers.factories import Pool
from monai.networks.layers.utils import get_norm_layer
from torch import nn
from torch.utils.checkpoint import checkpoint

from medseg.errors import ConfigError
from medseg.models._blocks import norm_spec
from medseg.models._registry import MODELS, _cumulative, check_input
from medseg.models.spec import AxisStrides, NetworkSpec, required_divisor

__all__ = ["FCN", "DeepLab", "DenseUNet", "PSPNet"]

_ACT = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})

OPTIONS: dict[str, dict[str, Any]] = {
    "fcn": {},
    "dense_unet": {"growth_rate": 8, "layers": 3, "efficient": False},
    "deeplab": {"output_stride": 8, "atrous_rates": [1, 2, 4, 6]},
    "pspnet": {"output_stride": 8, "pool_sizes": [1, 2, 3, 6]},
}
"""Each network's ``model.options`` and their defaults."""


def _options(spec: NetworkSpec) -> dict[str, Any]:
    """The spec's options over the network's defaults; unknown ones and U-Net-only settings refused."""
    known = OPTIONS[spec.name]
    unknown = sorted(set(spec.options) - set(known))
    if unknown:
        raise ConfigError(
            f"model.options {unknown} are not options of {spec.name!r}; it takes {dict(known) or 'none'}"
        )
    if spec.deep_supervision:
        raise ConfigError(f"model.name {spec.name!r} has no deep supervision (a U-Net feature); remove it")
    merged = {**known, **spec.options}
    for key, value in merged.items():
        default = known[key]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:  # a sequence of integers
            ok = isinstance(value, list | tuple) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value
            )
        if not ok:
            raise ConfigError(
                f"model.options.{key} of {spec.name!r} must be {_kind(default)} like {default!r}, "
                f"got {value!r}"
            )
    return merged


def _kind(default: object) -> str:
    if isinstance(default, bool):
        return "true or false"
    return "an integer" if isinstance(default, int) else "a list of integers"


def _norm(spec: NetworkSpec) -> tuple[str, dict[str, Any]]:
    return norm_spec(spec.norm)


def _conv(
    spec: NetworkSpec,
    cin: int,
    cout: int,
    *,
    stride: Sequence[int] | int = 1,
    dilation: Sequence[int] | int = 1,
    kernel: int = 3,
) -> nn.Module:
    """Convolution, normalisation, activation (MONAI's block; 'same' padding for any dilation)."""
    return Convolution(
        spec.spatial_dims, cin, cout, strides=stride, kernel_size=kernel, dilation=dilation,
        norm=_norm(spec), act=_ACT, bias=False,
    )  # fmt: skip


def _level(
    spec: NetworkSpec, cin: int, cout: int, *, stride: Sequence[int] = (1,), dilation: Sequence[int] | int = 1
) -> nn.Module:
    """One encoder level: two 3x3 convolutions (the first strided) or a residual unit of two."""
    if spec.residual:
        return _Residual(spec, cin, cout, stride=stride, dilation=dilation)
    return nn.Sequential(
        _conv(spec, cin, cout, stride=stride, dilation=dilation),
        _conv(spec, cout, cout, dilation=dilation),
    )


class _Residual(nn.Module):
    """Two convolutions plus a shortcut (identity, or a strided 1x1 projection when the shape changes).

    Hand-written because MONAI's ``ResidualUnit`` pads its projection shortcut for the dilation it
    does not apply to it, so a dilated unit that changes the width returns a mis-sized shortcut."""

    def __init__(
        self, spec: NetworkSpec, cin: int, cout: int, *, stride: Sequence[int], dilation: Sequence[int] | int
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(spec, cin, cout, stride=stride, dilation=dilation),
            _conv(spec, cout, cout, dilation=dilation),
        )
        strided = any(int(v) != 1 for v in (stride if isinstance(stride, Sequence) else (stride,)))
        if cin == cout and not strided:
            self.shortcut: nn.Module = nn.Identity()
        else:
            conv = nn.Conv3d if spec.spatial_dims == 3 else nn.Conv2d
            st = tuple(stride) if len(stride) == spec.spatial_dims else int(stride[0])
            self.shortcut = conv(cin, cout, kernel_size=1, stride=st)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


def _head(spec: NetworkSpec, cin: int, cout: int) -> nn.Module:
    conv = nn.Conv3d if spec.spatial_dims == 3 else nn.Conv2d
    return conv(cin, cout, kernel_size=1)


class _Up(nn.Module):
    """Upsampling to a given size: a transposed convolution with kernel = stride = ``scale``
    (``deconv``), or linear interpolation followed by a 1x1 convolution (``resize``). The output is
    cropped or padded to the target size, so odd sizes are safe."""

    def __init__(self, spec: NetworkSpec, cin: int, cout: int, scale: Sequence[int]) -> None:
        super().__init__()
        nd, self.mode = spec.spatial_dims, spec.upsample
        if self.mode not in ("deconv", "resize"):
            raise ConfigError(f"unknown upsample {spec.upsample!r}; expected 'deconv' or 'resize'")
        if self.mode == "deconv":
            tconv = nn.ConvTranspose3d if nd == 3 else nn.ConvTranspose2d
            scale = tuple(int(s) for s in scale)
            self.op: nn.Module = tconv(cin, cout, kernel_size=scale, stride=scale)
        else:
            self.op = _head(spec, cin, cout)
        self.interp = "trilinear" if nd == 3 else "bilinear"

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if self.mode == "deconv":
            return _fit(self.op(x), size)
        x = F.interpolate(x, size=tuple(size), mode=self.interp, align_corners=False)
        return self.op(x)


def _final(spec: NetworkSpec, channels: int, scale: Sequence[int]) -> _Up | None:
    """The last upsampling of the class scores to the input's size; ``None`` when they are full size."""
    return None if all(int(v) == 1 for v in scale) else _Up(spec, channels, channels, scale)


def _fit(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop or zero-pad the trailing spatial axes of ``x`` to ``size``."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    x = x[(slice(None), slice(None), *(slice(0, s) for s in size))]
    pad = []
    for have, want in zip(reversed(x.shape[2:]), reversed(tuple(size)), strict=True):
        pad += [0, max(0, want - have)]
    return F.pad(x, pad)


class _SegmentationNet(nn.Module):
    """What every registered network exposes: ``level_strides``, ``input_divisor``,
    ``output_strides`` and a shape check of its input."""

    def _setup(self, spec: NetworkSpec, in_channels: int, strides: Sequence[AxisStrides]) -> None:
        self.spatial_dims, self.in_channels = spec.spatial_dims, in_channels
        self.level_strides = [tuple(s) for s in strides]
        self.input_divisor = required_divisor(self.level_strides)
        self.output_strides = [(1,) * spec.spatial_dims]

    def _check(self, x: torch.Tensor) -> None:
        check_input(x, self, self.spatial_dims, self.in_channels)


class FCN(_SegmentationNet):
    """FCN-8s style: score maps of the three deepest levels, fused coarse to fine (see module docstring).

    Needs at least three levels (``len(channels) >= 3``)."""

    def __init__(self, spec: NetworkSpec, in_channels: int, out_channels: int) -> None:
        super().__init__()
        _options(spec)
        if len(spec.channels) < 3:
            raise ConfigError(f"fcn needs at least 3 levels in model.channels, got {list(spec.channels)}")
        self._setup(spec, in_channels, spec.strides)
        nd, ch = spec.spatial_dims, spec.channels
        pool = Pool["MAX", nd]
        self.pools = nn.ModuleList(
            nn.Identity() if i == 0 else pool(kernel_size=s, stride=s) for i, s in enumerate(spec.strides)
        )
        self.levels = nn.ModuleList(
            _level(spec, in_channels if i == 0 else ch[i - 1], ch[i]) for i in range(len(ch))
        )
        self.scores = nn.ModuleList(_head(spec, ch[i], out_channels) for i in (-1, -2, -3))
        self.ups = nn.ModuleList(_Up(spec, out_channels, out_channels, spec.strides[i]) for i in (-1, -2))
        self.final = _final(spec, out_channels, _cumulative(spec.strides)[-3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        size = x.shape[2:]
        feats = []
        for pool, level in zip(self.pools, self.levels, strict=True):
            x = level(pool(x))
            feats.append(x)
        score = self.scores[0](feats[-1])
        score = self.ups[0](score, feats[-2].shape[2:]) + self.scores[1](feats[-2])
        score = self.ups[1](score, feats[-3].shape[2:]) + self.scores[2](feats[-3])
        return score if self.final is None else self.final(score, size)


class _DenseBlock(nn.Module):
    """``n`` layers (norm, activation, 3x3 convolution to ``growth`` channels), each fed with the
    concatenation of the block's input and every earlier layer's output. Returns the new features and
    the concatenation of input and new features.

    Hand-written instead of MONAI's ``DenseBlock`` because the up path needs the new features apart
    from the input, and ``efficient`` recomputes each layer in the backward pass (checkpointing) so
    the concatenated inputs are not all kept for backward."""

    def __init__(self, spec: NetworkSpec, cin: int, growth: int, n: int, *, efficient: bool) -> None:
        super().__init__()
        nd = spec.spatial_dims
        conv = nn.Conv3d if nd == 3 else nn.Conv2d
        self.layers = nn.ModuleList(
            nn.Sequential(
                get_norm_layer(_norm(spec), nd, cin + i * growth),
                nn.LeakyReLU(0.01),
                conv(cin + i * growth, growth, kernel_size=3, padding=1, bias=False),
            )
            for i in range(n)
        )
        self.efficient = efficient
        self.out_channels = cin + n * growth

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = [x]
        for layer in self.layers:
            inp = torch.cat(feats, 1)
            if self.efficient and self.training and inp.requires_grad:
                y = checkpoint(layer, inp, use_reentrant=False)
            else:
                y = layer(inp)
            feats.append(y)
        return torch.cat(feats[1:], 1), torch.cat(feats, 1)


class DenseUNet(_SegmentationNet):
    """FC-DenseNet ("Tiramisu"); ``channels[0]`` is the width of the first convolution and the number
    of levels is ``len(channels)`` (see module docstring for the options)."""

    def __init__(self, spec: NetworkSpec, in_channels: int, out_channels: int) -> None:
        super().__init__()
        opts = _options(spec)
        growth, n, efficient = int(opts["growth_rate"]), int(opts["layers"]), bool(opts["efficient"])
        if growth < 1 or n < 1:
            raise ConfigError(f"dense_unet: growth_rate and layers must be >= 1, got {growth} and {n}")
        self._setup(spec, in_channels, spec.strides)
        nd, depth = spec.spatial_dims, len(spec.channels)
        conv = nn.Conv3d if nd == 3 else nn.Conv2d
        pool = Pool["MAX", nd]
        self.first = conv(in_channels, spec.channels[0], kernel_size=3, padding=1)
        c = spec.channels[0]
        self.down, self.trans_down, skips = nn.ModuleList(), nn.ModuleList(), []
        for i in range(depth - 1):
            block = _DenseBlock(spec, c, growth, n, efficient=efficient)
            self.down.append(block)
            c = block.out_channels
            skips.append(c)
            stride = spec.strides[i + 1]
            self.trans_down.append(
                nn.Sequential(
                    get_norm_layer(_norm(spec), nd, c),
                    nn.LeakyReLU(0.01),
                    conv(c, c, kernel_size=1, bias=False),
                    pool(kernel_size=stride, stride=stride),
                )
            )
        self.bottleneck = _DenseBlock(spec, c, growth, n, efficient=efficient)
        new = n * growth  # only the new features of a block go up
        self.trans_up, self.up = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(depth - 1)):
            self.trans_up.append(_Up(spec, new, new, spec.strides[i + 1]))
            block = _DenseBlock(spec, new + skips[i], growth, n, efficient=efficient)
            self.up.append(block)
        self.head = _head(spec, self.up[-1].out_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        x = self.first(x)
        skips = []
        for block, trans in zip(self.down, self.trans_down, strict=True):
            _, x = block(x)
            skips.append(x)
            x = trans(x)
        new, _ = self.bottleneck(x)
        everything = new
        for up, block, skip in zip(self.trans_up, self.up, reversed(skips), strict=True):
            new, everything = block(torch.cat([up(new, skip.shape[2:]), skip], 1))
        return self.head(everything)


def _dilated_strides(
    strides: Sequence[AxisStrides], output_stride: int
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Per level: the stride actually used (downsampling stops once an axis reaches ``output_stride``)
    and the dilation that replaces the rest (so the receptive field keeps growing)."""
    used, dilations = [], []
    acc = [1] * len(strides[0])
    dil = [1] * len(strides[0])
    for s in strides:
        level_stride, level_dil = [], []
        for ax, v in enumerate(s):
            if acc[ax] * v <= output_stride:
                acc[ax] *= v
                level_stride.append(v)
            else:
                dil[ax] *= v
                level_stride.append(1)
            level_dil.append(dil[ax])
        used.append(tuple(level_stride))
        dilations.append(tuple(level_dil))
    return used, dilations


class _DilatedEncoder(nn.Module):
    """Conv levels whose downsampling stops at ``output_stride`` and continues as dilation."""

    def __init__(self, spec: NetworkSpec, in_channels: int, output_stride: int) -> None:
        super().__init__()
        if output_stride < 1 or output_stride & (output_stride - 1):
            raise ConfigError(f"model.options.output_stride must be a power of 2, got {output_stride}")
        self.strides, dilations = _dilated_strides(spec.strides, output_stride)
        ch = spec.channels
        self.levels = nn.ModuleList(
            _level(spec, in_channels if i == 0 else ch[i - 1], ch[i], stride=s, dilation=d)
            for i, (s, d) in enumerate(zip(self.strides, dilations, strict=True))
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for level in self.levels:
            x = level(x)
            feats.append(x)
        return feats


class DeepLab(_SegmentationNet):
    """DeepLabv3+ style: dilated encoder, ASPP with image pooling, light decoder (see module docstring)."""

    def __init__(self, spec: NetworkSpec, in_channels: int, out_channels: int) -> None:
        super().__init__()
        opts = _options(spec)
        rates = tuple(int(r) for r in opts["atrous_rates"])
        if len(spec.channels) < 3:
            raise ConfigError(f"deeplab needs at least 3 levels in model.channels, got {list(spec.channels)}")
        self.encoder = _DilatedEncoder(spec, in_channels, int(opts["output_stride"]))
        self._setup(spec, in_channels, self.encoder.strides)
        nd, ch = spec.spatial_dims, spec.channels
        branch = max(ch[-1] // len(rates), 4)
        self.aspp = SimpleASPP(
            nd, ch[-1], branch, kernel_sizes=[1] + [3] * (len(rates) - 1), dilations=rates,
            norm_type=_norm(spec), acti_type=_ACT,
        )  # fmt: skip
        self.image_pool = nn.Sequential(Pool["ADAPTIVEAVG", nd](1), _head(spec, ch[-1], branch))
        width = ch[1]
        self.project = _conv(spec, branch * (len(rates) + 1), width, kernel=1)
        self.low = _conv(spec, ch[1], width // 2 or 1, kernel=1)
        self.up = _Up(spec, width, width, _ratio(self.encoder.strides, -1, 1))
        self.decoder = nn.Sequential(_conv(spec, width + (width // 2 or 1), width), _conv(spec, width, width))
        self.head = _head(spec, width, out_channels)
        self.final = _final(spec, out_channels, _cumulative(self.encoder.strides)[1])
        self.interp = "trilinear" if nd == 3 else "bilinear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        size = x.shape[2:]
        feats = self.encoder(x)
        deep = feats[-1]
        pooled = F.interpolate(
            self.image_pool(deep), size=deep.shape[2:], mode=self.interp, align_corners=False
        )
        y = self.project(torch.cat([self.aspp(deep), pooled], 1))
        low = feats[1]
        y = self.decoder(torch.cat([self.up(y, low.shape[2:]), self.low(low)], 1))
        y = self.head(y)
        return y if self.final is None else self.final(y, size)


class PSPNet(_SegmentationNet):
    """PSPNet: dilated encoder and pyramid pooling module (see module docstring)."""

    def __init__(self, spec: NetworkSpec, in_channels: int, out_channels: int) -> None:
        super().__init__()
        opts = _options(spec)
        bins = tuple(int(b) for b in opts["pool_sizes"])
        if not bins or min(bins) < 1:
            raise ConfigError(f"model.options.pool_sizes must be positive integers, got {list(bins)}")
        self.encoder = _DilatedEncoder(spec, in_channels, int(opts["output_stride"]))
        self._setup(spec, in_channels, self.encoder.strides)
        nd, c = spec.spatial_dims, spec.channels[-1]
        branch = max(c // len(bins), 4)
        self.pools = nn.ModuleList(
            # no normalisation on a branch pooled to 1 bin: instance norm is undefined on one voxel
            nn.Sequential(Pool["ADAPTIVEAVG", nd](b), _head(spec, c, branch), nn.LeakyReLU(0.01))
            for b in bins
        )
        self.fuse = _conv(spec, c + branch * len(bins), spec.channels[-2])
        self.head = _head(spec, spec.channels[-2], out_channels)
        self.final = _final(spec, out_channels, _cumulative(self.encoder.strides)[-1])
        self.interp = "trilinear" if nd == 3 else "bilinear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        size = x.shape[2:]
        deep = self.encoder(x)[-1]
        grid = deep.shape[2:]
        pyramid = [
            F.interpolate(p(deep), size=grid, mode=self.interp, align_corners=False) for p in self.pools
        ]
        y = self.head(self.fuse(torch.cat([deep, *pyramid], 1)))
        return y if self.final is None else self.final(y, size)


def _ratio(strides: Sequence[AxisStrides], deep: int, shallow: int) -> tuple[int, ...]:
    """Per-axis size ratio between the outputs of two levels."""
    cum = _cumulative(strides)
    return tuple(a // b for a, b in zip(cum[deep], cum[shallow], strict=True))


def _builder(cls: type[nn.Module]) -> Any:
    def build(spec: NetworkSpec, *, in_channels: int, out_channels: int) -> nn.Module:
        return cls(spec, in_channels, out_channels)

    build.__doc__ = f"Build :class:`{cls.__name__}` from a network record."
    return build


for _name, _cls in (("fcn", FCN), ("dense_unet", DenseUNet), ("deeplab", DeepLab), ("pspnet", PSPNet)):
    MODELS.register(_name)(_builder(_cls))
