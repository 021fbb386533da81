"""`medseg train` (2 epochs) then `medseg predict` with each classic network (FCN, Tiramisu, DeepLab,
PSPNet), in 2D on the chest X-ray phantom and in 3D on the CT phantom: the run trains, records the
network and its options in the plan, and predicts on the input's exact grid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli.main import main
from medseg.data.synthetic import synth_ct
from medseg.data.synthetic_cxr import synth_chest_xray
from medseg.io import load_volume

OPTIONS = {
    "fcn": [],
    "dense_unet": ["model.options.growth_rate=4", "model.options.layers=2"],
    "deeplab": ["model.options.output_stride=4", "model.options.atrous_rates=[1,2,3]"],
    "pspnet": ["model.options.pool_sizes=[1,2,4]"],
}
TINY = {
    "ct": ["model.channels=[4,8,16]", "train.patch_size=[32,32,16]", "train.target_spacing_mm=[3.0,3.0,4.0]"],
    "cxr": ["model.channels=[4,8,16]", "train.patch_size=[64,64]", "model.residual=false"],
}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("classic")
    return {
        "ct": synth_ct(root / "ct", cases=3, seed=5, dicom_cases=0),
        "cxr": synth_chest_xray(root / "cxr", cases=3, seed=5),
        "cache": root / "cache",
    }


CASES = [pytest.param(n, mode, id=f"{n}-{mode}") for n in OPTIONS for mode in ("cxr", "ct")]


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_train_and_predict_with_a_classic_network(
    name: str, mode: str, phantoms: dict[str, Path], tmp_path: Path, train_args: Any, metrics_rows: Any
) -> None:
    config = "demo_ct.yaml" if mode == "ct" else "demo_chest_xray.yaml"
    extra = [f"model.name={name}", *OPTIONS[name], *TINY[mode], "train.iterations_per_epoch=2"]
    run = tmp_path / "run"
    assert main(train_args(config, phantoms[mode], phantoms["cache"], run, extra, epochs=2)) == 0
    network = json.loads((run / "plan.json").read_text())["network"]
    assert network["name"] == name
    expected = {k.split("=")[0].removeprefix("model.options."): k.split("=")[1] for k in OPTIONS[name]}
    assert {k: json.dumps(v, separators=(",", ":")) for k, v in network["options"].items()} == expected
    rows = metrics_rows(run)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(np.isfinite(float(r["train_loss"])) for r in rows)

    out = tmp_path / "pred"
    if mode == "ct":
        scan = next((phantoms["ct"] / "imagesTs").glob("*.nii.gz"))
        assert main(["predict", "--model", str(run), "--input", str(scan), "--output", str(out),
                     "--no-progress", "--device", "cpu"]) == 0  # fmt: skip
        pred, img = sitk.ReadImage(str(out / scan.name.replace("_0000", ""))), sitk.ReadImage(str(scan))
        assert pred.GetSize() == img.GetSize()
        assert pred.GetSpacing() == img.GetSpacing() and pred.GetOrigin() == img.GetOrigin()
        assert pred.GetDirection() == img.GetDirection()
    else:
        image = sorted((phantoms["cxr"] / "images").iterdir())[-1]
        assert main(["predict", "--model", str(run), "--input", str(image), "--output", str(out),
                     "--no-progress", "--device", "cpu"]) == 0  # fmt: skip
        masks = sorted(p for p in out.rglob("*.png"))
        assert masks, "no masks written"
        shape = load_volume(image).array.shape
        assert all(load_volume(m).array.shape == shape for m in masks)


@pytest.mark.parametrize(
    ("mode", "weighting"),
    [("ct", ["loss.class_weights=median_frequency"]),
     ("cxr", ["loss.class_weights=inverse_frequency", "loss.focal_weight=1", "loss.focal_alpha=0.25"])],
)  # fmt: skip
def test_train_with_class_weights_from_the_training_cases(
    mode: str,
    weighting: list[str],
    phantoms: dict[str, Path],
    tmp_path: Path,
    train_args: Any,
    metrics_rows: Any,
) -> None:
    config = "demo_ct.yaml" if mode == "ct" else "demo_chest_xray.yaml"
    run = tmp_path / "run"
    extra = [*weighting, *TINY[mode], "train.iterations_per_epoch=2"]
    assert main(train_args(config, phantoms[mode], phantoms["cache"], run, extra, epochs=2)) == 0
    plan = json.loads((run / "plan.json").read_text())
    weights = np.asarray(plan["class_weights"]["weights"])
    assert plan["class_weights"]["method"] == weighting[0].split("=")[1]
    assert plan["border_weights"]["class_balance"] is False
    if mode == "ct":  # background first and the lightest: it is by far the most frequent class
        assert weights.shape == (len(plan["structure_names"]) + 1,) and weights.argmin() == 0
    else:  # (outside, inside) per structure: the inside of every structure weighs more
        assert weights.shape == (len(plan["structure_names"]), 2) and (weights[:, 1] > weights[:, 0]).all()
    assert all(np.isfinite(float(r["train_loss"])) for r in metrics_rows(run))
