"""Slow: the shipped demo configs reach their Dice targets on held-out phantoms (CPU, a few minutes).

chest X-ray (sigmoid): mean Dice >= 0.90 and predicted clavicles still overlap the predicted lungs
(a pixel can be in two structures); CT (softmax): mean organ Dice >= 0.85 and the output is one label
map, so no voxel can carry two organs.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from medseg.cli.main import main
from medseg.data.synthetic import synth_ct
from medseg.data.synthetic_cxr import synth_chest_xray
from medseg.io import load_volume

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.slow


def _heldout(run: Path, data: Path, out: Path) -> dict:
    spec = importlib.util.spec_from_file_location("heldout_dice", ROOT / "scripts" / "heldout_dice.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    assert mod.main(["--model", str(run), "--data", str(data), "--json", str(out), "--device", "cpu"]) == 0
    return json.loads(out.read_text())


def _train(config: str, data: Path, tmp: Path) -> Path:
    run = tmp / "run"
    args = [
        "train",
        "--config",
        str(ROOT / "configs" / config),
        "--set",
        f"data.root={data}",
        "--set",
        f"train.cache_dir={tmp / 'cache'}",
        "--run-dir",
        str(run),
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    return run


def test_demo_chest_xray_quality_and_overlap(tmp_path: Path) -> None:
    data = synth_chest_xray(tmp_path / "cxr", cases=20, seed=0)
    run = _train("demo_chest_xray.yaml", data, tmp_path)
    result = _heldout(run, data, tmp_path / "dice.json")
    assert result["mean_dice"] >= 0.90, result["mean"]
    test_ids = [s for s in (data / "test.txt").read_text().split() if s]
    out = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                "--model",
                str(run),
                "--input",
                *[str(data / "images" / f"{c}.png") for c in test_ids],
                "--output",
                str(out),
                "--no-progress",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    overlap = 0
    for c in test_ids:
        masks = {
            s: load_volume(out / c / f"{s}.png").array[0] > 0
            for s in ("left_lung", "right_lung", "left_clavicle", "right_clavicle")
        }
        image = load_volume(data / "images" / f"{c}.png")
        assert masks["left_lung"].shape == image.spatial_shape  # masks on the image's pixel grid
        overlap += int(
            (
                (masks["left_clavicle"] | masks["right_clavicle"])
                & (masks["left_lung"] | masks["right_lung"])
            ).sum()
        )
    assert overlap > 0, "no predicted pixel is both clavicle and lung"


def test_demo_ct_quality_and_exclusive_labels(tmp_path: Path) -> None:
    data = synth_ct(tmp_path / "ct", cases=10, seed=0, dicom_cases=0)
    run = _train("demo_ct.yaml", data, tmp_path)
    result = _heldout(run, data, tmp_path / "dice.json")
    assert result["mean_dice"] >= 0.85, result["mean"]
    out = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                "--model",
                str(run),
                "--input",
                str(data / "imagesTs"),
                "--output",
                str(out),
                "--no-progress",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    for f in sorted(out.glob("*.nii.gz")):
        vol = load_volume(f)
        assert vol.num_channels == 1 and vol.array.dtype == np.uint8
        assert set(np.unique(vol.array)) <= set(range(7))
