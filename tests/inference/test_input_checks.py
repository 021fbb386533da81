"""Inputs a model was not trained for are not silently predicted: NaN/inf voxels are replaced (and said
so), and a CT model warns about scans that are not CT in Hounsfield units, in the log, predict.json and
the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from factories import build_plan, write_run
from scipy import ndimage

from medseg.cli.main import main
from medseg.data.preprocess import ScanStats, input_warnings
from medseg.io import load_volume, save_volume
from medseg.types import Volume

AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])


def _ct(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    arr = np.full((1, 80, 80, 16), -1000.0, np.float32)
    arr[0, 6:74, 8:72, 2:14] = rng.normal(40, 30, size=(68, 64, 12))
    arr[0, 14:26, 12:24, 4:10] = 150  # a bright organ
    return arr


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_run(tmp_path_factory.mktemp("run"), build_plan(patch_size=(16, 16, 8)), seed=3)


def _predict(run: Path, scan: Path, out: Path, *extra: str) -> dict:
    assert (
        main(
            [
                "predict",
                "--model",
                str(run),
                "--input",
                str(scan),
                "--output",
                str(out),
                "--no-progress",
                "--device",
                "cpu",
                *extra,
            ]
        )
        == 0
    )
    return json.loads((out / "predict.json").read_text())


def test_nan_voxels_are_replaced_and_reported(run: Path, tmp_path: Path, capsys) -> None:
    clean = _ct()
    dirty = clean.copy()
    dirty[0, 60:65, 60:65, 4:16] = np.nan  # 300 voxels inside the body
    dirty[0, 62, 58, 8] = np.inf
    n_bad = 301
    save_volume(Volume(clean, AFFINE), tmp_path / "clean.nii.gz")
    save_volume(Volume(dirty, AFFINE), tmp_path / "dirty.nii.gz")
    _predict(run, tmp_path / "clean.nii.gz", tmp_path / "a")
    manifest = _predict(run, tmp_path / "dirty.nii.gz", tmp_path / "b")
    warning = manifest["cases"][0]["input_warnings"][0]
    assert f"{n_bad} voxel(s) of channel 0 are NaN or infinite" in warning and "replaced" in warning
    assert "dirty.nii.gz: 301 voxel(s) of channel 0 are NaN or infinite" in capsys.readouterr().err
    a = load_volume(tmp_path / "a" / "clean.nii.gz").array
    b = load_volume(tmp_path / "b" / "dirty.nii.gz").array
    # the change stays within the network's reach of the bad voxels (before, NaN spread through every
    # window that read one, and on through the blending)
    bad = ~np.isfinite(dirty[0])
    mm = ndimage.distance_transform_edt(~bad, sampling=(1.5, 1.5, 3.0))
    far = mm > 40
    assert far.mean() > 0.3 and np.array_equal(a[0][far], b[0][far])
    assert np.mean(a != b) < 0.1


@pytest.mark.parametrize(
    ("name", "values", "expected"),
    [
        ("rescaled to 0..1", lambda ct: (ct + 1000) / 2000, "the scan looks rescaled"),
        ("an MR scan", lambda ct: np.clip(ct + 1000, 0, None) * 0.8, "not a CT in Hounsfield units"),
    ],
)
def test_a_ct_model_flags_inputs_that_are_not_ct(run: Path, tmp_path: Path, name, values, expected) -> None:
    scan = save_volume(Volume(values(_ct()).astype(np.float32), AFFINE), tmp_path / "scan.nii.gz")
    manifest = _predict(run, scan, tmp_path / "out", "--report")
    (warning,) = manifest["cases"][0]["input_warnings"]
    assert expected in warning, name
    html = (tmp_path / "out" / "scan_report" / "report.html").read_text()
    assert "Input outside the model's training range" in html and expected in html
    report = json.loads((tmp_path / "out" / "scan_report" / "report.json").read_text())
    assert report["input_warnings"] == [warning]


def test_a_plausible_ct_gets_no_warning(run: Path, tmp_path: Path) -> None:
    scan = save_volume(Volume(_ct().astype(np.int16), AFFINE), tmp_path / "scan.nii.gz")
    assert "input_warnings" not in _predict(run, scan, tmp_path / "out")["cases"][0]


def test_modality_of_a_dicom_series_must_match_the_model() -> None:
    stats = ScanStats(100, (-1000.0,), (400.0,), (0.0,), (1.0,), (0,), 50)
    ct_plan = build_plan()
    assert input_warnings(stats, ct_plan, {"modality": "CT"}) == []
    (w,) = input_warnings(stats, ct_plan, {"modality": "MR"})
    assert "the DICOM image is MR, but the model was trained on ct" in w
    (w,) = input_warnings(stats, ct_plan, {"modality": "PT"})  # a modality no model is trained on
    assert "the DICOM image is PT" in w
    xray = build_plan(modality="xray", spatial_dims=2, target_spacing_mm=(1.0, 1.0), patch_size=(16, 16))
    assert input_warnings(ScanStats(100, (0.0,), (1.0,), (0.5,), (0.2,), (0,), 0), xray, {}) == []
