"""One preprocessing definition: the training cache (eager) and the prediction engine (lazy, window by
window, from memory or streamed from the file) give identical arrays and one geometry record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from factories import build_plan

from medseg.data.plan import ChannelNorm
from medseg.data.preprocess import Preprocessing, preprocess_case, preprocess_volume
from medseg.errors import DataError
from medseg.inference.tiling import window_slices
from medseg.io import save_volume
from medseg.io.nifti import NiftiSlabs
from medseg.types import Volume

AFFINES = {
    "RAS": np.array([[0.8, 0, 0, -10], [0, 0.8, 0, 20], [0, 0, 2.5, 5], [0, 0, 0, 1]]),
    "LPS": np.array([[-0.75, 0, 0, 10], [0, -0.75, 0, 20], [0, 0, 3.0, -5], [0, 0, 0, 1]]),
    "oblique": np.array([[0.7, -0.35, 0, 1], [0.35, 0.7, 0, 2], [0, 0, 2.5, 3], [0, 0, 0, 1]]),
    # stored sagittally: the first stored axis runs head-to-feet
    "sagittal": np.array([[0, 0, -1.1, 4], [0, 0.9, 0, -3], [-2.0, 0, 0, 8], [0, 0, 0, 1]]),
}


def _scan(affine: np.ndarray, shape=(31, 27, 13), seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    arr = np.full((1, *shape), -1000, np.int16)
    arr[0, 4:27, 3:22, 2:11] = rng.integers(-150, 300, size=(23, 19, 9))
    return Volume(arr, affine)


def _lazily(prep: Preprocessing, patch) -> np.ndarray:
    """The engine's view: rows requested window by window in its order, assembled and un-padded."""
    lay, lazy = prep.layout, prep.lazy()
    out = np.full((prep.source.channels, *lay.padded_shape), np.nan, np.float32)
    for w in window_slices(lay.padded_shape, patch, 0.5):
        rows = lazy.rows(w[-1].start, w[-1].stop)  # (pz, C, *inplane_padded)
        out[(slice(None), *w)] = np.moveaxis(rows[(slice(None), slice(None), *w[:-1])], 0, -1)
    inner = tuple(slice(a, a + n) for (a, _), n in zip(lay.pad, lay.resampled_shape, strict=True))
    return out[(slice(None), *inner)]


@pytest.mark.parametrize("name", list(AFFINES))
@pytest.mark.parametrize("norm", ["ct", "zscore"])
def test_cache_and_engine_give_identical_arrays(name: str, norm: str, tmp_path: Path) -> None:
    norms = (ChannelNorm("ct", -200, 250, 20, 80),) if norm == "ct" else (ChannelNorm("zscore"),)
    plan = build_plan(target_spacing_mm=(1.1, 1.3, 1.9), patch_size=(16, 16, 8), normalization=norms)
    vol = _scan(AFFINES[name])
    eager, props = preprocess_volume(vol, plan)
    prep = Preprocessing.of(vol, plan)
    assert prep.layout.crop != tuple(slice(0, n) for n in prep.layout.canonical_shape)  # cropped to the body
    np.testing.assert_array_equal(_lazily(prep, plan.patch_size), eager)
    # streamed from the file, as `medseg predict` reads a NIfTI
    path = save_volume(vol, tmp_path / "scan.nii.gz")
    with NiftiSlabs(path) as stream:
        np.testing.assert_array_equal(_lazily(Preprocessing.of(stream, plan), plan.patch_size), eager)
    # one geometry record: the cache's props are the engine's layout's
    label = vol.with_array((vol.array > 0).astype(np.uint8))
    case = preprocess_case(vol, label, plan)
    np.testing.assert_array_equal(case.image, eager)
    assert case.props == props
    assert {k: v for k, v in case.props.items() if k != "spacing_mm"} == prep.layout.props()
    assert case.label is not None and case.label.shape[1:] == eager.shape[1:]


def test_zscore_uses_the_cropped_scans_statistics() -> None:
    plan = build_plan(normalization=(ChannelNorm("zscore"),), target_spacing_mm=(0.8, 0.8, 2.5))
    vol = _scan(AFFINES["RAS"])
    arr, _ = preprocess_volume(vol, plan)
    canonical_crop = vol.array[(slice(None), *Preprocessing.of(vol, plan).layout.crop)].astype(np.float64)
    expected = (canonical_crop - canonical_crop.mean()) / canonical_crop.std()
    np.testing.assert_allclose(arr, expected, rtol=1e-5, atol=1e-5)  # same grid: no resampling


def test_one_input_check_for_both_paths() -> None:
    plan = build_plan()
    two_d = Volume(np.zeros((1, 20, 20), np.int16), np.eye(4))
    with pytest.raises(DataError, match="a 2D image .* but the model is 3D"):
        preprocess_volume(two_d, plan)
    with pytest.raises(DataError, match="2 channel"):
        Preprocessing.of(Volume(np.zeros((2, 20, 20, 8), np.int16), np.eye(4)), plan)
