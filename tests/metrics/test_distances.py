"""HD95 and NSD: a hand-computed phantom, brute-force point sets, MONAI, empty policy and errors.

Known answer: a 4x4x4 cube at 1 x 1 x 2.5 mm shifted by one slice (2.5 mm) along z. Each cube has 56
surface voxels; of the shifted cube's, 36 coincide with the reference surface, the 4 inner voxels of its
bottom face are 1 mm (in-plane) from the reference surface ring, and its 16 top-face voxels are 2.5 mm
away. So HD95 = 2.5 mm and NSD at 2 mm = (40 + 40) / (56 + 56) = 5/7 (and 1 at 2.5 mm).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from medseg.errors import DataError, ShapeError
from medseg.metrics import (
    EMPTY_POLICY,
    surface_metrics,
    surface_metrics_labels,
    surface_metrics_masks,
)

SPACING = (1.0, 1.0, 2.5)


def _cube_pair() -> tuple[np.ndarray, np.ndarray]:
    ref = np.zeros((10, 10, 10), dtype=bool)
    ref[2:6, 2:6, 2:6] = True
    return np.roll(ref, 1, axis=2), ref


def _brute_surface(mask: np.ndarray) -> np.ndarray:
    """Coordinates of voxels with a face neighbour outside the mask (outside the image counts)."""
    padded = np.pad(mask, 1)
    inner = np.ones_like(mask)
    for axis in range(mask.ndim):
        for shift in (-1, 1):
            inner &= np.roll(padded, shift, axis=axis)[tuple(slice(1, -1) for _ in range(mask.ndim))]
    return np.argwhere(mask & ~inner).astype(float)


def _brute(pred: np.ndarray, ref: np.ndarray, spacing, tol: float) -> tuple[float, float]:
    """HD95 and NSD from all pairwise distances between the two surface point sets (no EDT, no crop)."""
    sp, sr = _brute_surface(pred) * spacing, _brute_surface(ref) * spacing
    if len(sp) == 0 and len(sr) == 0:
        return math.nan, math.nan
    if len(sp) == 0 or len(sr) == 0:
        return math.inf, 0.0
    d = cdist(sp, sr)
    d_pr, d_rp = d.min(axis=1), d.min(axis=0)
    hd = max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))
    nsd = (np.sum(d_pr <= tol) + np.sum(d_rp <= tol)) / (len(d_pr) + len(d_rp))
    return float(hd), float(nsd)


def _blobs(rng: np.random.Generator, shape, n_labels: int) -> np.ndarray:
    """Random ellipsoid-ish blobs (some touching the image border) in an exclusive label map."""
    lab = np.zeros(shape, dtype=np.uint8)
    grid = np.indices(shape).astype(float)
    for k in range(1, n_labels + 1):
        centre = rng.uniform(0, np.array(shape) - 1)
        radii = rng.uniform(1.5, max(2.0, min(shape) / 3), size=len(shape))
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1
        lab[inside & (rng.random(shape) < 0.9)] = k  # a few holes make ragged surfaces
    return lab


def _perturb(rng: np.random.Generator, lab: np.ndarray) -> np.ndarray:
    out = np.roll(lab, tuple(rng.integers(-2, 3, size=lab.ndim)), axis=tuple(range(lab.ndim)))
    out[rng.random(lab.shape) < 0.02] = 0
    return out


# --------------------------------------------------------------------------- known answers


def test_shifted_cube_hand_computed() -> None:
    pred, ref = _cube_pair()
    m = surface_metrics(pred, ref, SPACING, tolerance_mm=2.0)
    assert (m.n_surface_pred, m.n_surface_ref) == (56, 56)
    assert m.hd95_mm == pytest.approx(2.5)
    assert m.nsd == pytest.approx(5 / 7)
    assert surface_metrics(pred, ref, SPACING, tolerance_mm=2.5).nsd == pytest.approx(1.0)
    # the same shift along x (1 mm) is at most 1 mm away
    assert surface_metrics(np.roll(ref, 1, axis=0), ref, SPACING).hd95_mm == pytest.approx(1.0)


def test_identical_structures_are_perfect() -> None:
    _, ref = _cube_pair()
    m = surface_metrics(ref, ref, SPACING)
    assert (m.hd95_mm, m.nsd) == (0.0, 1.0)


def test_empty_policy() -> None:
    _, ref = _cube_pair()
    empty = np.zeros_like(ref)
    both = surface_metrics(empty, empty, SPACING)
    assert math.isnan(both.hd95_mm) and math.isnan(both.nsd)
    for pred, r in ((empty, ref), (ref, empty)):
        one = surface_metrics(pred, r, SPACING)
        assert one.hd95_mm == math.inf and one.nsd == 0.0
    assert "inf" in EMPTY_POLICY and "HD95" in EMPTY_POLICY


# --------------------------------------------------------------------------- independent references


@pytest.mark.parametrize(("shape", "spacing"), [((18, 15, 11), (0.8, 1.3, 2.5)), ((30, 24), (0.5, 1.7))])
def test_labels_match_brute_force(shape, spacing) -> None:
    rng = np.random.default_rng(len(shape))
    ref = _blobs(rng, shape, 5)
    pred = _perturb(rng, ref)
    pred[pred == 4] = 0  # label 4 missed
    labels = [1, 2, 3, 4, 5, 9]  # 9 absent from both
    got = surface_metrics_labels(pred, ref, labels, spacing, tolerance_mm=1.5)
    assert list(got) == labels
    for k in labels:
        hd, nsd = _brute(pred == k, ref == k, spacing, 1.5)
        assert got[k].hd95_mm == pytest.approx(hd, nan_ok=True), k
        assert got[k].nsd == pytest.approx(nsd, nan_ok=True), k
    fortran = surface_metrics_labels(
        np.asfortranarray(pred), np.asfortranarray(ref), labels, spacing, tolerance_mm=1.5
    )  # NIfTI arrays arrive Fortran-ordered; they are processed as transposed views
    for k in labels:
        assert [fortran[k].hd95_mm, fortran[k].nsd] == pytest.approx(
            [got[k].hd95_mm, got[k].nsd], nan_ok=True
        )
    masks_p = np.stack([pred == k for k in labels])
    masks_r = np.stack([ref == k for k in labels])
    assert surface_metrics_masks(masks_p, masks_r, spacing, labels, tolerance_mm=1.5) == got


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecation notices
def test_matches_monai() -> None:
    torch = pytest.importorskip("torch")
    monai_metrics = pytest.importorskip("monai.metrics")
    rng = np.random.default_rng(7)
    shape, spacing = (20, 17, 12), (0.7, 1.1, 3.0)
    ref = _blobs(rng, shape, 4)
    pred = _perturb(rng, ref)
    labels = [1, 2, 3, 4]
    got = surface_metrics_labels(pred, ref, labels, spacing, tolerance_mm=2.0)

    def onehot(lab: np.ndarray):
        return torch.from_numpy(np.stack([lab == k for k in labels])[None].astype(np.float32))

    hd = monai_metrics.compute_hausdorff_distance(
        onehot(pred), onehot(ref), include_background=True, percentile=95, spacing=spacing
    )[0].numpy()
    nsd = monai_metrics.compute_surface_dice(
        onehot(pred), onehot(ref), [2.0] * len(labels), include_background=True, spacing=spacing
    )[0].numpy()
    np.testing.assert_allclose([got[k].hd95_mm for k in labels], hd, rtol=1e-5)
    np.testing.assert_allclose([got[k].nsd for k in labels], nsd, rtol=1e-5)


# --------------------------------------------------------------------------- errors


def test_errors() -> None:
    pred, ref = _cube_pair()
    with pytest.raises(ShapeError, match="same voxel grid"):
        surface_metrics(pred[:-1], ref, SPACING)
    with pytest.raises(DataError, match="3 finite positive numbers"):
        surface_metrics(pred, ref, (1.0, 1.0))
    with pytest.raises(DataError, match="tolerance_mm"):
        surface_metrics(pred, ref, SPACING, tolerance_mm=-1)
    with pytest.raises(DataError, match="binary"):
        surface_metrics(pred * 3, ref, SPACING)
    with pytest.raises(DataError, match="integer label map"):
        surface_metrics_labels(pred.astype(float), ref.astype(np.uint8), [1], SPACING)
