"""Dense CRF (fully connected CRF, Krähenbühl & Koltun, NIPS 2011) solved by mean-field iterations, in
torch, on ``(B, C, *spatial)`` tensors in 2D and 3D; differentiable, so a trainable CRF-as-RNN layer
(Zheng et al., ICCV 2015) can reuse :class:`MeanField`.

Model: labels ``x`` with energy ``E(x) = sum_i U_i(x_i) + sum_{i != j} mu(x_i, x_j) sum_m w_m k_m(i, j)``,
the unary ``U = -log p`` from the network's probabilities, Potts compatibility ``mu(l, l') = [l != l']``
(or a given matrix), and two Gaussian kernels with positions in mm (``spacing_mm``):

* spatial (smoothness): ``k_s = exp(-|pos_i - pos_j|^2 / (2 sigma_s^2))``;
* bilateral (appearance): ``k_b = exp(-|pos_i - pos_j|^2 / (2 sigma_b^2) - |I_i - I_j|^2 / 2)``, the
  intensities ``I`` already divided by their width (``features``; several channels add up).

Mean field: ``Q <- softmax(-U - sum_m w_m mu (k_m * Q))``. Each ``k_m * Q`` here is the kernel-weighted
*average* of ``Q`` over the other voxels ``j != i`` (row-normalised; the reference implementation
normalises its kernels too), so the weights mean the same whatever the spacing, window or position
near the border, and a uniform field stays uniform. With Potts ``mu`` the update is
``softmax(log p + sum_m w_m (k_m * Q))``: the part that does not depend on the label cancels.
Sigmoid (overlapping structures): each channel is a 2-label CRF (outside, inside); its update is
``q <- sigmoid(logit p + sum_m w_m (2 (k_m * q) - 1))``.

Approximation and cost (exact message passing is O(N^2) in the number of voxels N; the reference
implementation approximates it with a permutohedral lattice): the kernels are truncated, as in ConvCRF
(Teichmann & Cipolla, 2018).

* The spatial kernel is separable, so it is computed exactly up to its truncation at 2 sigma by one 1D
  Gaussian convolution per axis: radius ``ceil(2 sigma_s / spacing)`` voxels per axis (at most 32),
  cost ``O(N * sum_d (2 r_d + 1))`` per channel and iteration.
* The bilateral kernel is not separable (its intensity term); it is summed over the offsets of a
  window of radius ``min(ceil(2 sigma_b / spacing), window)`` voxels per axis, each offset a pair of
  slices of the tensor (shifts, no unfold copy): cost ``O(N * prod_d (2 r_d + 1) * (C + C_img))`` per
  iteration. Its long range on photographs (sigma 50-80 px) is therefore not reproduced: it acts
  within a few voxels, where it keeps edges that the spatial kernel alone would smooth over.

Memory: a few float copies of ``(B, C, *spatial)``. :class:`MeanField` computes one iteration for rows
``o0:o1`` of the first spatial axis from a block of rows around them (:meth:`MeanField.step`; the
outermost axis, so that a block of rows is contiguous in memory), so a caller can
run it slab by slab with bounded memory (:mod:`medseg.inference.crf`); one iteration reads
:attr:`MeanField.reach` rows on each side.

Why hand-written: pydensecrf (1.0rc3, 2018), pydensecrf2 (1.1) and SimpleCRF (0.2.1.1, 2021) publish
no wheels for CPython 3.11 (checked with ``pip download --only-binary=:all:``: only source archives
that need Cython and a C++ compiler at install time); they run on the CPU only and are not
differentiable, and pydensecrf's kernels take positions in pixels of a 2D image (3D and spacing in mm
need hand-made feature arrays).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from medseg.config import CRFConfig
from medseg.errors import ConfigError, ShapeError

__all__ = ["DenseCRF", "MeanField", "dense_crf", "kernel_radius"]

TRUNCATE = 2.0
"""Kernels are cut at this many sigmas (exp(-2) = 0.14 of the peak; 95 % of a 1D Gaussian's mass)."""

MAX_SPATIAL_RADIUS = 32
"""Cap of the separable spatial kernel's radius in voxels: room for the 3 mm default on pixels down to
0.19 mm (a radiograph at full resolution); finer grids get a narrower kernel."""

PROB_FLOOR = 1e-5
"""Probabilities are raised to at least PROB_FLOOR (sigmoid: and cut to at most 1 - PROB_FLOOR) before
the log: a voxel the network called impossible (log 1e-5 = -11.5) can still change when its neighbours
agree strongly."""

_SPATIAL_SELF_MIN = 1e-3
"""Spatial kernel mass of a voxel's neighbours (its own weight is 1) below which it gets no spatial
message: the message is a difference of float sums, too inexact below this."""

Mode = Literal["softmax", "sigmoid"]


def kernel_radius(sigma_mm: float, spacing_mm: Sequence[float], cap: int) -> tuple[int, ...]:
    """Window half-widths in voxels per axis: ``min(ceil(2 sigma / spacing), cap)``, at least 1.

    >>> kernel_radius(5.0, (0.8, 0.8, 3.0), cap=3)
    (3, 3, 3)
    >>> kernel_radius(3.0, (1.0, 1.0, 5.0), cap=32)
    (6, 6, 2)
    """
    return tuple(max(1, min(cap, math.ceil(TRUNCATE * sigma_mm / float(s) - 1e-9))) for s in spacing_mm)


class MeanField:
    """One dense CRF's kernels on a grid with ``spacing_mm``, and its mean-field update.

    Args:
        spacing_mm: Voxel size per spatial axis.
        cfg: Iterations, kernel widths and weights, window (``enabled`` is not looked at).
        mode: ``softmax`` (one CRF over exclusive classes) or ``sigmoid`` (one 2-label CRF per channel).
        weights: ``(spatial, bilateral)`` weights as a tensor (e.g. trainable); default ``cfg.weights``.
        compatibility: ``(C, C)`` label compatibility ``mu`` of softmax models; default Potts.
    """

    def __init__(
        self,
        spacing_mm: Sequence[float],
        cfg: CRFConfig,
        mode: Mode = "softmax",
        *,
        weights: torch.Tensor | None = None,
        compatibility: torch.Tensor | None = None,
    ) -> None:
        if mode not in ("softmax", "sigmoid"):
            raise ConfigError(f"CRF mode must be 'softmax' or 'sigmoid', got {mode!r}")
        if compatibility is not None and mode != "softmax":
            raise ConfigError("a CRF compatibility matrix applies to softmax models only")
        self.spacing = tuple(float(s) for s in spacing_mm)
        if len(self.spacing) not in (2, 3) or min(self.spacing) <= 0:
            raise ConfigError(f"CRF spacing must be 2 or 3 positive values in mm, got {spacing_mm}")
        self.cfg, self.mode, self.iterations = cfg, mode, cfg.iterations
        self.weights = weights if weights is not None else tuple(float(w) for w in cfg.weights)
        self.compatibility = compatibility
        self.spatial_radius = kernel_radius(cfg.spatial_sigma_mm, self.spacing, MAX_SPATIAL_RADIUS)
        self.bilateral_radius = kernel_radius(cfg.bilateral_sigma_mm, self.spacing, cfg.window)
        self.reach = max(self.spatial_radius[0], self.bilateral_radius[0])
        """Rows of the first spatial axis one iteration reads on each side of the rows it computes."""
        self._taps = [  # unnormalised 1D Gaussians, centre tap 1, per axis
            [math.exp(-0.5 * (t * s / cfg.spatial_sigma_mm) ** 2) for t in range(-r, r + 1)]
            for r, s in zip(self.spatial_radius, self.spacing, strict=True)
        ]
        ranges = [range(-r, r + 1) for r in self.bilateral_radius]
        self.offsets = [
            (
                off,
                -0.5
                * sum((o * s / cfg.bilateral_sigma_mm) ** 2 for o, s in zip(off, self.spacing, strict=True)),
            )
            for off in itertools.product(*ranges)
            if any(off)
        ]
        """Bilateral window offsets (voxels) with the log of their spatial factor."""

    @property
    def spatial_dims(self) -> int:
        return len(self.spacing)

    # ------------------------------------------------------------------------------ unary

    def unary(
        self, x: torch.Tensor, inputs: Literal["probabilities", "logits"] = "probabilities"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(-U, Q0)``: the unary as logits (softmax: ``log p``, sigmoid: ``logit p``) and the
        starting marginals, from probabilities (clipped to ``PROB_FLOOR``) or network logits."""
        if inputs == "logits":
            u = x
        elif self.mode == "softmax":
            u = torch.log(x.clamp(PROB_FLOOR, 1.0))
        else:
            p = x.clamp(PROB_FLOOR, 1.0 - PROB_FLOOR)
            u = torch.log(p) - torch.log1p(-p)
        return u, self._activate(u)

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, 1) if self.mode == "softmax" else torch.sigmoid(logits)

    # ------------------------------------------------------------------------------ one iteration

    def step(
        self,
        u: torch.Tensor,
        q: torch.Tensor,
        features: torch.Tensor,
        lo: int,
        o0: int,
        o1: int,
        n: int,
    ) -> torch.Tensor:
        """One mean-field update of rows ``o0:o1`` (of ``n``) along the first spatial axis.

        Args:
            u: Unary logits of rows ``o0:o1``, ``(B, C, o1 - o0, *rest)``.
            q: Current marginals of rows ``lo:lo + q.shape[2]``; they must include every row within
                :attr:`reach` of ``o0:o1`` that lies in ``0:n``.
            features: Intensities divided by their kernel width, ``(B or 1, C_img, *same as q)``.
            lo: First row of ``q`` and ``features``.
            o0, o1: Rows to update.
            n: Rows of the whole grid (rows outside ``0:n`` have no voxels).

        Returns:
            The new marginals of rows ``o0:o1``, shaped like ``u``.
        """
        if q.shape[2:] != features.shape[2:]:
            raise ShapeError(
                "CRF features must lie on the marginals' grid", expected=q.shape, actual=features.shape
            )
        if u.shape[2:] != (o1 - o0, *q.shape[3:]):
            raise ShapeError(
                f"CRF unary must cover rows {o0}:{o1}", expected=(o1 - o0, *q.shape[3:]), actual=u.shape[2:]
            )
        rows = q.shape[2]
        if o0 < lo or o1 > lo + rows or max(0, o0 - self.reach) < lo or min(n, o1 + self.reach) > lo + rows:
            raise AssertionError(
                f"CRF rows {o0}:{o1} need rows within {self.reach} of them; given {lo}:{lo + rows}"
            )
        ws, wb = self.weights[0], self.weights[1]
        ms, has_s = self._spatial(q, lo, o0, o1, n)
        mb, has_b = self._bilateral(q, features, lo, o0, o1, n)
        if self.mode == "sigmoid":
            return torch.sigmoid(u + ws * (2 * ms - has_s) + wb * (2 * mb - has_b))
        if self.compatibility is None:  # Potts
            return torch.softmax(u + ws * ms + wb * mb, 1)
        mu = self.compatibility.to(q.dtype)
        pair = ws * torch.einsum("lk,bk...->bl...", mu, ms) + wb * torch.einsum("lk,bk...->bl...", mu, mb)
        return torch.softmax(u - pair, 1)

    def _spatial(
        self, q: torch.Tensor, lo: int, o0: int, o1: int, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Average of ``q`` over the other voxels under the spatial kernel, rows ``o0:o1``; and 1 where
        a voxel has neighbours under it (0 where the kernel is narrower than a voxel)."""
        dims = self.spatial_dims
        r0 = self.spatial_radius[0]
        a, b = max(0, o0 - r0), min(n, o1 + r0)
        pad = (0, 0) * (dims - 1) + (r0 - (o0 - a), r0 - (b - o1))  # rows beyond the grid: no voxels
        x = F.pad(q[:, :, a - lo : b - lo], pad)
        m = o1 - o0
        # 1D Gaussians along each axis as sums of shifted slices (3x faster than a 1-channel conv on
        # the CPU); along the rows only o0:o1 are made
        taps = self._taps[0]
        out = x[:, :, r0 : r0 + m] * taps[r0]
        for t in range(-r0, r0 + 1):
            if t:
                out.add_(x[:, :, r0 + t : r0 + t + m], alpha=taps[t + r0])
        x = out
        for axis in range(1, dims):
            r, taps, size = self.spatial_radius[axis], self._taps[axis], x.shape[2 + axis]
            out = x * taps[r]
            for t in range(-r, r + 1):
                if t and abs(t) < size:
                    dst = [slice(None)] * x.ndim
                    src = [slice(None)] * x.ndim
                    dst[2 + axis] = slice(max(0, -t), size - max(0, t))  # out[i] += g(t) x[i + t]
                    src[2 + axis] = slice(max(0, t), size - max(0, -t))
                    out[tuple(dst)].add_(x[tuple(src)], alpha=taps[t + r])
            x = out
        num = x - q[:, :, o0 - lo : o1 - lo]
        # the kernel's mass over in-grid voxels is separable too: a product of 1D sums
        den = None
        for axis in range(dims):
            length = n if axis == 0 else q.shape[2 + axis]
            first, count = (o0, m) if axis == 0 else (0, length)
            shape = [1] * dims
            shape[axis] = count
            s = self._mass_1d(axis, length, first, count, q).reshape(shape)
            den = s if den is None else den * s
        den = (den - 1.0)[None, None]
        has = (den > _SPATIAL_SELF_MIN).to(q.dtype)
        return num / den.clamp_min(_SPATIAL_SELF_MIN) * has, has

    def _mass_1d(self, axis: int, length: int, first: int, count: int, like: torch.Tensor) -> torch.Tensor:
        """``sum_t g(t)`` over the taps ``t`` with ``i + t`` in ``0:length``, for each ``i`` in
        ``first:first + count``."""
        taps = torch.tensor(self._taps[axis], dtype=like.dtype, device=like.device)
        r = self.spatial_radius[axis]
        i = torch.arange(first, first + count, device=like.device)[:, None] + torch.arange(
            -r, r + 1, device=like.device
        )
        inside = ((i >= 0) & (i < length)).to(like.dtype)
        return (inside * taps).sum(1)

    def _bilateral(
        self, q: torch.Tensor, f: torch.Tensor, lo: int, o0: int, o1: int, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Average of ``q`` over the window's other voxels under the bilateral kernel, rows ``o0:o1``;
        and 1 where the kernel weight of the neighbours is not zero."""
        rest = q.shape[3:]
        m = o1 - o0
        num = q.new_zeros((*q.shape[:2], m, *rest))
        den = q.new_zeros((f.shape[0], 1, m, *rest))
        centre = f[:, :, o0 - lo : o1 - lo]
        for off, log_s in self.offsets:
            d0 = off[0]
            z0, z1 = max(o0, -d0), min(o1, n - d0)  # output rows whose neighbour row is on the grid
            out_sl = [slice(max(0, -d), size - max(0, d)) for d, size in zip(off[1:], rest, strict=True)]
            if z1 <= z0 or any(s.stop <= s.start for s in out_sl):
                continue
            nb_sl = [slice(s.start + d, s.stop + d) for s, d in zip(out_sl, off[1:], strict=True)]
            a = (slice(None), slice(None), slice(z0 - o0, z1 - o0), *out_sl)  # output voxels i
            b = (slice(None), slice(None), slice(z0 + d0 - lo, z1 + d0 - lo), *nb_sl)  # their neighbours
            sq = (centre[a] - f[b]).square()
            sq = sq if sq.shape[1] == 1 else sq.sum(1, keepdim=True)
            w = sq.mul_(-0.5).add_(log_s).exp_()  # in place: none of these backward passes needs the input
            num[a].addcmul_(w, q[b])
            den[a].add_(w)
        has = (den > 0).to(q.dtype)
        return num / den.clamp_min(torch.finfo(q.dtype).tiny) * has, has

    # ------------------------------------------------------------------------------ whole tensor

    def __call__(
        self,
        x: torch.Tensor,
        features: torch.Tensor,
        inputs: Literal["probabilities", "logits"] = "probabilities",
    ) -> torch.Tensor:
        """Marginals after ``iterations`` updates of the whole tensor ``x`` ``(B, C, *spatial)``."""
        if x.ndim != self.spatial_dims + 2:
            raise ShapeError(
                f"CRF input must be (B, C, *spatial) with {self.spatial_dims} spatial axes",
                expected=(self.spatial_dims + 2,),
                actual=tuple(x.shape),
            )
        u, q = self.unary(x, inputs)
        n = q.shape[2]
        for _ in range(self.iterations):
            q = self.step(u, q, features, 0, 0, n, n)
        return q


def dense_crf(
    x: torch.Tensor,
    image: torch.Tensor,
    spacing_mm: Sequence[float],
    cfg: CRFConfig | None = None,
    *,
    mode: Mode = "softmax",
    inputs: Literal["probabilities", "logits"] = "probabilities",
) -> torch.Tensor:
    """Refine probabilities (or logits) ``x`` ``(B, C, *spatial)`` with a dense CRF over ``image``.

    Args:
        x: Softmax probabilities (``mode="softmax"``, channels sum to 1) or per-channel sigmoid
            probabilities (``mode="sigmoid"``); network logits with ``inputs="logits"``.
        image: Intensities ``(B or 1, C_img, *spatial)`` in the units of
            ``cfg.bilateral_sigma_intensity``.
        spacing_mm: Voxel size per spatial axis; kernel widths are in mm.
        cfg: Kernel settings (default :class:`~medseg.config.CRFConfig`).
        mode: ``softmax`` or ``sigmoid``.
        inputs: What ``x`` holds.

    Returns:
        The refined marginals, shaped like ``x`` (probabilities).

    Example:
        >>> p = torch.full((1, 2, 8, 8), 0.5); p[:, 0, 2:4, 2:4] = 0.9; p[:, 1] = 1 - p[:, 0]
        >>> q = dense_crf(p, torch.zeros(1, 1, 8, 8), (1.0, 1.0))
        >>> q.shape, bool(torch.allclose(q.sum(1), torch.ones(1, 8, 8)))
        (torch.Size([1, 2, 8, 8]), True)
    """
    cfg = cfg or CRFConfig()
    features = image / cfg.bilateral_sigma_intensity
    return MeanField(spacing_mm, cfg, mode)(x, features.to(x.dtype), inputs)


class DenseCRF(nn.Module):
    """:func:`dense_crf` as a module: the kernel weights are a ``(2,)`` buffer (spatial, bilateral),
    which a trainable layer can turn into a parameter.

    ``forward(x, image, spacing_mm)`` takes the same arguments as :func:`dense_crf`.
    """

    def __init__(
        self,
        cfg: CRFConfig | None = None,
        *,
        mode: Mode = "softmax",
        inputs: Literal["probabilities", "logits"] = "probabilities",
    ) -> None:
        super().__init__()
        self.cfg, self.mode, self.inputs = cfg or CRFConfig(), mode, inputs
        self.register_buffer("kernel_weights", torch.tensor(self.cfg.weights, dtype=torch.float32))

    def forward(self, x: torch.Tensor, image: torch.Tensor, spacing_mm: Sequence[float]) -> torch.Tensor:
        mf = MeanField(spacing_mm, self.cfg, self.mode, weights=self.kernel_weights.to(x.dtype))
        return mf(x, (image / self.cfg.bilateral_sigma_intensity).to(x.dtype), self.inputs)
