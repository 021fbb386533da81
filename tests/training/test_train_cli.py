"""End-to-end `medseg train` on tiny phantoms: both output modes, the run bundle, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medseg.cli.main import main
from medseg.data.synthetic import synth_ct
from medseg.data.synthetic_cxr import synth_chest_xray
from medseg.training import loop
from medseg.training.loop import lr_factor

TINY_CT = [
    "model.channels=[4,8,16]",
    "train.patch_size=[32,32,16]",
    "train.target_spacing_mm=[3.0,3.0,4.0]",
    "train.batch_size=2",
    "train.iterations_per_epoch=3",
    "loss.border_weights.sigma_mm=6",
]
TINY_CXR = [
    "model.channels=[4,8,16]",
    "train.patch_size=[64,64]",
    "train.batch_size=2",
    "train.iterations_per_epoch=3",
]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("phantoms")
    return {
        "ct": synth_ct(root / "ct", cases=4, seed=3, dicom_cases=0),
        "cxr": synth_chest_xray(root / "cxr", cases=4, seed=3),
        "cache": root / "cache",
    }


@pytest.mark.parametrize("mode", ["ct", "cxr"])
def test_train_two_epochs_writes_a_model_bundle(
    phantoms: dict[str, Path], tmp_path: Path, mode: str, train_args: Any, metrics_rows: Any
) -> None:
    config, extra = ("demo_ct.yaml", TINY_CT) if mode == "ct" else ("demo_chest_xray.yaml", TINY_CXR)
    run = tmp_path / "run"
    assert main(train_args(config, phantoms[mode], phantoms["cache"], run, extra)) == 0
    for name in (
        "config.yaml",
        "plan.json",
        "env.json",
        "metrics.csv",
        "curves.png",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
    ):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    plan = json.loads((run / "plan.json").read_text())
    env = json.loads((run / "env.json").read_text())
    assert env["device"] == "cpu" and len(env["config_hash"]) == 16
    rows = metrics_rows(run)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    structures = plan["structure_names"]
    assert {"epoch", "train_loss", "val_mean_dice", *[f"val_dice_{s}" for s in structures]} <= set(rows[0])
    assert all(np.isfinite(float(r["train_loss"])) for r in rows)
    assert 0.0 <= float(rows[-1]["val_mean_dice"]) <= 1.0
    if mode == "ct":
        assert plan["mode"] == "softmax" and plan["spatial_dims"] == 3
        assert structures[:5] == ["liver", "spleen", "left_kidney", "right_kidney", "aorta"]
    else:
        assert plan["mode"] == "sigmoid" and plan["spatial_dims"] == 2
        assert "left_clavicle" in structures
    # class locations for foreground sampling are stored with the preprocessed case
    from medseg.data.cache import CachedCase
    from medseg.data.plan import Plan
    from medseg.data.sampling import class_locations

    folder = phantoms["cache"] / Plan.load(run / "plan.json").preprocess_key()
    cc = CachedCase(sorted(folder.glob("*_locations.npz"))[0].name.replace("_locations.npz", ""), folder)
    stored, fresh = cc.locations(plan["mode"]), class_locations(cc.label(), plan["mode"])
    assert sorted(stored) == sorted(fresh) and all(np.array_equal(stored[k], fresh[k]) for k in fresh)
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["epoch"] == 2 and set(ck) >= {"model", "optimizer", "scheduler", "scaler", "rng"}


class TickClock:
    """A clock for ``train.max_minutes`` that advances one second per reading: the budget is spent after
    a fixed number of readings, whatever the machine's speed."""

    def __init__(self) -> None:
        self.readings = 0

    def __call__(self) -> float:
        self.readings += 1
        return float(self.readings)


def test_time_budget_ends_training_early_validated_and_annealed(
    phantoms: dict[str, Path],
    tmp_path: Path,
    train_args: Any,
    metrics_rows: Any,
    capsys: Any,
    monkeypatch: Any,
) -> None:
    monkeypatch.setattr(loop, "_clock", TickClock())
    run = tmp_path / "run"
    extra = [*TINY_CXR, "train.max_minutes=1", "train.val_every=1000"]  # 60 readings of the clock
    args = train_args("demo_chest_xray.yaml", phantoms["cxr"], phantoms["cache"], run, extra, epochs=500)
    assert main(args) == 0
    rows = metrics_rows(run)
    assert 3 <= len(rows) < 500, rows
    assert "time budget: stopping after epoch" in capsys.readouterr().err
    # the last epoch of the budget is validated although validation was due only every 1000 epochs
    assert rows[-1]["val_mean_dice"] != "" and all(r["val_mean_dice"] == "" for r in rows[:-1])
    assert (run / "checkpoints" / "best.pt").is_file()
    # the schedule follows the time: over 500 epochs poly would barely have moved; here it anneals
    lr = [float(r["lr"]) for r in rows]
    assert lr[-1] < 0.5 * lr[0] and lr == sorted(lr, reverse=True), lr
    # a resumed run lays its new budget over what is left of the schedule: no warm restart
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert 0.5 < ck["time_fraction"] <= 1.0
    monkeypatch.setattr(loop, "_clock", TickClock())
    assert main([*args, "--resume", "--set", "train.epochs=" + str(len(rows) + 1)]) == 0
    resumed = [float(r["lr"]) for r in metrics_rows(run)]
    assert len(resumed) == len(rows) + 1 and resumed[-1] <= lr[-1]


def test_time_budget_cuts_an_epoch_short(
    phantoms: dict[str, Path], tmp_path: Path, train_args: Any, metrics_rows: Any, monkeypatch: Any
) -> None:
    clock = TickClock()
    monkeypatch.setattr(loop, "_clock", clock)
    run = tmp_path / "run"
    extra = [*TINY_CXR, "train.max_minutes=0.5", "train.iterations_per_epoch=5000"]  # 30 readings
    assert (
        main(train_args("demo_chest_xray.yaml", phantoms["cxr"], phantoms["cache"], run, extra, epochs=3))
        == 0
    )
    assert clock.readings < 100  # one reading per step: the epoch ended after about 30 of its 5000 steps
    rows = metrics_rows(run)
    assert len(rows) == 1 and rows[0]["val_mean_dice"] != ""
    assert (run / "checkpoints" / "best.pt").is_file()


def test_lr_schedule_follows_the_time_used_when_it_is_further_along() -> None:
    assert lr_factor("poly", 10, 100) == pytest.approx(0.9**0.9)
    assert lr_factor("poly", 10, 100, time_fraction=0.5) == pytest.approx(0.5**0.9)
    assert lr_factor("cosine", 50, 100, time_fraction=0.2) == pytest.approx(0.5)  # the epochs lead
    assert lr_factor("poly", 0, 100, time_fraction=2.0) == 0.0


def test_refuses_existing_run_without_resume(
    phantoms: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    train_args: Any,
    metrics_rows: Any,
) -> None:
    run = tmp_path / "run"
    assert (
        main(train_args("demo_chest_xray.yaml", phantoms["cxr"], phantoms["cache"], run, TINY_CXR, epochs=1))
        == 0
    )
    capsys.readouterr()
    assert (
        main(train_args("demo_chest_xray.yaml", phantoms["cxr"], phantoms["cache"], run, TINY_CXR, epochs=1))
        == 2
    )
    assert "--resume" in capsys.readouterr().err
    # a finished run can be extended
    assert main(["train", "--run-dir", str(run), "--resume", "--no-progress", "--set", "train.epochs=2"]) == 0
    assert [r["epoch"] for r in metrics_rows(run)] == ["1", "2"]


def test_resume_after_sigkill_matches_uninterrupted_run(
    phantoms: dict[str, Path], tmp_path: Path, train_args: Any, metrics_rows: Any
) -> None:
    """Kill training mid-epoch with SIGKILL, resume: same epochs, no lost or doubled rows, and (CPU is
    deterministic) the same losses as a run that was never interrupted."""
    exe = [sys.executable, "-m", "medseg.cli.main"]
    extra = [*TINY_CXR, "train.iterations_per_epoch=12", "train.val_every=1"]
    ref = tmp_path / "ref"
    assert (
        main(train_args("demo_chest_xray.yaml", phantoms["cxr"], phantoms["cache"], ref, extra, epochs=3))
        == 0
    )

    run = tmp_path / "killed"
    args = train_args("demo_chest_xray.yaml", phantoms["cxr"], phantoms["cache"], run, extra, epochs=3)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*exe, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if (run / "metrics.csv").exists() and len(metrics_rows(run)) >= 1:
                break
            time.sleep(0.05)
        else:
            pytest.fail("training did not finish its first epoch in time")
        time.sleep(0.3)  # well inside epoch 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = len(metrics_rows(run))
    assert done < 3, "the run finished before it could be killed; make the epochs longer"
    out = subprocess.run(
        [*exe, "train", "--run-dir", str(run), "--resume", "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    rows, ref_rows = metrics_rows(run), metrics_rows(ref)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    for a, b in zip(rows, ref_rows, strict=True):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-5)
        assert float(a["val_mean_dice"]) == pytest.approx(float(b["val_mean_dice"]), abs=1e-6)


def test_resume_with_a_different_model_is_refused(
    phantoms: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, train_args: Any
) -> None:
    run = tmp_path / "run"
    assert (
        main(train_args("demo_chest_xray.yaml", phantoms["cxr"], phantoms["cache"], run, TINY_CXR, epochs=1))
        == 0
    )
    capsys.readouterr()
    code = main(
        ["train", "--run-dir", str(run), "--resume", "--no-progress", "--set", "model.channels=[4,8,32]"]
    )
    assert code == 2
    assert "model.channels" in capsys.readouterr().err


@pytest.mark.gpu
def test_train_and_predict_on_cuda_with_amp(
    phantoms: dict[str, Path], tmp_path: Path, train_args: Any, metrics_rows: Any
) -> None:
    """On a GPU: two AMP epochs on CUDA give a bundle that predicts on CUDA with the input's grid."""
    from medseg.io import load_volume

    run = tmp_path / "run"
    args = train_args("demo_ct.yaml", phantoms["ct"], phantoms["cache"], run, TINY_CT)
    args[args.index("--device") + 1] = "cuda"
    assert main([*args, "--set", "train.amp=true"]) == 0
    env = json.loads((run / "env.json").read_text())
    assert "cuda" in json.dumps(env)
    rows = metrics_rows(run)
    assert len(rows) == 2 and all(np.isfinite(float(r["train_loss"])) for r in rows)
    scan = sorted((phantoms["ct"] / "imagesTr").glob("*.nii.gz"))[0]
    out = tmp_path / "pred"
    cmd = ["predict", "--model", str(run), "--input", str(scan), "--output", str(out), "--device", "cuda"]
    assert main(cmd) == 0
    manifest = json.loads((out / "predict.json").read_text())
    assert manifest["device"].startswith("cuda")
    pred, img = load_volume(Path(manifest["cases"][0]["outputs"][0])), load_volume(scan)
    assert pred.spatial_shape == img.spatial_shape and np.allclose(pred.affine, img.affine, atol=1e-5)
    # resuming on CUDA: the RNG states in the checkpoint must come back as CPU tensors
    resume = ["train", "--run-dir", str(run), "--resume", "--no-progress", "--device", "cuda"]
    assert main([*resume, "--set", "train.epochs=3"]) == 0
    assert [r["epoch"] for r in metrics_rows(run)] == ["1", "2", "3"]
