"""Prediction geometry: outputs land on exactly the input grid, for every storage orientation.

An "oracle" network output (the one-hot of the preprocessed label) is pushed through the inverse
geometry; the restored label map must have the input's shape and affine and reproduce the original
labels up to resampling at organ borders.
"""

from __future__ import annotations

import numpy as np
import pytest
from factories import build_plan

from medseg.data.geometry import resampled_shape
from medseg.data.plan import Plan
from medseg.data.preprocess import preprocess_case
from medseg.inference.restore import restore_to_original
from medseg.types import Volume


def _phantom(affine: np.ndarray, shape=(40, 36, 12)) -> tuple[Volume, Volume]:
    """Body (0 HU) in air (-1000) with two boxes labelled 3 and 7, defined in voxel space."""
    img = np.full((1, *shape), -1000, np.int16)
    img[0, 4:36, 4:32, 1:11] = 0
    lab = np.zeros((1, *shape), np.uint8)
    lab[0, 8:20, 8:18, 3:9] = 3
    lab[0, 22:34, 18:30, 2:10] = 7
    return Volume(img, affine), Volume(lab, affine.copy())


def _affine(kind: str) -> np.ndarray:
    sp = np.array([0.8, 0.9, 3.0])
    axes = {
        "RAS": np.eye(3),
        "LPS": np.diag([-1.0, -1, 1]),
        "LAS": np.diag([-1.0, 1, 1]),
        "PSR": np.array([[0, 0, 1], [-1, 0, 0], [0, 1, 0]], float),
    }
    if kind == "oblique":
        t = np.deg2rad(25)
        rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    else:
        rot = axes[kind]
    a = np.eye(4)
    a[:3, :3] = rot * sp[None, :]
    a[:3, 3] = [12.5, -30.0, 80.0]
    return a


def _assert_close_centres(p: np.ndarray, g: np.ndarray, image: Volume, plan: Plan) -> None:
    """Centres of mass agree within half a voxel of the coarser of the two grids, per array axis."""
    ornt = np.asarray(pre_ornt(image))
    tol = [
        0.5 * max(1.0, plan.target_spacing_mm[int(ornt[i, 0])] / image.spacing_mm[i]) + 0.1 for i in range(3)
    ]
    diff = np.abs(np.argwhere(p).mean(0) - np.argwhere(g).mean(0))
    assert np.all(diff <= tol), (diff, tol)


def pre_ornt(image: Volume) -> np.ndarray:
    from medseg.data.geometry import canonical_ornt

    return canonical_ornt(image.affine, 3)


def _plan(mode: str, spacing=(1.6, 1.6, 3.0)) -> Plan:
    return build_plan(
        mode=mode,
        label_values=(3, 7) if mode == "softmax" else (),
        target_spacing_mm=spacing,
        patch_size=(32, 32, 8),
    )


@pytest.mark.parametrize("kind", ["RAS", "LPS", "LAS", "PSR", "oblique"])
def test_softmax_restore_is_on_the_input_grid(kind: str) -> None:
    image, label = _phantom(_affine(kind))
    plan = _plan("softmax")
    pre = preprocess_case(image, label, plan)
    # the body crop and the resampling happened
    assert pre.props["crop"] != [[0, s] for s in pre.props["canonical_shape"]]
    assert tuple(pre.image.shape[1:]) == tuple(pre.props["resampled_shape"])
    probs = np.stack([(pre.label[0] == k) for k in range(3)]).astype(np.float32)
    restored = restore_to_original(probs, pre.props, plan)
    assert restored.shape == label.array.shape and restored.dtype == np.uint8
    assert set(np.unique(restored)) <= {0, 3, 7}
    for v in (3, 7):
        p, g = restored[0] == v, label.array[0] == v
        dice = 2 * (p & g).sum() / (p.sum() + g.sum())
        assert dice > 0.8, (kind, v, dice)  # small boxes lose border voxels in 2x down- and upsampling
        # centre of mass within half a resampled voxel: no flipped axis or shifted origin
        _assert_close_centres(p, g, image, plan)


def test_sigmoid_restore_keeps_overlaps_and_grid() -> None:
    image, label = _phantom(_affine("LPS"))
    masks = np.stack([label.array[0] == 3, (label.array[0] == 3) | (label.array[0] == 7)]).astype(np.uint8)
    plan = _plan("sigmoid", spacing=(0.8, 0.9, 3.0))  # no resampling: the round trip is exact
    pre = preprocess_case(image, Volume(masks, image.affine), plan)
    restored = restore_to_original(pre.label.astype(np.float32), pre.props, plan)
    np.testing.assert_array_equal(restored, masks)
    assert (restored.sum(0) == 2).any()  # a voxel in both structures survives


def test_resampled_shapes_for_anisotropic_input() -> None:
    assert resampled_shape((40, 36, 12), (0.8, 0.9, 3.0), (1.6, 1.6, 3.0)) == (20, 20, 12)
