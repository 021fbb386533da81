"""The classic networks (FCN, Tiramisu, DeepLab, PSPNet): what sets each apart, their options and errors.

The shape/gradient/determinism contract every registered network meets is in ``test_models.py``
(it runs over the whole registry, these networks included)."""

from __future__ import annotations

import pytest
import torch

from medseg.config import ModelConfig, load_config
from medseg.errors import ConfigError
from medseg.models import MODELS, create_model, create_network
from medseg.models.classic import OPTIONS, DeepLab, DenseUNet, PSPNet, _dilated_strides
from medseg.models.spec import NetworkSpec

CLASSIC = ["fcn", "dense_unet", "deeplab", "pspnet"]


def _spec(name: str, dims: int = 2, depth: int = 4, **kw: object) -> NetworkSpec:
    cfg = ModelConfig(name=name, channels=[4, 8, 16, 16, 16][:depth], **kw)  # type: ignore[arg-type]
    return NetworkSpec.from_config(cfg, spatial_dims=dims)


def test_all_registered_with_their_options() -> None:
    assert set(CLASSIC) <= set(MODELS.names())
    assert set(OPTIONS) == set(CLASSIC)


def test_dilated_strides_stop_downsampling_at_the_output_stride() -> None:
    used, dil = _dilated_strides([(1, 1), (2, 2), (2, 2), (2, 2), (2, 2)], 4)
    assert used == [(1, 1), (2, 2), (2, 2), (1, 1), (1, 1)]
    assert dil == [(1, 1), (1, 1), (1, 1), (2, 2), (4, 4)]
    # an axis that is not pooled at a level is not dilated there either
    used, dil = _dilated_strides([(1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2)], 4)
    assert used == [(1, 1, 1), (2, 2, 1), (2, 2, 2), (1, 1, 2)]
    assert dil == [(1, 1, 1), (1, 1, 1), (1, 1, 1), (2, 2, 1)]


@pytest.mark.parametrize("cls", [DeepLab, PSPNet])
def test_dilated_encoder_keeps_the_output_stride_and_grows_the_receptive_field(cls: type) -> None:
    spec = _spec(cls.__name__.lower(), depth=5, options={"output_stride": 4})
    net = cls(spec, 1, 2).eval()
    x = torch.zeros(1, 1, 64, 64)
    assert net.encoder(x)[-1].shape[2:] == (16, 16)  # 64 / output_stride
    assert net.input_divisor == (4, 4)  # only the strides actually used
    # receptive field: the centre output depends on inputs 20 pixels away (dilated levels reach far)
    x = torch.zeros(1, 1, 64, 64, requires_grad=True)
    net(x)[0, 1, 32, 32].backward()
    reach = x.grad[0, 0].abs().sum(0).nonzero()
    assert reach.max() - 32 >= 20 and 32 - reach.min() >= 20


def test_dense_unet_passes_only_new_features_up() -> None:
    spec = _spec("dense_unet", depth=3, options={"growth_rate": 3, "layers": 2})
    net = DenseUNet(spec, 1, 2)
    new = 3 * 2
    # every transposed convolution upsamples the n * growth new features of the block below
    assert [up.op.in_channels for up in net.trans_up] == [new, new]
    # the deepest up block sees those plus the skip of level 1: 4 input channels + 6 + 6 new ones
    assert net.up[0].layers[0][0].num_features == new + (4 + new * 2)


def test_dense_unet_efficient_mode_gives_the_same_outputs_and_gradients() -> None:
    out, grads = [], []
    for efficient in (False, True):
        torch.manual_seed(0)
        net = create_network(
            _spec("dense_unet", options={"efficient": efficient}), in_channels=1, out_channels=2
        ).train()
        x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y = net(x)
        y.square().sum().backward()
        out.append(y.detach())
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(out[0], out[1])
    torch.testing.assert_close(grads[0], grads[1])


def test_fcn_fuses_the_three_deepest_levels() -> None:
    net = create_network(_spec("fcn", depth=4), in_channels=1, out_channels=3)
    assert [s.in_channels for s in net.scores] == [16, 16, 8]
    assert net.final is not None  # level -3 is at stride 2: one more upsampling to full size
    three = create_network(_spec("fcn", depth=3), in_channels=1, out_channels=3)
    assert three.final is None  # level -3 is the full-resolution input level


@pytest.mark.parametrize(
    ("name", "kw", "match"),
    [
        ("fcn", {"options": {"growth_rate": 4}}, r"\['growth_rate'\] are not options of 'fcn'"),
        ("dense_unet", {"options": {"output_stride": 8}}, r"are not options of 'dense_unet'; it takes"),
        ("unet", {"options": {"growth_rate": 4}}, r"not used by 'unet'"),
        ("monai_unet", {"options": {"layers": 2}}, r"not used by 'monai_unet'"),
        ("deeplab", {"deep_supervision": True}, "has no deep supervision"),
        ("deeplab", {"options": {"output_stride": 6}}, "power of 2"),
        ("pspnet", {"options": {"pool_sizes": [0, 2]}}, "pool_sizes must be positive"),
        ("dense_unet", {"options": {"growth_rate": 0}}, "must be >= 1"),
        ("dense_unet", {"options": {"growth_rate": "8"}}, "growth_rate of 'dense_unet' must be an integer"),
        ("dense_unet", {"options": {"efficient": 1}}, "must be true or false"),
        ("deeplab", {"options": {"atrous_rates": "12"}}, "must be a list of integers like"),
        ("pspnet", {"options": {"pool_sizes": [1.5]}}, "must be a list of integers"),
    ],
)
def test_bad_settings_are_config_errors(name: str, kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        create_network(_spec(name, **kw), in_channels=1, out_channels=2)


@pytest.mark.parametrize("name", ["fcn", "deeplab"])
def test_too_few_levels_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match="at least 3 levels"):
        create_network(_spec(name, depth=2), in_channels=1, out_channels=2)


@pytest.mark.parametrize("name", CLASSIC)
def test_plan_record_round_trip_rebuilds_the_same_network(name: str) -> None:
    opts = {"fcn": {}, "dense_unet": {"growth_rate": 4}, "deeplab": {"atrous_rates": [1, 3]},
            "pspnet": {"pool_sizes": [1, 4]}}[name]  # fmt: skip
    spec = _spec(name, dims=3, options=opts)
    again = NetworkSpec.from_dict(spec.to_dict())
    assert again == spec
    torch.manual_seed(0)
    a = create_network(spec, in_channels=1, out_channels=2)
    b = create_network(again, in_channels=1, out_channels=2)
    b.load_state_dict(a.state_dict())  # strict: same architecture
    x = torch.randn(1, 1, 16, 16, 16)
    torch.testing.assert_close(a.eval()(x), b.eval()(x))


def test_options_come_from_the_yaml_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "c.yaml"
    path.write_text(
        "data: {root: d, spatial_dims: 2, structures: [lung]}\n"
        "model: {name: deeplab, channels: [4, 8, 16, 16],\n"
        "        options: {output_stride: 4, atrous_rates: [1, 2]}}\n"
    )
    cfg = load_config(path)
    net = create_model(cfg.model, spatial_dims=2, in_channels=1, out_channels=1, patch_size=(32, 32))
    assert net.input_divisor == (4, 4)
    assert len(net.aspp.convs) == 2
