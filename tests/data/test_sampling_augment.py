"""Patch sampling statistics and augmentation alignment on hand-made volumes."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medseg.data.augment import Augmenter
from medseg.data.sampling import class_locations, crop_padded, sample_patch


def _volume() -> tuple[np.ndarray, np.ndarray]:
    lab = np.zeros((1, 64, 64, 32), np.uint8)
    lab[0, 10:14, 10:14, 10:14] = 1  # tiny organ: 64 voxels of 131072
    lab[0, 40:60, 30:60, 5:25] = 2
    img = lab.astype(np.float32) * 100.0
    return img, lab


def test_class_locations_cover_present_classes_only() -> None:
    _, lab = _volume()
    locs = class_locations(lab, "softmax")
    assert sorted(locs) == [1, 2]
    assert len(locs[1]) == 64 and np.all(lab[0][tuple(locs[1].T)] == 1)
    masks = np.stack([lab[0] == 1, lab[0] == 2, np.zeros_like(lab[0])]).astype(np.uint8)
    assert sorted(class_locations(masks, "sigmoid")) == [0, 1]


def test_foreground_share_and_class_balance() -> None:
    img, lab = _volume()
    locs = class_locations(lab, "softmax")
    rng = np.random.default_rng(0)
    n, fraction = 600, 1 / 3
    forced, tiny_seen = 0, 0
    for _ in range(n):
        force = bool(rng.random() < fraction)
        p = sample_patch(img, lab, None, locs, (16, 16, 8), rng, force_foreground=force)
        assert p.image.shape == (1, 16, 16, 8) and p.label.shape == (1, 16, 16, 8)
        if force:
            forced += 1
            # the patch centre is a voxel of the chosen class
            assert p.label[0, 8, 8, 4] == p.forced_class
        tiny_seen += bool((p.label == 1).any())
    assert abs(forced / n - fraction) < 0.06
    # the tiny organ (0.05 % of voxels) is in about half of the forced patches (one of two classes)
    assert tiny_seen / n > 0.12


def test_crop_padded_fills_outside() -> None:
    a = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    out = crop_padded(a, (-1, 2), (3, 3), -5.0)
    expected = np.array([[-5, -5, -5], [2, 3, -5], [6, 7, -5]], dtype=np.float32)
    np.testing.assert_array_equal(out[0], expected)


def test_augmentation_keeps_image_label_and_weights_aligned() -> None:
    """The image encodes its label (100 x label); after rotation/scaling/elastic deformation the
    transformed label still equals the label read off the transformed image."""
    img, lab = _volume()
    weights = 1.0 + lab.astype(np.float32)
    aug = Augmenter(
        3, (48, 48, 24), "softmax", p_affine=1.0, p_elastic=1.0, p_noise=0, p_gamma=0, p_contrast=0
    )
    for seed in range(3):
        out = aug({"image": img, "label": lab, "weights": weights}, seed=seed)
        assert out["image"].shape == (1, 48, 48, 24) and out["label"].dtype == np.uint8
        label = out["label"][0]
        band = ndimage.maximum_filter(label, size=3) != ndimage.minimum_filter(label, size=3)
        band[0], band[-1], band[:, 0], band[:, -1], band[..., 0], band[..., -1] = (True,) * 6  # edges
        for decoded in (np.rint(out["image"][0] / 100.0), np.rint(out["weights"][0] - 1.0)):
            mismatch = decoded != label
            assert mismatch.mean() < 0.05
            # linear vs nearest interpolation differ only on the one-voxel band around edges ...
            assert not (mismatch & ~band).any()
            # ... and the objects have the same centre (a misaligned transform would shift it)
            # (class 2 only: edges of class 2 blend to ~100 and would pollute class 1)
            c_lab = np.argwhere(label == 2).mean(axis=0)
            c_img = np.argwhere(decoded == 2).mean(axis=0)
            assert np.abs(c_lab - c_img).max() < 0.3, (c_lab, c_img)
        # same seed, same patch
        again = aug({"image": img, "label": lab, "weights": weights}, seed=seed)
        np.testing.assert_array_equal(again["label"], out["label"])


def test_mirror_swaps_left_right_labels() -> None:
    lab = np.zeros((1, 8, 4, 4), np.uint8)
    lab[0, :2] = 1  # "left" structure near x = 0
    lab[0, 6:] = 2  # "right" structure
    img = lab.astype(np.float32)
    aug = Augmenter(
        3,
        (8, 4, 4),
        "softmax",
        [(1, 2)],
        p_affine=0,
        p_elastic=0,
        p_mirror=1.0,
        p_noise=0,
        p_gamma=0,
        p_contrast=0,
    )
    out = aug({"image": img, "label": lab, "weights": None}, seed=0)
    np.testing.assert_array_equal(out["image"][0], img[0, ::-1])  # flipped
    # label 1 is still at x < 2: flipped (moves to x >= 6) and swapped (becomes 2 ... back at x < 2 as 1)
    assert np.all(out["label"][0, :2] == 1) and np.all(out["label"][0, 6:] == 2)
    masks = np.stack([lab[0] == 1, lab[0] == 2]).astype(np.uint8)
    aug2 = Augmenter(
        3,
        (8, 4, 4),
        "sigmoid",
        [(0, 1)],
        p_affine=0,
        p_elastic=0,
        p_mirror=1.0,
        p_noise=0,
        p_gamma=0,
        p_contrast=0,
    )
    out2 = aug2({"image": img, "label": masks, "weights": None}, seed=0)
    np.testing.assert_array_equal(out2["label"], masks)  # flip + channel swap = same masks here
