"""The threshold baseline: the window search and the post-processing choice on arrays with known answers,
then `medseg baseline threshold` -> `medseg predict` -> `medseg evaluate` on the CT phantom (3D,
softmax) and the chest X-ray phantom (2D, sigmoid)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from factories import build_plan

from medseg.cli.main import main
from medseg.data.patches import TrainCase
from medseg.data.plan import ChannelNorm
from medseg.data.synthetic import synth_ct
from medseg.data.synthetic_cxr import synth_chest_xray
from medseg.errors import DataError
from medseg.io import load_volume
from medseg.models import NetworkSpec, create_network
from medseg.runtime.bundle import PostProcessing
from medseg.training.threshold import (
    best_interval,
    fit_postprocessing,
    fit_windows,
    lateral_side,
    mean_dice,
    select_postprocessing,
    training_predictions,
)

CONFIGS = Path(__file__).parents[2] / "configs"


# ------------------------------------------------------------------------------------ the window search


def test_best_interval_by_hand() -> None:
    fg = np.array([0, 0, 5, 5, 0, 0])
    total = np.array([10, 10, 5, 6, 10, 10])
    # bins 2..3: TP 10, P 11, G 10 -> 20 / 21; bin 2 alone: 10 / 15; bins 1..3: 20 / 31
    assert best_interval(fg, total) == (2, 3, pytest.approx(20 / 21))
    # with 10 more voxels of the structure it cannot reach, G = 20
    assert best_interval(fg, total, n_ref=20)[2] == pytest.approx(20 / 31)


def _integer_phantom(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Background of the integers 0..3 and 7..9, a structure (class 1) of exactly 4, 5 and 6."""
    rng = np.random.default_rng(seed)
    img = rng.choice([0, 1, 2, 3, 7, 8, 9], size=(12, 10, 8)).astype(np.float32)
    lab = np.zeros((1, 12, 10, 8), np.uint8)
    lab[0, 3:7, 2:6, 2:6] = 1
    img[3:7, 2:6, 2:6] = rng.choice([4, 5, 6], size=(4, 4, 4))
    return img[None], lab


def test_window_separates_a_structure_and_sits_midway_in_the_gaps() -> None:
    img, lab = _integer_phantom()
    (w,) = fit_windows([img], [lab], "softmax", 1)
    assert w.dice == 1.0
    assert w.channel == 0
    # nothing lies in (3, 4) and (6, 7): the ends are put halfway through those gaps
    assert w.lo == pytest.approx(3.5, abs=0.02)
    assert w.hi == pytest.approx(6.5, abs=0.02)
    assert w.scale == pytest.approx((w.hi - w.lo) / 2)


def test_window_is_dice_optimal_where_intensities_overlap() -> None:
    img = np.zeros((1, 20, 11, 1), np.float32)
    lab = np.zeros((1, 20, 11, 1), np.uint8)
    img[0, :10, :10] = 0.0  # 100 background voxels at 0
    img[0, 10:, :10] = 9.0  # 100 at 9
    img[0, :, 10] = 5.0  # 20 voxels at 5, half of them the structure
    lab[0, :10, 10] = 1
    (w,) = fit_windows([img], [lab], "softmax", 1)
    # any window around 5 and nothing else: TP 10, P 20, G 10 -> 2/3 (the best there is)
    assert w.dice == pytest.approx(2 / 3)
    assert w.lo < 5 < w.hi and w.lo > 0 and w.hi < 9


def test_the_brightest_structure_gets_an_open_window() -> None:
    img, lab = _integer_phantom()
    img[0][lab[0] == 1] = 9.5  # now the brightest voxels
    img[0][img[0] == 9] = 8.0
    (w,) = fit_windows([img], [lab], "softmax", 1)
    assert w.dice == 1.0 and w.hi is None and 8.0 < w.lo < 9.5


def test_each_structure_uses_its_best_channel_sigmoid_masks() -> None:
    rng = np.random.default_rng(1)
    masks = np.zeros((2, 16, 16), np.uint8)
    masks[0, 2:8, 2:8] = 1
    masks[1, 6:12, 6:14] = 1  # overlaps structure 0
    img = rng.normal(size=(2, 16, 16)).astype(np.float32)  # channel 0: noise
    img[1] = 0.0
    img[1][masks[0] == 1] = 3.0  # channel 1: structure 0 at 3 (and 5 where both overlap)
    img[1][masks[1] == 1] += 5.0
    w0, w1 = fit_windows([img], [masks], "sigmoid", 2)
    assert (w0.channel, w1.channel) == (1, 1)
    # structure 0: 32 voxels at 3 and 4 at 8 (the overlap); a window that reached 8 would take the 44
    # voxels at 5 as well, so the best is 3 alone: 2 * 32 / (32 + 36)
    assert w0.dice == pytest.approx(64 / 68)
    assert 0 < w0.lo < 3 < w0.hi < 5
    # structure 1: 5 and 8, the brightest values: an open window from between 3 and 5
    assert w1.dice == 1.0 and 3 < w1.lo < 5 and w1.hi is None


def test_lateral_prior_tells_left_from_right() -> None:
    assert lateral_side(2, 98) == 1 and lateral_side(98, 2) == -1 and lateral_side(30, 70) == 0
    img = np.zeros((1, 10, 4), np.float32)
    lab = np.zeros((1, 10, 4), np.uint8)
    lab[0, 1:3, 1:3], lab[0, 7:9, 1:3] = 1, 2  # two structures of the same intensity
    img[lab > 0] = 1.0
    w1, w2 = fit_windows([img], [lab], "softmax", 2, pairs=[(0, 1)])
    assert (w1.side, w2.side) == (-1, 1)
    assert w1.dice == 1.0 and w2.dice == 1.0
    # not a declared pair: no prior (the left-right mirror is a symmetry of the task)
    unpaired = fit_windows([img], [lab], "softmax", 2)
    assert [w.side for w in unpaired] == [0, 0]
    assert [w.dice for w in unpaired] == [pytest.approx(2 / 3)] * 2  # TP 4 of 8 predicted: 8 / 12
    # a pair found on the same side gets no prior either
    lab[0, 7:9, 1:3] = 0
    lab[0, 3:4, 1:3] = 2
    same_side = fit_windows([(lab > 0).astype(np.float32)], [lab], "softmax", 2, pairs=[(0, 1)])
    assert [w.side for w in same_side] == [0, 0]


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_the_network_predicts_what_the_fit_measured(sigma: float) -> None:
    """Sigmoid decisions are exactly "inside the window" (with the lateral prior, the chosen channel and
    the smoothing), so on one case the network's Dice equals the Dice the search found."""
    rng = np.random.default_rng(3)
    masks = np.zeros((2, 24, 20), np.uint8)
    masks[0, 3:9, 4:12] = 1
    masks[1, 15:21, 6:16] = 1  # same intensity as structure 0, the other side
    img = rng.normal(0.0, 0.6, size=(2, 24, 20)).astype(np.float32)
    img[1] += 2.0 * masks.max(0)
    windows = fit_windows([img], [masks], "sigmoid", 2, sigma_vox=(sigma, sigma), pairs=[(0, 1)])
    assert [w.side for w in windows] == [-1, 1]
    plan = build_plan(
        spatial_dims=2, target_spacing_mm=(1.0, 1.0), patch_size=(24, 20), mode="sigmoid", in_channels=2,
        normalization=(ChannelNorm("zscore"), ChannelNorm("zscore")),
    )  # fmt: skip
    options = {
        "mode": "sigmoid",
        "windows": [w.option(n) for w, n in zip(windows, "ab", strict=True)],
        "sigma_vox": [sigma] * 2,
    }
    spec = NetworkSpec("threshold", 2, (1,), ((1, 1),), options=options)
    net = create_network(spec, in_channels=2, out_channels=2)
    case = TrainCase("c", img, masks, None, {}, 0.0)
    (pred,) = training_predictions(net, [case], plan)
    # the pair shares one window, scored on both structures together
    assert (windows[0].lo, windows[0].hi) == (windows[1].lo, windows[1].hi)
    tp, p, g = (pred & masks).sum(), pred.sum(), masks.sum()
    assert 2 * tp / (p + g) == pytest.approx(windows[0].dice, abs=1e-9)
    assert windows[0].dice == windows[1].dice
    assert np.nanmean(mean_dice([pred], [masks], plan)) > 0.5


def test_a_structure_without_voxels_is_reported_by_name() -> None:
    img, lab = _integer_phantom()
    with pytest.raises(DataError, match="structure kidney has no voxels"):
        fit_windows([img], [lab], "softmax", 2, names=["liver", "kidney"])


# ------------------------------------------------------------------------------------ post-processing


def test_single_objects_and_smallest_object_from_labels() -> None:
    a = np.zeros((1, 10, 10, 4), np.uint8)
    a[0, 1:4, 1:4, :] = 1  # structure 1: one object (36 voxels)
    a[0, 6:8, 6:8, :2] = 2  # structure 2: two objects, of 8 and 4 voxels
    a[0, 6:8, 1, :2] = 2
    b = np.zeros_like(a)
    b[0, 2:5, 2:5, 1:3] = 1  # 18 voxels
    single, min_mm3 = fit_postprocessing([a, b], "softmax", ["one", "two"], (1.0, 2.0, 0.5))
    assert single == {"one"}
    assert min_mm3 == pytest.approx(0.5 * 4 * 1.0)  # half the smallest object (4 voxels of 1 mm3)


def test_post_processing_steps_are_kept_only_where_they_help() -> None:
    plan = build_plan(spatial_dims=2, target_spacing_mm=(1.0, 1.0), patch_size=(16, 16), mode="sigmoid")
    ref = np.zeros((2, 16, 16), np.uint8)
    ref[0, 2:6, 2:6] = 1  # a small object
    ref[1, 8:14, 8:14] = 1
    pred = ref.copy()
    pred[0, 9:15, 1:7] = 1  # a larger false blob: keeping the largest component loses the object
    pred[1, 1, 14] = 1  # a speck: keeping the largest component removes it
    candidate = PostProcessing(single=frozenset({"a", "b"}), min_component_mm3=0.0, fill_holes=True)
    chosen = select_postprocessing([pred], [ref], plan, candidate)
    assert chosen.single == {"b"}
    assert chosen.fill_holes  # changes nothing here: a tie keeps the step


# ------------------------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("baseline")
    return {
        "ct": synth_ct(root / "ct", cases=5, seed=5, dicom_cases=0),
        "cxr": synth_chest_xray(root / "cxr", cases=5, seed=5),
        "cache": root / "cache",
    }


def _baseline(config: str, data: Path, cache: Path, run: Path) -> list[str]:
    return [
        "baseline", "threshold", "--config", str(CONFIGS / config), "--run-dir", str(run), "--no-progress",
        "--device", "cpu", "--set", f"data.root={data}", "--set", f"train.cache_dir={cache}",
    ]  # fmt: skip


def _predict(run: Path, inputs: list[Path], out: Path) -> list[str]:
    return ["predict", "--model", str(run), "--input", *map(str, inputs), "--output", str(out),
            "--no-progress", "--device", "cpu"]  # fmt: skip


def _evaluate(pred: Path, ref: Path, out: Path, run: Path) -> dict:
    argv = ["evaluate", "--pred", str(pred), "--ref", str(ref), "--output", str(out), "--labels", str(run)]
    assert main([*argv, "--no-plot"]) == 0
    return json.loads((out / "summary.json").read_text())


def _check_run(run: Path, names: list[str], mode: str, out: str) -> dict:
    """The run directory is a model bundle with the fitted windows; returns baseline.json."""
    plan = json.loads((run / "plan.json").read_text())
    assert plan["network"]["name"] == "threshold"
    assert plan["network"]["options"]["mode"] == mode
    assert [w["structure"] for w in plan["network"]["options"]["windows"]] == names
    fitted = json.loads((run / "baseline.json").read_text())
    val = [s["val_dice"] for s in fitted["structures"]]
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert best["model"] == {}
    assert best["best_metric"] == pytest.approx(np.nanmean([v for v in val if v is not None]), abs=1e-5)
    for name in names:
        assert name in out
    return fitted


def test_baseline_ct_phantom_predict_and_evaluate(
    phantoms: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(_baseline("demo_ct.yaml", phantoms["ct"], phantoms["cache"], run)) == 0
    names = ["liver", "spleen", "left_kidney", "right_kidney", "aorta", "spine"]
    out = capsys.readouterr().out
    fitted = _check_run(run, names, "softmax", out)
    assert "HU" in out and fitted["structures"][0]["units"] == "HU"
    sides = {s["structure"]: s["side"] for s in fitted["structures"]}
    assert sides["left_kidney"] == -sides["right_kidney"] != 0  # RAS: the kidneys on opposite sides

    scan = next((phantoms["ct"] / "imagesTs").glob("*.nii.gz"))  # held out: neither fitted nor validated
    pred = tmp_path / "pred"
    assert main(_predict(run, [scan], pred)) == 0
    out_file = pred / scan.name.replace("_0000", "")
    p, img = sitk.ReadImage(str(out_file)), sitk.ReadImage(str(scan))
    assert p.GetSize() == img.GetSize() and p.GetSpacing() == img.GetSpacing()
    assert p.GetOrigin() == img.GetOrigin() and p.GetDirection() == img.GetDirection()

    ref = tmp_path / "ref"
    ref.mkdir()
    shutil.copy(phantoms["ct"] / "labelsTs" / out_file.name, ref / out_file.name)
    summary = _evaluate(pred, ref, tmp_path / "eval", run)
    assert summary["structures"]["spine"]["dice"]["mean"] > 0.6  # bone: the easy one
    assert summary["structures"]["liver"]["dice"]["mean"] > 0.5


def test_baseline_chest_xray_phantom_predict_and_evaluate(
    phantoms: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(_baseline("demo_chest_xray.yaml", phantoms["cxr"], phantoms["cache"], run)) == 0
    names = ["left_lung", "right_lung", "heart", "left_clavicle", "right_clavicle"]
    out = capsys.readouterr().out
    fitted = _check_run(run, names, "sigmoid", out)
    assert fitted["structures"][0]["units"] == "z-score"

    case = (phantoms["cxr"] / "test.txt").read_text().split()[0]  # held out
    image = phantoms["cxr"] / "images" / f"{case}.png"
    pred = tmp_path / "pred"
    assert main(_predict(run, [image], pred)) == 0
    shape = load_volume(image).array.shape
    masks = sorted(pred.rglob("*.png"))
    assert sorted(m.stem for m in masks) == sorted(names)
    assert all(load_volume(m).array.shape == shape for m in masks)

    ref = tmp_path / "ref" / case
    ref.mkdir(parents=True)
    for name in names:
        shutil.copy(phantoms["cxr"] / "masks" / name / f"{case}.png", ref / f"{name}.png")
    summary = _evaluate(pred, ref.parent, tmp_path / "eval", run)
    for lung in ("left_lung", "right_lung"):  # dark, one on each side: the easy ones
        assert summary["structures"][lung]["dice"]["mean"] > 0.7


def test_train_refuses_the_threshold_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--config", str(CONFIGS / "demo_ct.yaml"), "--set", "model.name=threshold"]
    assert main([*argv, "--set", f"data.root={tmp_path}", "--run-dir", str(tmp_path / "run")]) == 2
    assert "medseg baseline threshold" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_baseline_refuses_a_run_directory_that_holds_a_model(
    phantoms: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.pt").write_bytes(b"")
    assert main(_baseline("demo_ct.yaml", phantoms["ct"], phantoms["cache"], run)) == 2
    assert "already holds a model" in capsys.readouterr().err
