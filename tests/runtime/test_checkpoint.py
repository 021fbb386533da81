"""Checkpoints are data: a pickle that would run code is refused everywhere a checkpoint is read, old
files are refused with the command that converts them, and conversion restores them exactly."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from factories import build_plan, write_run

from medseg.cli.main import main
from medseg.errors import DataError
from medseg.runtime.checkpoint import (
    FORMAT_VERSION,
    convert_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


class _Payload:
    """Unpickling this calls ``os.system`` (what a hostile model folder would carry)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: D105
        return (os.system, (f"touch {self.marker}",))


def _hostile(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {}, "epoch": 1, "extra": _Payload(marker)}, path)
    return path


def _draws() -> tuple[float, float, float, torch.Tensor]:
    """Draws from every generator a checkpoint restores (numpy's first normal may be a cached one)."""
    return random.random(), float(np.random.standard_normal()), float(np.random.random()), torch.rand(3)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's legacy state
    torch.manual_seed(3)
    path = save_checkpoint(tmp_path / "c.pt", {"model": {}, "rng": rng_state()})
    expected = _draws()
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ck = load_checkpoint(path)
    assert ck["format_version"] == FORMAT_VERSION
    set_rng_state(ck["rng"])
    got = _draws()
    assert got[:3] == expected[:3]
    assert torch.equal(got[3], expected[3])


def test_hostile_checkpoint_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _hostile(tmp_path / "best.pt", marker)
    with pytest.raises(DataError, match=r"refused.*posix\.system.*could run code"):
        load_checkpoint(path)
    with pytest.raises(DataError, match=r"refused.*posix\.system.*could run code"):
        convert_checkpoint(path)
    assert not marker.exists()


def test_predict_refuses_a_hostile_model_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = write_run(tmp_path / "run", build_plan())
    marker = tmp_path / "pwned"
    _hostile(run / "checkpoints" / "best.pt", marker)
    scan = tmp_path / "scan.nii.gz"
    from medseg.io import save_volume
    from medseg.types import Volume

    save_volume(Volume(np.zeros((1, 20, 20, 8), np.int16), np.eye(4)), scan)
    code = main(["predict", "--model", str(run), "--input", str(scan), "--output", str(tmp_path / "out")])
    assert code == 2
    assert "could run code" in capsys.readouterr().err
    assert not marker.exists()
    assert not list((tmp_path / "out").glob("*"))  # refused before any case


def test_train_resume_refuses_a_hostile_last_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    marker = tmp_path / "pwned"
    _hostile(run / "checkpoints" / "last.pt", marker)
    cfg = {"data": {"root": str(tmp_path), "labels": {"a": 1}}, "model": {"channels": [4, 8, 16]}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    code = main(["train", "--run-dir", str(run), "--resume", "--no-progress"])
    assert code == 2
    assert "could run code" in capsys.readouterr().err
    assert not marker.exists()


def _format1(path: Path) -> dict:
    """A checkpoint as medseg wrote it before format 2: numpy's legacy RNG tuple, no format_version."""
    random.seed(5)
    np.random.seed(6)
    np.random.standard_normal()
    torch.manual_seed(7)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    payload = {
        "model": {"w": torch.ones(2)},
        "epoch": 3,
        "best_metric": 0.9,
        "rng": rng,
        "rng_ranks": [rng, rng],
        "world_size": 2,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return payload


def test_old_checkpoint_is_refused_with_the_command_that_converts_it(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", build_plan())
    _format1(run / "checkpoints" / "best.pt")
    with pytest.raises(DataError, match=rf"older medseg.*medseg convert-run {run}"):
        load_checkpoint(run / "checkpoints" / "best.pt")


def test_convert_run_rewrites_old_checkpoints_exactly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = write_run(tmp_path / "run", build_plan())
    old = _format1(run / "checkpoints" / "last.pt")
    expected = _draws()
    assert main(["convert-run", str(run)]) == 0
    assert "last.pt: converted to checkpoint format 2" in capsys.readouterr().out
    ck = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ck["epoch"] == 3 and torch.equal(ck["model"]["w"], old["model"]["w"])
    assert ck["best_metric"] == -1.0  # validation measured something else then: the next one is best
    assert len(ck["rng_ranks"]) == 2
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    set_rng_state(ck["rng"])
    got = _draws()
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])
    assert main(["convert-run", str(run)]) == 0  # a second run changes nothing
    assert "already up to date" in capsys.readouterr().out
