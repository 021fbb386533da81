"""Dense CRF refinement during prediction (``predict.crf``): the mean field of
:class:`medseg.models.crf.MeanField` run over the probabilities on the scan's own grid, slab by slab
along the last axis as the :class:`~medseg.inference.restore.Restorer` produces them, before the
argmax/threshold.

Memory stays bounded by pipelining the iterations instead of giving each slab a halo of
``iterations x reach`` rows: iteration ``t`` runs as soon as iteration ``t - 1`` holds the rows it reads
(:attr:`~medseg.models.crf.MeanField.reach` on each side), so each of the ``T`` iterations keeps about
``2 * reach + chunk`` rows of ``C`` float32 channels, the unary and the image about ``T * reach + chunk``
rows. Every (row, iteration) is computed once, from exactly the rows a whole-volume run would use, so
the result equals the whole-volume CRF (up to float rounding) whatever the chunks. Giving each slab a
halo of ``T * reach`` rows per side instead would hold and recompute ``2 * T * reach`` extra rows per
slab, as many as the slab itself for a thin one.

The CRF runs on the body crop the labels are decided on (outside it everything is background, as
without the CRF). With ``--save-probabilities`` the saved probabilities are the CRF's marginals, the
ones the labels are decided from.

The intensities are the scan's own voxels on its own grid (the same canonical crop the labels are
decided on), not the resampled network input: raw (``intensity: raw``, e.g. HU) or through the
model's normalisation (``intensity: normalised``, the default: the plan's CT clip and scaling or the
scan's z-score, applied voxel by voxel), divided by ``bilateral_sigma_intensity``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from medseg.config import CRFConfig
from medseg.data.canonical import canonical_grid
from medseg.data.preprocess import Preprocessing
from medseg.errors import DataError
from medseg.labels import Mode
from medseg.models.crf import MeanField

__all__ = ["StreamingCRF", "crf_for_scan", "crf_memory_bytes", "scan_features"]

FeatureRows = Callable[[int, int], np.ndarray]
"""``(z0, z1) -> (C_img, *inplane, z1 - z0)`` float32 intensities already divided by their width."""


class _Rows:
    """Rows ``start:stop`` (the first spatial axis) of a ``(1, C, rows, *inplane)`` tensor, growing at
    the end and dropped at the front."""

    def __init__(self) -> None:
        self.start, self.t = 0, None

    @property
    def stop(self) -> int:
        return self.start + (0 if self.t is None else self.t.shape[2])

    def append(self, rows: torch.Tensor) -> None:
        self.t = rows if self.t is None or self.t.shape[2] == 0 else torch.cat([self.t, rows], 2)

    def get(self, z0: int, z1: int) -> torch.Tensor:
        if z0 < self.start or z1 > self.stop:
            raise AssertionError(f"CRF rows {z0}:{z1} asked of rows {self.start}:{self.stop}")
        return self.t[:, :, z0 - self.start : z1 - self.start]

    def drop_before(self, z: int) -> None:
        if self.t is not None and z > self.start:
            cut = min(z, self.stop) - self.start
            self.t = self.t[:, :, cut:].clone()  # a copy, so the dropped rows are freed
            self.start += cut


class StreamingCRF:
    """Mean-field iterations over rows pushed in order along the grid's last axis (``n`` rows in all),
    as the :class:`~medseg.inference.restore.Restorer` decides them.

    :meth:`push` takes the probabilities of the next rows and returns the refined marginals of the
    rows every iteration has reached; after the last row is pushed, every row has been returned.
    Inside, the rows are the outermost axis (:class:`~medseg.models.crf.MeanField`'s first), so a
    block of rows is contiguous.

    Args:
        spacing_mm: Voxel size per axis of the grid, the row axis last.
        cfg: The CRF's settings.
        mode: ``softmax`` or ``sigmoid``.
        n: Rows of the grid.
        features: Intensities of rows ``z0:z1`` (:data:`FeatureRows`).
        device: Where the iterations run.
    """

    def __init__(
        self,
        spacing_mm: Sequence[float],
        cfg: CRFConfig,
        mode: str,
        n: int,
        features: FeatureRows,
        *,
        device: Any = "cpu",
    ) -> None:
        mf_mode = "softmax" if mode == Mode.SOFTMAX else "sigmoid"
        self.mf = MeanField((spacing_mm[-1], *spacing_mm[:-1]), cfg, mf_mode)
        self.n, self.features, self.device = int(n), features, torch.device(device)
        self.levels = [_Rows() for _ in range(self.mf.iterations)]  # marginals after 0 .. T-1 iterations
        self.unary, self.feat = _Rows(), _Rows()
        self.done = [0] * (self.mf.iterations + 1)  # rows computed of each iteration (0: the input)

    def push(self, z0: int, probs: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Add probabilities ``(m, C, *inplane)`` of rows ``z0:z0 + m``; returns ``(row, marginals)``
        blocks (same layout) of rows that are final."""
        if z0 != self.done[0]:
            raise AssertionError(f"CRF rows pushed out of order: {z0} after {self.done[0]}")
        m = len(probs)
        x = torch.from_numpy(np.asarray(probs, np.float32)).to(self.device)
        with torch.no_grad():
            u, q0 = self.mf.unary(x.transpose(0, 1).contiguous()[None])  # (1, C, m, *inplane)
            self.unary.append(u)
            self.levels[0].append(q0)
            f = torch.from_numpy(np.asarray(self.features(z0, z0 + m), np.float32)).to(self.device)
            self.feat.append(f.movedim(-1, 1).contiguous()[None])
            self.done[0] = z0 + m
            return self._advance()

    def _advance(self) -> list[tuple[int, np.ndarray]]:
        r, n, last = self.mf.reach, self.n, self.mf.iterations
        out: list[tuple[int, np.ndarray]] = []
        for t in range(1, last + 1):
            have = self.done[t - 1]
            upto = n if have >= n else have - r  # rows whose every neighbour iteration t-1 has computed
            if upto > self.done[t]:
                o0, o1 = self.done[t], upto
                lo, hi = max(0, o0 - r), min(n, o1 + r)
                prev, feat = self.levels[t - 1].get(lo, hi), self.feat.get(lo, hi)
                q = self.mf.step(self.unary.get(o0, o1), prev, feat, lo, o0, o1, n)
                self.done[t] = o1
                if t < last:
                    self.levels[t].append(q)
                else:
                    q_rows = np.ascontiguousarray(q[0].transpose(0, 1).cpu().numpy())
                    if not np.isfinite(q_rows).all():  # labels decided from NaN would be silently empty
                        raise DataError(
                            f"the dense CRF gave non-finite probabilities in rows {o0}-{o1}; its settings "
                            f"(predict.crf: {self.mf.cfg.model_dump()}) overflow on this scan: widen "
                            "bilateral_sigma_intensity or lower the weights"
                        )
                    out.append((o0, q_rows))
            self.levels[t - 1].drop_before(self.done[t] - r)
        self.unary.drop_before(self.done[last])
        self.feat.drop_before(self.done[last] - r)
        return out

    @property
    def finished(self) -> bool:
        return self.done[-1] >= self.n


def scan_features(prep: Preprocessing, cfg: CRFConfig) -> FeatureRows:
    """Intensities of the scan's canonical crop rows (the grid labels are decided on), as the CRF's
    appearance kernel reads them: NaN/infinite voxels as the channel's lowest value, then raw or
    normalised (``cfg.intensity``), divided by ``cfg.bilateral_sigma_intensity``."""
    crop = prep.layout.crop
    c0 = crop[-1].start
    lowest = np.asarray(prep.stats.lowest, np.float32)

    def rows(z0: int, z1: int) -> np.ndarray:
        x = np.asarray(prep.source.slab(c0 + z0, c0 + z1, crop[:-1]), np.float32).copy()
        if not np.isfinite(x).all():
            x = np.where(np.isfinite(x), x, lowest.reshape((-1,) + (1,) * (x.ndim - 1)))
        if cfg.intensity == "normalised":
            for c, norm in enumerate(prep.norms):
                x[c] = norm.apply(x[c])
        x /= cfg.bilateral_sigma_intensity
        return x

    return rows


def crf_for_scan(
    image: Any, prep: Preprocessing, mode: str, cfg: CRFConfig, *, device: Any = "cpu"
) -> StreamingCRF:
    """The streaming CRF of a scan's canonical crop (on the network's device when it is a GPU)."""
    dev = torch.device(device)
    return StreamingCRF(
        canonical_grid(image)[2],
        cfg,
        mode,
        prep.layout.crop_shape[-1],
        scan_features(prep, cfg),
        device=dev if dev.type == "cuda" else "cpu",
    )


def crf_memory_bytes(
    inplane: Sequence[int],
    channels: int,
    image_channels: int,
    cfg: CRFConfig,
    spacing_mm: Sequence[float],
    chunk: int,
) -> int:
    """Rough bytes the streaming CRF holds: per iteration ``2 * reach + chunk`` rows of the marginals,
    the unary and intensities over ``iterations * reach + chunk`` rows, and the working set of one
    update with the allocator's slack (measured: about ten copies of ``chunk + 2 * reach`` rows).
    ``spacing_mm`` has the row axis last."""
    r = MeanField((spacing_mm[-1], *spacing_mm[:-1]), cfg).reach
    t = cfg.iterations
    row = 4 * math.prod(inplane)
    levels = t * (2 * r + chunk) * channels * row
    span = (t * r + chunk) * (channels + image_channels) * row
    work = 10 * (chunk + 2 * r) * (channels + 1) * row
    return int(levels + span + work)
