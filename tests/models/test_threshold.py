"""The threshold network: logits from fitted windows (softmax and sigmoid, inside and outside the
window), the lateral prior, channel choice, smoothing, and the checks of its options."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.errors import ConfigError
from medseg.models import MODELS, NetworkSpec, create_network
from medseg.models.threshold import OUTSIDE_SIDE, gaussian_smooth


def _spec(dims: int, windows: list[dict[str, Any]], mode: str = "softmax", **options: Any) -> NetworkSpec:
    return NetworkSpec(
        name="threshold",
        spatial_dims=dims,
        channels=(1,),
        strides=((1,) * dims,),
        options={"mode": mode, "windows": windows, **options},
    )


def _window(lo: float | None, hi: float | None, scale: float, channel: int = 0, side: int = 0) -> dict:
    return {"structure": "s", "channel": channel, "lo": lo, "hi": hi, "scale": scale, "side": side}


def _line(values: list[float], dims: int = 3, channels: int = 1) -> torch.Tensor:
    """``(1, channels, n, 1[, 1])`` with ``values`` along the first spatial axis on every channel."""
    x = torch.tensor(values, dtype=torch.float32).reshape(1, 1, -1, *([1] * (dims - 1)))
    return x.repeat(1, channels, *([1] * dims))


def test_registered() -> None:
    assert "threshold" in MODELS


def test_softmax_logits_and_argmax_by_hand() -> None:
    # structure 1: window [0, 2] (centre 1, half width 1); structure 2: [1.5, 3.5] (centre 2.5)
    net = create_network(
        _spec(3, [_window(0.0, 2.0, 1.0), _window(1.5, 3.5, 1.0)]), in_channels=1, out_channels=3
    )
    x = _line([-1.0, 0.5, 1.0, 1.8, 2.5, 4.0])
    with torch.no_grad():
        y = net(x)[0, :, :, 0, 0]
    # logit = min(x - lo, hi - x, scale) / scale; background 0
    expected = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [-1.0, 0.5, 1.0, 0.2, -0.5, -2.0],
            [-2.5, -1.0, -0.5, 0.3, 1.0, -0.5],
        ]
    )
    torch.testing.assert_close(y, expected)
    # outside both windows: background; where they overlap (1.8): the window it fits best
    assert y.argmax(0).tolist() == [0, 1, 1, 2, 2, 0]


@pytest.mark.parametrize(("lo", "hi"), [(0.25, 0.75), (None, 0.5), (0.4, None)])
def test_sigmoid_is_above_one_half_exactly_inside_the_window(lo: float | None, hi: float | None) -> None:
    net = create_network(_spec(2, [_window(lo, hi, 0.2)], mode="sigmoid"), in_channels=1, out_channels=1)
    values = np.linspace(-1.0, 2.0, 301) + 0.005  # no value on a window end (float32 rounding)
    with torch.no_grad():
        p = torch.sigmoid(net(_line(values.tolist(), dims=2)))[0, 0, :, 0].numpy()
    inside = (values > (-np.inf if lo is None else lo)) & (values < (np.inf if hi is None else hi))
    assert np.array_equal(p > 0.5, inside)
    # an open end is a ramp of width `scale` up to a plateau of 1
    assert float(p.max()) == pytest.approx(1 / (1 + np.exp(-1.0)), abs=1e-6)


def test_lateral_prior_keeps_each_structure_on_its_side() -> None:
    windows = [_window(0.0, 2.0, 1.0, side=-1), _window(0.0, 2.0, 1.0, side=1)]
    net = create_network(_spec(2, windows, mode="sigmoid"), in_channels=1, out_channels=2)
    x = torch.ones(1, 1, 5, 3)  # every voxel at the centre of both windows
    with torch.no_grad():
        y = net(x)[0, :, :, 0]
    # 5 rows along the first axis: 0, 1 below the centre, 2 the centre (neither side), 3, 4 above it
    assert y[0].tolist() == [1.0, 1.0, OUTSIDE_SIDE, OUTSIDE_SIDE, OUTSIDE_SIDE]
    assert y[1].tolist() == [OUTSIDE_SIDE, OUTSIDE_SIDE, OUTSIDE_SIDE, 1.0, 1.0]


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_left_right_mirror_with_the_pair_swapped_changes_nothing(mode: str) -> None:
    """Mirror TTA averages the network with its mirror image (pairs swapped): with priors on a pair
    only, that is the network itself."""
    windows = [_window(-1.0, 0.5, 0.75, side=-1), _window(-0.5, 1.0, 0.75), _window(-1.0, 0.5, 0.75, side=1)]
    spec = _spec(3, windows, mode=mode, sigma_vox=[1.0, 0.5, 0.5])
    out = len(windows) + (mode == "softmax")
    net = create_network(spec, in_channels=1, out_channels=out)
    x = torch.randn(2, 1, 9, 6, 4, generator=torch.Generator().manual_seed(0))
    perm = [0, 3, 2, 1] if mode == "softmax" else [2, 1, 0]  # the pair's channels swapped
    with torch.no_grad():
        torch.testing.assert_close(torch.flip(net(torch.flip(x, [2])), [2])[:, perm], net(x))


def test_each_structure_reads_its_own_channel() -> None:
    windows = [_window(0.0, 2.0, 1.0, channel=1), _window(9.0, 11.0, 1.0, channel=0)]
    net = create_network(_spec(3, windows, mode="sigmoid"), in_channels=2, out_channels=2)
    x = torch.zeros(1, 2, 2, 2, 2)
    x[:, 0] = 10.0  # inside window 2 only on channel 0
    x[:, 1] = 1.0  # inside window 1 only on channel 1
    with torch.no_grad():
        y = net(x)
    assert bool((y == 1.0).all())


def test_output_shape_for_odd_sizes_and_batches() -> None:
    spec = _spec(3, [_window(0.0, 1.0, 0.5)] * 2, sigma_vox=[1.0, 1.0, 0.5])
    net = create_network(spec, in_channels=1, out_channels=3)
    assert net(torch.randn(2, 1, 7, 5, 3)).shape == (2, 3, 7, 5, 3)
    assert net.input_divisor == (1, 1, 1)
    assert dict(net.state_dict()) == {}  # the windows live in plan.json, not in the checkpoint


def test_autocast_does_not_lower_the_precision() -> None:
    """The engine runs networks under autocast on GPUs; the windows were fitted in float32."""
    spec = _spec(3, [_window(0.1, 0.3, 0.1)], mode="sigmoid", sigma_vox=[1.0, 1.0, 1.0])
    net = create_network(spec, in_channels=1, out_channels=1)
    x = torch.rand(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = net(x)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, plain)


def test_gaussian_smooth_matches_scipy_with_replicated_edges() -> None:
    rng = np.random.default_rng(0)
    img = rng.normal(size=(9, 8, 6)).astype(np.float32)
    sigma = (1.0, 1.5, 0.0)
    ours = gaussian_smooth(torch.from_numpy(img)[None, None], sigma)[0, 0].numpy()
    ref = ndimage.gaussian_filter(img.astype(np.float64), sigma, mode="nearest", truncate=3.0)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    const = torch.full((1, 2, 5, 5), 3.0)
    torch.testing.assert_close(gaussian_smooth(const, (2.0, 2.0)), const)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"mode": "softmax"}, "medseg baseline threshold"),
        ({}, "medseg baseline threshold"),
        ({"mode": "softmax", "windows": [_window(0, 1, 1)]}, "2 structures"),
        ({"mode": "sigmoid", "windows": [_window(1, 0, 1)] * 2}, "lo 1.0 must be below hi 0.0"),
        ({"mode": "sigmoid", "windows": [_window(0, 1, 0)] * 2}, r"scale must be a number in \[1e-06"),
        ({"mode": "sigmoid", "windows": [_window(0, 1, 1e-300)] * 2}, r"scale must be a number in \[1e-06"),
        ({"mode": "sigmoid", "windows": [_window(-1e300, 1, 1)] * 2}, "lo must be a number"),
        # a plan is untrusted: a smoothing of 1e9 voxels would build a kernel of 6e9 taps
        (
            {"mode": "sigmoid", "windows": [_window(0, 1, 1)] * 2, "sigma_vox": [1e9, 0.0]},
            "sigma_vox must be",
        ),
        ({"mode": "sigmoid", "windows": [_window(0, 1, 1, channel=1)] * 2}, "input channel 0..0"),
        ({"mode": "sigmoid", "windows": [_window(0, 1, 1, side=2)] * 2}, "side must be -1, 0 or 1"),
        ({"mode": "sigmoid", "windows": [_window(0, 1, 1)] * 2, "sigma_vox": [1.0]}, "2 values"),
        ({"mode": "sigmoid", "windows": [_window(0, 1, 1)] * 2, "growth_rate": 8}, "not options"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], match: str) -> None:
    spec = NetworkSpec(name="threshold", spatial_dims=2, channels=(1,), strides=((1, 1),), options=options)
    with pytest.raises(ConfigError, match=match):
        create_network(spec, in_channels=1, out_channels=2 if options.get("mode") == "sigmoid" else 3)
