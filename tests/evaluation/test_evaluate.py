"""``medseg evaluate``: phantoms with hand-computed answers, layouts, refusals, the CLI and real scans.

Known answers: a 4x4x4 cube at 1 x 1 x 2.5 mm is 64 * 2.5 / 1000 = 0.16 mL; shifting it by
one voxel leaves 48 shared voxels, so Dice = 2 * 48 / 128 = 0.75.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from medseg.cli.main import main
from medseg.errors import ConfigError, DataError
from medseg.evaluation import EvaluateOptions, evaluate, evaluate_case
from medseg.io import save_label_map
from medseg.types import Volume

AFFINE = np.diag([1.0, 1.0, 2.5, 1.0])
NAMES = {"1": "liver", "2": "spleen", "3": "kidney", "4": "pancreas"}


def _phantom() -> np.ndarray:
    """12x10x8 reference: a 4x4x4 cube (label 1) and a 2x2x2 cube (label 2)."""
    a = np.zeros((12, 10, 8), dtype=np.uint8)
    a[2:6, 2:6, 2:6] = 1
    a[8:10, 6:8, 5:7] = 2
    return a


def _save(arr: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> Path:
    return save_label_map(Volume(arr[None].astype(np.uint8), affine), path)


def _labels_file(tmp_path: Path) -> Path:
    path = tmp_path / "names.json"
    path.write_text(json.dumps(NAMES))
    return path


def _by(rows: list[dict], case: str) -> dict[str, dict]:
    return {r["structure"]: r for r in rows if r["case"] == case}


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """Case 'a': liver shifted by one voxel, spleen missed, a false-positive kidney; case 'b': perfect."""
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref = _phantom()
    pred = np.where(ref == 1, 0, ref)
    pred[3:7, 2:6, 2:6] = 1  # liver one voxel along x
    pred[pred == 2] = 0  # spleen missed
    pred[0:2, 0:2, 0:2] = 3  # kidney where the reference has none
    _save(ref, ref_dir / "a.nii.gz")
    _save(pred, pred_dir / "a.nii.gz")
    _save(ref, ref_dir / "b.nii.gz")
    _save(ref, pred_dir / "b.nii.gz")
    return pred_dir, ref_dir


# --------------------------------------------------------------------------- known answers


def test_phantom_dice_volumes_and_empty_policy(tmp_path: Path, folders: tuple[Path, Path]) -> None:
    pred_dir, ref_dir = folders
    res = evaluate(pred_dir, ref_dir, tmp_path / "out", EvaluateOptions(labels=_labels_file(tmp_path)))
    a, b = _by(res.rows, "a"), _by(res.rows, "b")
    assert set(a) == set(NAMES.values()) and len(res.rows) == 8
    assert a["liver"]["dice"] == pytest.approx(0.75)
    assert a["liver"]["volume_ref_ml"] == pytest.approx(0.16)
    assert a["liver"]["volume_pred_ml"] == pytest.approx(0.16)
    assert (a["liver"]["tp"], a["liver"]["fp"], a["liver"]["fn"]) == (48, 16, 16)
    assert a["spleen"]["dice"] == 0.0 and a["spleen"]["volume_diff_pct"] == pytest.approx(-100.0)
    assert a["kidney"]["dice"] == 0.0 and math.isnan(a["kidney"]["volume_diff_pct"])  # empty reference
    assert math.isnan(a["pancreas"]["dice"]) and math.isnan(b["pancreas"]["dice"])  # empty in both
    assert b["liver"]["dice"] == 1.0 and b["spleen"]["volume_ref_ml"] == pytest.approx(8 * 2.5 / 1000)

    s = res.summary["structures"]
    assert s["liver"]["dice"] == {
        "mean": pytest.approx(0.875),
        "median": pytest.approx(0.875),
        "std": pytest.approx(0.125),
        "min": pytest.approx(0.75),
        "max": 1.0,
        "n_valid": 2,
        "n_nan": 0,
        "n_inf": 0,
    }
    assert s["liver"]["global_dice"] == pytest.approx(2 * (48 + 64) / (128 + 128))
    assert (s["pancreas"]["dice"]["n_valid"], s["pancreas"]["dice"]["n_nan"]) == (0, 2)
    assert s["pancreas"]["dice"]["mean"] is None and s["pancreas"]["n_both_empty"] == 2
    assert (s["spleen"]["n_missed"], s["kidney"]["n_false_positive"]) == (1, 1)
    assert res.summary["empty_policy"].startswith("Dice is NaN")
    assert res.summary["mean_dice"] == pytest.approx(np.mean([0.875, 0.5, 0.0]))  # kidney: 0 in a, NaN in b


def test_outputs_on_disk_agree_with_rows(tmp_path: Path, folders: tuple[Path, Path]) -> None:
    pred_dir, ref_dir = folders
    res = evaluate(pred_dir, ref_dir, tmp_path / "out", EvaluateOptions(labels=_labels_file(tmp_path)))
    with open(res.outputs["metrics_csv"], newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(res.rows)
    for line, row in zip(table, res.rows, strict=True):
        assert line["case"] == row["case"] and line["structure"] == row["structure"]
        assert float(line["dice"]) == pytest.approx(row["dice"], nan_ok=True)
        assert float(line["volume_pred_ml"]) == pytest.approx(row["volume_pred_ml"])
    assert "hd95_mm" not in table[0]
    summary = json.loads(res.outputs["summary_json"].read_text())  # valid JSON: no NaN tokens
    assert summary["structures"]["liver"]["dice"]["n_valid"] == 2
    png = res.outputs["dice_boxplot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").iterdir())  # no temporary files


def test_volume_difference(tmp_path: Path) -> None:
    ref = _phantom()
    pred = ref.copy()
    pred[2:6, 2:6, 6] = 1  # one extra slice of 16 voxels: +0.04 mL, +25 %
    rows = evaluate_case(_save(pred, tmp_path / "p.nii.gz"), _save(ref, tmp_path / "r.nii.gz"))
    liver = _by(rows, "r")["label_1"]
    assert liver["volume_diff_ml"] == pytest.approx(16 * 2.5 / 1000)
    assert liver["volume_diff_pct"] == pytest.approx(25.0)


def test_border_contact_is_named_after_the_file_axes(tmp_path: Path) -> None:
    ref = _phantom()
    ref[0:3, 4:7, 6:8] = 3  # touches x_min and z_max (the array is read back Fortran-ordered)
    ref[5:8, 9:10, 0:2] = 4  # touches y_max and z_min
    rows = _by(evaluate_case(_save(ref, tmp_path / "p.nii.gz"), _save(ref, tmp_path / "r.nii.gz")), "r")
    assert rows["label_3"]["ref_touches_border"] == "x_min;z_max"
    assert rows["label_4"]["ref_touches_border"] == "y_max;z_min"
    assert rows["label_1"]["ref_touches_border"] == ""


def _surface(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    core = np.ones_like(mask)
    for ax in range(3):
        for s in (-1, 1):
            core &= np.roll(padded, s, axis=ax)[1:-1, 1:-1, 1:-1]
    return np.argwhere(mask & ~core) * np.array([1.0, 1.0, 2.5])


def test_distances_against_point_sets(tmp_path: Path) -> None:
    ref = _phantom()
    pred = np.roll(ref, (1, -1, 1), axis=(0, 1, 2))
    pred[4, 3, 3:5] = 0
    rows = evaluate_case(
        _save(pred, tmp_path / "p.nii.gz"),
        _save(ref, tmp_path / "r.nii.gz"),
        options=EvaluateOptions(distances=True, nsd_tolerance_mm=1.5),
    )
    for row in rows:
        k = row["label"]
        d = cdist(_surface(pred == k), _surface(ref == k))
        d_pr, d_rp = d.min(axis=1), d.min(axis=0)
        assert row["hd95_mm"] == pytest.approx(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))
        assert row["nsd"] == pytest.approx(
            (np.sum(d_pr <= 1.5) + np.sum(d_rp <= 1.5)) / (len(d_pr) + len(d_rp))
        )


# --------------------------------------------------------------------------- layouts


def test_mask_folders_equal_label_maps(tmp_path: Path, folders: tuple[Path, Path]) -> None:
    pred_dir, ref_dir = folders
    labels = _labels_file(tmp_path)
    direct = evaluate(pred_dir, ref_dir, tmp_path / "o1", EvaluateOptions(labels=labels, distances=True))
    masks = tmp_path / "pred_masks"
    for case in ("a", "b"):
        from medseg.io import load_volume

        lab = load_volume(pred_dir / f"{case}.nii.gz").array[0]
        for value, name in NAMES.items():
            _save((lab == int(value)).astype(np.uint8), masks / case / f"{name}.nii.gz")
    via_masks = evaluate(masks, ref_dir, tmp_path / "o2", EvaluateOptions(labels=labels, distances=True))
    assert [(r["case"], r["structure"]) for r in via_masks.rows] == [
        (r["case"], r["structure"]) for r in direct.rows
    ]
    key = ("dice", "volume_pred_ml", "hd95_mm", "nsd", "tp", "fp", "fn")
    for got, want in zip(via_masks.rows, direct.rows, strict=True):
        assert [got[k] for k in key] == pytest.approx([want[k] for k in key], nan_ok=True)
    # masks on both sides, no --labels: structures come from the file names
    both = evaluate(masks, masks, tmp_path / "o3")
    assert {r["structure"] for r in both.rows} == set(NAMES.values())
    assert all(r["dice"] == 1.0 or r["n_ref"] == 0 for r in both.rows)


def test_png_masks_2d(tmp_path: Path) -> None:
    from medseg.io import save_volume

    ref = np.zeros((1, 20, 16), dtype=np.uint8)
    ref[0, 4:12, 4:10] = 1  # 48 pixels
    pred = np.zeros_like(ref)
    pred[0, 6:12, 4:10] = 255  # 36 pixels inside the reference (PNG masks hold 0/255)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    save_volume(Volume(ref, affine), tmp_path / "ref" / "xray.png")
    save_volume(Volume(pred, affine), tmp_path / "pred" / "xray" / "lesion.png")
    spec = tmp_path / "names.json"
    spec.write_text('{"1": "lesion"}')
    res = evaluate(tmp_path / "pred", tmp_path / "ref", tmp_path / "out", EvaluateOptions(labels=spec))
    (row,) = res.rows
    assert row["dice"] == pytest.approx(2 * 36 / (36 + 48))
    assert math.isnan(row["volume_ref_ml"])  # 2D: no volume


def test_reoriented_prediction_is_aligned(tmp_path: Path) -> None:
    ref = _phantom()
    ref[0, 0, 0] = 2  # break the symmetry
    pred = np.roll(ref, 1, axis=0)
    flipped = AFFINE.copy()
    flipped[:3, 0] *= -1
    flipped[0, 3] = (ref.shape[0] - 1) * 1.0  # the same voxel centres, x stored backwards
    rows = evaluate_case(_save(pred[::-1], tmp_path / "p.nii.gz", flipped), _save(ref, tmp_path / "r.nii.gz"))
    expected = evaluate_case(_save(pred, tmp_path / "q.nii.gz"), tmp_path / "r.nii.gz")
    assert [r["dice"] for r in rows] == [r["dice"] for r in expected]


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("shape", "affine", "what"),
    [
        ((12, 10, 8), np.diag([1.0, 1.0, 3.0, 1.0]), "spacing"),
        ((12, 10, 9), AFFINE, "shape"),
        (
            (12, 10, 8),
            AFFINE + np.array([[0, 0, 0, 0.5], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]),
            "origin",
        ),
    ],
)
def test_mismatched_grids_refused(tmp_path: Path, shape, affine, what: str) -> None:
    ref_path = _save(_phantom(), tmp_path / "ref.nii.gz")
    pred_path = _save(np.zeros(shape, dtype=np.uint8), tmp_path / "pred.nii.gz", affine)
    with pytest.raises(DataError, match="not on the same voxel grid") as info:
        evaluate_case(pred_path, ref_path)
    msg = str(info.value)
    assert str(pred_path) in msg and str(ref_path) in msg and "medseg predict" in msg
    assert what in msg


def test_grid_tolerance(tmp_path: Path) -> None:
    ref_path = _save(_phantom(), tmp_path / "ref.nii.gz")
    nudged = AFFINE.copy()
    nudged[:3, 3] += 1e-4  # header rounding, not a different grid
    rows = evaluate_case(_save(_phantom(), tmp_path / "pred.nii.gz", nudged), ref_path)
    assert all(r["dice"] == 1.0 for r in rows)


def test_missing_predictions(tmp_path: Path, folders: tuple[Path, Path]) -> None:
    pred_dir, ref_dir = folders
    _save(_phantom(), ref_dir / "c.nii.gz")
    _save(_phantom(), pred_dir / "zz_extra.nii.gz")
    with pytest.raises(DataError, match=r"1 of 3 reference cases have no prediction.*: c\b.*--allow-missing"):
        evaluate(pred_dir, ref_dir, tmp_path / "out")
    res = evaluate(pred_dir, ref_dir, tmp_path / "out", EvaluateOptions(allow_missing=True))
    c = _by(res.rows, "c")
    assert c["label_1"]["dice"] == 0.0 and c["label_1"]["n_pred"] == 0
    assert res.summary["missing_predictions"] == ["c"]
    assert res.summary["predictions_without_reference"] == ["zz_extra"]
    assert "zz_extra" not in {r["case"] for r in res.rows}
    # without --labels every case gets every structure seen anywhere (label 3 only in case a's prediction)
    assert math.isnan(_by(res.rows, "b")["label_3"]["dice"])


def test_output_inside_input_refused(tmp_path: Path, folders: tuple[Path, Path]) -> None:
    pred_dir, ref_dir = folders
    for out in (pred_dir, ref_dir / "eval"):
        with pytest.raises(ConfigError, match="choose a separate folder"):
            evaluate(pred_dir, ref_dir, out)
    assert sorted(p.name for p in pred_dir.iterdir()) == ["a.nii.gz", "b.nii.gz"]
    with pytest.raises(ConfigError, match="--nsd-tolerance-mm must be a number >= 0"):
        evaluate(pred_dir, ref_dir, tmp_path / "out", EvaluateOptions(nsd_tolerance_mm=-1.0))


def test_unexpected_labels_and_missing_masks(tmp_path: Path, folders: tuple[Path, Path]) -> None:
    pred_dir, ref_dir = folders
    names = tmp_path / "two.json"
    names.write_text('{"1": "liver", "2": "spleen"}')
    res = evaluate(pred_dir, ref_dir, tmp_path / "out", EvaluateOptions(labels=names))
    assert res.summary["unexpected_labels"] == {"a": [3]}
    _save(_phantom() == 1, tmp_path / "masks" / "a" / "liver.nii.gz")
    with pytest.raises(DataError, match=r"no mask for 1 structure\(s\): \['spleen'\]"):
        evaluate_case(tmp_path / "masks" / "a", ref_dir / "a.nii.gz", spec=_spec(names))


def _spec(path: Path):
    from medseg.labels import load_labels

    return load_labels(path)


# --------------------------------------------------------------------------- CLI


def test_cli_end_to_end(tmp_path: Path, folders: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    pred_dir, ref_dir = folders
    out = tmp_path / "eval"
    argv = ["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--output", str(out)]
    code = main([*argv, "--labels", str(_labels_file(tmp_path)), "--distances", "--nsd-tolerance-mm", "1"])
    printed = capsys.readouterr().out
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"metrics.csv", "summary.json", "dice_boxplot.png"}
    assert "liver" in printed and "Empty structures:" in printed and "NSD tolerance 1.0 mm" in printed
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == ["case", "structure", "label", "dice", "volume_pred_ml", "volume_ref_ml"]
    assert {"hd95_mm", "nsd"} <= set(header)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distances"]["nsd_tolerance_mm"] == 1.0
    assert summary["structures"]["spleen"]["hd95_mm"]["n_inf"] == 1  # missed in case a

    _save(np.zeros((5, 5, 5), dtype=np.uint8), pred_dir / "a.nii.gz")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not on the same voxel grid" in err and "Traceback" not in err


# --------------------------------------------------------------------------- real scans


@pytest.mark.realdata
def test_real_volumes_match_simpleitk(real_data: Path, tmp_path: Path) -> None:
    import SimpleITK as sitk

    seg = real_data / "ct_totalsegmentator" / "example_seg.nii.gz"
    rows = evaluate_case(seg, seg)
    flt = sitk.LabelShapeStatisticsImageFilter()
    flt.Execute(sitk.ReadImage(str(seg)))
    expected = {int(k): flt.GetPhysicalSize(k) / 1000.0 for k in flt.GetLabels()}
    assert len(expected) > 30 and {r["label"] for r in rows} == set(expected)
    from medseg.io import load_volume
    from medseg.metrics import touches_border_labels

    border = touches_border_labels(np.ascontiguousarray(load_volume(seg).array[0]), sorted(expected))
    for r in rows:
        assert r["volume_ref_ml"] == pytest.approx(expected[r["label"]], rel=1e-6)
        assert r["volume_pred_ml"] == r["volume_ref_ml"]
        assert r["ref_touches_border"] == ";".join(border[r["label"]])
    assert any(r["ref_touches_border"] for r in rows)


@pytest.mark.realdata
def test_real_self_and_shifted(real_data: Path, tmp_path: Path) -> None:
    from medseg.io import load_volume

    folder = real_data / "ct_totalsegmentator"
    seg = folder / "example_seg.nii.gz"
    labels = f"{folder / 'class_map_total.json'}:total"
    same = evaluate(seg, seg, tmp_path / "self", EvaluateOptions(labels=labels, distances=True, plot=False))
    present = [r for r in same.rows if r["n_ref"] > 0]
    assert len(present) > 30 and len(same.rows) == len(
        json.loads((folder / "class_map_total.json").read_text())["total"]
    )
    assert all(r["dice"] == 1.0 and r["hd95_mm"] == 0.0 and r["nsd"] == 1.0 for r in present)
    assert _by(same.rows, "example_seg")["liver"]["label"] == 5

    vol = load_volume(seg)
    ref = vol.array[0]
    shifted = np.zeros_like(ref)
    shifted[1:] = ref[:-1]  # one voxel along the first axis, background shifted in
    shifted_path = save_label_map(vol.with_array(shifted[None]), tmp_path / "shifted" / "example_seg.nii.gz")
    res = evaluate(shifted_path, seg, tmp_path / "shift", EvaluateOptions(labels=labels))
    for r in res.rows:
        p, q = shifted == r["label"], ref == r["label"]
        denom = p.sum() + q.sum()
        want = 2 * np.sum(p & q) / denom if denom else math.nan
        assert r["dice"] == pytest.approx(want, nan_ok=True), r["structure"]
    assert any(0 < r["dice"] < 1 for r in res.rows)
