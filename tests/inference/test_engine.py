"""The slab-wise inference engine: stitching, slab-wise vs one-shot accumulation, bounded buffers,
TTA with left/right swaps, air-window skipping, and the memory estimate."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from factories import build_plan

from medseg.data.canonical import CanonicalSlabs, canonical_grid, oriented_view
from medseg.data.geometry import bbox_of
from medseg.data.plan import ChannelNorm, Plan
from medseg.data.preprocess import body_box, linear_taps, preprocess_volume
from medseg.errors import ConfigError
from medseg.inference.engine import EngineOptions, EngineStats, estimate_memory, segment
from medseg.inference.restore import restore_to_original
from medseg.inference.tiling import (
    NetworkRunner,
    RoiMap,
    window_slices,
    window_starts,
)
from medseg.types import Volume


def sliding_window_logits(model, image: np.ndarray, patch, device, *, overlap: float, batch_size: int):
    """Reference: MONAI's sliding_window_inference (Gaussian blending, padded with the image minimum)
    over a whole preprocessed ``(C, *spatial)`` image; ``(K, *spatial)`` logits."""
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.array(image, dtype=np.float32))[None]
    with torch.no_grad():
        out = sliding_window_inference(
            x,
            roi_size=tuple(patch),
            sw_batch_size=batch_size,
            predictor=model.eval(),
            overlap=overlap,
            mode="gaussian",
            padding_mode="constant",
            cval=float(x.min()),
            sw_device=device,
            device=torch.device("cpu"),
        )
    return out[0]


def _plan(mode="softmax", *, spacing=(1.0, 1.0, 1.0), patch=(8, 8, 4), crop=False, dims=3, pairs=()) -> Plan:
    return build_plan(
        spatial_dims=dims,
        mode=mode,
        structure_names=("left", "right", "other"),
        label_values=(1, 2, 5) if mode == "softmax" else (),
        target_spacing_mm=spacing[:dims],
        patch_size=patch[:dims],
        normalization=(ChannelNorm("ct", -200.0, 250.0, 20.0, 80.0),),
        crop_to_body=crop,
        body_threshold=-500.0 if crop else None,
        left_right_pairs=pairs,
    )


def _ct(shape, affine=None, seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    img = np.full((1, *shape), -1000, np.int16)
    inner = tuple(slice(2, max(3, n - 2)) for n in shape)
    img[(0, *inner)] = rng.integers(-150, 220, [s.stop - s.start for s in inner])
    return Volume(img, np.diag([1.0] * 4) if affine is None else affine)


def _conv_net(k: int, dims: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
    return torch.nn.Sequential(conv(1, 6, 3, padding=1), torch.nn.Tanh(), conv(6, k, 3, padding=1)).eval()


class _Linear(torch.nn.Module):
    """A 1x1 'network': logits_k = a_k * x + b_k (stitching must reproduce it exactly)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.a = torch.linspace(-1.5, 2.0, k)
        self.b = torch.linspace(0.3, -0.2, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * self.a.view(shape) + self.b.view(shape)


@pytest.mark.parametrize(
    ("shape", "patch", "dims"),
    [((13, 9, 7), (8, 8, 4), 3), ((5, 6, 3), (8, 8, 4), 3), ((23, 11), (8, 8), 2), ((5, 3), (8, 8), 2)],
    ids=["odd-3d", "patch-larger-3d", "odd-2d", "patch-larger-2d"],
)
def test_stitching_reproduces_a_linear_predictor(shape, patch, dims):
    """With no resampling, the blended probabilities equal the whole-volume ones voxel for voxel."""
    plan = _plan("sigmoid", patch=patch, dims=dims)
    vol = _ct(shape, np.diag([1.0] * 4))
    got = {}

    def sink(box, probs):
        got[box[-1].start] = (box, probs)

    out = segment(vol, plan, _Linear(3), "cpu", EngineOptions(batch_size=3), sink=sink)
    x = plan.normalization[0].apply(vol.array[0])
    ref = torch.sigmoid(_Linear(3)(torch.from_numpy(x)[None, None]))[0].numpy()  # (K, *shape)
    seen = np.zeros(shape[-1], int)
    for box, probs in got.values():
        np.testing.assert_allclose(np.moveaxis(probs, 0, -1), ref[(slice(None), *box)], atol=2e-6)
        seen[box[-1]] += 1
    assert np.all(seen == 1), "every slice finalised exactly once"
    np.testing.assert_array_equal(out, (ref >= 0.5).astype(np.uint8))


def _affine_lps() -> np.ndarray:
    a = np.diag([-0.8, -0.9, 2.5, 1.0])
    a[:3, 3] = [10, 20, 30]
    return a


def _one_shot_logits(net, arr: np.ndarray, patch, overlap: float = 0.5) -> torch.Tensor:
    """Reference: every window of :func:`window_slices` over the whole preprocessed image, blended with
    MONAI's Gaussian into one full-size accumulator (what the engine does slab by slab)."""
    from monai.data.utils import compute_importance_map

    imp = compute_importance_map(tuple(patch), mode="gaussian", sigma_scale=0.125, device="cpu")
    x = torch.from_numpy(arr)
    acc, wsum = None, torch.zeros(arr.shape[1:])
    with torch.inference_mode():
        for w in window_slices(arr.shape[1:], patch, overlap):
            y = net(x[(slice(None), *w)][None])[0]
            acc = torch.zeros((y.shape[0], *arr.shape[1:])) if acc is None else acc
            acc[(slice(None), *w)] += y * imp
            wsum[w] += imp
    return acc / wsum


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
@pytest.mark.parametrize(("batch_size", "space"), [(1, "probabilities"), (3, "logits"), (7, "probabilities")])
def test_slabwise_equals_one_shot_accumulation(mode, batch_size, space):
    """Engine (lazy resampling, ring accumulator, per-slab restore) == one full-size accumulation of
    the same windows + one-shot restoration, with cropping, resampling and LPS storage; resampling
    probabilities or logits."""
    plan = _plan(mode, spacing=(1.3, 1.1, 1.9), patch=(16, 16, 8), crop=True)
    vol = _ct((37, 29, 23), _affine_lps())
    net = _conv_net(plan.out_channels)
    arr, props = preprocess_volume(vol, plan)
    assert all(n > p for n, p in zip(arr.shape[1:], plan.patch_size, strict=True))  # several windows
    logits = _one_shot_logits(net, arr, plan.patch_size)
    probs = (torch.softmax(logits, 0) if mode == "softmax" else torch.sigmoid(logits)).numpy()
    ref = restore_to_original(logits.numpy() if space == "logits" else probs, props, plan, space=space)
    other = restore_to_original(
        probs if space == "logits" else logits.numpy(),
        props,
        plan,
        space=("probabilities" if space == "logits" else "logits"),
    )
    assert np.mean(other != ref) > 3e-4  # the two resamplings differ near boundaries: the test can tell
    stats = EngineStats()
    opts = EngineOptions(batch_size=batch_size, skip_air=False, resample=space)
    got = segment(vol, plan, net, "cpu", opts, stats=stats)
    assert got.shape == ref.shape
    assert stats.windows_run == stats.windows > 1
    # identical up to float-rounding ties (blending order differs)
    assert np.mean(got != ref) < 1e-4


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_equals_monai_where_the_window_placements_coincide(mode):
    """(size - patch) a multiple of the step on every axis: MONAI's windows are the even ones, and the
    engine reproduces MONAI's sliding_window_inference (Gaussian) + restoration."""
    plan = _plan(mode, patch=(16, 16, 8))
    vol = _ct((40, 24, 16))
    net = _conv_net(plan.out_channels)
    arr, props = preprocess_volume(vol, plan)
    assert arr.shape[1:] == (40, 24, 16)
    logits = sliding_window_logits(net, arr, plan.patch_size, "cpu", overlap=0.5, batch_size=2)
    probs = (torch.softmax(logits, 0) if mode == "softmax" else torch.sigmoid(logits)).numpy()
    ref = restore_to_original(probs, props, plan)
    got = segment(vol, plan, net, "cpu", EngineOptions(batch_size=3, skip_air=False))
    assert np.mean(got != ref) < 1e-4


def test_window_starts_are_spaced_evenly():
    # 37 - 16 = 21 over ceil(21 / 8) = 3 steps of 7 (MONAI: 0, 8, 16 and the clamped 21)
    assert window_starts(37, 16, 0.5) == [0, 7, 14, 21]
    assert window_starts(40, 16, 0.5) == [0, 8, 16, 24]  # divisible: MONAI's placement
    assert window_starts(30, 8, 0.5) == [0, 4, 7, 11, 15, 18, 22]  # 22 / ceil(22 / 4) = 3.67, rounded
    assert window_starts(16, 16, 0.5) == [0] and window_starts(5, 16, 0.5) == [0]
    assert window_starts(48, 8, 0.0) == [0, 8, 16, 24, 32, 40]  # no overlap: a tiling
    assert window_starts(50, 8, 0.0) == [0, 7, 14, 21, 28, 35, 42]  # 7 windows, sharing 1 voxel each
    for size, patch, overlap in [(37, 16, 0.5), (201, 64, 0.5), (97, 32, 0.75), (50, 8, 0.0)]:
        s = window_starts(size, patch, overlap)
        gaps = np.diff(s)
        assert s[0] == 0 and s[-1] == size - patch
        assert gaps.max() - gaps.min() <= 1 and gaps.max() <= math.ceil(patch * (1 - overlap))


def test_logit_resampling_saves_probabilities_that_match_the_labels():
    plan = _plan("softmax", spacing=(1.3, 1.1, 1.9), patch=(16, 16, 8), crop=True)
    vol = _ct((37, 29, 23), _affine_lps())
    seen = []
    out = segment(
        vol,
        plan,
        _conv_net(plan.out_channels),
        "cpu",
        EngineOptions(resample="logits"),
        sink=lambda box, p: seen.append((box, p.copy())),
    )
    view = oriented_view(out, canonical_grid(vol)[0])  # the label map in the sink's canonical order
    lut = np.array([0, *plan.label_values])
    for box, p in seen:  # (n, K, *inplane) probabilities on the input grid
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(lut[p.argmax(1)], np.moveaxis(view[(0, *box)], -1, 0))
    assert sum(p.shape[0] for _, p in seen) > 0 and out.max() > 0
    with pytest.raises(ConfigError, match="resample"):
        EngineOptions(resample="labels")


def test_uncovered_voxels_stay_background_at_any_threshold_in_logit_space():
    """Voxels only skipped windows cover are background, even with a threshold below their
    placeholder logit (sigmoid(-20) = 2e-9)."""
    plan = _plan("sigmoid", patch=(8, 8, 4))
    plan = replace(plan, body_threshold=-500.0)
    img = np.full((1, 40, 40, 16), -1000, np.int16)
    img[0, 2:8, 2:8, 2:6] = 100
    vol = Volume(img, np.eye(4))
    for space in ("probabilities", "logits"):
        opts = EngineOptions(resample=space, threshold=1e-12)
        out = segment(vol, plan, _Pointwise("sigmoid"), "cpu", opts)
        assert out[0, 2:8, 2:8, 2:6].all()  # tissue: logit -5 > logit(1e-12)
        assert not out[:, 24:, 24:, :].any(), space  # far air: no window ran there


def test_float16_accumulator_changes_only_near_ties():
    plan = _plan("softmax", spacing=(1.3, 1.1, 1.9), patch=(16, 16, 8), crop=True)
    vol = _ct((37, 29, 23), _affine_lps())
    net = _conv_net(plan.out_channels)
    a = segment(vol, plan, net, "cpu", EngineOptions(skip_air=False))
    b = segment(vol, plan, net, "cpu", EngineOptions(skip_air=False, accumulator_dtype="float16"))
    assert a.shape == b.shape and b.dtype == a.dtype and b.any()
    assert np.mean(a != b) < 2e-3


def test_accumulator_does_not_grow_with_the_scan():
    plan = _plan("softmax", patch=(8, 8, 4))
    net = _conv_net(plan.out_channels)
    sizes = []
    for z in (12, 60):
        stats = EngineStats()
        segment(_ct((16, 16, z)), plan, net, "cpu", EngineOptions(batch_size=2, skip_air=False), stats=stats)
        sizes.append(stats.accumulator_bytes)
    assert sizes[0] == sizes[1] > 0
    # the ring holds patch + step rows (6 of them), not the scan's 60
    assert sizes[1] == 6 * 16 * 16 * (plan.out_channels * 4 + 4)


def test_tta_respects_left_right_pairs():
    """A network that is consistent under mirroring (right = mirrored left, symmetric in y/z) gives the
    same output with and without TTA, but only if mirrored passes swap the paired channels."""
    plan = _plan("sigmoid", pairs=(("left", "right"),))
    torch.manual_seed(1)
    w = torch.randn(1, 1, 3, 3, 3)
    w = (w + w.flip(3)) / 2
    w = (w + w.flip(4)) / 2  # symmetric in y and z, not in x

    class LRConsistent(torch.nn.Module):
        def forward(self, x):
            g = torch.nn.functional.conv3d(x, w, padding=1)
            right = torch.nn.functional.conv3d(x.flip(2), w, padding=1).flip(2)
            return torch.cat([g, right, torch.zeros_like(g)], 1)

    x = np.random.default_rng(0).normal(size=(2, 1, 8, 8, 4)).astype(np.float32)
    plain = NetworkRunner(LRConsistent(), "cpu", plan, tta=False)(x)
    tta = NetworkRunner(LRConsistent(), "cpu", plan, tta=True)(x)
    np.testing.assert_allclose(tta, plain, atol=1e-5)
    unpaired = _plan("sigmoid")
    wrong = NetworkRunner(LRConsistent(), "cpu", unpaired, tta=True)(x)
    assert np.abs(wrong - plain).max() > 0.1
    assert _plan("softmax", pairs=(("left", "right"),)).labels.lr_channel_permutation() == [0, 2, 1, 3]


def test_air_windows_are_skipped_without_changing_the_result():
    """A scan that is mostly air: fewer windows run, and a network that calls air background agrees."""
    plan = _plan("softmax", patch=(8, 8, 4), crop=False)
    plan = replace(plan, body_threshold=-500.0)
    img = np.full((1, 40, 40, 16), -1000, np.int16)
    img[0, 4:12, 5:14, 3:9] = 100
    vol = Volume(img, np.eye(4))

    class Threshold(torch.nn.Module):
        def forward(self, x):
            fg = (x - 0.0) * 4  # normalised 100 HU -> 1; air -> about -2.8
            return torch.cat([-fg, fg, -fg - 1, -fg - 2], 1)

    full, skip = EngineStats(), EngineStats()
    a = segment(vol, plan, Threshold(), "cpu", EngineOptions(skip_air=False), stats=full)
    b = segment(vol, plan, Threshold(), "cpu", EngineOptions(skip_air=True), stats=skip)
    np.testing.assert_array_equal(a, b)
    assert skip.windows_run < full.windows_run / 3
    assert (b == 1).sum() == 8 * 9 * 6


class _Pointwise(torch.nn.Module):
    """Calls voxels above 100 HU (normalised 1.0) structure 1 / the first structure, anything else
    background, voxel by voxel: blending cannot change its labels, so any difference is a skipped window."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x):
        fg = (x - 1.0) * 4
        if self.mode == "softmax":
            return torch.cat([-fg, fg, -fg - 1, -fg - 2], 1)
        return torch.cat([fg, fg - 20, fg - 20], 1)


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_coarse_roi_runs_fewer_windows_and_keeps_the_labels(mode):
    plan = _plan(mode, patch=(8, 8, 4))
    img = np.zeros((1, 48, 40, 24), np.int16)  # soft tissue everywhere: no air to skip
    img[0, 10:17, 20:23, 9:14] = 200  # a structure across several coarse windows (not block-aligned)
    img[0, 45:48, 0:2, 23] = 200  # and one in a corner
    vol = Volume(img, np.eye(4))
    full, roi = EngineStats(), EngineStats()
    a = segment(vol, plan, _Pointwise(mode), "cpu", EngineOptions(), stats=full)
    b = segment(vol, plan, _Pointwise(mode), "cpu", EngineOptions(coarse_roi=True), stats=roi)
    np.testing.assert_array_equal(a, b)
    assert int((b[0] == 1).sum()) == 7 * 3 * 5 + 3 * 2
    assert roi.coarse_windows_run == 6 * 5 * 6  # the non-overlapping tiling of 48x40x24 by 8x8x4
    assert full.windows_run == full.windows == 11 * 9 * 11
    assert roi.windows_run + roi.coarse_windows_run < full.windows_run / 2


def test_coarse_roi_keeps_the_largest_component_of_single_structures():
    """A stray blob far from the organ pulls its windows into the ROI unless the structure is declared
    single; then only the organ's windows run and the organ's labels stay exact."""
    plan = _plan("softmax", patch=(8, 8, 4))
    img = np.zeros((1, 48, 48, 32), np.int16)
    img[0, 4:14, 4:14, 2:10] = 200  # the organ ("left")
    img[0, 40:42, 40:42, 26:28] = 200  # a stray blob of the same class, far away
    vol = Volume(img, np.eye(4))
    plain, one = EngineStats(), EngineStats()
    net, opts = _Pointwise("softmax"), EngineOptions(coarse_roi=True)
    a = segment(vol, plan, net, "cpu", opts, stats=plain)
    b = segment(vol, plan, net, "cpu", opts, stats=one, single=frozenset({"left"}))
    assert one.windows_run < plain.windows_run
    np.testing.assert_array_equal(b[0, :24, :24, :16], a[0, :24, :24, :16])  # the organ is untouched
    assert (b == 1).sum() == 10 * 10 * 8  # the stray blob's windows were not run: background
    assert (a == 1).sum() == 10 * 10 * 8 + 2 * 2 * 2
    # a structure not declared single keeps every blob
    c = segment(vol, plan, net, "cpu", opts, single=frozenset({"right"}))
    np.testing.assert_array_equal(c, a)


def test_coarse_roi_on_a_scan_without_structures_runs_only_the_coarse_pass():
    plan = _plan("softmax", patch=(8, 8, 4))
    vol = Volume(np.zeros((1, 24, 16, 12), np.int16), np.eye(4))
    stats = EngineStats()
    out = segment(vol, plan, _Pointwise("softmax"), "cpu", EngineOptions(coarse_roi=True), stats=stats)
    assert stats.windows_run == 0 and stats.coarse_windows_run == 3 * 2 * 3
    assert out.shape == (1, 24, 16, 12) and not out.any()


def test_roi_map_marks_blocks_of_unaligned_windows():
    roi = RoiMap((40, 30), block=8)
    fg = np.zeros((8, 8), bool)
    fg[7, 0] = True  # voxel (12, 20): block (1, 2)
    roi.mark((slice(5, 13), slice(20, 28)), fg)
    assert roi.fg.shape == (5, 4) and roi.fg.sum() == 1 and roi.fg[1, 2]
    assert roi.near((slice(16, 24), slice(0, 8)), (0, 0)) is False
    assert roi.near((slice(8, 16), slice(16, 24)), (0, 0)) is True
    assert roi.near((slice(24, 32), slice(16, 24)), (0, 0)) is False
    assert roi.near((slice(24, 32), slice(16, 24)), (9, 0)) is True  # within the margin


def test_body_box_matches_a_full_mask_bbox():
    rng = np.random.default_rng(3)
    img = np.full((1, 30, 20, 50), -1000, np.int16)
    img[0, 5:17, 2:9, 11:40] = rng.integers(-400, 300, (12, 7, 29))
    ident = np.array([[0, 1], [1, 1], [2, 1]], float)

    def box(a):
        return body_box(CanonicalSlabs(Volume(a, np.eye(4)), ident, a.shape[1:]), -500.0)

    assert box(img) == bbox_of(img[0] > -500.0, margin=3)
    assert box(np.full((1, 4, 4, 4), -1000)) == (slice(0, 4),) * 3


def test_linear_taps_match_torch_interpolate():
    x = torch.arange(7, dtype=torch.float32).view(1, 1, 7) ** 1.5
    for n_out in (3, 7, 16):
        ref = torch.nn.functional.interpolate(x, size=n_out, mode="linear", align_corners=False)[0, 0].numpy()
        i0, i1, lam = linear_taps(n_out, 7, 0, n_out)
        v = x[0, 0].numpy()
        np.testing.assert_allclose((1 - lam) * v[i0] + lam * v[i1], ref, rtol=1e-6)


def test_memory_estimate_scales_with_classes_not_slices():
    plan20 = replace(
        _plan("softmax"),
        structure_names=tuple(f"s{i}" for i in range(20)),
        label_values=tuple(range(1, 21)),
        patch_size=(64, 64, 32),
    )
    opts = EngineOptions(batch_size=2)
    short = estimate_memory(Volume(np.zeros((1, 2, 2, 2), np.int16), np.eye(4)), plan20, opts)
    big = {z: estimate_memory(_Shape((512, 512, z)), plan20, opts) for z in (250, 1000)}
    assert big[250]["accumulator"] == big[1000]["accumulator"] > short["accumulator"] > 0
    assert big[1000]["output"] == 4 * big[250]["output"] == 4 * 512 * 512 * 250
    half = estimate_memory(_Shape((512, 512, 250)), plan20, EngineOptions(accumulator_dtype="float16"))
    assert half["accumulator"] < 0.6 * big[250]["accumulator"]


class _Shape(Volume):
    """A Volume-like stand-in with a large shape and no data (the estimate reads only geometry)."""

    def __init__(self, shape):  # noqa: D107 - deliberately skips the dataclass init
        object.__setattr__(
            self, "array", np.lib.stride_tricks.as_strided(np.zeros(1, np.int16), (1, *shape), (0,) * 4)
        )
        object.__setattr__(self, "affine", np.diag([0.8, 0.8, 1.0, 1.0]))
        object.__setattr__(self, "meta", {})


@pytest.mark.parametrize(
    "axes",
    [
        np.eye(3),
        np.diag([-1.0, -1, 1]),
        np.diag([1.0, 1, -1]),
        np.array([[0, 0, 1], [-1, 0, 0], [0, 1, 0.0]]),
    ],
    ids=["RAS", "LPS", "RAI-z-flipped", "PSR-reordered"],
)
def test_streamed_nifti_gives_the_same_labels_as_the_loaded_volume(tmp_path, axes):
    """Reading the scan block by block from its file (NiftiSlabs) changes nothing in the result, for
    axial, flipped and reordered (sagittal-like) storage."""
    from medseg.io import load_volume, save_volume
    from medseg.io.nifti import NiftiSlabs

    aff = np.eye(4)
    aff[:3, :3] = axes * np.array([0.9, 1.1, 2.0])[None, :]
    path = tmp_path / "scan.nii.gz"
    save_volume(_ct((21, 17, 13), aff), path)
    plan = _plan("softmax", spacing=(1.3, 1.1, 1.9), patch=(16, 16, 8), crop=True)
    net = _conv_net(plan.out_channels)
    want = segment(load_volume(path), plan, net, "cpu", EngineOptions(skip_air=False))
    with NiftiSlabs(path) as src:
        src.load = None  # never loaded whole, whichever storage axis is the canonical last one
        got = segment(src, plan, net, "cpu", EngineOptions(skip_air=False))
    np.testing.assert_array_equal(got, want)
    assert want.any()


def test_peak_rss_is_this_process_not_its_parent():
    """A child started after the parent touched 1 GB reports its own peak (ru_maxrss would not)."""
    import subprocess
    import sys

    from medseg.inference.process import peak_rss_bytes

    before = peak_rss_bytes()
    big = np.ones(2**27)  # 1 GiB, touched
    assert peak_rss_bytes() >= before + 0.9 * big.nbytes or before >= big.nbytes
    del big
    code = "from medseg.inference.process import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    assert 10 * 2**20 < child < 2**29


def test_memory_kept_by_the_tuned_allocator_still_counts_as_available():
    """After tune_allocator, freed blocks stay in the process; available_memory must still count them
    (else a later case in a batch would be refused). Run in a child: the tuning is process-wide."""
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from medseg.inference.process import available_memory, tune_allocator\n"
        "assert tune_allocator()\n"
        "x = np.ones(2**26); x[:] = 2; keep = np.ones(16); del x\n"  # 512 MiB freed below a live block
        "total = available_memory()\n"
        "info = open('/proc/meminfo').read().split('MemAvailable:')[1]\n"
        "kernel = int(info.split()[0]) * 1024\n"
        "print((total - kernel) / 2**20)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "MEDSEG_MALLOC"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    # the kept 512 MiB are counted on top of what the kernel reports (two reads microseconds apart)
    assert 480 < float(out.stdout) < 1024, f"counted {out.stdout.strip()} MiB of the process's free heap"
