"""check-data: one planted defect per case, all found in one pass, named by case and check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import medseg.io
from medseg.config import DataConfig
from medseg.data.check import CHECKS, CheckReport, check_dataset
from medseg.data.datasets import Problem, dataset_from_folder, load_dataset
from medseg.io import save_label_map, save_volume
from medseg.types import Volume

SHAPE = (8, 8, 4)
AFFINE = np.array([[1.0, 0, 0, -10.0], [0, 1.0, 0, 5.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1]])
LABELS = {"liver": 1, "spleen": 2}


def image(path: Path, arr: np.ndarray | None = None, affine: np.ndarray = AFFINE) -> None:
    if arr is None:
        arr = np.random.default_rng(0).normal(0, 100, (1, *SHAPE)).astype(np.float32)
    save_volume(Volume(arr, affine), path)


def label(
    path: Path, values: tuple[int, ...] = (1, 2), shape: tuple[int, ...] = SHAPE, affine: np.ndarray = AFFINE
) -> None:
    arr = np.zeros((1, *shape), dtype=np.uint8)
    for k, v in enumerate(values):
        arr[0, 1 + 3 * k : 3 + 3 * k, 2:5, ...] = v
    save_label_map(Volume(arr, affine), path)


def msd(root: Path, channels: int = 1) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    names = {str(i): f"ch{i}" for i in range(channels)}
    (root / "dataset.json").write_text(
        json.dumps({"channel_names": names, "labels": {"background": 0, **LABELS}, "file_ending": ".nii.gz"})
    )
    return root


def found(report: CheckReport) -> set[tuple[str, str]]:
    return {(p.case, p.check) for p in report.problems}


def by_case(report: CheckReport, case: str) -> list[Problem]:
    return [p for p in report.problems if p.case == case]


def test_clean_dataset(tmp_path: Path) -> None:
    root = msd(tmp_path / "ds")
    for cid in ("a", "b"):
        image(root / "imagesTr" / f"{cid}_0000.nii.gz")
        label(root / "labelsTr" / f"{cid}.nii.gz")
    image(root / "imagesTs" / "t_0000.nii.gz")
    cfg = DataConfig(root=root, labels=LABELS)
    report = check_dataset(load_dataset(cfg), cfg, progress=True)
    assert report.problems == []
    assert report.exit_code == 0 and report.n_cases == 3
    assert report.to_table() == "no problems found\n3 cases checked: 0 errors, 0 warnings"
    assert report.to_records() == []


def plant_defects(root: Path) -> None:
    tr, lt = root / "imagesTr", root / "labelsTr"
    image(tr / "clean_0000.nii.gz")
    label(lt / "clean.nii.gz")
    # unreadable image
    tr.mkdir(parents=True, exist_ok=True)
    (tr / "corrupt_0000.nii.gz").write_bytes(b"\x1f\x8b not really gzip, not a nifti")
    label(lt / "corrupt.nii.gz")
    # label grid problems, one each
    image(tr / "shape_0000.nii.gz")
    label(lt / "shape.nii.gz", shape=(8, 8, 5))
    image(tr / "spacing_0000.nii.gz")
    a = AFFINE.copy()
    a[2, 2] = 2.5
    label(lt / "spacing.nii.gz", affine=a)
    image(tr / "origin_0000.nii.gz")
    a = AFFINE.copy()
    a[:3, 3] += [3.0, 0.0, 0.0]
    label(lt / "origin.nii.gz", affine=a)
    image(tr / "direction_0000.nii.gz")
    a = AFFINE.copy()
    a[0, 0] = -1.0  # same origin and spacing, x axis reversed
    label(lt / "direction.nii.gz", affine=a)
    # label content problems
    image(tr / "undeclared_0000.nii.gz")
    label(lt / "undeclared.nii.gz", values=(1, 3))
    image(tr / "empty_0000.nii.gz")
    label(lt / "empty.nii.gz", values=())
    image(tr / "fraction_0000.nii.gz")
    frac = np.zeros((1, *SHAPE), dtype=np.float32)
    frac[0, 2:4, 2:4, 1] = 0.5
    save_volume(Volume(frac, AFFINE), lt / "fraction.nii.gz")
    # image content problems
    nan = np.zeros((1, *SHAPE), dtype=np.float32)
    nan[0, 1, 1, 1] = np.nan
    image(tr / "nan_0000.nii.gz", nan)
    label(lt / "nan.nii.gz")
    image(tr / "fourd_0000.nii.gz", np.zeros((2, *SHAPE), dtype=np.float32))
    label(lt / "fourd.nii.gz")
    image(tr / "flat_0000.nii.gz", np.zeros((1, 8, 8), dtype=np.float32))
    label(lt / "flat.nii.gz", shape=(8, 8))
    # pairing problems
    image(tr / "nolabel_0000.nii.gz")
    label(lt / "noimage.nii.gz")


EXPECTED = {
    "corrupt": "unreadable",
    "shape": "shape_mismatch",
    "spacing": "spacing_mismatch",
    "origin": "origin_mismatch",
    "direction": "direction_mismatch",
    "undeclared": "undeclared_label",
    "empty": "empty_label",
    "fraction": "non_integer_label",
    "nan": "non_finite",
    "fourd": "image_4d",
    "flat": "spatial_dims",
    "nolabel": "missing_label",
    "noimage": "missing_image",
}


def test_every_planted_defect_is_found(tmp_path: Path) -> None:
    root = msd(tmp_path / "ds")
    plant_defects(root)
    cfg = DataConfig(root=root, labels=LABELS, spatial_dims=3)
    report = check_dataset(load_dataset(cfg), cfg)
    got = found(report)
    for case, check in EXPECTED.items():
        assert (case, check) in got, f"{case}: {check} not reported; got {by_case(report, case)}"
        assert check in CHECKS
    assert by_case(report, "clean") == []
    # each grid defect is reported as itself, not as a cascade of other mismatches
    for case in ("spacing", "origin", "direction"):
        assert [p.check for p in by_case(report, case)] == [EXPECTED[case]]
    assert report.exit_code == 2
    assert {p.severity for p in by_case(report, "empty")} == {"warning"}
    assert len(report.errors) >= len(EXPECTED) - 1 and len(report.warnings) >= 1

    def message(case: str) -> str:
        return next(p.message for p in by_case(report, case) if p.check == EXPECTED[case])

    assert "label values [3] are not declared" in message("undeclared")
    assert "background=0, liver=1, spleen=2" in message("undeclared")
    assert "label spacing (1, 1, 2.5) mm differs from image spacing (1, 1, 2) mm" in message("spacing")
    assert "nearest-neighbour" in message("spacing")
    assert "by 3 mm" in message("origin")
    assert "label shape (8, 8, 5) differs from image shape (8, 8, 4)" in message("shape")
    assert "1 NaN" in message("nan")
    assert "2 volumes" in message("fourd") and "fourd_0000, fourd_0001" in message("fourd")
    assert "image is 2D" in message("flat") and "data.spatial_dims is 3" in message("flat")
    unreadable = next(p for p in by_case(report, "corrupt") if p.check == "unreadable")
    assert unreadable.file == "imagesTr/corrupt_0000.nii.gz"
    assert "NIfTI" in unreadable.message

    table = report.to_table()
    lines = table.splitlines()
    assert lines[0].split() == ["severity", "case", "check", "message"]
    col = lines[0].index("check")
    assert all(line[col - 2 : col] == "  " for line in lines[1:-1])
    n_err, n_warn = len(report.errors), len(report.warnings)
    warn_word = "warning" if n_warn == 1 else "warnings"
    assert lines[-1] == f"{report.n_cases} cases checked: {n_err} errors, {n_warn} {warn_word}"
    assert "labelsTr/spacing.nii.gz: label spacing" in table
    records = report.to_records()
    assert set(records[0]) == {"severity", "case", "file", "check", "message"}
    json.dumps(records)


def test_each_file_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = msd(tmp_path / "ds", channels=2)
    for cid in ("a", "b", "c"):
        image(root / "imagesTr" / f"{cid}_0000.nii.gz")
        image(root / "imagesTr" / f"{cid}_0001.nii.gz")
        label(root / "labelsTr" / f"{cid}.nii.gz")
    calls: list[str] = []
    real = medseg.io.load_volume

    def counting(path, **kw):
        calls.append(str(path))
        return real(path, **kw)

    from medseg.data import check as check_module
    from medseg.data.datasets import read as read_module

    for module in (check_module, read_module):  # every place that reads a dataset's files
        monkeypatch.setattr(module, "load_volume", counting)
    report = check_dataset(dataset_from_folder(root))
    assert report.exit_code == 0
    assert len(calls) == 9 and len(set(calls)) == 9


def test_warnings_alone_exit_zero(tmp_path: Path) -> None:
    root = msd(tmp_path / "ds")
    image(root / "imagesTr" / "a_0000.nii.gz")
    label(root / "labelsTr" / "a.nii.gz", values=(1,))
    image(root / "imagesTr" / "b_0000.nii.gz")
    label(root / "labelsTr" / "b.nii.gz", values=())
    report = check_dataset(dataset_from_folder(root))
    assert report.errors == []
    assert found(report) == {("b", "empty_label"), ("", "unused_label")}
    assert report.exit_code == 0
    assert report.to_table().endswith("2 cases checked: 0 errors, 2 warnings")
    assert "spleen=2 is declared but appears in none of the 2 label maps" in report.to_table()


def test_small_origin_difference_is_tolerated(tmp_path: Path) -> None:
    root = msd(tmp_path / "ds")
    image(root / "imagesTr" / "a_0000.nii.gz")
    a = AFFINE.copy()
    a[:3, 3] += 0.004
    label(root / "labelsTr" / "a.nii.gz", affine=a)
    assert check_dataset(dataset_from_folder(root)).problems == []
    report = check_dataset(dataset_from_folder(root), tol_origin_mm=1e-3)
    assert found(report) == {("a", "origin_mismatch")}


def test_channel_checks(tmp_path: Path) -> None:
    root = msd(tmp_path / "v2", channels=2)
    for cid in ("ok", "extra", "gap"):
        image(root / "imagesTr" / f"{cid}_0000.nii.gz")
        label(root / "labelsTr" / f"{cid}.nii.gz")
    image(root / "imagesTr" / "ok_0001.nii.gz")
    image(root / "imagesTr" / "extra_0001.nii.gz")
    image(root / "imagesTr" / "extra_0002.nii.gz")
    shifted = AFFINE.copy()
    shifted[:3, 3] += 2.0
    image(root / "imagesTr" / "gap_0002.nii.gz", affine=shifted)
    report = check_dataset(dataset_from_folder(root))
    assert ("extra", "channel_count") in found(report)
    assert ("gap", "missing_channel") in found(report)
    assert ("gap", "origin_mismatch") in found(report)  # channel 2 is not on channel 0's grid
    assert by_case(report, "ok") == []

    # MSD Task folders keep all modalities in one 4D file: fine when declared, else channel_count
    root = tmp_path / "msd"
    root.mkdir()
    (root / "dataset.json").write_text(
        json.dumps({"modality": {"0": "FLAIR", "1": "T1"}, "labels": {"1": "x"}})
    )
    image(root / "imagesTr" / "brain_001.nii.gz", np.zeros((2, *SHAPE), dtype=np.float32))
    label(root / "labelsTr" / "brain_001.nii.gz", values=(1,))
    image(root / "imagesTr" / "brain_002.nii.gz", np.zeros((3, *SHAPE), dtype=np.float32))
    label(root / "labelsTr" / "brain_002.nii.gz", values=(1,))
    report = check_dataset(dataset_from_folder(root))
    assert found(report) == {("brain_002", "channel_count")}
    assert "image has 3 channel(s) but 2 were expected" in report.problems[0].message


def png(path: Path, arr: np.ndarray) -> None:
    save_volume(Volume(arr[None].astype(np.uint8), np.eye(4)), path)


def test_scr_checks(tmp_path: Path) -> None:
    root = tmp_path / "scr"
    for cid in ("ok", "aspect", "empty", "grey", "nomask"):
        png(root / "images" / f"{cid}.png", np.full((8, 6), 100))
        heart = np.zeros((8, 6))
        heart[2, 2] = 255
        png(root / "masks" / "heart" / f"{cid}.png", heart)
    lungs = np.zeros((4, 3))  # half resolution, same field of view: fine
    lungs[1, 1] = 255
    for cid in ("ok", "empty", "grey"):
        png(root / "masks" / "lungs" / f"{cid}.png", lungs if cid != "empty" else np.zeros((4, 3)))
    png(root / "masks" / "lungs" / "aspect.png", np.full((4, 4), 255))
    grey = np.zeros((8, 6))
    grey[1:3, 1:3] = [[128, 255], [255, 3]]
    png(root / "masks" / "heart" / "grey.png", grey)
    cfg = DataConfig(root=root, layout="scr", spatial_dims=2, structures=["lungs", "heart"])
    report = check_dataset(load_dataset(cfg), cfg)
    assert found(report) == {
        ("aspect", "aspect_ratio"),
        ("empty", "empty_mask"),
        ("grey", "non_binary_mask"),
        ("nomask", "missing_mask"),
    }
    assert report.exit_code == 2
    grey_msg = next(p.message for p in report.problems if p.check == "non_binary_mask")
    assert "[0, 3, 128, 255]" in grey_msg
    aspect = next(p for p in report.problems if p.check == "aspect_ratio")
    assert aspect.file == "masks/lungs/aspect.png" and "4x4 pixels" in aspect.message


def test_list_layout_missing_files(tmp_path: Path) -> None:
    image(tmp_path / "a.nii.gz")
    label(tmp_path / "a_seg.nii.gz")
    (tmp_path / "cases.csv").write_text("image,label\na.nii.gz,a_seg.nii.gz\nb.nii.gz,b_seg.nii.gz\n")
    cfg = DataConfig(root=tmp_path, layout="list", list_file=tmp_path / "cases.csv", labels=LABELS)
    report = check_dataset(load_dataset(cfg), cfg)
    missing = [p for p in report.problems if p.check == "missing_file"]
    assert {p.file for p in missing} == {"b.nii.gz", "b_seg.nii.gz"}  # reported once each
    assert all(p.case == "b" for p in missing) and by_case(report, "a") == []
    assert report.exit_code == 2
