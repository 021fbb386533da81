"""``threshold``: the classical baseline as a network, so that the prediction path (sliding windows,
geometry restore, post-processing, DICOM SEG, reports) runs it exactly as it runs a trained model.

It has no trainable weights. Every structure ``k`` has a window ``[lo_k, hi_k]`` on one input
channel, in the plan's *normalised* intensities (what the training cache holds and what the engine
feeds the network, so fitting and prediction see the same numbers), fitted on the training cases by
:mod:`medseg.training.threshold` (``medseg baseline threshold``) and recorded in the network's
options in ``plan.json``. The logit of ``k`` at an intensity ``x`` is::

    logit_k(x) = min(x - lo_k, hi_k - x, s_k) / s_k

(a missing end of an open window is +inf), positive exactly inside the window: a triangle peaking at 1
in its centre for a closed window (``s_k`` = half its width) and a ramp of width ``s_k`` up to a
plateau of 1 for an open one. Softmax models add a background logit of 0, so the argmax is
background outside every window and, where windows overlap, the structure whose window fits the
intensity best (closest to its centre relative to its width). Sigmoid models threshold each channel:
with the default threshold 0.5, a structure is predicted exactly inside its window.

Options (``model.options``; every entry written by ``medseg baseline threshold``):

``mode``
    ``softmax`` (a background logit first) or ``sigmoid``; must match the plan's label mode.
``windows``
    One mapping per structure, in the plan's channel order: ``channel`` (input channel), ``lo``,
    ``hi`` (normalised intensities; ``null`` for an open end), ``scale`` (``s_k`` > 0), ``side``
    (-1, 0 or 1, below) and ``structure`` (its name, for readers of ``plan.json``; not used).
``sigma_vox``
    Gaussian smoothing of the input before the windows, standard deviation in voxels per spatial
    axis (0: none); the same smoothing the fit measured the windows on. Edges are replicated.
``side`` (of a window)
    A lateral prior: ``1`` keeps the structure in the upper half of the window along the first
    spatial axis (the left-right axis of the canonical RAS grid; the axis mirror augmentation and TTA
    flip), ``-1`` in the lower half, ``0`` anywhere; elsewhere, and on the centre plane of an odd
    size, its logit is -1. Intensities alone cannot tell a left kidney from a right one. The
    baseline gives it to left/right pairs only, with opposite sides, so that the network commutes
    with the left-right mirror (the pair swapped), as mirror TTA assumes. The rule is exact when one
    window spans the scan along that axis (the baseline plans its patch so), as images smaller than
    the window are padded centrally; with several windows across the axis each splits at its own
    centre.

Written by hand because it is a few element-wise operations no library packages as a network.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import ConfigError
from medseg.models._registry import MODELS, check_input
from medseg.models.spec import NetworkSpec

__all__ = ["ThresholdNet", "gaussian_smooth", "window_logits"]

OUTSIDE_SIDE = -1.0
"""Logit of a structure on the wrong side of its lateral prior (background's is 0)."""

_NOT_FITTED = (
    "model 'threshold' is not trained by `medseg train`: its intensity windows are fitted on the "
    "training cases by `medseg baseline threshold --config FILE --run-dir DIR`, which writes a run "
    "directory `medseg predict` uses as it is"
)


def gaussian_smooth(x: torch.Tensor, sigma_vox: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(B, C, *spatial)`` per channel, edges replicated.

    Args:
        x: Float tensor with 2 or 3 spatial axes.
        sigma_vox: Standard deviation per spatial axis in voxels; 0 leaves an axis alone.

    Returns:
        A tensor of ``x``'s shape and dtype (``x`` itself when every sigma is 0). The kernel is cut at
        3 sigma and normalised to sum 1, so constant regions keep their value.
    """
    nd = x.ndim - 2
    if len(sigma_vox) != nd:
        raise ConfigError(f"sigma_vox {list(sigma_vox)} must give one value per spatial axis ({nd})")
    conv = F.conv3d if nd == 3 else F.conv2d
    channels = x.shape[1]
    for axis, sigma in enumerate(sigma_vox):
        if sigma <= 0:
            continue
        radius = max(1, math.ceil(3.0 * float(sigma)))
        t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
        k = torch.exp(-0.5 * (t / float(sigma)) ** 2)
        k = (k / k.sum()).to(x.dtype)
        shape = [1, 1] + [1] * nd
        shape[2 + axis] = k.numel()
        pad = [0, 0] * nd
        # F.pad lists the last axis first
        pad[2 * (nd - 1 - axis)] = pad[2 * (nd - 1 - axis) + 1] = radius
        weight = k.reshape(shape).expand(channels, *shape[1:])  # the same kernel for every channel
        x = conv(F.pad(x, pad, mode="replicate"), weight, groups=channels)
    return x


def window_logits(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``min(x - lo, hi - x, scale) / scale`` per structure (module docstring).

    Args:
        x: ``(B, S, *spatial)`` intensities, structure ``k``'s channel at ``k``.
        lo, hi: ``(S,)`` window ends; ``-inf`` / ``+inf`` for open ends.
        scale: ``(S,)`` positive ramp widths.
    """
    shape = (1, -1) + (1,) * (x.ndim - 2)
    lo, hi, scale = lo.reshape(shape), hi.reshape(shape), scale.reshape(shape)
    return torch.minimum(torch.minimum(x - lo, hi - x), scale) / scale


_LIMIT = 1e30
"""Largest window end (normalised intensities are z-scores; a plan's numbers are untrusted data)."""
MAX_SIGMA_VOX = 16.0
"""Largest smoothing in voxels (the fit tries 0-2): the kernel grows with it, and a plan may come from
elsewhere."""
MIN_SCALE = 1e-6
"""Smallest ramp width: the logits divide by it in float32."""


def _number(value: Any, where: str, lo: float = -_LIMIT, hi: float = _LIMIT) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ConfigError(f"model.options.{where} must be a number in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def _windows(spec: NetworkSpec, in_channels: int, n: int) -> list[dict[str, Any]]:
    """The checked ``windows`` option: ``n`` mappings with channel, lo, hi, scale and side."""
    windows = spec.options.get("windows")
    if not windows:
        raise ConfigError(_NOT_FITTED)
    if not isinstance(windows, list | tuple) or len(windows) != n:
        count = len(windows) if isinstance(windows, list | tuple) else windows
        raise ConfigError(
            f"model.options.windows has {count} entries but the model has {n} structures; fit the "
            "baseline again for this label layout"
        )
    known = {"structure", "channel", "lo", "hi", "scale", "side"}
    out = []
    for k, w in enumerate(windows):
        if not isinstance(w, Mapping) or set(w) - known:
            raise ConfigError(
                f"model.options.windows[{k}] must be a mapping with keys {sorted(known)}, got {w!r}"
            )
        channel = w.get("channel", 0)
        if isinstance(channel, bool) or not isinstance(channel, int) or not 0 <= channel < in_channels:
            raise ConfigError(
                f"model.options.windows[{k}].channel must be an input channel 0..{in_channels - 1}, got "
                f"{channel!r}"
            )
        lo = -math.inf if w.get("lo") is None else _number(w["lo"], f"windows[{k}].lo")
        hi = math.inf if w.get("hi") is None else _number(w["hi"], f"windows[{k}].hi")
        if not lo < hi:
            raise ConfigError(f"model.options.windows[{k}]: lo {lo} must be below hi {hi}")
        scale = _number(w.get("scale"), f"windows[{k}].scale", MIN_SCALE)
        side = w.get("side", 0)
        if side not in (-1, 0, 1) or isinstance(side, bool):
            raise ConfigError(f"model.options.windows[{k}].side must be -1, 0 or 1, got {side!r}")
        out.append({"channel": channel, "lo": lo, "hi": hi, "scale": scale, "side": int(side)})
    return out


class ThresholdNet(nn.Module):
    """Logits from fitted intensity windows (see the module docstring); no trainable weights.

    Args:
        spec: The network record; ``options`` holds ``mode``, ``windows`` and ``sigma_vox``. Its
            ``channels``, ``strides``, ``norm``, ``residual`` and ``upsample`` are not used.
        in_channels: Image channels.
        out_channels: Structures + 1 (softmax) or structures (sigmoid).

    Raises:
        ConfigError: Windows missing (the network is fitted, not trained), or options that do not fit
            the label layout.
    """

    def __init__(self, spec: NetworkSpec, in_channels: int, out_channels: int) -> None:
        super().__init__()
        unknown = sorted(set(spec.options) - {"mode", "windows", "sigma_vox"})
        if unknown:
            raise ConfigError(
                f"model.options {unknown} are not options of 'threshold'; it takes mode, windows, sigma_vox"
            )
        if spec.deep_supervision:
            raise ConfigError("model.name 'threshold' has no deep supervision (a U-Net feature); remove it")
        mode = spec.options.get("mode")
        if mode not in ("softmax", "sigmoid"):
            raise ConfigError(
                f"model.options.mode must be 'softmax' or 'sigmoid', got {mode!r}. {_NOT_FITTED}"
            )
        nd = spec.spatial_dims
        self.softmax = mode == "softmax"
        windows = _windows(spec, in_channels, out_channels - 1 if self.softmax else out_channels)
        sigma = spec.options.get("sigma_vox") or [0.0] * nd
        if not isinstance(sigma, list | tuple) or len(sigma) != nd:
            raise ConfigError(f"model.options.sigma_vox must give {nd} values (one per axis), got {sigma!r}")
        self.sigma_vox = tuple(_number(s, "sigma_vox", 0.0, MAX_SIGMA_VOX) for s in sigma)
        self.spatial_dims, self.in_channels = nd, in_channels
        self.level_strides = [(1,) * nd]
        self.input_divisor = (1,) * nd
        self.output_strides = [(1,) * nd]
        # not persistent: the record in plan.json is the model, the checkpoint holds no weights
        for name, key in (("lo", "lo"), ("hi", "hi"), ("scale", "scale"), ("side", "side")):
            values = torch.tensor([float(w[key]) for w in windows], dtype=torch.float32)
            self.register_buffer(name, values, persistent=False)
        channel = torch.tensor([w["channel"] for w in windows], dtype=torch.long)
        self.register_buffer("channel", channel, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self, self.spatial_dims, self.in_channels)
        # float32 even under the engine's autocast: the windows were fitted on float32 intensities
        with torch.autocast(x.device.type, enabled=False):
            return self._logits(x.float())

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = gaussian_smooth(x, self.sigma_vox)
        logits = window_logits(x.index_select(1, self.channel), self.lo, self.hi, self.scale)
        if bool((self.side != 0).any()):
            n = x.shape[2]
            pos = torch.arange(n, device=x.device, dtype=torch.float32) - (n - 1) / 2.0
            shape = (1, -1, n) + (1,) * (self.spatial_dims - 1)
            # the centre plane of an odd size belongs to neither side, so the mirror maps sides exactly
            wrong = (self.side.reshape(-1, 1) * pos.reshape(1, -1)).reshape(shape) <= 0
            wrong &= (self.side != 0).reshape(1, -1, *([1] * self.spatial_dims))
            logits = torch.where(wrong, torch.full_like(logits, OUTSIDE_SIDE), logits)
        if self.softmax:
            logits = torch.cat([torch.zeros_like(logits[:, :1]), logits], dim=1)
        return logits


@MODELS.register("threshold")
def _build_threshold(spec: NetworkSpec, *, in_channels: int, out_channels: int) -> nn.Module:
    """Build :class:`ThresholdNet` from a network record with fitted windows."""
    return ThresholdNet(spec, in_channels, out_channels)
