"""U-Net family: contract test over the registry, deep supervision, strides, errors, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import DynUNet

from medseg.config import ModelConfig, load_config
from medseg.errors import ConfigError, ShapeError
from medseg.models import (
    MODELS,
    UNet,
    check_input_shape,
    create_model,
    plan_strides,
    required_divisor,
    resolve_strides,
)
from medseg.models._blocks import ResizeUpBlock

CONFIGS = Path(__file__).parents[2] / "configs"
TINY = [4, 8, 16]
SPATIAL = {2: (16, 16), 3: (16, 16, 8)}


def _supported(name: str, upsample: str) -> bool:
    # `threshold` has no weights to train (its windows are fitted): see tests/models/test_threshold.py
    return not (name == "monai_unet" and upsample == "resize") and name != "threshold"


CONTRACT_CASES = [
    pytest.param(
        name, dims, residual, norm, upsample, id=f"{name}-{dims}d-res{int(residual)}-{norm}-{upsample}"
    )
    for name in MODELS.names()
    for dims in (2, 3)
    for residual in (False, True)
    for norm in ("instance", "batch")
    for upsample in ("deconv", "resize")
    if _supported(name, upsample)
]


def _input(dims: int, batch: int = 2, channels: int = 1, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *SPATIAL[dims], generator=gen)


def test_registry_lists_the_models() -> None:
    assert {"unet", "monai_unet"} <= set(MODELS.names())


@pytest.mark.parametrize(("name", "dims", "residual", "norm", "upsample"), CONTRACT_CASES)
def test_model_contract(name: str, dims: int, residual: bool, norm: str, upsample: str) -> None:
    cfg = ModelConfig(name=name, channels=TINY, residual=residual, norm=norm, upsample=upsample)
    model = create_model(cfg, spatial_dims=dims, in_channels=2, out_channels=3, patch_size=SPATIAL[dims])
    model.train()
    x = _input(dims, channels=2)
    out = model(x)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 3, *SPATIAL[dims])
    assert torch.isfinite(out).all()
    weights = torch.rand(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {pname}"
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 3, *SPATIAL[dims])


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("upsample", ["deconv", "resize"])
def test_deep_supervision_train_list_eval_tensor(dims: int, upsample: str) -> None:
    cfg = ModelConfig(channels=[4, 8, 16, 32], deep_supervision=True, upsample=upsample)
    spatial = SPATIAL[dims]
    model = create_model(cfg, spatial_dims=dims, in_channels=1, out_channels=2)
    x = torch.randn(2, 1, *spatial, generator=torch.Generator().manual_seed(0))
    model.train()
    outs = model(x)
    assert isinstance(outs, list) and len(outs) == len(cfg.channels) - 1
    expected = [tuple(s // f for s, f in zip(spatial, st, strict=True)) for st in model.output_strides]
    assert expected == [spatial, tuple(s // 2 for s in spatial), tuple(s // 4 for s in spatial)]
    assert [tuple(o.shape) for o in outs] == [(2, 2, *e) for e in expected]
    sum(o.float().mean() for o in outs).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        single = model(x)
    assert isinstance(single, torch.Tensor) and single.shape == (2, 2, *spatial)
    # instance norm keeps no running statistics, so the full-size head is identical in both modes
    torch.testing.assert_close(outs[0].detach(), single)


def test_deep_supervision_with_anisotropic_strides() -> None:
    cfg = ModelConfig(channels=[4, 8, 16, 32], deep_supervision=True)
    model = create_model(
        cfg,
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        patch_size=(32, 32, 16),
        spacing_mm=(1.0, 1.0, 2.5),
    )
    assert model.level_strides == [(1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2)]
    assert model.output_strides == [(1, 1, 1), (2, 2, 1), (4, 4, 2)]
    outs = model.train()(torch.randn(1, 1, 32, 32, 16))
    assert [tuple(o.shape[2:]) for o in outs] == [(32, 32, 16), (16, 16, 16), (8, 8, 8)]


def test_without_deep_supervision_train_mode_returns_tensor() -> None:
    model = create_model(ModelConfig(channels=TINY), spatial_dims=2, in_channels=1, out_channels=2)
    assert isinstance(model.train()(_input(2)), torch.Tensor)
    assert model.output_strides == [(1, 1)]


def test_unknown_model_name_has_did_you_mean() -> None:
    with pytest.raises(ConfigError, match=r"Did you mean 'unet'\?"):
        create_model(ModelConfig(name="unte"), spatial_dims=3, in_channels=1, out_channels=2)


@pytest.mark.parametrize("name", ["unet", "monai_unet"])
def test_non_divisible_input_names_padded_size(name: str) -> None:
    model = create_model(ModelConfig(name=name, channels=TINY), spatial_dims=2, in_channels=1, out_channels=2)
    assert model.input_divisor == (4, 4)
    with pytest.raises(ShapeError, match=r"divisible by \(4, 4\).*expected \(20, 16\), got \(17, 16\)"):
        model(torch.zeros(1, 1, 17, 16))
    with pytest.raises(ShapeError, match="spatial"):
        model(torch.zeros(1, 1, 16, 16, 16))
    with pytest.raises(ShapeError, match=r"in_channels.*expected \(-1, 1, -1, -1\), got \(1, 3, 16, 16\)"):
        model(torch.zeros(1, 3, 16, 16))


def test_check_input_shape_accepts_model_or_divisor() -> None:
    model = create_model(ModelConfig(channels=TINY), spatial_dims=3, in_channels=1, out_channels=2)
    check_input_shape((16, 16, 8), model)
    with pytest.raises(ShapeError, match=r"expected \(16, 16, 12\)"):
        check_input_shape((16, 16, 10), (4, 4, 4))


def test_non_divisible_patch_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"use train.patch_size \[20, 16\]"):
        create_model(
            ModelConfig(channels=TINY, strides=[1, 2, 2]),
            spatial_dims=2,
            in_channels=1,
            out_channels=2,
            patch_size=(18, 16),
        )


def test_config_strides_are_used_and_validated() -> None:
    model = create_model(
        ModelConfig(channels=TINY, strides=[1, 2, 1]), spatial_dims=3, in_channels=1, out_channels=2
    )
    assert model.level_strides == [(1, 1, 1), (2, 2, 2), (1, 1, 1)]
    assert model.input_divisor == (2, 2, 2)
    assert model.eval()(torch.zeros(1, 1, 6, 6, 6)).shape == (1, 2, 6, 6, 6)
    with pytest.raises(ConfigError, match="one stride per level"):
        resolve_strides(ModelConfig(channels=TINY, strides=[2, 2]), spatial_dims=2)
    with pytest.raises(ConfigError, match=r"strides\[0\].*must be 1"):
        resolve_strides(ModelConfig(channels=TINY, strides=[2, 2, 2]), spatial_dims=2)


def test_plan_strides_known_answers() -> None:
    assert plan_strides((64, 64, 32), (1.6, 1.6, 3.0), depth=4) == [(1, 1, 1)] + [(2, 2, 2)] * 3
    # 5 mm slices are kept until the in-plane axes reach a comparable spacing (0.8 -> 3.2 mm)
    assert plan_strides((128, 128, 16), (0.8, 0.8, 5.0), depth=5) == [
        (1, 1, 1),
        (2, 2, 1),
        (2, 2, 1),
        (2, 2, 2),
        (2, 2, 2),
    ]
    # an axis is not pooled below 4 voxels
    assert plan_strides((16, 16, 8), depth=3) == [(1, 1, 1), (2, 2, 2), (2, 2, 1)]
    assert required_divisor(plan_strides((16, 16, 8), depth=3)) == (4, 4, 2)
    with pytest.raises(ConfigError, match="too small for 4 levels"):
        plan_strides((8, 8), depth=4)


def test_unsupported_fields_raise_for_monai_unet() -> None:
    with pytest.raises(ConfigError, match="upsample: resize.*Use model.name: unet"):
        create_model(
            ModelConfig(name="monai_unet", channels=TINY, upsample="resize"),
            spatial_dims=2,
            in_channels=1,
            out_channels=2,
        )
    with pytest.raises(ConfigError, match="deep_supervision"):
        create_model(
            ModelConfig(name="monai_unet", channels=TINY, deep_supervision=True),
            spatial_dims=2,
            in_channels=1,
            out_channels=2,
        )


def test_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="spatial_dims must be 2 or 3"):
        create_model(ModelConfig(channels=TINY), spatial_dims=4, in_channels=1, out_channels=2)
    with pytest.raises(ConfigError, match="at least 3 levels"):
        create_model(ModelConfig(channels=[4, 8]), spatial_dims=2, in_channels=1, out_channels=2)
    with pytest.raises(ConfigError, match="patch_size"):
        create_model(
            ModelConfig(channels=TINY), spatial_dims=3, in_channels=1, out_channels=2, patch_size=(16, 16)
        )


def test_state_dict_keys_are_readable_and_load_monai_dynunet_weights() -> None:
    model = UNet(3, 1, 2, channels=TINY, deep_supervision=True)
    keys = list(model.state_dict())
    assert not any("skip_layers" in k for k in keys)
    assert len(keys) == len(list(model.parameters())) + len(list(model.buffers()))
    assert {k.split(".")[0] for k in keys} == {
        "input_block",
        "downsamples",
        "bottleneck",
        "upsamples",
        "output_block",
        "deep_supervision_heads",
    }
    resize_keys = list(UNet(3, 1, 2, channels=TINY, upsample="resize").state_dict())
    assert not any("transp_conv" in k for k in resize_keys)
    assert "upsamples.0.upsample.preconv.weight" in resize_keys
    monai_net = DynUNet(3, 1, 2, [3] * 3, [1, 2, 2], [2, 2], filters=TINY, deep_supervision=True)
    model.load_state_dict(monai_net.state_dict(), strict=True)
    x = torch.randn(1, 1, 16, 16, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), monai_net.eval()(x))


@pytest.mark.parametrize("dims", [2, 3])
def test_resize_block_projects_before_resizing_without_changing_the_result(dims: int) -> None:
    block = ResizeUpBlock(dims, 8, 4, kernel_size=3, scale_factor=2, norm_name=("INSTANCE", {"affine": True}))
    x = torch.randn(2, 8, *(6,) * dims, generator=torch.Generator().manual_seed(0))
    conv = block.upsample.preconv
    mode = "bilinear" if dims == 2 else "trilinear"
    resize_then_project = conv(F.interpolate(x, scale_factor=2, mode=mode, align_corners=False))
    with torch.no_grad():
        torch.testing.assert_close(block.upsample(x), resize_then_project, atol=1e-5, rtol=1e-5)
    out = block(x, torch.randn(2, 4, *(12,) * dims))
    assert out.shape == (2, 4, *(12,) * dims)


@pytest.mark.parametrize(
    "config", ["demo_ct.yaml", "demo_chest_xray.yaml", "ct_organs.yaml", "chest_xray.yaml"]
)
def test_shipped_config_models_build_and_run(config: str) -> None:
    cfg = load_config(CONFIGS / config)
    n_out = len(cfg.data.structure_names) + (1 if cfg.data.mode == "softmax" else 0)
    model = create_model(
        cfg.model,
        spatial_dims=cfg.data.spatial_dims,
        in_channels=1,
        out_channels=n_out,
        patch_size=cfg.train.patch_size,
        spacing_mm=cfg.train.target_spacing_mm,
    )
    # the configs' channels, but the smallest input whose bottleneck still has 2 voxels per axis
    spatial = tuple(2 * k for k in model.input_divisor)
    x = torch.randn(2, 1, *spatial, generator=torch.Generator().manual_seed(0))
    out = model.train()(x)
    assert out.shape == (2, n_out, *spatial) and torch.isfinite(out).all()
