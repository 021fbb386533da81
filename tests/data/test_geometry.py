"""Reorientation is exactly invertible; resampling keeps the field of view and maps labels per class."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from medseg.data.geometry import (
    bbox_of,
    crop_affine,
    invert_ornt,
    reorient,
    resample_image,
    resample_labels,
    resample_masks,
    resampled_affine,
    resampled_shape,
    to_canonical,
)
from medseg.types import Volume


def _axis_affines():
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product([1, -1], repeat=3):
            aff = np.zeros((4, 4))
            aff[3, 3] = 1
            for i, (p, s) in enumerate(zip(perm, signs, strict=True)):
                aff[p, i] = s * (i + 1) * 0.5
            aff[:3, 3] = [10, -20, 30]
            yield aff


def test_canonical_reorientation_is_exactly_invertible() -> None:
    rng = np.random.default_rng(0)
    for aff in _axis_affines():
        arr = rng.random((2, 5, 4, 3))
        vol = Volume(arr, aff)
        can, ornt = to_canonical(vol)
        assert can.orientation == "RAS"
        # the same voxel value sits at the same world position
        ijk = np.array([[4, 1, 2]])
        world = vol.voxel_to_world(ijk)[0]
        ijk2 = np.rint(np.linalg.inv(can.affine) @ np.r_[world, 1])[:3].astype(int)
        assert can.array[(1, *ijk2)] == arr[(1, 4, 1, 2)]
        back, back_aff = reorient(can.array, can.affine, invert_ornt(ornt))
        np.testing.assert_array_equal(back, arr)
        np.testing.assert_allclose(back_aff, aff)


def test_resampled_grid_covers_the_same_field_of_view() -> None:
    aff = np.diag([0.8, 0.8, 4.0, 1.0])
    aff[:3, 3] = [-50, 20, 7]
    shape = (100, 90, 20)
    new_shape = resampled_shape(shape, (0.8, 0.8, 4.0), (1.6, 1.6, 2.0))
    assert new_shape == (50, 45, 40)
    new_aff = resampled_affine(aff, shape, new_shape)
    np.testing.assert_allclose(np.linalg.norm(new_aff[:3, :3], axis=0), [1.6, 1.6, 2.0])
    # outer voxel edges coincide: old edge at index -0.5 == new edge at index -0.5
    for a, s in ((aff, shape), (new_aff, new_shape)):
        lo = a @ np.array([-0.5, -0.5, -0.5, 1])
        hi = a @ np.array([s[0] - 0.5, s[1] - 0.5, s[2] - 0.5, 1])
        np.testing.assert_allclose(lo[:3], [-50.4, 19.6, 5.0])
        np.testing.assert_allclose(hi[:3], [-50.4 + 80, 19.6 + 72, 85.0])


def test_linear_ramp_is_resampled_exactly() -> None:
    """A linear function of the world position stays the same function after resampling."""
    shape = (8, 6, 4)
    x = np.arange(shape[0], dtype=np.float32)[:, None, None] * np.ones(shape, np.float32)
    out = resample_image(x[None], (16, 6, 4))
    # new voxel i sits at old index (i + 0.5) / 2 - 0.5; interior voxels reproduce it exactly
    expected = (np.arange(16) + 0.5) / 2 - 0.5
    np.testing.assert_allclose(out[0, 1:-1, 0, 0], expected[1:-1], atol=1e-6)


def test_label_resampling_per_class_keeps_volumes() -> None:
    lab = np.zeros((1, 40, 40, 10), np.uint8)
    lab[0, 4:24, 4:24, 2:8] = 2  # 20x20x6 voxels
    lab[0, 28:36, 28:36, 2:8] = 7  # 8x8x6
    out = resample_labels(lab, (20, 20, 20))
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 2, 7}
    # each new voxel is 2 x 2 x 0.5 old voxels
    assert (out == 2).sum() * 2 == 20 * 20 * 6
    assert (out == 7).sum() * 2 == 8 * 8 * 6


def test_mask_resampling_thresholds_half() -> None:
    m = np.zeros((2, 8, 8), np.uint8)
    m[0, 2:6, 2:6] = 1
    m[1, :, :4] = 1
    out = resample_masks(m, (16, 16))
    assert out.shape == (2, 16, 16) and out.dtype == np.uint8
    assert out[0].sum() == 64 and out[1].sum() == 128


@pytest.mark.parametrize("margin", [0, 2])
def test_bbox_and_crop_affine(margin: int) -> None:
    m = np.zeros((10, 12, 8), bool)
    m[3:5, 4:9, 2:3] = True
    box = bbox_of(m, margin=margin)
    assert box == (
        slice(3 - margin, 5 + margin),
        slice(4 - margin, 9 + margin),
        slice(2 - margin, 3 + margin),
    )
    aff = np.diag([2.0, 3.0, 4.0, 1.0])
    np.testing.assert_allclose(
        crop_affine(aff, box)[:3, 3], [2 * (3 - margin), 3 * (4 - margin), 4 * (2 - margin)]
    )
    assert bbox_of(np.zeros((3, 3), bool)) == (slice(0, 3), slice(0, 3))
