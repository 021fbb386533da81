"""Validation measures what `medseg predict` ships: the validation Dice of the epoch that wrote best.pt
equals `medseg predict` (best.pt) + `medseg evaluate` on the same validation cases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from medseg.cli.main import main
from medseg.config import load_config
from medseg.data.datasets import load_dataset
from medseg.data.patches import split_validation
from medseg.data.synthetic import synth_ct
from medseg.data.synthetic_cxr import synth_chest_xray

TINY = {
    "ct": [
        "model.channels=[4,8,16]",
        "train.patch_size=[32,32,16]",
        "train.target_spacing_mm=[3.0,3.0,4.0]",
        "train.iterations_per_epoch=4",
        "train.val_fraction=0.4",
        "data.single_component=[liver,spleen]",  # post-processing is part of what is validated
    ],
    "cxr": [
        "model.channels=[4,8,16]",
        "train.patch_size=[64,64]",
        "train.iterations_per_epoch=4",
        "train.val_fraction=0.4",
        "predict.threshold=0.4",
    ],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("val")
    return {
        "ct": synth_ct(root / "ct", cases=5, seed=4, dicom_cases=0),
        "cxr": synth_chest_xray(root / "cxr", cases=5, seed=4),
        "cache": root / "cache",
    }


def _inputs_and_references(mode: str, run: Path, ref: Path) -> list[str]:
    """The validation cases' images (as `medseg predict` inputs) and their references laid out as
    `medseg evaluate` reads them."""
    cfg = load_config(run / "config.yaml")
    cases = {c.case_id: c for c in load_dataset(cfg.data).train_cases}
    _, val = split_validation(list(cases), cfg.train.val_fraction, cfg.train.seed)
    assert len(val) == 2
    inputs = []
    for v in val:
        case = cases[v]
        inputs.append(str(case.images[0]))
        if mode == "ct":
            ref.mkdir(parents=True, exist_ok=True)
            shutil.copy(case.label, ref / f"{v}.nii.gz")
        else:
            for name, path in case.masks.items():
                (ref / v).mkdir(parents=True, exist_ok=True)
                shutil.copy(path, ref / v / f"{name}.png")
    return inputs


@pytest.mark.parametrize("mode", ["ct", "cxr"])
def test_validation_dice_equals_predict_plus_evaluate(
    mode: str, data: dict[str, Path], tmp_path: Path, train_args: Any, metrics_rows: Any
) -> None:
    config = "demo_ct.yaml" if mode == "ct" else "demo_chest_xray.yaml"
    run = tmp_path / "run"
    assert main(train_args(config, data[mode], data["cache"], run, TINY[mode], epochs=2)) == 0
    best_epoch = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["epoch"]
    row = next(r for r in metrics_rows(run) if int(r["epoch"]) == best_epoch)

    inputs = _inputs_and_references(mode, run, tmp_path / "ref")
    pred, ev = tmp_path / "pred", tmp_path / "ev"
    assert (
        main(["predict", "--model", str(run), "--input", *inputs, "--output", str(pred), "--no-progress"])
        == 0
    )
    args = ["evaluate", "--pred", str(pred), "--ref", str(tmp_path / "ref"), "--output", str(ev)]
    assert main([*args, "--labels", str(run)]) == 0
    summary = json.loads((ev / "summary.json").read_text())

    assert summary["n_cases"] == 2
    names = json.loads((run / "plan.json").read_text())["structure_names"]
    for name in names:
        shipped = summary["structures"][name]["dice"]["mean"]
        validated = row[f"val_dice_{name}"]
        if shipped is None:  # empty in both everywhere: NaN, an empty cell
            assert validated == ""
        else:
            assert float(validated) == pytest.approx(shipped, abs=1e-6), name
    assert float(row["val_mean_dice"]) == pytest.approx(summary["mean_dice"], abs=1e-6)
