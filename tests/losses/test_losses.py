"""Losses: soft Dice, weighted CE/BCE, focal, the compound loss and deep supervision.

Tiny tensors with hand-computed answers (MONAI ``TEST_CASES`` style). Voxels are listed flattened in
C order; ``_img`` reshapes a flat list to ``(1, 1, 2, 2)``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medseg.config import LossConfig
from medseg.errors import ConfigError, ShapeError
from medseg.losses.compound import (
    LOSSES,
    SegmentationLoss,
    create_loss,
    focal_loss,
    weighted_bce,
    weighted_cross_entropy,
)
from medseg.losses.dice import SoftDiceLoss, soft_dice_loss

LN2, LN4, LN4_3 = math.log(2), math.log(4), math.log(4 / 3)


def _img(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(1, 1, 2, 2)


def _onehot(idx: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, 1, *spatial) int64 -> (B, C, *spatial) float."""
    shape = (idx.shape[0], num_classes, *idx.shape[2:])
    return torch.zeros(shape).scatter_(1, idx, 1.0)


def _perfect_logits(onehot: torch.Tensor) -> torch.Tensor:
    return 30.0 * (2.0 * onehot - 1.0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# soft Dice

# One 1x2x2x2 example: foreground probabilities p1 = [0.9, 0.5, 0.3, 0.1], target g1 = [1, 1, 0, 0];
# background p0 = 1 - p1 = [0.1, 0.5, 0.7, 0.9], g0 = [0, 0, 1, 1].
#   plain:   fg  2*sum(pg)/(sum p + sum g) = 2*1.4/(1.8 + 2) ; bg 2*1.6/(2.2 + 2)
#   squared: fg  2*1.4/(sum p^2 + sum g^2) = 2*1.4/(1.16 + 2); bg 2*1.6/(1.56 + 2)
_P1 = [0.9, 0.5, 0.3, 0.1]
_G1 = [1.0, 1.0, 0.0, 0.0]
_PROBS = torch.cat([_img([1 - v for v in _P1]), _img(_P1)], dim=1)
_TARGET = torch.cat([_img([1 - v for v in _G1]), _img(_G1)], dim=1)
_FG_PLAIN, _BG_PLAIN = 1 - 2.8 / 3.8, 1 - 3.2 / 4.2
_FG_SQ, _BG_SQ = 1 - 2.8 / 3.16, 1 - 3.2 / 3.56

DICE_CASES = [
    ({"include_background": True, "squared": False}, (_FG_PLAIN + _BG_PLAIN) / 2),
    ({"include_background": False, "squared": False}, _FG_PLAIN),
    ({"include_background": True, "squared": True}, (_FG_SQ + _BG_SQ) / 2),
    ({"include_background": False, "squared": True}, _FG_SQ),
]


@pytest.mark.parametrize(("kwargs", "expected"), DICE_CASES)
@pytest.mark.parametrize("batch", [True, False])  # a single sample: batch and per-sample agree
def test_soft_dice_hand_computed(kwargs: dict, expected: float, batch: bool) -> None:
    got = soft_dice_loss(_PROBS, _TARGET, batch=batch, smooth=0.0, **kwargs)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    module = SoftDiceLoss(batch=batch, smooth=0.0, **kwargs)
    assert module(_PROBS, _TARGET).item() == pytest.approx(expected, abs=1e-6)


def test_soft_dice_batch_versus_per_sample() -> None:
    # sample 2 foreground: p = [0.2, 0.2, 0.2, 0.6], g = [0, 0, 0, 1] -> 1 - 2*0.6/(1.2 + 1)
    p2, g2 = [0.2, 0.2, 0.2, 0.6], [0.0, 0.0, 0.0, 1.0]
    probs = torch.cat([_PROBS, torch.cat([_img([1 - v for v in p2]), _img(p2)], dim=1)])
    target = torch.cat([_TARGET, torch.cat([_img([1 - v for v in g2]), _img(g2)], dim=1)])
    per_sample = soft_dice_loss(probs, target, include_background=False, batch=False, smooth=0.0)
    assert per_sample.item() == pytest.approx((_FG_PLAIN + (1 - 1.2 / 2.2)) / 2, abs=1e-6)
    # batch: sum(pg) = 1.4 + 0.6, sum p = 1.8 + 1.2, sum g = 2 + 1 -> 1 - 4/6
    batch = soft_dice_loss(probs, target, include_background=False, batch=True, smooth=0.0)
    assert batch.item() == pytest.approx(1 - 4.0 / 6.0, abs=1e-6)


def test_soft_dice_smooth_empty_channels() -> None:
    empty = torch.zeros(1, 1, 2, 2)
    # empty target and empty prediction: (0 + s) / (0 + s) = 1 -> loss 0
    assert soft_dice_loss(empty, empty).item() == pytest.approx(0.0, abs=1e-7)
    # empty target, non-empty prediction: s / (2 + s) -> loss ~1
    assert soft_dice_loss(_img([0.5] * 4), empty).item() == pytest.approx(1.0, abs=1e-4)


def test_soft_dice_defaults_and_dtype() -> None:
    module = SoftDiceLoss()
    options = (module.include_background, module.batch, module.squared, module.smooth)
    assert options == (True, True, False, 1e-5)
    got = soft_dice_loss(_PROBS.to(torch.bfloat16), _TARGET.to(torch.uint8), smooth=0.0)
    assert got.dtype == torch.float32


def test_soft_dice_errors() -> None:
    with pytest.raises(ShapeError, match=r"same shape as probs.*class indices.*expected \(1, 2, 2, 2\), got"):
        soft_dice_loss(_PROBS, _TARGET[:, :1])
    with pytest.raises(ShapeError, match=r"\(B, C, X, Y\) or \(B, C, X, Y, Z\).*got \(2, 2, 2\)"):
        soft_dice_loss(_PROBS[0], _TARGET[0])
    with pytest.raises(ValueError, match="include_background=False drops channel 0"):
        soft_dice_loss(_PROBS[:, :1], _TARGET[:, :1], include_background=False)


# --------------------------------------------------------------------------------------------
# weighted CE / BCE

# Four voxels with p(target) = 1/2, 3/4, 1/4, 1/2 -> ce = ln 2, ln 4/3, ln 4, ln 2.
_CE_LOGITS = torch.cat([_img([0.0, math.log(3), 0.0, 0.0]), _img([0.0, 0.0, math.log(3), 0.0])], dim=1)
_CE_TARGET = torch.tensor([0, 0, 0, 1]).reshape(1, 1, 2, 2)
_W = _img([1.0, 2.0, 3.0, 4.0])


def test_weighted_ce_hand_computed() -> None:
    unweighted = (LN2 + LN4_3 + LN4 + LN2) / 4
    weighted = (1 * LN2 + 2 * LN4_3 + 3 * LN4 + 4 * LN2) / 10
    assert weighted_cross_entropy(_CE_LOGITS, _CE_TARGET).item() == pytest.approx(unweighted, abs=1e-6)
    assert weighted_cross_entropy(_CE_LOGITS, _CE_TARGET, _W).item() == pytest.approx(weighted, abs=1e-6)
    # (B, *spatial) forms of target and weight map give the same
    got = weighted_cross_entropy(_CE_LOGITS, _CE_TARGET[:, 0], _W[:, 0])
    assert got.item() == pytest.approx(weighted, abs=1e-6)


def test_weighted_ce_unit_weights_equal_plain_ce() -> None:
    logits = torch.randn(2, 3, 5, 4, 3, generator=_gen())
    target = torch.randint(0, 3, (2, 1, 5, 4, 3), generator=_gen(1))
    plain = F.cross_entropy(logits, target[:, 0])
    got = weighted_cross_entropy(logits, target, torch.ones(2, 1, 5, 4, 3))
    assert torch.allclose(got, plain, atol=1e-6)
    assert torch.allclose(weighted_cross_entropy(logits, target), plain, atol=1e-6)


def test_weighted_ce_is_normalised_over_the_whole_batch() -> None:
    logits = torch.cat([_CE_LOGITS, torch.zeros(1, 2, 2, 2)])  # sample 2: ce = ln 2 everywhere
    target = torch.cat([_CE_TARGET, torch.zeros(1, 1, 2, 2, dtype=torch.long)])
    w = torch.cat([_W, torch.full((1, 1, 2, 2), 0.5)])
    numerator = 1 * LN2 + 2 * LN4_3 + 3 * LN4 + 4 * LN2 + 4 * 0.5 * LN2
    got = weighted_cross_entropy(logits, target, w)
    assert got.item() == pytest.approx(numerator / (10 + 2), abs=1e-6)  # global, not mean of per-sample
    assert weighted_cross_entropy(logits, target, torch.zeros_like(w)).item() == 0.0


def test_weighted_bce_hand_computed() -> None:
    logits = _img([0.0, math.log(3), -math.log(3), 0.0])  # sigmoid: 1/2, 3/4, 1/4, 1/2
    target = _img([1.0, 1.0, 1.0, 0.0])  # bce: ln 2, ln 4/3, ln 4, ln 2
    weighted = (1 * LN2 + 2 * LN4_3 + 3 * LN4 + 4 * LN2) / 10
    assert weighted_bce(logits, target).item() == pytest.approx((LN2 + LN4_3 + LN4 + LN2) / 4, abs=1e-6)
    assert weighted_bce(logits, target, _W).item() == pytest.approx(weighted, abs=1e-6)
    assert weighted_bce(logits, target.to(torch.uint8), _W[:, 0]).item() == pytest.approx(weighted, abs=1e-6)
    assert weighted_bce(logits, target.bool(), torch.ones_like(_W)).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, target).item(), abs=1e-6
    )


def test_weighted_bce_shared_map_equals_channel_mean_then_weighted() -> None:
    logits = torch.randn(2, 3, 4, 4, generator=_gen(2))
    target = (torch.rand(2, 3, 4, 4, generator=_gen(3)) > 0.5).float()
    w = torch.rand(2, 1, 4, 4, generator=_gen(4)) + 0.1
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=1, keepdim=True)
    expected = (w * bce).sum() / w.sum()
    assert torch.allclose(weighted_bce(logits, target, w), expected, atol=1e-6)
    # a per-channel map equal on every channel is the same as the shared map
    assert torch.allclose(weighted_bce(logits, target, w.expand(2, 3, 4, 4)), expected, atol=1e-6)


# --------------------------------------------------------------------------------------------
# focal


def test_focal_gamma_zero_equals_ce_and_bce() -> None:
    logits = torch.randn(2, 3, 4, 4, 2, generator=_gen(5))
    idx = torch.randint(0, 3, (2, 1, 4, 4, 2), generator=_gen(6))
    w = torch.rand(2, 1, 4, 4, 2, generator=_gen(7))
    for weight in (None, w):
        fl = focal_loss(logits, idx, mode="softmax", gamma=0.0, weight_map=weight)
        assert torch.allclose(fl, weighted_cross_entropy(logits, idx, weight), atol=1e-6)
    binary = (torch.rand(2, 3, 4, 4, 2, generator=_gen(8)) > 0.5).float()
    for weight in (None, w):
        fl = focal_loss(logits, binary, mode="sigmoid", gamma=0.0, weight_map=weight)
        assert torch.allclose(fl, weighted_bce(logits, binary, weight), atol=1e-6)


def test_focal_hand_computed_and_why_not_monai_mean() -> None:
    # p_t = 1/2, 3/4, 1/4, 1/2 (the CE example) -> (1 - p_t)^2 * ce
    expected = (0.25 * LN2 + (1 / 16) * LN4_3 + (9 / 16) * LN4 + 0.25 * LN2) / 4
    got = focal_loss(_CE_LOGITS, _CE_TARGET, mode="softmax", gamma=2.0)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # MONAI's FocalLoss averages over the class channels too: gamma=0 gives CE / C, not CE
    from monai.losses import FocalLoss

    monai_fl = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=0.0)(_CE_LOGITS, _CE_TARGET)
    ce = weighted_cross_entropy(_CE_LOGITS, _CE_TARGET)
    assert monai_fl.item() == pytest.approx(ce.item() / 2, abs=1e-6)
    # alpha as a per-class sequence scales each voxel's term by its class weight
    alpha = focal_loss(_CE_LOGITS, _CE_TARGET, mode="softmax", gamma=0.0, alpha=[1.0, 2.0])
    assert alpha.item() == pytest.approx((LN2 + LN4_3 + LN4 + 2 * LN2) / 4, abs=1e-6)


def test_focal_errors() -> None:
    with pytest.raises(ValueError, match="mode must be 'softmax' or 'sigmoid', got 'softmx'"):
        focal_loss(_CE_LOGITS, _CE_TARGET, mode="softmx")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        focal_loss(_CE_LOGITS, _CE_TARGET, mode="softmax", gamma=-1.0)


# --------------------------------------------------------------------------------------------
# compound


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_compound_is_weighted_sum_of_terms(mode: str) -> None:
    logits = torch.randn(2, 3, 6, 5, generator=_gen(9))
    w = torch.rand(2, 1, 6, 5, generator=_gen(10)) + 0.5
    if mode == "softmax":
        target = torch.randint(0, 3, (2, 1, 6, 5), generator=_gen(11))
        dice = soft_dice_loss(torch.softmax(logits, 1), _onehot(target, 3), include_background=False)
        ce = weighted_cross_entropy(logits, target, w)
    else:
        target = (torch.rand(2, 3, 6, 5, generator=_gen(11)) > 0.6).float()
        dice = soft_dice_loss(torch.sigmoid(logits), target, include_background=True)
        ce = weighted_bce(logits, target, w)
    focal = focal_loss(logits, target, mode=mode, gamma=2.0, weight_map=w)  # type: ignore[arg-type]
    loss = SegmentationLoss(mode, 3, dice_weight=0.7, ce_weight=0.3, focal_weight=0.5)  # type: ignore[arg-type]
    assert torch.allclose(loss(logits, target, w), 0.7 * dice + 0.3 * ce + 0.5 * focal, atol=1e-6)
    terms = loss.terms(logits, target, w)
    assert set(terms) == {"dice", "ce", "focal"}
    assert torch.allclose(terms["dice"], dice, atol=1e-6)
    only_dice = SegmentationLoss(mode, 3, ce_weight=0.0)  # type: ignore[arg-type]
    assert set(only_dice.terms(logits, target)) == {"dice"}
    assert torch.allclose(only_dice(logits, target), dice, atol=1e-6)


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
@pytest.mark.parametrize("spatial", [(8, 6), (6, 5, 4)])
@pytest.mark.parametrize(
    "options",
    [{}, {"squared": True, "batch_dice": False, "include_background": True, "focal_weight": 1.0}],
)
def test_perfect_prediction_gives_zero_loss(mode: str, spatial: tuple[int, ...], options: dict) -> None:
    if mode == "softmax":
        target = torch.randint(0, 4, (2, 1, *spatial), generator=_gen(12))
        target[target == 2] = 0  # class 2 absent from the batch
        logits = _perfect_logits(_onehot(target, 4))
    else:
        target = (torch.rand(2, 4, *spatial, generator=_gen(12)) > 0.5).float()
        target[:, 2] = 0  # structure 2 absent from the batch
        logits = _perfect_logits(target)
    loss = SegmentationLoss(mode, 4, **options)  # type: ignore[arg-type]
    w = torch.rand(2, 1, *spatial, generator=_gen(13)) * 10
    assert loss(logits, target).item() < 1e-3
    assert loss(logits, target, w).item() < 1e-3


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("batch_dice", [False, True])
def test_gradients_finite_with_absent_class(mode: str, squared: bool, batch_dice: bool) -> None:
    logits = torch.randn(2, 3, 6, 5, 4, generator=_gen(14)).requires_grad_(True)
    if mode == "softmax":
        target = torch.zeros(2, 1, 6, 5, 4, dtype=torch.long)
        target[0, :, :3] = 1  # class 2 never appears; class 1 only in sample 0
    else:
        target = torch.zeros(2, 3, 6, 5, 4)
        target[0, 0, :3] = 1  # structures 1 and 2 absent
    loss = SegmentationLoss(
        mode,  # type: ignore[arg-type]
        3,
        squared=squared,
        batch_dice=batch_dice,
        focal_weight=1.0,
    )
    value = loss(logits, target, torch.ones(2, 6, 5, 4))
    value.backward()
    assert torch.isfinite(value)
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_low_precision_logits_give_float32_loss() -> None:
    target = torch.randint(0, 3, (1, 1, 4, 4), generator=_gen(15))
    logits = torch.randn(1, 3, 4, 4, generator=_gen(16)).to(torch.bfloat16)
    out = SegmentationLoss("softmax", 3, focal_weight=1.0)(logits, target.float())  # float indices: rounded
    assert out.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# deep supervision


def _block_target(mode: str) -> torch.Tensor:
    """16x16 target made of 4x4 constant blocks, so every 2x / 4x downsampling is exact."""
    coarse = torch.randint(0, 3, (2, 1, 4, 4), generator=_gen(17))
    if mode == "softmax":
        return coarse.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    return _onehot(coarse, 3).repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_deep_supervision_matches_manual_levels(mode: str) -> None:
    target = _block_target(mode)
    levels = [torch.randn(2, 3, s, s, generator=_gen(18 + s)) for s in (16, 8, 4)]
    w = torch.rand(2, 1, 16, 16, generator=_gen(30)) + 0.5
    loss = SegmentationLoss(mode, 3, focal_weight=0.5)  # type: ignore[arg-type]
    expected = torch.zeros(())
    for lw, lg in zip((4 / 7, 2 / 7, 1 / 7), levels, strict=True):
        step = 16 // lg.shape[-1]
        tgt = target[..., ::step, ::step]  # exact on 4x4 blocks
        wl = F.avg_pool2d(w, step) if step > 1 else w  # "area" = local mean
        expected = expected + lw * loss(lg, tgt, wl)
    assert torch.allclose(loss(levels, target, w), expected, atol=1e-6)
    assert torch.allclose(loss(tuple(levels), target, w), expected, atol=1e-6)
    # explicit weights (normalised): only the top level counts
    top_only = SegmentationLoss(mode, 3, focal_weight=0.5, ds_weights=[2.0, 0.0, 0.0])  # type: ignore[arg-type]
    assert torch.allclose(top_only(levels, target, w), loss(levels[0], target, w), atol=1e-6)


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_deep_supervision_perfect_prediction(mode: str, spatial_dims: int) -> None:
    target = _block_target(mode)
    if spatial_dims == 3:  # 16x16x8, still 4x4x4 blocks along the first two axes and 2x blocks along Z
        target = target[..., None].repeat_interleave(8, dim=-1)
    onehot = _onehot(target, 3) if mode == "softmax" else target
    sizes = [tuple(s // f for s in onehot.shape[2:]) for f in (1, 2, 4)]
    levels = [_perfect_logits(F.interpolate(onehot, size=size, mode="nearest-exact")) for size in sizes]
    assert SegmentationLoss(mode, 3)(levels, target).item() < 1e-3  # type: ignore[arg-type]
    w = torch.rand(target.shape[0], 1, *target.shape[2:], generator=_gen(31))
    assert SegmentationLoss(mode, 3, focal_weight=1.0)(levels, target, w).item() < 1e-3  # type: ignore[arg-type]


def test_deep_supervision_errors() -> None:
    target = _block_target("softmax")
    loss = SegmentationLoss("softmax", 3)
    with pytest.raises(ShapeError, match=r"level 1 must have the batch size and dimensionality"):
        loss([torch.randn(2, 3, 16, 16), torch.randn(2, 3, 32, 32)], target)
    with pytest.raises(ShapeError, match=r"logits have 2 channels but the loss was built for num_classes=3"):
        loss([torch.randn(2, 3, 16, 16), torch.randn(2, 2, 8, 8)], target)
    with pytest.raises(ValueError, match="ds_weights has 2 entries but got 3 logit levels"):
        levels = [torch.randn(2, 3, s, s) for s in (16, 8, 4)]
        SegmentationLoss("softmax", 3, ds_weights=[1.0, 0.5])(levels, target)
    with pytest.raises(ValueError, match="empty list of logits"):
        loss([], target)


# --------------------------------------------------------------------------------------------
# shape errors


def test_shape_errors_have_expected_and_got() -> None:
    soft = SegmentationLoss("softmax", 3)
    sig = SegmentationLoss("sigmoid", 3)
    logits = torch.randn(2, 3, 8, 8)
    with pytest.raises(ShapeError, match=r"class indices.*expected \(2, 1, 8, 8\), got \(2, 1, 8, 7\)"):
        soft(logits, torch.zeros(2, 1, 8, 7, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"one-hot target.*argmax\(1, keepdim=True\)"):
        soft(logits, torch.zeros(2, 3, 8, 8))
    with pytest.raises(ShapeError, match=r"one binary mask per logit channel.*expected \(2, 3, 8, 8\), got"):
        sig(logits, torch.zeros(2, 1, 8, 8))
    with pytest.raises(ShapeError, match=r"weight_map must be .*expected \(2, 1, 8, 8\), got \(2, 3, 8, 8\)"):
        soft(logits, torch.zeros(2, 8, 8, dtype=torch.long), torch.ones(2, 3, 8, 8))
    with pytest.raises(ShapeError, match=r"weight_map must be .*got \(1, 8, 8\)"):
        sig(logits, torch.zeros(2, 3, 8, 8), torch.ones(1, 8, 8))
    with pytest.raises(ShapeError, match=r"logits have 4 channels but the loss was built for num_classes=3"):
        soft(torch.randn(2, 4, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"must be \(B, C, X, Y\) or \(B, C, X, Y, Z\).*got \(2, 3, 8\)"):
        soft(torch.randn(2, 3, 8), torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"expected \(2, 1, 8, 8\), got \(2, 4, 4\)"):  # shape as given
        weighted_cross_entropy(logits, torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"weighted_cross_entropy: target class indices"):
        weighted_cross_entropy(logits, torch.zeros(3, 8, 8, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"weighted_bce: sigmoid mode takes one binary mask"):
        weighted_bce(logits, torch.zeros(2, 3, 8, 4))


# --------------------------------------------------------------------------------------------
# config and registry


def test_create_loss_defaults() -> None:
    loss = create_loss(LossConfig(), "softmax", num_classes=3)
    assert isinstance(loss, SegmentationLoss)
    assert LOSSES.get("dice_ce") is SegmentationLoss
    assert (loss.dice_weight, loss.ce_weight, loss.focal_weight) == (1.0, 1.0, 0.0)
    assert (loss.include_background, loss.batch_dice, loss.squared, loss.smooth) == (False, True, False, 1e-5)
    sig = create_loss(LossConfig(), "sigmoid", num_classes=2)
    assert sig.include_background is True  # every sigmoid channel is a structure


def test_create_loss_overrides() -> None:
    cfg = LossConfig(
        dice_weight=0.5,
        ce_weight=2.0,
        focal_weight=0.25,
        dice_include_background=True,
        dice_batch=False,
        dice_squared=True,
    )
    loss = create_loss(cfg, "softmax", num_classes=4)
    assert (loss.dice_weight, loss.ce_weight, loss.focal_weight) == (0.5, 2.0, 0.25)
    assert (loss.include_background, loss.batch_dice, loss.squared) == (True, False, True)
    logits = torch.randn(1, 4, 4, 4, generator=_gen(40))
    target = torch.randint(0, 4, (1, 4, 4), generator=_gen(41))
    expected = (
        0.5 * soft_dice_loss(torch.softmax(logits, 1), _onehot(target[:, None], 4), batch=False, squared=True)
        + 2.0 * weighted_cross_entropy(logits, target)
        + 0.25 * focal_loss(logits, target, mode="softmax")
    )
    assert torch.allclose(loss(logits, target), expected, atol=1e-6)


def test_create_loss_errors() -> None:
    with pytest.raises(ConfigError, match="Unknown loss 'dice_cee'. Did you mean 'dice_ce'"):
        create_loss(LossConfig(), "softmax", 3, name="dice_cee")
    with pytest.raises(ConfigError, match="all 0; set at least one > 0"):
        create_loss(LossConfig(dice_weight=0, ce_weight=0), "softmax", 3)
    with pytest.raises(ConfigError, match="mode must be 'softmax' or 'sigmoid', got 'multiclass'"):
        create_loss(LossConfig(), "multiclass", 3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"num_classes >= 2 \(background \+ at least one class\), got 1"):
        create_loss(LossConfig(), "softmax", 1)
