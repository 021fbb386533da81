"""Dense CRF (``predict.crf``): cleaner labels on noisy two-region images in 2D and 3D, uniform fields
left alone, kernels in mm (against a brute-force reference), slab-wise == whole volume, sigmoid mode,
gradients, the engine's streaming path, and ``medseg predict --crf`` end to end."""

from __future__ import annotations

import itertools
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from factories import build_plan

from medseg.cli.main import main
from medseg.config import CRFConfig, load_config
from medseg.data.canonical import canonical_grid, oriented_view
from medseg.data.plan import ChannelNorm
from medseg.errors import ConfigError, DataError
from medseg.inference.crf import StreamingCRF
from medseg.inference.engine import EngineOptions, estimate_memory, segment
from medseg.io import save_volume
from medseg.models.crf import DenseCRF, MeanField, dense_crf, kernel_radius
from medseg.types import Volume

RAW = CRFConfig(intensity="raw", bilateral_sigma_intensity=30.0)  # image in raw units below


def _two_regions(shape, spacing, seed=0):
    """A ball (class 1) in background (class 0): image ``100 * truth + noise(20)``, and probabilities
    of class 1 ``0.5 +- 0.2 + noise(0.3)``: about a quarter of the voxels' argmax is wrong."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(
        *[(np.arange(n) - n / 2 + 0.5) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij"
    )
    radius = 0.3 * min(n * s for n, s in zip(shape, spacing, strict=True))
    truth = (sum(g**2 for g in grids) < radius**2).astype(np.int64)
    image = 100.0 * truth + rng.normal(0, 20, shape)
    p1 = np.clip(0.5 + 0.2 * (2 * truth - 1) + rng.normal(0, 0.3, shape), 0.01, 0.99)
    probs = np.stack([1 - p1, p1])[None].astype(np.float32)
    return truth, torch.from_numpy(image[None, None].astype(np.float32)), torch.from_numpy(probs)


# ------------------------------------------------------------------------------------ cleaner labels


@pytest.mark.parametrize(
    ("shape", "spacing"), [((48, 40), (0.8, 0.8)), ((24, 22, 12), (1.0, 1.0, 2.5))], ids=["2d", "3d"]
)
def test_noisy_two_region_image_gets_cleaner(shape, spacing):
    truth, image, probs = _two_regions(shape, spacing)
    before = int((probs.argmax(1)[0].numpy() != truth).sum())
    q = dense_crf(probs, image, spacing, RAW)
    after = int((q.argmax(1)[0].numpy() != truth).sum())
    assert before > 0.15 * truth.size  # the input is noisy: the test can tell
    assert after < before / 4, (before, after)
    np.testing.assert_allclose(q.sum(1).numpy(), 1.0, atol=1e-5)
    # the appearance kernel alone (no smoothness term) cleans too: it follows the image's regions
    only_b = dense_crf(probs, image, spacing, RAW.model_copy(update={"weights": (0.0, 5.0)}))
    assert int((only_b.argmax(1)[0].numpy() != truth).sum()) < before / 2


def test_more_iterations_do_not_undo_the_cleaning():
    truth, image, probs = _two_regions((40, 40), (1.0, 1.0), seed=3)
    flips = [
        int(
            (
                dense_crf(probs, image, (1.0, 1.0), RAW.model_copy(update={"iterations": t}))
                .argmax(1)[0]
                .numpy()
                != truth
            ).sum()
        )
        for t in (1, 5, 10)
    ]
    before = int((probs.argmax(1)[0].numpy() != truth).sum())
    assert flips[0] < before and flips[1] <= flips[0] and flips[2] <= flips[0], (before, flips)


# ------------------------------------------------------------------------------------ uniform fields


@pytest.mark.parametrize("dims", [2, 3])
def test_uniform_image_and_probabilities_stay_uniform_with_the_same_labels(dims):
    shape = (9, 8, 7)[:dims]
    spacing = (0.7, 1.3, 2.0)[:dims]
    image = torch.full((1, 1, *shape), 40.0)
    for p in ([0.7, 0.3], [0.2, 0.5, 0.3]):
        probs = torch.tensor(p).reshape(1, -1, *[1] * dims).expand(1, len(p), *shape).contiguous()
        q = dense_crf(probs, image, spacing, RAW)
        spread = (q.amax(dim=tuple(range(2, 2 + dims))) - q.amin(dim=tuple(range(2, 2 + dims)))).max()
        assert float(spread) < 1e-6  # borders too: the kernels are averages over the voxels present
        assert torch.equal(q.argmax(1), probs.argmax(1))
    tie = torch.full((1, 2, *shape), 0.5)
    torch.testing.assert_close(dense_crf(tie, image, spacing, RAW), tie, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        dense_crf(tie[:, :1], image, spacing, RAW, mode="sigmoid"), tie[:, :1], atol=2e-5, rtol=0
    )  # float32 rounding of the spatial average (a sum minus the voxel's own weight)


# ------------------------------------------------------------------------------------ kernels in mm


def test_window_radii_follow_the_spacing():
    # ceil(2 sigma / spacing) voxels per axis, capped: 2 * 3 mm over 0.5, 2 and 5 mm
    assert kernel_radius(3.0, (0.5, 2.0, 5.0), cap=4) == (4, 3, 2)
    assert kernel_radius(3.0, (0.5, 2.0, 5.0), cap=32) == (12, 3, 2)
    assert kernel_radius(3.0, (6.0, 60.0), cap=32) == (1, 1)  # at least the next voxel
    cfg = CRFConfig(spatial_sigma_mm=3.0, bilateral_sigma_mm=3.0, window=4)
    mf = MeanField((0.5, 2.0, 5.0), cfg)
    assert mf.bilateral_radius == (4, 3, 2) and len(mf.offsets) == 9 * 7 * 5 - 1
    assert mf.spatial_radius == (12, 3, 2) and mf.reach == 12  # rows: the first axis
    iso = MeanField((1.0, 1.0, 1.0), cfg)
    assert iso.bilateral_radius == (4, 4, 4) and iso.reach == 6


def _brute_force_step(q, u, f, spacing, cfg):
    """One mean-field update by direct sums over every voxel pair (Potts, softmax), kernels
    truncated per axis as documented: the reference for the shifted-slice implementation."""
    shape = q.shape[1:]
    rs = kernel_radius(cfg.spatial_sigma_mm, spacing, 32)
    rb = kernel_radius(cfg.bilateral_sigma_mm, spacing, cfg.window)
    ws, wb = cfg.weights
    out = np.empty_like(q)
    for i in itertools.product(*map(range, shape)):
        num_s, den_s = np.zeros(q.shape[0]), 0.0
        num_b, den_b = np.zeros(q.shape[0]), 0.0
        for j in itertools.product(*map(range, shape)):
            if j == i:
                continue
            d = [a - b for a, b in zip(i, j, strict=True)]
            dist2 = sum((x * s) ** 2 for x, s in zip(d, spacing, strict=True))
            if all(abs(x) <= r for x, r in zip(d, rs, strict=True)):
                k = math.exp(-0.5 * dist2 / cfg.spatial_sigma_mm**2)
                num_s += k * q[(slice(None), *j)]
                den_s += k
            if all(abs(x) <= r for x, r in zip(d, rb, strict=True)):
                k = math.exp(-0.5 * dist2 / cfg.bilateral_sigma_mm**2 - 0.5 * float((f[i] - f[j]) ** 2))
                num_b += k * q[(slice(None), *j)]
                den_b += k
        logits = u[(slice(None), *i)] + ws * num_s / den_s + wb * num_b / den_b
        e = np.exp(logits - logits.max())
        out[(slice(None), *i)] = e / e.sum()
    return out


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.6, 2.2)])
def test_one_iteration_equals_the_direct_sum_over_voxel_pairs(spacing):
    rng = np.random.default_rng(1)
    shape = (7, 6)
    cfg = CRFConfig(spatial_sigma_mm=1.5, bilateral_sigma_mm=2.0, window=2, weights=(2.0, 4.0), iterations=1)
    p = rng.dirichlet([1, 1, 1], size=shape).transpose(2, 0, 1)
    f = rng.normal(0, 1.0, shape)
    mf = MeanField(spacing, cfg)
    u, q = mf.unary(torch.from_numpy(p[None]))
    got = mf.step(u, q, torch.from_numpy(f[None, None]), 0, 0, shape[0], shape[0])[0].numpy()
    want = _brute_force_step(q[0].numpy(), u[0].numpy(), f, spacing, cfg)
    np.testing.assert_allclose(got, want, atol=1e-10)


def test_thin_stripe_is_removed_only_when_its_neighbours_are_near_in_mm():
    """A one-voxel stripe of class 1 along x: on a 1 mm grid its neighbours across (1 mm away) outvote
    it; with 10 mm between rows they are too far for the kernels, and the stripe stays."""
    shape = (16, 9)
    probs = torch.full((1, 2, *shape), 0.0)
    probs[:, 0], probs[:, 1] = 0.8, 0.2
    probs[:, 0, :, 4], probs[:, 1, :, 4] = 0.3, 0.7
    image = torch.zeros(1, 1, *shape)
    cfg = CRFConfig(intensity="raw", bilateral_sigma_intensity=1.0)
    near = dense_crf(probs, image, (1.0, 1.0), cfg).argmax(1)[0]
    far = dense_crf(probs, image, (1.0, 10.0), cfg).argmax(1)[0]
    assert probs.argmax(1)[0, :, 4].all()
    assert not near[:, 4].any()
    assert far[:, 4].all() and not far[:, :4].any()


# ------------------------------------------------------------------------------------ slab-wise


@pytest.mark.parametrize("chunk", [1, 3, 40])
@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_slabwise_equals_whole_volume_and_holds_few_rows(chunk, mode):
    rng = np.random.default_rng(2)
    shape, spacing = (12, 10, 40), (0.9, 1.1, 1.4)
    cfg = CRFConfig(iterations=3, window=2, intensity="raw", bilateral_sigma_intensity=1.0)
    k = 3
    raw = rng.random((k, *shape)).astype(np.float32)
    probs = raw / raw.sum(0) if mode == "softmax" else raw
    feats = rng.normal(0, 1, (1, *shape)).astype(np.float32)
    mf = MeanField(spacing, cfg, mode)
    whole = mf(torch.from_numpy(probs[None]), torch.from_numpy(feats[None]))[0].numpy()
    crf = StreamingCRF(spacing, cfg, mode, shape[-1], lambda z0, z1: feats[..., z0:z1])
    r = crf.mf.reach
    assert r == 5 and 2 * cfg.iterations * r < shape[-1]  # the pipeline is deeper than one slab
    got = np.empty_like(probs)
    held = 0
    for z0 in range(0, shape[-1], chunk):
        block = np.moveaxis(probs[..., z0 : z0 + chunk], -1, 0)  # (rows, K, *inplane), as the Restorer gives
        for r0, q in crf.push(z0, block):
            got[..., r0 : r0 + len(q)] = np.moveaxis(q, 0, -1)
        held = max(held, max(lv.stop - lv.start for lv in crf.levels))
    assert crf.finished
    np.testing.assert_allclose(got, whole, atol=2e-6)
    if chunk < shape[-1]:
        assert held <= 2 * r + chunk  # each iteration keeps only the rows the next one reads


# ------------------------------------------------------------------------------------ sigmoid


def test_sigmoid_channel_is_the_two_label_crf_of_that_structure():
    truth, image, probs = _two_regions((30, 26), (1.0, 1.0), seed=4)
    soft = dense_crf(probs, image, (1.0, 1.0), RAW)
    sig = dense_crf(probs[:, 1:], image, (1.0, 1.0), RAW, mode="sigmoid")
    torch.testing.assert_close(sig[:, 0], soft[:, 1], atol=1e-5, rtol=0)


def test_sigmoid_overlapping_structures_get_cleaner_and_keep_their_overlap():
    rng = np.random.default_rng(5)
    shape = (40, 36)
    a = np.zeros(shape, bool)
    b = np.zeros(shape, bool)
    a[5:30, 5:25], b[15:35, 12:32] = True, True  # overlap [15:30, 12:25]
    truth = np.stack([a, b]).astype(np.int64)
    image = 60.0 * a + 60.0 * b + rng.normal(0, 15, shape)
    p = np.clip(0.5 + 0.2 * (2 * truth - 1) + rng.normal(0, 0.3, truth.shape), 0.01, 0.99)
    q = dense_crf(
        torch.from_numpy(p[None]).float(),
        torch.from_numpy(image[None, None]).float(),
        (1.0, 1.0),
        RAW,
        mode="sigmoid",
    )[0].numpy()
    for c in range(2):
        before = int(((p[c] >= 0.5) != truth[c]).sum())
        after = int(((q[c] >= 0.5) != truth[c]).sum())
        assert before > 0.15 * truth[c].size and after < before / 4, (c, before, after)
    overlap = a & b
    assert ((q[0] >= 0.5) & (q[1] >= 0.5))[overlap].mean() > 0.9


# ------------------------------------------------------------------------------------ gradients


def test_gradients_flow_to_probabilities_image_and_weights():
    rng = np.random.default_rng(6)
    cfg = CRFConfig(iterations=2, window=1, intensity="raw", bilateral_sigma_intensity=1.0)
    p = torch.from_numpy(rng.dirichlet([1, 1], size=(5, 4)).transpose(2, 0, 1)[None]).requires_grad_(True)
    f = torch.from_numpy(rng.normal(0, 1, (1, 1, 5, 4))).requires_grad_(True)
    w = torch.tensor([1.5, 2.5], dtype=torch.float64, requires_grad=True)

    def run(p, f, w):
        return MeanField((1.0, 1.3), cfg, weights=w)(p, f)

    assert torch.autograd.gradcheck(run, (p, f, w), eps=1e-6, atol=1e-6)
    # logits in (a CRF-as-RNN layer), 3D, through the module: finite, non-zero gradients
    x = torch.randn(1, 3, 6, 5, 4, requires_grad=True)
    crf = DenseCRF(cfg, inputs="logits")
    crf.kernel_weights = torch.nn.Parameter(crf.kernel_weights.clone())
    crf(x, torch.randn(1, 1, 6, 5, 4), (1.0, 1.0, 2.0))[:, 1].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 and crf.kernel_weights.grad.abs().sum() > 0


def test_potts_compatibility_matrix_gives_the_potts_result():
    truth, image, probs = _two_regions((20, 18), (1.0, 1.0), seed=7)
    probs = torch.cat([probs, torch.full_like(probs[:, :1], 0.1)], 1)
    probs = probs / probs.sum(1, keepdim=True)
    mf = MeanField((1.0, 1.0), RAW)
    potts = MeanField((1.0, 1.0), RAW, compatibility=1 - torch.eye(3))
    feats = image / RAW.bilateral_sigma_intensity
    torch.testing.assert_close(potts(probs, feats), mf(probs, feats), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="softmax"):
        MeanField((1.0, 1.0), RAW, "sigmoid", compatibility=1 - torch.eye(2))


def test_crf_config_is_strict_and_off_by_default(tmp_path):
    assert CRFConfig().enabled is False
    path = tmp_path / "c.yaml"
    path.write_text("data: {root: " + str(tmp_path) + ", labels: {a: 1}}\n")
    cfg = load_config(path, overrides=["predict.crf.enabled=true", "predict.crf.weights=[1, 2]"])
    assert cfg.predict.crf.enabled and cfg.predict.crf.weights == (1.0, 2.0)
    with pytest.raises(ConfigError, match="iterations"):
        load_config(path, overrides=["predict.crf.iteratons=3"])
    with pytest.raises(ConfigError, match="weights"):
        load_config(path, overrides=["predict.crf.weights=[1, 2, 3]"])
    with pytest.raises(ConfigError, match="window"):
        load_config(path, overrides=["predict.crf.window=0"])


# ------------------------------------------------------------------------------------ the engine


def _ct(shape, affine, seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    img = np.full((1, *shape), -1000, np.int16)
    img[(0, *(slice(3, n - 3) for n in shape))] = rng.integers(-150, 220, [n - 6 for n in shape])
    img[(0, *(slice(5, 14) for _ in shape))] += 300  # a bright block with edges for the appearance kernel
    return Volume(img, affine)


def _net(k: int, dims: int) -> torch.nn.Module:
    torch.manual_seed(0)
    conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
    return torch.nn.Sequential(conv(1, 6, 3, padding=1), torch.nn.Tanh(), conv(6, k, 3, padding=1)).eval()


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_engine_applies_the_crf_to_the_probabilities_on_the_scan_grid(mode, dims):
    """segment() with the CRF == the CRF run once over the probabilities segment() decides from
    without it (collected from the sink), on the scan's own canonical crop with its intensities."""
    lps = np.array([[-0.9, 0, 0, 10], [0, -0.8, 0, 20], [0, 0, 2.0, -5], [0, 0, 0, 1]])
    shape = (30, 24, 22) if dims == 3 else (44, 40)
    vol = _ct(shape, lps if dims == 3 else np.diag([0.9, 0.8, 1.0, 1.0]))
    plan = build_plan(
        spatial_dims=dims,
        mode=mode,
        structure_names=("a", "b"),
        label_values=(1, 2) if mode == "softmax" else (),
        target_spacing_mm=(1.3, 1.1, 1.9)[:dims],
        patch_size=(16, 16, 8)[:dims],
        normalization=(ChannelNorm("ct", -200.0, 250.0, 20.0, 80.0),),
    )
    net = _net(plan.out_channels, dims)
    cfg = CRFConfig(enabled=True, iterations=3, intensity="raw", bilateral_sigma_intensity=50.0)
    seen_off, seen_on = [], []
    opts = EngineOptions(skip_air=False)
    plain = segment(vol, plan, net, "cpu", opts, sink=lambda b, p: seen_off.append((b, p.copy())))
    got = segment(
        vol,
        plan,
        net,
        "cpu",
        EngineOptions(skip_air=False, crf=cfg),
        sink=lambda b, p: seen_on.append((b, p.copy())),
    )
    assert got.shape == plain.shape == (1 if mode == "softmax" else 2, *shape)
    assert len(seen_off) > 1  # the rows reach the CRF in several blocks
    assert len(seen_on) > 1 or dims == 2  # and leave it in several (2D: the pipeline is deeper than 40 rows)

    def whole(seen):
        boxes = [b for b, _ in seen]
        box = (*boxes[0][:-1], slice(boxes[0][-1].start, boxes[-1][-1].stop))
        return box, np.concatenate([np.moveaxis(p, 0, -1) for _, p in seen], -1)  # (K, *crop)

    box, p_off = whole(seen_off)
    box_on, p_on = whole(seen_on)
    assert box == box_on
    ornt, _, spacing = canonical_grid(vol)
    image = oriented_view(vol.array, ornt)[(slice(None), *box)].astype(np.float32)
    want = dense_crf(torch.from_numpy(p_off[None]), torch.from_numpy(image[None]), spacing, cfg, mode=mode)[0]
    np.testing.assert_allclose(p_on, want.numpy(), atol=1e-5)
    labels = oriented_view(got, ornt)[(slice(None), *box)]
    if mode == "softmax":
        np.testing.assert_array_equal(labels[0], np.array([0, 1, 2])[p_on.argmax(0)])
    else:
        np.testing.assert_array_equal(labels, (p_on >= 0.5).astype(labels.dtype))
    assert (got != plain).any()  # the CRF changed some labels: the comparison above can fail
    est = estimate_memory(vol, plan, EngineOptions(crf=cfg))
    assert est["crf"] > 0 and "crf" not in estimate_memory(vol, plan, EngineOptions())


# ------------------------------------------------------------------------------------ CLI


def test_predict_cli_with_crf_keeps_the_input_grid_and_records_the_settings(tmp_path, save_run, capsys):
    plan = build_plan()
    config = {
        "data": {"root": str(tmp_path), "labels": {"a": 1, "b": 2}},
        "predict": {"crf": {"iterations": 2}},
    }
    run = save_run(tmp_path / "run", plan, config=config)
    lps = np.array([[-0.75, 0, 0, 10], [0, -0.75, 0, 20], [0, 0, 3.0, -5], [0, 0, 0, 1]])
    save_volume(_ct((30, 26, 16), lps), tmp_path / "in" / "ct_0000.nii.gz")

    def predict(out: str, *flags: str) -> dict:
        args = [
            "predict",
            "--model",
            str(run),
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / out),
        ]
        assert main([*args, "--no-progress", "--device", "cpu", "--save-probabilities", *flags]) == 0
        return json.loads((tmp_path / out / "predict.json").read_text())

    on = predict("on", "--crf")
    off = predict("off")
    assert "1 predicted" in capsys.readouterr().out
    crf = on["postprocessing"]["crf"]
    assert crf["enabled"] is True and crf["iterations"] == 2  # the run's settings, switched on
    assert off["postprocessing"]["crf"]["enabled"] is False and "crf" not in off["options"]
    src = nib.load(str(tmp_path / "in" / "ct_0000.nii.gz"))
    pred = nib.load(str(tmp_path / "on" / "ct.nii.gz"))
    assert pred.shape == src.shape
    np.testing.assert_array_equal(pred.affine, src.affine)
    p_on = np.load(tmp_path / "on" / "ct_probabilities.npy").astype(np.float32)
    p_off = np.load(tmp_path / "off" / "ct_probabilities.npy").astype(np.float32)
    assert p_on.shape == p_off.shape == (3, *src.shape)
    assert np.abs(p_on - p_off).max() > 0.01  # the CRF ran
    labels = np.asarray(pred.dataobj)
    inside = p_on.max(0) > 0.6  # float16 storage: compare away from near-ties
    np.testing.assert_array_equal(labels[inside], p_on.argmax(0)[inside])


def test_settings_from_an_untrusted_config_are_bounded():
    # a run's config.yaml may come from elsewhere: no billion iterations, no kernel that overflows
    for bad in ({"iterations": 10**9}, {"bilateral_sigma_intensity": 1e-40}, {"spatial_sigma_mm": 1e9},
                {"weights": (1e9, 1.0)}):  # fmt: skip
        with pytest.raises(ValueError):
            CRFConfig(**bad)


def test_non_finite_marginals_are_an_error_not_empty_labels(monkeypatch):
    shape = (6, 6, 8)
    crf = StreamingCRF((1.0, 1.0, 1.0), CRFConfig(iterations=1, window=1), "softmax", shape[-1],
                       lambda z0, z1: np.zeros((1, *shape[:-1], z1 - z0), np.float32))  # fmt: skip
    monkeypatch.setattr(crf.mf, "step", lambda *a, **k: torch.full((1, 2, 8, 6, 6), float("nan")))
    with pytest.raises(DataError, match="non-finite probabilities"):
        crf.push(0, np.full((shape[-1], 2, *shape[:-1]), 0.5, np.float32))
