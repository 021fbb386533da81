"""Post-processing on hand-made label maps: largest component, small-blob removal, hole filling."""

from __future__ import annotations

import numpy as np

from medseg.inference.postprocess import PostProcessing, postprocess_label_map, postprocess_masks


def _labels() -> np.ndarray:
    lab = np.zeros((1, 20, 20, 10), np.uint8)
    lab[0, 2:10, 2:10, 2:8] = 1  # liver: 384 voxels
    lab[0, 15:17, 15:17, 2:4] = 1  # a stray liver blob: 8 voxels
    lab[0, 12:18, 2:8, 2:8] = 2  # spleen with a one-voxel hole
    lab[0, 14, 4, 4] = 0
    lab[0, 0, 19, 0] = 2  # a one-voxel spleen speck
    return lab


def test_largest_component_for_single_structures_only() -> None:
    pp = PostProcessing(single=frozenset({"liver"}))
    out = postprocess_label_map(_labels(), [1, 2], ["liver", "spleen"], (1.0, 1.0, 1.0), pp)
    assert (out == 1).sum() == 384  # stray blob removed
    assert out[0, 15, 15, 2] == 0
    assert out[0, 0, 19, 0] == 2  # spleen is not declared single: its speck stays


def test_small_components_removed_by_volume_in_mm3() -> None:
    # spacing 2 x 2 x 2 mm = 8 mm3 per voxel: the 8-voxel blob is 64 mm3, the speck 8 mm3
    pp = PostProcessing(min_component_mm3=10.0)
    out = postprocess_label_map(_labels(), [1, 2], ["liver", "spleen"], (2.0, 2.0, 2.0), pp)
    assert out[0, 0, 19, 0] == 0 and out[0, 15, 15, 2] == 1
    pp = PostProcessing(min_component_mm3=100.0)
    out = postprocess_label_map(_labels(), [1, 2], ["liver", "spleen"], (2.0, 2.0, 2.0), pp)
    assert out[0, 15, 15, 2] == 0 and (out == 1).sum() == 384


def test_fill_holes_claims_only_background() -> None:
    lab = _labels()
    lab[0, 14, 5, 4] = 1  # a liver voxel inside the spleen: not background, must stay liver
    out = postprocess_label_map(
        lab, [1, 2], ["liver", "spleen"], (1.0, 1.0, 1.0), PostProcessing(fill_holes=True)
    )
    assert out[0, 14, 4, 4] == 2  # hole filled
    assert out[0, 14, 5, 4] == 1


def test_nothing_to_do_returns_equal_copy() -> None:
    lab = _labels()
    out = postprocess_label_map(lab, [1, 2], ["liver", "spleen"], (1.0, 1.0, 1.0), PostProcessing())
    np.testing.assert_array_equal(out, lab)
    assert out is not lab


def test_masks_keep_overlaps() -> None:
    m = np.zeros((2, 12, 12), np.uint8)
    m[0, 1:8, 1:8] = 1
    m[0, 10, 10] = 1  # stray
    m[1, 5:10, 5:10] = 1  # overlaps channel 0
    out = postprocess_masks(m, ["lung", "clavicle"], (1.0, 1.0), PostProcessing(single=frozenset({"lung"})))
    assert out[0, 10, 10] == 0 and out[0].sum() == 49
    assert (out[0] & out[1]).sum() == 9  # the overlap survives
