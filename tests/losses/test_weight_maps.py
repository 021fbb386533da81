"""U-Net border weight maps: analytic cases, 2D/3D consistency, anisotropy, bbox vs naive, errors.

Distance convention (scipy's EDT): from a background voxel centre to the nearest object voxel centre.
With ``g`` background voxels between two objects along one axis (g odd), the middle gap voxel is
``(g + 1) / 2`` voxels from each object, so ``d1 + d2 = (g + 1) * spacing``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from medseg.errors import ConfigError, DataError
from medseg.losses.weight_maps import unet_border_weight_map, unet_border_weight_map_multichannel


def _term(distance_sum: float, w0: float = 10.0, sigma: float = 5.0) -> float:
    return w0 * math.exp(-(distance_sum**2) / (2 * sigma**2))


def _reference(labels, spacing, w0=10.0, sigma=5.0, max_w=10.0, structure_rank=None):
    """Brute force: every object's EDT over the whole image, sorted; median-frequency w_c by hand."""
    ndim = labels.ndim
    structure = ndi.generate_binary_structure(ndim, structure_rank or ndim)
    dists = []
    for value in np.unique(labels[labels > 0]):
        comp, n = ndi.label(labels == value, structure=structure)
        for i in range(1, n + 1):
            dists.append(ndi.distance_transform_edt(comp != i, sampling=spacing))
    values, counts = np.unique(labels, return_counts=True)
    median = np.median(counts)
    w = np.zeros(labels.shape)
    for v, c in zip(values, counts, strict=True):
        w[labels == v] = np.clip(median / c, 1 / max_w, max_w)
    if len(dists) >= 2:
        d = np.sort(np.stack(dists), axis=0)
        w += w0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2)) * (labels == 0)
    return w, len(dists)


def _random_labels(rng, shape, n_blobs, n_classes=4):
    """Random axis-aligned ellipsoids with random labels (later ones overwrite: some touch)."""
    labels = np.zeros(shape, dtype=np.int16)
    grid = np.indices(shape)
    for _ in range(n_blobs):
        centre = [rng.uniform(0, n) for n in shape]
        radii = [rng.uniform(1.5, max(2.0, n / 6)) for n in shape]
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1
        labels[inside] = rng.integers(1, n_classes + 1)
    return labels


def _two_boxes(shape, axis, gap, first=slice(3, 7)):
    """Two 4-voxel boxes along `axis`, `gap` background voxels apart; returns (labels, gap middle)."""
    labels = np.zeros(shape, dtype=np.uint8)
    a = [slice(3, n - 3) for n in shape]
    b = list(a)
    a[axis] = first
    b[axis] = slice(first.stop + gap, first.stop + gap + 4)
    labels[tuple(a)] = 1
    labels[tuple(b)] = 2
    mid = [n // 2 for n in shape]
    mid[axis] = first.stop + gap // 2
    return labels, tuple(mid)


# --------------------------------------------------------------------------- analytic cases


@pytest.mark.parametrize("gap", [1, 3, 5])
def test_two_squares_2d_known_gap(gap: int) -> None:
    labels, mid = _two_boxes((20, 20), axis=1, gap=gap)
    w = unet_border_weight_map(labels, class_balance=False)
    assert w.dtype == np.float32 and w.shape == labels.shape
    assert w[mid] == pytest.approx(1.0 + _term(gap + 1.0), rel=1e-6)  # d1 = d2 = (gap + 1) / 2
    assert np.all(w[labels > 0] == 1.0)  # separation term on background only


def test_two_cubes_3d_known_gap() -> None:
    labels, mid = _two_boxes((14, 14, 20), axis=2, gap=5)
    w = unet_border_weight_map(labels, class_balance=False, w0=7.0, sigma_mm=4.0)
    assert w[mid] == pytest.approx(1.0 + _term(6.0, w0=7.0, sigma=4.0), rel=1e-6)


def test_two_squares_same_label_are_two_objects() -> None:
    labels, mid = _two_boxes((20, 20), axis=0, gap=3)
    labels[labels > 0] = 1
    w = unet_border_weight_map(labels, class_balance=False)
    assert w[mid] == pytest.approx(1.0 + _term(4.0), rel=1e-6)


def test_one_object_has_no_separation_term() -> None:
    labels = np.zeros((12, 10, 6), dtype=np.uint8)
    labels[2:6, 3:7, 1:4] = 3
    w = unet_border_weight_map(labels)
    assert np.array_equal(w, unet_border_weight_map(labels, w0=0.0))
    assert np.all(unet_border_weight_map(labels, class_balance=False) == 1.0)


@pytest.mark.parametrize("shape", [(9, 7), (5, 6, 4)])
def test_empty_label_map_gives_unit_weights(shape: tuple[int, ...]) -> None:
    labels = np.zeros(shape, dtype=np.int32)
    for balance in (True, False):
        w = unet_border_weight_map(labels, class_balance=balance)
        assert w.dtype == np.float32 and np.all(w == 1.0)


def test_zero_size_label_map() -> None:
    assert unet_border_weight_map(np.zeros((0, 4), dtype=np.uint8)).shape == (0, 4)


def test_connectivity_full_vs_face() -> None:
    labels = np.zeros((10, 10), dtype=np.uint8)
    labels[2:5, 2:5] = 1
    labels[5:8, 5:8] = 1  # touches the first square at a corner only
    full = unet_border_weight_map(labels, class_balance=False)
    face = unet_border_weight_map(labels, class_balance=False, connectivity="face")
    assert np.all(full == 1.0)  # one object
    # (4, 5) is background, 1 voxel from both squares (face-connected: two objects)
    assert face[4, 5] == pytest.approx(1.0 + _term(2.0), rel=1e-6)


# --------------------------------------------------------------------------- spacing and dimensions


def test_anisotropic_spacing_scales_distances() -> None:
    spacing = (2.0, 1.0)
    along_0, mid_0 = _two_boxes((24, 24), axis=0, gap=5)
    along_1, mid_1 = _two_boxes((24, 24), axis=1, gap=5)
    w0 = unet_border_weight_map(along_0, class_balance=False, spacing_mm=spacing)
    w1 = unet_border_weight_map(along_1, class_balance=False, spacing_mm=spacing)
    assert w0[mid_0] == pytest.approx(1.0 + _term(12.0), rel=1e-6)  # 3 voxels x 2 mm on each side
    assert w1[mid_1] == pytest.approx(1.0 + _term(6.0), rel=1e-6)  # 3 voxels x 1 mm on each side


def test_anisotropic_spacing_3d_along_z() -> None:
    labels, mid = _two_boxes((12, 12, 18), axis=2, gap=3)
    w = unet_border_weight_map(labels, class_balance=False, spacing_mm=(0.8, 0.8, 2.5))
    assert w[mid] == pytest.approx(1.0 + _term(2 * 2 * 2.5), rel=1e-6)


def test_3d_stack_of_2d_map_matches_2d() -> None:
    rng = np.random.default_rng(3)
    labels2 = _random_labels(rng, (30, 26), n_blobs=7)
    w2 = unet_border_weight_map(labels2, spacing_mm=(0.7, 1.2), sigma_mm=3.0)
    single = unet_border_weight_map(labels2[:, :, None], spacing_mm=(0.7, 1.2, 5.0), sigma_mm=3.0)
    np.testing.assert_allclose(single[:, :, 0], w2, atol=1e-5)
    # prisms along z: every slice sees the same in-plane distances, whatever the z spacing
    stack = np.repeat(labels2[:, :, None], 5, axis=2)
    w3 = unet_border_weight_map(stack, spacing_mm=(0.7, 1.2, 3.0), sigma_mm=3.0)
    for z in range(5):
        np.testing.assert_allclose(w3[:, :, z], w2, atol=1e-5)


def test_axis_order_and_memory_layout() -> None:
    """Transposing the map (and its spacing) transposes the weights; Fortran order (nibabel) works."""
    rng = np.random.default_rng(11)
    labels = _random_labels(rng, (30, 24, 12), n_blobs=8)
    spacing = (0.8, 1.1, 2.5)
    w = unet_border_weight_map(labels, spacing_mm=spacing, sigma_mm=2.0)
    wt = unet_border_weight_map(labels.transpose(2, 0, 1), spacing_mm=spacing[2:] + spacing[:2], sigma_mm=2.0)
    np.testing.assert_allclose(wt, w.transpose(2, 0, 1), atol=1e-5)
    np.testing.assert_array_equal(
        unet_border_weight_map(np.asfortranarray(labels), spacing_mm=spacing, sigma_mm=2.0), w
    )


# --------------------------------------------------------------------------- bbox vs naive


@pytest.mark.parametrize(
    ("shape", "spacing", "seed"),
    [((64, 52), (0.7, 1.3), 0), ((64, 52), (1.0, 1.0), 1), ((40, 36, 16), (0.8, 1.1, 2.5), 2)],
)
def test_bbox_matches_naive_and_brute_force(shape, spacing, seed) -> None:
    rng = np.random.default_rng(seed)
    labels = _random_labels(rng, shape, n_blobs=12)
    expected, n_objects = _reference(labels, spacing, sigma=2.0)
    assert n_objects >= 6
    naive = unet_border_weight_map(labels, spacing_mm=spacing, sigma_mm=2.0, method="naive")
    bbox = unet_border_weight_map(labels, spacing_mm=spacing, sigma_mm=2.0, method="bbox")
    np.testing.assert_allclose(naive, expected, atol=1e-5)
    assert np.abs(bbox - naive).max() <= 1e-4
    assert np.abs(bbox - naive).max() <= 10.0 * math.exp(-(5.0**2) / 2) + 1e-5  # documented bound


def test_bbox_error_bound_holds_for_small_margin() -> None:
    rng = np.random.default_rng(5)
    labels = _random_labels(rng, (80, 70), n_blobs=15)
    naive = unet_border_weight_map(labels, sigma_mm=3.0, method="naive")
    bbox = unet_border_weight_map(labels, sigma_mm=3.0, margin_sigmas=2.0)
    diff = naive - bbox
    assert diff.min() >= -1e-5  # bbox distances are exact or over-estimates: never a larger weight
    assert diff.max() <= 10.0 * math.exp(-(2.0**2) / 2) + 1e-5


def test_isolated_objects_are_skipped_exactly() -> None:
    labels = np.zeros((120, 40), dtype=np.uint8)
    labels[5:10, 5:10] = 1
    labels[5:10, 13:18] = 2  # close pair
    labels[100:110, 20:30] = 1  # far from both (> 5 sigma)
    naive = unet_border_weight_map(labels, sigma_mm=2.0, method="naive")
    bbox = unet_border_weight_map(labels, sigma_mm=2.0)
    assert np.abs(bbox - naive).max() <= 1e-4


# --------------------------------------------------------------------------- class balance


def test_class_balance_median_frequency() -> None:
    labels = np.zeros((16, 16), dtype=np.uint8)
    labels[1:5, 1:5] = 1  # 16 voxels
    labels[8:12, 8:12] = 2  # 16 voxels
    labels[13:15, 1:3] = 3  # 4 voxels; background 220; median count = 16
    w = unet_border_weight_map(labels, w0=0.0)
    assert np.all(w[labels == 1] == 1.0) and np.all(w[labels == 2] == 1.0)
    assert np.all(w[labels == 3] == pytest.approx(4.0))  # rarer class gets a larger weight
    assert np.all(w[labels == 0] == pytest.approx(0.1))  # 16 / 220 clipped to 1 / max_class_weight
    clipped = unet_border_weight_map(labels, w0=0.0, max_class_weight=2.0)
    assert np.all(clipped[labels == 3] == pytest.approx(2.0))
    assert np.all(clipped[labels == 0] == pytest.approx(0.5))


def test_class_balance_with_large_label_values() -> None:
    labels = np.zeros((10, 10), dtype=np.int64)
    labels[1:3, 1:3] = 2**30  # beyond the lookup-table size
    labels[6:9, 6:9] = 7
    expected, _ = _reference(labels, (1.0, 1.0))
    np.testing.assert_allclose(unet_border_weight_map(labels), expected, atol=1e-5)


def test_bool_labels_are_accepted() -> None:
    labels, mid = _two_boxes((20, 20), axis=1, gap=3)
    w = unet_border_weight_map(labels > 0, class_balance=False)
    assert w[mid] == pytest.approx(1.0 + _term(4.0), rel=1e-6)


# --------------------------------------------------------------------------- multichannel


def test_multichannel_one_hot_equals_exclusive() -> None:
    rng = np.random.default_rng(7)
    labels = _random_labels(rng, (30, 28, 10), n_blobs=10)
    spacing = (0.9, 0.9, 2.0)
    masks = np.stack([labels == k for k in range(1, 6)])  # includes an absent class
    exclusive = unet_border_weight_map(labels, spacing_mm=spacing, sigma_mm=2.0)
    multi = unet_border_weight_map_multichannel(masks, spacing_mm=spacing, sigma_mm=2.0)
    np.testing.assert_allclose(multi, exclusive, atol=1e-6)


def test_multichannel_overlapping_masks() -> None:
    masks = np.zeros((2, 12, 20), dtype=bool)
    masks[0, 2:8, 2:6] = True  # A
    masks[0, 2:8, 11:15] = True  # C: 5 background columns (6..10) between A and C
    masks[1, 0:4, 0:4] = True  # B overlaps A at rows 2-3, columns 2-3
    w = unet_border_weight_map_multichannel(masks, class_balance=False)
    # (4, 8): 3 voxels from A and from C; B's nearest voxel (3, 3) is sqrt(26) away
    assert w[4, 8] == pytest.approx(1.0 + _term(6.0), rel=1e-6)
    assert np.all(w[masks.any(axis=0)] == 1.0)

    balanced = unet_border_weight_map_multichannel(masks, w0=0.0)
    n_bg = np.count_nonzero(~masks.any(axis=0))  # 240 - 48 - 16 + 4 = 180
    counts = np.array([n_bg, 48, 16])  # background, channel 0, channel 1
    expected = np.clip(np.median(counts) / counts, 0.1, 10.0)
    assert balanced[0, 0] == pytest.approx(expected[2])  # channel 1 only
    assert balanced[5, 3] == pytest.approx(expected[1])  # channel 0 only
    assert balanced[2, 2] == pytest.approx(expected.max())  # overlap: the larger weight
    assert balanced[10, 18] == pytest.approx(expected[0])


def test_multichannel_errors() -> None:
    with pytest.raises(DataError, match="must have shape"):
        unet_border_weight_map_multichannel(np.zeros((8, 8), dtype=bool))
    with pytest.raises(DataError, match="masks > 0.5"):
        unet_border_weight_map_multichannel(np.zeros((2, 8, 8), dtype=np.float32))
    with pytest.raises(DataError, match="values in"):
        unet_border_weight_map_multichannel(np.full((2, 8, 8), 2, dtype=np.uint8))
    with pytest.raises(DataError, match="3 values"):
        unet_border_weight_map_multichannel(np.zeros((2, 8, 8), dtype=bool), spacing_mm=(1, 1, 1))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("labels", "kwargs", "match"),
    [
        (np.zeros(5, dtype=np.uint8), {}, "got 1 dimensions"),
        (np.zeros((1, 4, 4, 4), dtype=np.uint8), {}, "Drop the channel axis"),
        (np.zeros((4, 4), dtype=np.float32), {}, "integer dtype, got float32"),
        (np.full((4, 4), -1, dtype=np.int16), {}, "negative values"),
        (np.zeros((4, 4), dtype=np.uint8), {"spacing_mm": (1.0, 1.0, 2.0)}, "3 values"),
        (np.zeros((4, 4), dtype=np.uint8), {"spacing_mm": (1.0, 0.0)}, "finite and positive"),
    ],
)
def test_data_errors(labels, kwargs, match) -> None:
    with pytest.raises(DataError, match=match):
        unet_border_weight_map(labels, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sigma_mm": 0.0}, "sigma_mm must be"),
        ({"w0": -1.0}, "w0 must be"),
        ({"max_class_weight": 0.5}, "max_class_weight must be"),
        ({"margin_sigmas": 0.0}, "margin_sigmas must be"),
        ({"method": "fast"}, "one of 'bbox', 'naive'"),
        ({"connectivity": "edge"}, "one of 'full', 'face'"),
    ],
)
def test_option_errors(kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        unet_border_weight_map(np.zeros((4, 4), dtype=np.uint8), **kwargs)
