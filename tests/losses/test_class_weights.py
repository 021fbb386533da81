"""Class weights (inverse and median frequency, hand-computed tables), their place in the loss (weighted
CE/BCE and focal α, hand-computed), and their way from the training cases into the plan."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medseg.config import BorderWeightConfig, LossConfig, load_config
from medseg.data.datasets import load_case, load_dataset
from medseg.data.plan import Fingerprint, Plan, compute_fingerprint, make_plan, plan_class_weights
from medseg.data.preprocess import compute_weights
from medseg.data.synthetic import synth_ct
from medseg.errors import ConfigError, DataError
from medseg.losses.class_weights import binary_class_weights, frequency_class_weights
from medseg.losses.compound import SegmentationLoss, create_loss, focal_loss
from medseg.training.memory import memory_estimator

# two cases of 100 mm³: class volumes (background, a, b)
TABLE = [[60.0, 30.0, 10.0], [80.0, 0.0, 20.0]]


def test_inverse_frequency_by_hand() -> None:
    # f = (140, 30, 30) / 200 = (0.7, 0.15, 0.15); w = 1 / (3 f)
    w = frequency_class_weights(TABLE, "inverse_frequency")
    np.testing.assert_allclose(w, [1 / 2.1, 1 / 0.45, 1 / 0.45])
    f = np.array([0.7, 0.15, 0.15])
    assert float((f * w).sum()) == pytest.approx(1.0)  # the frequency-weighted mean weight is 1


def test_median_frequency_by_hand() -> None:
    # freq_c = class volume / volume of the cases holding it: bg 140/200, a 30/100 (case 1 has none),
    # b 30/200 -> (0.7, 0.3, 0.15), median 0.3 -> w = 0.3 / freq
    w = frequency_class_weights(TABLE, "median_frequency")
    np.testing.assert_allclose(w, [0.3 / 0.7, 1.0, 2.0])


def test_binary_weights_per_structure_by_hand() -> None:
    # structure in case 1 only (20 of 100 mm³): outside (100 + 80), inside 20
    inv = binary_class_weights([[0.0], [20.0]], [100.0, 100.0], "inverse_frequency")
    np.testing.assert_allclose(inv, [[1 / (2 * 0.9), 1 / (2 * 0.1)]])
    # median: outside 180/200 = 0.9, inside 20/100 = 0.2, median 0.55
    med = binary_class_weights([[0.0], [20.0]], [100.0, 100.0], "median_frequency")
    np.testing.assert_allclose(med, [[0.55 / 0.9, 0.55 / 0.2]])


def test_a_class_without_voxels_is_named() -> None:
    with pytest.raises(DataError, match="'b' has no voxel"):
        frequency_class_weights([[90.0, 10.0, 0.0]], "median_frequency", names=["bg", "a", "b"])
    with pytest.raises(ValueError, match="one of"):
        frequency_class_weights(TABLE, "balanced")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# the loss


def test_softmax_class_weights_equal_torch_weighted_cross_entropy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 5)
    target = torch.randint(0, 3, (2, 1, 6, 5))
    cw = [0.5, 2.0, 4.0]
    loss = SegmentationLoss("softmax", 3, dice_weight=0.0, class_weights=cw)
    expected = F.cross_entropy(logits, target[:, 0], weight=torch.tensor(cw))
    assert float(loss(logits, target)) == pytest.approx(float(expected), rel=1e-6)
    # with a weight map the two multiply: sum(w·cw[y]·ce) / sum(w·cw[y])
    wmap = torch.rand(2, 1, 6, 5) + 0.1
    ce = F.cross_entropy(logits, target[:, 0], reduction="none")
    v = wmap[:, 0] * torch.tensor(cw)[target[:, 0]]
    assert float(loss(logits, target, wmap)) == pytest.approx(float((v * ce).sum() / v.sum()), rel=1e-6)
    assert float(loss(logits, target)) != pytest.approx(float(F.cross_entropy(logits, target[:, 0])))


def test_sigmoid_class_weights_by_hand() -> None:
    # two voxels: logit 0 inside the structure (bce ln 2, weight 3), logit 2 outside (bce ln(1 + e²), 1)
    logits = torch.tensor([0.0, 2.0]).view(1, 1, 1, 2)
    target = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    loss = SegmentationLoss("sigmoid", 1, dice_weight=0.0, class_weights=[[1.0, 3.0]])
    expected = (3 * math.log(2) + math.log1p(math.exp(2))) / 4
    assert float(loss(logits, target)) == pytest.approx(expected, rel=1e-6)


def test_focal_alpha_by_hand() -> None:
    # gamma 0: -alpha_y · log p_y, averaged over the voxels
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]]).T.reshape(1, 2, 1, 2)  # p = (1/2, 3/4)
    target = torch.tensor([0, 1]).view(1, 1, 1, 2)
    got = focal_loss(logits, target, mode="softmax", gamma=0.0, alpha=[0.2, 0.8])
    assert float(got) == pytest.approx((0.2 * math.log(2) + 0.8 * math.log(4 / 3)) / 2, rel=1e-6)
    cfg = LossConfig(
        dice_weight=0.0, ce_weight=0.0, focal_weight=1.0, focal_gamma=0.0, focal_alpha=[0.2, 0.8]
    )
    assert float(create_loss(cfg, "softmax", 2)(logits, target)) == pytest.approx(float(got))


def test_class_weights_and_alpha_that_do_not_fit_the_channels_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"shape \(3,\)"):
        SegmentationLoss("softmax", 3, class_weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match="pair per channel"):
        SegmentationLoss("sigmoid", 2, class_weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match="one non-negative weight per output channel"):
        SegmentationLoss("softmax", 3, focal_alpha=[0.5, 0.5])


# --------------------------------------------------------------------------------------------
# planning


def _cfg(class_weights: Any, **data: Any) -> Any:
    d = {
        "data": {"root": ".", "labels": {"a": 1, "b": 2}, **data},
        "model": {"channels": [4, 8, 16]},
        "loss": {"class_weights": class_weights},
        "train": {"device": "cpu", "patch_size": [16, 16, 8]},
    }
    if "structures" in data:
        del d["data"]["labels"]
    return load_config(d, resolve_paths=False)


def _fp(volumes: list[tuple[float, ...]]) -> Fingerprint:
    return Fingerprint(
        spacings=[(1.0, 1.0, 2.0)] * 2,
        shapes=[(16, 16, 8)] * 2,
        in_channels=1,
        foreground_samples=[np.linspace(0, 100, 50, dtype=np.float32)],
        label_volumes=volumes,
    )


def test_plan_stores_the_weights_and_drops_the_border_maps_own_balance(tmp_path: Path) -> None:
    cfg = _cfg("median_frequency")
    fp = _fp([(100.0, 30.0, 10.0), (100.0, 0.0, 20.0)])  # the TABLE above, as (case, a, b)
    plan = make_plan(cfg, fp, memory=memory_estimator(cfg))
    assert plan.class_weights["method"] == "median_frequency"
    np.testing.assert_allclose(plan.class_weights["weights"], [0.3 / 0.7, 1.0, 2.0], rtol=1e-5)
    assert plan.border_weights["class_balance"] is False
    again = Plan.load(plan.save(tmp_path / "plan.json"))
    assert again.class_weights == plan.class_weights
    assert (
        again.preprocess_key() != make_plan(_cfg("none"), fp, memory=memory_estimator(cfg)).preprocess_key()
    )
    # without class weights the plan is as before: no key, the map balances classes per case
    plain = make_plan(_cfg("none"), fp, memory=memory_estimator(cfg))
    assert plain.class_weights == {} and "class_balance" not in plain.border_weights


def test_border_map_without_its_class_balance() -> None:
    cfg = _cfg("inverse_frequency")
    plan = make_plan(cfg, _fp([(100.0, 30.0, 10.0)] * 2), memory=memory_estimator(cfg))
    label = np.zeros((1, 16, 16, 8), np.uint8)
    label[0, 2:6, 2:6, 2:6] = 1
    w = compute_weights(label, plan)
    assert w is not None
    assert float(w[0][label[0] == 1].mean()) == pytest.approx(1.0, abs=1e-3)  # w_c = 1 inside the organ


def test_sigmoid_plan_weights_and_given_lists() -> None:
    cfg = _cfg("inverse_frequency", structures=["lung", "heart"], spatial_dims=3)
    fp = _fp([(100.0, 50.0, 10.0), (100.0, 30.0, 10.0)])
    w = plan_class_weights(cfg, fp)["weights"]
    np.testing.assert_allclose(w, [[1 / 1.2, 1 / 0.8], [1 / 1.8, 1 / 0.2]], rtol=1e-5)
    given = plan_class_weights(_cfg([1.0, 5.0], structures=["lung", "heart"]), fp)
    assert given == {"method": "given", "weights": [[1.0, 1.0], [1.0, 5.0]]}
    with pytest.raises(ConfigError, match="needs 3"):
        plan_class_weights(_cfg([1.0, 5.0]), fp)


def test_a_plan_with_broken_class_weights_is_refused(tmp_path: Path) -> None:
    cfg = _cfg("median_frequency")
    d = make_plan(cfg, _fp([(100.0, 30.0, 10.0)] * 2), memory=memory_estimator(cfg)).to_dict()
    d["class_weights"]["weights"] = [1.0, -2.0, 1.0]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    with pytest.raises(DataError, match="class_weights"):
        Plan.load(path)


def test_fingerprint_counts_label_volumes_in_mm3(tmp_path: Path) -> None:
    root = synth_ct(tmp_path / "ct", cases=2, seed=1, dicom_cases=0)
    config = load_config(Path("configs/demo_ct.yaml"), overrides=[f"data.root={root}"])
    cases = load_dataset(config.data).train_cases
    fp = compute_fingerprint(cases, config.data)
    assert len(fp.label_volumes) == len(cases)
    image, label = load_case(cases[0], config.data)
    assert label is not None and config.data.labels is not None
    voxel = float(np.prod(image.spacing_mm))
    expected = [
        np.count_nonzero(label.array == config.data.labels[n]) * voxel for n in config.data.structure_names
    ]
    assert min(expected) > 0
    np.testing.assert_allclose(fp.label_volumes[0], [label.array.size * voxel, *expected])


def test_class_weights_without_border_maps_keep_the_cache_key() -> None:
    # no weight map is computed, so nothing in the preprocessed arrays changes: no cache miss
    fp = _fp([(100.0, 30.0, 10.0)] * 2)
    plans = []
    for cw in ("median_frequency", "none"):
        cfg = _cfg(cw)
        loss = cfg.loss.model_copy(update={"border_weights": BorderWeightConfig(enabled=False)})
        cfg = cfg.model_copy(update={"loss": loss})
        plans.append(make_plan(cfg, fp, memory=memory_estimator(cfg)))
    assert "class_balance" not in plans[0].border_weights and plans[0].class_weights
    assert plans[0].preprocess_key() == plans[1].preprocess_key()
