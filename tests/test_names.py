"""Names from configs, model folders and label maps are data: never paths, never spreadsheet formulas."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from factories import build_plan, write_run

from medseg.cli.main import main
from medseg.config import load_config
from medseg.errors import ConfigError, DataError
from medseg.io import save_label_map, save_volume
from medseg.labels import LabelLayout
from medseg.names import check_label_name, check_name, safe_join, spreadsheet_safe
from medseg.types import Volume


@pytest.mark.parametrize("name", ["liver", "left_kidney", "vertebrae_L1", "T1.w", "a-b", "_x", "3"])
def test_safe_names_pass(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["../../../x", "a/b", "a\\b", ".hidden", "..", "-rf", "<script>", "a b", "", "x" * 129]
)
def test_unsafe_names_are_refused_with_a_suggestion(name: str) -> None:
    with pytest.raises(ConfigError, match="names become file and folder names.*e.g. '"):
        check_name(name)


def test_display_names_allow_spaces_but_no_paths() -> None:
    assert check_label_name("right kidney") == "right kidney"
    for bad in ("../x", "a/b", ".x", "bell\x07", ""):
        with pytest.raises(ConfigError):
            check_label_name(bad)
    with pytest.raises(ConfigError, match="not allowed"):
        LabelLayout("softmax", ("liver", "../../etc"), (1, 2))


def test_config_refuses_structure_names_that_are_paths() -> None:
    with pytest.raises(ConfigError, match=r"data\.structures: structure name '\.\./\.\./\.\./x'"):
        load_config({"data": {"root": ".", "structures": ["lung", "../../../x"]}})
    with pytest.raises(ConfigError, match=r"data\.labels: structure name '<script>alert\(1\)</script>'"):
        load_config({"data": {"root": ".", "labels": {"<script>alert(1)</script>": 1}}})


def test_spreadsheet_formulas_are_quoted() -> None:
    assert spreadsheet_safe("=HYPERLINK(1)") == "'=HYPERLINK(1)"
    assert [spreadsheet_safe(s) for s in ("+1", "-1", "@a", "\tx")] == ["'+1", "'-1", "'@a", "'\tx"]
    assert spreadsheet_safe("liver") == "liver"


def test_safe_join_stays_inside(tmp_path: Path) -> None:
    assert safe_join(tmp_path, "case", "lung.nii.gz") == tmp_path / "case" / "lung.nii.gz"
    for part in ("..", "../x", "a/../../x", ".", ""):
        with pytest.raises(DataError, match="refusing to write"):
            safe_join(tmp_path / "out", part)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path)
    with pytest.raises(DataError, match="outside the output folder"):
        safe_join(tmp_path / "out", "link", "x.nii.gz")


def _hostile_plan_run(tmp_path: Path) -> Path:
    """A model folder from elsewhere whose plan.json names a structure '../../../x' (sigmoid, 2D)."""
    plan = build_plan(
        spatial_dims=2,
        modality="xray",
        mode="sigmoid",
        structure_names=("lung", "heart"),
        label_values=(),
        target_spacing_mm=(2.0, 2.0),
        patch_size=(16, 16),
        crop_to_body=False,
        body_threshold=None,
    )
    run = write_run(tmp_path / "run", plan)
    d = json.loads((run / "plan.json").read_text())
    d["structure_names"] = ["lung", "../../../x"]
    (run / "plan.json").write_text(json.dumps(d))
    return run


def test_predict_refuses_a_model_whose_names_escape_the_output_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = _hostile_plan_run(tmp_path)
    img = tmp_path / "img.png"
    save_volume(Volume(np.full((1, 20, 20), 100, np.uint8), np.eye(4)), img)
    out = tmp_path / "out" / "a" / "b"
    code = main(
        ["predict", "--model", str(run), "--input", str(img), "--output", str(out), "--device", "cpu"]
    )
    assert code == 2
    assert "name '../../../x' is not allowed" in capsys.readouterr().err
    written = sorted(
        p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file() and "run" not in p.parts
    )
    assert written == [Path("img.png")]


def test_evaluate_and_report_csv_cells_cannot_be_formulas(tmp_path: Path) -> None:
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"1": '=HYPERLINK("x")', "2": "@SUM(A1)"}))
    arr = np.zeros((1, 6, 6, 4), np.uint8)
    arr[0, 1:3, 1:3, 1:3] = 1
    arr[0, 3:5, 3:5, 1:3] = 2
    for side in ("pred", "ref"):
        save_label_map(Volume(arr, np.eye(4)), tmp_path / side / "+case.nii.gz")
    assert (
        main(
            [
                "evaluate",
                "--pred",
                str(tmp_path / "pred"),
                "--ref",
                str(tmp_path / "ref"),
                "--output",
                str(tmp_path / "ev"),
                "--labels",
                str(labels),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(open(tmp_path / "ev" / "metrics.csv", newline="")))
    assert {r["structure"] for r in rows} == {'\'=HYPERLINK("x")', "'@SUM(A1)"}
    assert {r["case"] for r in rows} == {"'+case"}
    save_volume(Volume(np.zeros((1, 6, 6, 4), np.int16), np.eye(4)), tmp_path / "ct.nii.gz")
    assert (
        main(
            [
                "report",
                "--image",
                str(tmp_path / "ct.nii.gz"),
                "--mask",
                str(tmp_path / "pred" / "+case.nii.gz"),
                "--labels",
                str(labels),
                "--output",
                str(tmp_path / "rep"),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(open(tmp_path / "rep" / "volumes.csv", newline="")))
    assert {r["structure"] for r in rows} == {'\'=HYPERLINK("x")', "'@SUM(A1)"}
