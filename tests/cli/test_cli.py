"""End-to-end tests of the `medseg` command (in-process through `main(argv)`, one via a subprocess)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medseg.cli.main import main
from medseg.io import save_label_map, save_volume
from medseg.types import Volume

CONFIGS = Path(__file__).parents[2] / "configs"


def test_version_and_help_subprocess() -> None:
    exe = shutil.which("medseg", path=str(Path(sys.executable).parent))
    assert exe is not None, "the medseg console script is not installed next to this python"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("medseg ")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    for cmd in ("info", "data", "config"):
        assert cmd in out.stdout


def test_info_json_has_exactly_the_documented_keys(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    aff = np.array([[-0.8, 0, 0, 10], [0, -0.8, 0, 20], [0, 0, 2.5, -30], [0, 0, 0, 1]])
    arr = np.arange(24, dtype=np.int16).reshape(1, 4, 3, 2) - 5
    path = save_volume(Volume(arr, aff), tmp_path / "scan.nii.gz")
    assert main(["info", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert set(d) == {"shape", "spacing", "orientation", "origin", "affine", "dtype", "min", "max"}
    assert d["shape"] == [4, 3, 2] and d["spacing"] == pytest.approx([0.8, 0.8, 2.5])
    assert d["orientation"] == "LPS" and d["origin"] == pytest.approx([10, 20, -30])
    assert np.allclose(d["affine"], aff, atol=1e-5)
    assert (d["dtype"], d["min"], d["max"]) == ("int16", -5, 18)
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "orientation: LPS" in text and "0.8 x 0.8 x 2.5 mm" in text


def test_info_bad_file_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["info", str(tmp_path / "missing.nii.gz")]) == 2
    assert "missing.nii.gz: no such file" in capsys.readouterr().err


def test_config_show_with_overrides(capsys: pytest.CaptureFixture) -> None:
    args = [
        "config",
        "show",
        "--config",
        str(CONFIGS / "demo_ct.yaml"),
        "--set",
        "train.epochs=3",
        "--set",
        "train.seed=7",
        "--json",
    ]
    assert main(args) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["train"]["epochs"] == 3 and d["train"]["seed"] == 7
    assert d["predict"]["overlap"] == 0.5  # defaults filled in


def test_config_errors_exit_2_with_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {root: x, labels: {liver: 1}}\ntrain: {lr_rate: 0.1, epochs: -1}\n")
    assert main(["config", "show", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "2 problems" in err
    assert "did you mean 'lr'" in err and "train.epochs" in err
    assert "Traceback" not in err


def _tiny_msd(root: Path) -> None:
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    labels = {"background": 0, "liver": 1}
    (root / "dataset.json").write_text(
        json.dumps(
            {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 2, "file_ending": ".nii.gz"}
        )
    )
    for i in range(2):
        img = np.full((1, 8, 8, 4), -100, np.int16)
        lab = np.zeros((1, 8, 8, 4), np.uint8)
        lab[0, 2:5, 2:5, 1:3] = 1
        save_volume(Volume(img, aff), root / "imagesTr" / f"c{i}_0000.nii.gz")
        save_label_map(Volume(lab, aff), root / "labelsTr" / f"c{i}.nii.gz")


def test_data_check_clean_and_broken(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "ds"
    _tiny_msd(root)
    assert main(["data", "check", str(root), "--no-progress"]) == 0
    capsys.readouterr()
    # plant an undeclared label value in case c1
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    lab = np.zeros((1, 8, 8, 4), np.uint8)
    lab[0, 1, 1, 1] = 7
    save_label_map(Volume(lab, aff), root / "labelsTr" / "c1.nii.gz")
    assert main(["data", "check", str(root), "--no-progress", "--json"]) == 2
    records = json.loads(capsys.readouterr().out)
    assert any(r["case"] == "c1" and r["severity"] == "error" and "7" in r["message"] for r in records)


def test_data_check_needs_config_or_folder(capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "check"]) == 2
    assert "give either --config" in capsys.readouterr().err


def test_synth_then_check_with_demo_configs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ct, cxr = tmp_path / "ct", tmp_path / "cxr"
    assert (
        main(["data", "synth", "ct", "--out", str(ct), "--cases", "3", "--seed", "1", "--no-progress"]) == 0
    )
    assert main(["data", "synth", "chest_xray", "--out", str(cxr), "--cases", "3", "--no-progress"]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "data",
                "check",
                "--config",
                str(CONFIGS / "demo_ct.yaml"),
                "--set",
                f"data.root={ct}",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "data",
                "check",
                "--config",
                str(CONFIGS / "demo_chest_xray.yaml"),
                "--set",
                f"data.root={cxr}",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "3 cases checked" in out
    # refuses to write into a non-empty folder
    assert main(["data", "synth", "ct", "--out", str(ct), "--cases", "1", "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_info_on_real_dicom_matches_label_grid(real_data: Path, capsys: pytest.CaptureFixture) -> None:
    """`medseg info` on the TotalSegmentator DICOM series describes the grid of its label map."""
    from medseg.types import same_physical_grid

    base = real_data / "ct_totalsegmentator"
    assert main(["info", str(base / "example_ct_dicom"), "--json"]) == 0
    dcm = json.loads(capsys.readouterr().out)
    assert main(["info", str(base / "example_seg_dicom.nii.gz"), "--json"]) == 0
    seg = json.loads(capsys.readouterr().out)
    assert dcm["shape"] == [512, 512, 20] and dcm["orientation"] == "LPS"
    assert seg["orientation"] == "LAS"  # rows stored in the opposite order
    assert same_physical_grid(dcm["shape"], np.array(dcm["affine"]), seg["shape"], np.array(seg["affine"]))
    assert dcm["min"] < -500 < dcm["max"]


def test_warnings_print_as_one_line_without_source_code(capsys: pytest.CaptureFixture) -> None:
    """Library warnings (e.g. a DICOM SEG's generated UIDs) reach CLI users as their message only."""
    import warnings

    from medseg.cli.main import _configure_logging

    _configure_logging(verbose=False, quiet=True)
    warnings.warn("the source series has no SeriesInstanceUID", UserWarning, stacklevel=1)
    assert capsys.readouterr().err == "warning: the source series has no SeriesInstanceUID\n"
