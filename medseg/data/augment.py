"""Training augmentation: MONAI's random spatial and intensity transforms plus a left/right mirror
that swaps paired labels (hand-written: MONAI's ``RandFlipd`` flips arrays but cannot relabel).

Spatial transforms move image, label and border-weight map together (label with nearest-neighbour,
image and weights with linear interpolation), so they stay aligned. Every random draw comes from
the generator seeded by :meth:`Augmenter.__call__`'s ``seed``: the same seed gives the same patch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from monai.transforms import (
    Compose,
    Rand2DElasticd,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    RandScaleIntensityd,
)

from medseg.labels import Mode


class _MirrorLR:
    """Flip along spatial axis 0 (the left-right axis of the canonical RAS grid, image columns in 2D)
    with probability ``prob`` and swap paired labels.

    softmax labels: class indices swapped through a lookup table; sigmoid masks: channels swapped.
    """

    def __init__(self, pairs: Sequence[tuple[int, int]], mode: str, prob: float = 0.5) -> None:
        self.pairs, self.mode, self.prob = list(pairs), mode, prob

    def __call__(self, d: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if rng.random() >= self.prob:
            return d
        out = dict(d)
        for key in ("image", "label", "weights"):
            if out.get(key) is not None:
                out[key] = np.ascontiguousarray(np.flip(out[key], axis=1))
        if self.pairs:
            lab = out["label"]
            if self.mode == Mode.SOFTMAX:
                lut = np.arange(max(int(lab.max()) + 1, 1 + max(max(p) for p in self.pairs)), dtype=lab.dtype)
                for a, b in self.pairs:
                    lut[a], lut[b] = b, a
                out["label"] = lut[lab]
            else:
                order = list(range(lab.shape[0]))
                for a, b in self.pairs:
                    order[a], order[b] = b, a
                out["label"] = np.ascontiguousarray(lab[order])
        return out


class Augmenter:
    """Random spatial (rotation, scaling, elastic), mirror and intensity (noise, gamma, contrast) changes.

    Args:
        spatial_dims: 2 or 3.
        patch_size: Output patch size; inputs may be larger (extra context for rotations) and are
            centre-cropped to it by the affine step.
        mode: ``"softmax"`` or ``"sigmoid"`` (how labels are swapped).
        lr_pairs: Pairs of label indices (softmax: class indices; sigmoid: channel indices) that a
            left-right mirror swaps.
        p_affine, p_elastic, p_mirror, p_noise, p_gamma, p_contrast: Probabilities.
    """

    def __init__(
        self,
        spatial_dims: int,
        patch_size: Sequence[int],
        mode: str,
        lr_pairs: Sequence[tuple[int, int]] = (),
        *,
        p_affine: float = 0.3,
        p_elastic: float = 0.1,
        p_mirror: float = 0.5,
        p_noise: float = 0.15,
        p_gamma: float = 0.15,
        p_contrast: float = 0.15,
    ) -> None:

        self.spatial_dims = spatial_dims
        self.patch_size = tuple(int(p) for p in patch_size)
        self.mirror = _MirrorLR(lr_pairs, mode, prob=p_mirror)
        angle = math.radians(15)
        rot = (angle,) if spatial_dims == 2 else (angle, angle, angle)
        keys = ["image", "label", "weights"]
        modes = ["bilinear", "nearest", "bilinear"]
        if spatial_dims == 2:
            elastic = Rand2DElasticd(
                keys,
                spacing=(16, 16),
                magnitude_range=(1, 2),
                prob=p_elastic,
                mode=modes,
                padding_mode="border",
                allow_missing_keys=True,
            )
        else:
            elastic = Rand3DElasticd(
                keys,
                sigma_range=(5, 8),
                magnitude_range=(30, 80),
                prob=p_elastic,
                mode=modes,
                padding_mode="border",
                allow_missing_keys=True,
            )
        self.spatial = Compose(
            [
                RandAffined(
                    keys,
                    spatial_size=self.patch_size,
                    prob=p_affine,
                    rotate_range=rot,
                    scale_range=[0.15] * spatial_dims,
                    mode=modes,
                    padding_mode="border",
                    allow_missing_keys=True,
                ),
                elastic,
            ]
        )
        self.intensity = Compose(
            [
                RandGaussianNoised("image", prob=p_noise, std=0.1),
                RandAdjustContrastd("image", prob=p_gamma, gamma=(0.7, 1.5)),
                RandScaleIntensityd("image", prob=p_contrast, factors=0.25),
            ]
        )

    def __call__(self, sample: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
        """Augment one ``{"image", "label", "weights"}`` sample of numpy ``(C, *spatial)`` arrays."""
        rng = np.random.default_rng(seed)
        d = {k: v for k, v in sample.items() if v is not None}
        label_dtype = d["label"].dtype
        d = self.mirror(d, rng)
        d = {k: np.asarray(v, dtype=np.float32) for k, v in d.items()}
        self.spatial.set_random_state(seed=int(rng.integers(2**31)))
        self.intensity.set_random_state(seed=int(rng.integers(2**31)))
        d = self.spatial(d)
        d = self.intensity(d)
        out = {
            k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, dtype=np.float32)
            for k, v in d.items()
        }
        out["label"] = np.rint(out["label"]).astype(label_dtype)
        return out
