"""Overlap counts, Dice, volumes in mL and border contact: known answers, naive references, errors.

Known answers: a 4x4x4 cube at 1 x 1 x 2.5 mm is 64 * 2.5 / 1000 = 0.16 mL; shifting it
one voxel leaves 48 shared voxels, so Dice = 2 * 48 / (64 + 64) = 0.75.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.errors import DataError, ShapeError
from medseg.metrics import (
    EMPTY_POLICY,
    Counts,
    count_overlaps,
    count_overlaps_masks,
    dice,
    label_volumes,
    touches_border,
    touches_border_labels,
    volume_ml,
)
from medseg.metrics import overlap as overlap_module
from medseg.types import Volume

SPACING = (1.0, 1.0, 2.5)


@pytest.fixture
def two_organ_phantom() -> Volume:
    """12x10x8 labels: a 4x4x4 cube (label 1) and a 2x2x2 cube (label 2); spacing 1 x 1 x 2.5 mm."""
    a = np.zeros((1, 12, 10, 8), dtype=np.uint8)
    a[0, 2:6, 2:6, 2:6] = 1
    a[0, 8:10, 6:8, 5:7] = 2
    return Volume(a, np.diag([*SPACING, 1.0]))


def _naive_counts(pred: np.ndarray, ref: np.ndarray, labels) -> dict[int, Counts]:
    out = {}
    for k in labels:
        p, r = pred == k, ref == k
        out[k] = Counts(
            tp=int(np.sum(p & r)), fp=int(np.sum(p & ~r)), fn=int(np.sum(~p & r)), tn=int(np.sum(~p & ~r))
        )
    return out


def _random_pair(rng: np.random.Generator, shape, n_values: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    ref = rng.integers(0, n_values, size=shape).astype(dtype)
    pred = ref.copy()
    flip = rng.random(shape) < 0.3  # 30 % of the voxels get another label
    pred[flip] = rng.integers(0, n_values, size=int(flip.sum())).astype(dtype)
    return pred, ref


# --------------------------------------------------------------------------- known answers


def test_phantom_volumes_are_hand_computed(two_organ_phantom: Volume) -> None:
    vols = label_volumes(two_organ_phantom, [1, 2, 3])
    assert list(vols) == [1, 2, 3]
    assert vols[1] == pytest.approx(0.16, rel=1e-12)  # 64 * 2.5 / 1000
    assert vols[2] == pytest.approx(0.02, rel=1e-12)  # 8 * 2.5 / 1000
    assert vols[3] == 0.0
    assert volume_ml(64, SPACING) == pytest.approx(0.16, rel=1e-12)
    assert volume_ml(0, SPACING) == 0.0


def test_shift_by_one_voxel_gives_dice_075(two_organ_phantom: Volume) -> None:
    ref = two_organ_phantom.array[0]
    pred = np.zeros_like(ref)
    pred[3:7, 2:6, 2:6] = 1  # the cube shifted one voxel along x; label 2 missed
    counts = count_overlaps(pred, ref, [1, 2])
    c1 = counts[1]
    assert (c1.tp, c1.fp, c1.fn, c1.n_pred, c1.n_ref) == (48, 16, 16, 64, 64)
    assert c1.tn == ref.size - 80
    assert dice(c1) == 0.75  # 2 * 48 / 128
    assert counts[2] == Counts(tp=0, fp=0, fn=8, tn=ref.size - 8)
    assert volume_ml(c1.n_pred, two_organ_phantom.spacing_mm) == pytest.approx(0.16)


def test_empty_policy() -> None:
    ref = np.zeros((4, 4, 4), dtype=np.int16)
    ref[1:3, 1:3, 1:3] = 1
    empty = np.zeros_like(ref)
    both_empty = count_overlaps(empty, empty, [1])[1]
    assert both_empty == Counts(0, 0, 0, 64)
    assert math.isnan(dice(both_empty))
    assert dice(count_overlaps(empty, ref, [1])[1]) == 0.0  # missed structure
    assert dice(count_overlaps(ref, empty, [1])[1]) == 0.0  # structure predicted where there is none
    assert dice(count_overlaps(ref, ref, [1])[1]) == 1.0
    assert "NaN" in EMPTY_POLICY and "0" in EMPTY_POLICY
    # NaN stays out of a mean and is counted separately
    scores = [dice(count_overlaps(p, ref if i else empty, [1])[1]) for i, p in enumerate([empty, ref])]
    valid = [s for s in scores if not math.isnan(s)]
    assert (len(valid), len(scores) - len(valid)) == (1, 1)


def test_counts_sum_over_cases_and_as_dict() -> None:
    a, b = Counts(48, 16, 16, 10), Counts(2, 0, 1, 5)
    total = a + b
    assert total == Counts(50, 16, 17, 15)
    assert total.as_dict() == {"tp": 50, "fp": 16, "fn": 17, "tn": 15, "n_pred": 66, "n_ref": 67}
    assert total.n_total == 98
    assert dice(total) == pytest.approx(100 / 133)


# --------------------------------------------------------------------------- one pass equals naive


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.int64])
def test_120_labels_equal_naive_per_label_counts(dtype) -> None:
    rng = np.random.default_rng(0)
    pred, ref = _random_pair(rng, (64, 64, 32), 131, dtype)  # values 0..130: 121..130 are not asked for
    labels = [*range(1, 121), 200]  # 200 is absent from both maps
    counts = count_overlaps(pred, ref, labels)
    assert list(counts) == labels
    assert counts == _naive_counts(pred, ref, labels)
    assert math.isnan(dice(counts[200]))
    assert all(c.n_total == pred.size for c in counts.values())


def test_more_than_255_labels_equal_naive() -> None:
    rng = np.random.default_rng(8)
    pred, ref = _random_pair(rng, (16, 16, 8), 311, np.int16)  # joint index above uint16: intp path
    labels = list(range(1, 301))
    assert count_overlaps(pred, ref, labels) == _naive_counts(pred, ref, labels)


def test_label_order_and_background_label() -> None:
    rng = np.random.default_rng(1)
    pred, ref = _random_pair(rng, (9, 7, 5), 6, np.uint8)
    labels = [5, 0, 3]
    counts = count_overlaps(pred, ref, labels)
    assert list(counts) == labels
    assert counts == _naive_counts(pred, ref, labels)


def test_slabs_large_values_and_many_labels_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small slabs, the sorted-search path for huge label values, and the diagonal path for many labels."""
    rng = np.random.default_rng(2)
    pred, ref = _random_pair(rng, (20, 11, 6), 40, np.int64)
    ref[ref == 7] = 3_000_000_000  # instance-like ids above the lookup-table limit
    pred[pred == 9] = 3_000_000_000
    labels = [*range(1, 30), 3_000_000_000, 2**40]
    expected = _naive_counts(pred, ref, labels)
    assert count_overlaps(pred, ref, labels) == expected
    monkeypatch.setattr(overlap_module, "_CHUNK_VOXELS", 50)  # 1 row of 66 voxels per slab
    monkeypatch.setattr(overlap_module, "_JOINT_MAX_BINS", 16)  # force diagonal + margins
    assert count_overlaps(pred, ref, labels) == expected
    small_pred, small_ref = pred % 40, ref % 40
    assert count_overlaps(small_pred, small_ref, labels) == _naive_counts(small_pred, small_ref, labels)


def test_uint64_and_bool_maps() -> None:
    rng = np.random.default_rng(3)
    pred, ref = _random_pair(rng, (8, 8, 8), 5, np.uint64)
    assert count_overlaps(pred, ref, [1, 2, 4]) == _naive_counts(pred, ref, [1, 2, 4])
    pb, rb = pred > 2, ref > 2
    assert count_overlaps(pb, rb, [1]) == _naive_counts(pb.astype(int), rb.astype(int), [1])


def test_channel_axis_and_2d_maps_are_accepted() -> None:
    rng = np.random.default_rng(4)
    pred, ref = _random_pair(rng, (1, 6, 5, 4), 4, np.uint8)
    assert count_overlaps(pred, ref, [1, 2, 3]) == _naive_counts(pred, ref, [1, 2, 3])
    assert count_overlaps(pred[0, :, :, 0], ref[0, :, :, 0], [1]) == _naive_counts(
        pred[0, :, :, 0], ref[0, :, :, 0], [1]
    )


# --------------------------------------------------------------------------- overlapping masks


def test_masks_with_overlap_hand_computed() -> None:
    ref = np.zeros((2, 4, 4, 2), dtype=bool)
    ref[0, 0:2] = True  # 16 voxels
    ref[1, 1:3] = True  # 16 voxels, 8 of them shared with structure 0
    pred = np.zeros_like(ref)
    pred[0, 0:2] = True  # perfect
    pred[1, 2:4] = True  # shifted by one row: 8 shared, 8 extra, 8 missed
    counts = count_overlaps_masks(pred, ref, labels=[10, 20])
    assert counts[10] == Counts(tp=16, fp=0, fn=0, tn=16)
    assert counts[20] == Counts(tp=8, fp=8, fn=8, tn=8)
    assert dice(counts[10]) == 1.0 and dice(counts[20]) == 0.5
    # both-empty channel, and the default keys 0..S-1 with integer 0/1 masks
    counts = count_overlaps_masks(np.zeros((3, 4, 4), np.uint8), np.zeros((3, 4, 4), np.uint8))
    assert list(counts) == [0, 1, 2] and all(math.isnan(dice(c)) for c in counts.values())


def test_masks_equal_naive_per_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    pred = rng.random((7, 16, 12, 6)) < 0.4
    ref = rng.random((7, 16, 12, 6)) < 0.4
    expected = {s: _naive_counts(pred[s].astype(int), ref[s].astype(int), [1])[1] for s in range(7)}
    assert count_overlaps_masks(pred, ref) == expected
    monkeypatch.setattr(overlap_module, "_CHUNK_VOXELS", 1)  # one channel at a time
    assert count_overlaps_masks(pred.astype(np.uint8), ref) == expected


# --------------------------------------------------------------------------- border contact


def test_touches_border_on_a_cube_cut_by_the_field_of_view() -> None:
    m = np.zeros((10, 12, 8), dtype=bool)
    m[0:3, 4:7, 5:8] = True  # cut at x = 0 and at the last z slice
    assert touches_border(m) == ["x_min", "z_max"]
    inside = np.zeros_like(m)
    inside[2:5, 2:5, 2:5] = True
    assert touches_border(inside) == []
    assert touches_border(np.zeros_like(m)) == []
    assert touches_border(np.ones_like(m, dtype=np.uint8)) == [
        "x_min",
        "x_max",
        "y_min",
        "y_max",
        "z_min",
        "z_max",
    ]
    m2d = np.zeros((6, 5), dtype=np.int32)
    m2d[3:6, 0:2] = 1
    assert touches_border(m2d) == ["x_max", "y_min"]


def test_touches_border_labels_matches_per_label_masks() -> None:
    rng = np.random.default_rng(6)
    lab = np.zeros((20, 18, 10), dtype=np.int16)
    for value in range(1, 30):  # random boxes, some cut by the field of view
        lo = rng.integers(-2, [18, 16, 8])
        hi = lo + rng.integers(1, 5, size=3)
        lab[tuple(slice(max(a, 0), b) for a, b in zip(lo, hi, strict=True))] = value
    labels = [*range(1, 30), 99, 0]
    sides = touches_border_labels(lab, labels)
    assert list(sides) == labels
    for value in labels:
        assert sides[value] == touches_border(lab == value), value
    assert sides[99] == []
    big = lab.astype(np.int64) * 10_000_000  # above the lookup-table limit
    assert touches_border_labels(big, [10_000_000 * v for v in range(1, 30)]) == {
        10_000_000 * v: sides[v] for v in range(1, 30)
    }


# --------------------------------------------------------------------------- against SimpleITK


def test_label_volumes_match_simpleitk_physical_size() -> None:
    sitk = pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(7)
    array = rng.integers(0, 6, size=(13, 11, 7)).astype(np.uint16)  # (X, Y, Z)
    spacing = (0.7, 1.3, 3.1)
    image = sitk.GetImageFromArray(array.transpose(2, 1, 0))  # SimpleITK arrays are (Z, Y, X)
    image.SetSpacing(spacing)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(image)
    vol = Volume(array[None], np.diag([*spacing, 1.0]))
    ours = label_volumes(vol, range(1, 6))
    assert sorted(stats.GetLabels()) == [1, 2, 3, 4, 5]
    for label in stats.GetLabels():
        expected_ml = stats.GetPhysicalSize(label) / 1000.0  # mm^3 -> mL
        assert abs(ours[label] - expected_ml) / expected_ml < 1e-6, (label, ours[label], expected_ml)


# --------------------------------------------------------------------------- errors


def test_shape_mismatch_message() -> None:
    with pytest.raises(
        ShapeError, match=r"same voxel grid.*nearest-neighbour.*expected \(4, 4, 4\), got \(4, 4, 5\)"
    ):
        count_overlaps(np.zeros((4, 4, 5), np.uint8), np.zeros((4, 4, 4), np.uint8), [1])
    with pytest.raises(ShapeError, match=r"same \(S, \.\.\.\) shape"):
        count_overlaps_masks(np.zeros((2, 4, 4), bool), np.zeros((3, 4, 4), bool))
    with pytest.raises(ShapeError, match=r"one key per mask channel.*expected \(2,\), got \(3,\)"):
        count_overlaps_masks(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4), bool), labels=[1, 2, 3])


def test_dtype_and_value_messages() -> None:
    ok = np.zeros((3, 3, 3), np.uint8)
    with pytest.raises(DataError, match=r"pred must be an integer label map, got dtype float32.*argmax"):
        count_overlaps(ok.astype(np.float32), ok, [1])
    with pytest.raises(DataError, match=r"ref holds negative values \(minimum -1\)"):
        count_overlaps(ok, ok.astype(np.int8) - 1, [1])
    with pytest.raises(DataError, match=r"labels must be distinct, got \[2\]"):
        count_overlaps(ok, ok, [1, 2, 2])
    with pytest.raises(DataError, match=r"labels must be integers, got 1.5"):
        count_overlaps(ok, ok, [1, 1.5])
    with pytest.raises(DataError, match=r"labels must be >= 0"):
        count_overlaps(ok, ok, [-1])
    with pytest.raises(DataError, match=r"masks must be binary \(values 0 and 1\), got values in \[0, 2\]"):
        count_overlaps_masks(np.arange(27, dtype=np.uint8).reshape(3, 3, 3) % 3, ok)
    with pytest.raises(DataError, match=r"masks must be binary.*dtype float64.*probs > 0.5"):
        count_overlaps_masks(ok.astype(float), ok)
    with pytest.raises(DataError, match=r"one binary mask per structure.*mask\[None\]"):
        count_overlaps_masks(np.zeros(4, bool), np.zeros(4, bool))


def test_volume_and_border_messages(two_organ_phantom: Volume) -> None:
    with pytest.raises(DataError, match=r"three spacings.*got 2"):
        volume_ml(10, (1.0, 1.0))
    with pytest.raises(DataError, match=r"finite and positive, got \(1.0, 0.0, 1.0\)"):
        volume_ml(10, (1.0, 0.0, 1.0))
    with pytest.raises(DataError, match=r"n_voxels must be an integer >= 0"):
        volume_ml(-1, SPACING)
    with pytest.raises(DataError, match=r"n_voxels must be an integer >= 0"):
        volume_ml(2.5, SPACING)  # type: ignore[arg-type]
    two_channel = Volume(np.zeros((2, 4, 4, 4), np.uint8), np.eye(4))
    with pytest.raises(DataError, match=r"shape \(1, X, Y, Z\), got shape \(2, 4, 4, 4\)"):
        label_volumes(two_channel, [1])
    with pytest.raises(DataError, match=r"integer label map, got dtype float32"):
        label_volumes(two_organ_phantom.with_array(two_organ_phantom.array.astype(np.float32)), [1])
    with pytest.raises(DataError, match=r"\(X, Y\) or \(X, Y, Z\).*array\[0\]"):
        touches_border(np.zeros((1, 4, 4, 4), bool))
    with pytest.raises(DataError, match=r"mask must be binary"):
        touches_border(np.full((4, 4), 3))
    with pytest.raises(DataError, match=r"\(X, Y\) or \(X, Y, Z\)"):
        touches_border_labels(two_organ_phantom.array, [1])
