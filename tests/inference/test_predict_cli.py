"""`medseg predict` end to end: NIfTI in several orientations and a DICOM series in, label maps with
exactly the input grid out; batch behaviour (skip existing, failures listed, exit code)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from factories import build_plan

from medseg.cli.main import main
from medseg.config import CRFConfig
from medseg.data.plan import ChannelNorm
from medseg.inference.writers import combined_label_map
from medseg.io import load_volume, save_volume
from medseg.io.dicom_write import write_dicom_series
from medseg.types import Volume


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, save_run) -> Path:
    """A run directory with an untrained network (geometry does not depend on the weights)."""
    return save_run(tmp_path_factory.mktemp("run"), build_plan())


def _scan(affine: np.ndarray, shape=(30, 26, 9)) -> Volume:
    rng = np.random.default_rng(0)
    arr = np.full((1, *shape), -1000, np.int16)
    arr[0, 3:27, 3:23, 1:8] = rng.integers(-100, 200, size=(24, 20, 7))
    return Volume(arr, affine)


AFFINES = {
    "RAS": np.array([[0.8, 0, 0, -10], [0, 0.8, 0, 20], [0, 0, 2.5, 5], [0, 0, 0, 1]]),
    "LPS": np.array([[-0.75, 0, 0, 10], [0, -0.75, 0, 20], [0, 0, 3.0, -5], [0, 0, 0, 1]]),
    "LAS": np.array([[-0.9, 0, 0, 10], [0, 0.9, 0, -20], [0, 0, 2.0, 0], [0, 0, 0, 1]]),
    "oblique": np.array([[0.7, -0.35, 0, 1], [0.35, 0.7, 0, 2], [0, 0, 2.5, 3], [0, 0, 0, 1]]),
}


def test_nifti_and_dicom_predictions_keep_the_input_grid(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    inputs = tmp_path / "in"
    for name, aff in AFFINES.items():
        save_volume(_scan(aff), inputs / f"{name}_0000.nii.gz")
    dicom = write_dicom_series(_scan(AFFINES["LPS"]), tmp_path / "dicom" / "series1")
    out = tmp_path / "out"
    args = [
        "predict",
        "--model",
        str(bundle),
        "--input",
        str(inputs),
        str(dicom),
        "--output",
        str(out),
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    assert "5 predicted" in capsys.readouterr().out
    for name in AFFINES:
        src = nib.load(str(inputs / f"{name}_0000.nii.gz"))
        pred = nib.load(str(out / f"{name}.nii.gz"))
        assert pred.shape == src.shape and pred.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(pred.affine, src.affine)  # bit for bit
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}
    src = load_volume(dicom)
    pred = load_volume(out / "series1.nii.gz")
    assert pred.spatial_shape == src.spatial_shape
    np.testing.assert_allclose(pred.affine, src.affine, atol=1e-4)  # NIfTI stores float32
    manifest = json.loads((out / "predict.json").read_text())
    assert len(manifest["cases"]) == 5 and manifest["failures"] == []
    # a second run skips existing outputs
    assert main(args) == 0
    assert "0 predicted, 5 skipped" in capsys.readouterr().out


def test_bad_input_is_listed_and_exit_code_nonzero(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    good = save_volume(_scan(AFFINES["RAS"]), tmp_path / "in" / "good.nii.gz")
    bad = tmp_path / "in" / "bad.nii.gz"
    bad.write_bytes(b"broken")
    code = main(
        [
            "predict",
            "--model",
            str(bundle),
            "--input",
            str(good),
            str(bad),
            "--output",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert code == 1
    text = capsys.readouterr().out
    assert "1 predicted" in text and "1 failed" in text and "bad.nii.gz" in text
    assert (tmp_path / "out" / "good.nii.gz").exists()


def test_refuses_to_write_into_the_input_folder(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    good = save_volume(_scan(AFFINES["RAS"]), tmp_path / "in" / "good.nii.gz")
    code = main(
        [
            "predict",
            "--model",
            str(bundle),
            "--input",
            str(good),
            "--output",
            str(tmp_path / "in"),
            "--no-progress",
        ]
    )
    assert code == 2
    assert "input folder" in capsys.readouterr().err
    # nor into a folder inside an input folder: a later run over that folder would read the outputs
    assert _predict(bundle, [tmp_path / "in"], tmp_path / "in" / "preds") == 2
    assert "lies inside the input folder" in capsys.readouterr().err
    assert not (tmp_path / "in" / "preds").exists()


def test_input_folders_take_images_and_series_and_say_what_they_skip(
    bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from medseg.cli.predict_cmd import expand_inputs

    a = save_volume(_scan(AFFINES["RAS"]), tmp_path / "in" / "a.nii.gz")
    b = save_volume(_scan(AFFINES["RAS"]), tmp_path / "in" / "b.nrrd")
    series = write_dicom_series(_scan(AFFINES["LPS"]), tmp_path / "in" / "series1")
    (tmp_path / "in" / "patient7" / "CT").mkdir(parents=True)  # nested: fails as a case, with the reason
    (tmp_path / "in" / "notes.csv").write_text("x")
    (tmp_path / "in" / "readme.txt").write_text("x")
    (tmp_path / "in" / ".hidden").write_text("x")
    with caplog.at_level("WARNING"):
        assert expand_inputs([tmp_path / "in"]) == [a, b, tmp_path / "in" / "patient7", series]
    assert "skipped 2 files that are not an image" in caplog.text and "notes.csv, readme.txt" in caplog.text
    assert expand_inputs([series]) == [series]


def test_duplicate_case_names_are_refused(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    a = save_volume(_scan(AFFINES["RAS"]), tmp_path / "a" / "scan.nii.gz")
    b = save_volume(_scan(AFFINES["LPS"]), tmp_path / "b" / "scan.nii.gz")
    code = main(
        [
            "predict",
            "--model",
            str(bundle),
            "--input",
            str(a),
            str(b),
            "--output",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "same output name" in err and str(a) in err and str(b) in err


@pytest.fixture(scope="module")
def bundle_2d(tmp_path_factory: pytest.TempPathFactory, save_run) -> Path:
    plan = build_plan(
        spatial_dims=2,
        modality="xray",
        mode="sigmoid",
        structure_names=("lung", "clavicle"),
        label_values=(),
        target_spacing_mm=(2.0, 2.0),
        patch_size=(32, 32),
        normalization=(ChannelNorm("zscore"),),
        crop_to_body=False,
        body_threshold=None,
    )
    return save_run(tmp_path_factory.mktemp("run2d"), plan)


def test_2d_model_on_png_and_single_slice_nifti(bundle_2d: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    png = save_volume(
        Volume(rng.integers(0, 255, (1, 50, 40)).astype(np.uint8), np.eye(4)), tmp_path / "in" / "x.png"
    )
    aff = np.diag([0.5, 0.5, 1.0, 1.0])
    nii = save_volume(
        Volume(rng.random((1, 50, 40, 1)).astype(np.float32), aff), tmp_path / "in" / "y.nii.gz"
    )
    out = tmp_path / "out"
    assert (
        main(
            [
                "predict",
                "--model",
                str(bundle_2d),
                "--input",
                str(png),
                str(nii),
                "--output",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    for s in ("lung", "clavicle"):
        m = load_volume(out / "x" / f"{s}.png")
        assert m.spatial_shape == (50, 40) and set(np.unique(m.array)) <= {0, 255}
        n = nib.load(str(out / "y" / f"{s}.nii.gz"))
        assert n.shape == (50, 40, 1)
        np.testing.assert_array_equal(n.affine, nib.load(str(nii)).affine)
    assert not list(out.glob(".*tmp*")), "temporary mask folder left behind"


def test_combined_label_map_of_overlapping_structures(bundle_2d: Path, tmp_path: Path) -> None:
    masks = np.zeros((3, 4, 5), np.uint8)
    masks[0, :3] = 1
    masks[1, 1:, :2] = 1  # overlaps structure 0 in rows 1-2
    masks[2, 2, 1] = 1  # on top of both
    expected = np.array([[1, 1, 1, 1, 1], [2, 2, 1, 1, 1], [2, 3, 1, 1, 1], [2, 2, 0, 0, 0]], np.uint8)
    np.testing.assert_array_equal(combined_label_map(masks)[0], expected)
    # end to end: a PNG and a NIfTI input, the label maps agree with the written masks
    rng = np.random.default_rng(1)
    png = save_volume(
        Volume(rng.integers(0, 255, (1, 50, 40)).astype(np.uint8), np.eye(4)), tmp_path / "in" / "x.png"
    )
    nii = save_volume(
        Volume(rng.random((1, 50, 40, 1)).astype(np.float32), np.eye(4)), tmp_path / "in" / "y.nii.gz"
    )
    out = tmp_path / "out"
    assert _predict(bundle_2d, [png, nii], out, "--combined-labels", "--threshold", "0.45") == 0
    for case, ext in (("x", ".png"), ("y", ".nii.gz")):
        lab = load_volume(out / f"{case}_labels{ext}").array
        lung, clav = (load_volume(out / case / f"{s}{ext}").array > 0 for s in ("lung", "clavicle"))
        np.testing.assert_array_equal(lab, np.where(clav, 2, np.where(lung, 1, 0)))
        side = json.loads((out / f"{case}_labels.json").read_text())
        assert side["labels"] == {"1": "lung", "2": "clavicle"} and "later" in side["overlap_rule"]
    manifest = json.loads((out / "predict.json").read_text())
    assert manifest["options"]["combined_labels"] is True
    # a rerun without --overwrite skips only when the label maps exist too
    (out / "x_labels.png").unlink()
    assert _predict(bundle_2d, [png], out, "--combined-labels") == 0
    assert json.loads((out / "predict.json").read_text())["cases"][0].get("skipped") is not True
    assert (out / "x_labels.png").is_file()


def _predict(bundle: Path, inputs: list[Path], out: Path, *extra: str) -> int:
    return main(
        [
            "predict",
            "--model",
            str(bundle),
            "--input",
            *map(str, inputs),
            "--output",
            str(out),
            "--no-progress",
            *extra,
        ]
    )


def test_dicom_seg_output_reads_back_equal_to_the_nifti(bundle: Path, tmp_path: Path) -> None:
    from medseg.io.dicom_seg import read_dicom_seg

    dicom = write_dicom_series(_scan(AFFINES["LAS"]), tmp_path / "dicom" / "series1")
    out = tmp_path / "out"
    assert _predict(bundle, [dicom], out, "--format", "both") == 0
    nifti = load_volume(out / "series1.nii.gz")
    present = [int(v) for v in np.unique(nifti.array) if v]
    assert present, "the untrained network predicts at least one structure on this scan"
    masks, names = read_dicom_seg(out / "series1_seg.dcm", reference=load_volume(dicom))
    assert names == [{1: "a", 2: "b"}[v] for v in present]
    for k, v in enumerate(present):
        np.testing.assert_array_equal(masks.array[k], nifti.array[0] == v)
    # --format both on a mixed batch: the NIfTI input gets its NIfTI output (and no SEG), exit 0
    save_volume(_scan(AFFINES["RAS"]), tmp_path / "nii" / "x.nii.gz")
    assert _predict(bundle, [dicom, tmp_path / "nii" / "x.nii.gz"], tmp_path / "o3", "--format", "both") == 0
    assert (tmp_path / "o3" / "x.nii.gz").is_file() and not (tmp_path / "o3" / "x_seg.dcm").exists()
    assert _predict(bundle, [dicom, tmp_path / "nii" / "x.nii.gz"], tmp_path / "o3", "--format", "both") == 0
    assert all(c["skipped"] for c in json.loads((tmp_path / "o3" / "predict.json").read_text())["cases"])
    # a NIfTI input cannot become a DICOM SEG: that case fails clearly, the others go on
    assert _predict(bundle, [tmp_path / "nii" / "x.nii.gz"], tmp_path / "out2", "--format", "dicom-seg") == 1
    failures = json.loads((tmp_path / "out2" / "predict.json").read_text())["failures"]
    assert "needs a DICOM series folder" in failures[0]["error"]


@pytest.mark.parametrize("kind", ["dicom", "sagittal-nifti"])
def test_streamed_inputs_give_the_labels_of_the_loaded_scan(
    bundle: Path, tmp_path: Path, monkeypatch, kind
) -> None:
    """A DICOM series folder and a sagittally stored NIfTI are read block by block (never loaded
    whole) and give the labels predict_volume gives on the loaded scan."""
    import medseg.io.dicom
    import medseg.io.nifti
    from medseg.inference.predict import predict_volume
    from medseg.runtime.bundle import load_bundle

    scan = _scan(AFFINES["LPS"])
    if kind == "dicom":
        src = write_dicom_series(scan, tmp_path / "in" / "series1")
        case = "series1"
    else:  # storage axes (S, A, R): the canonical slab axis is the first stored axis
        arr = np.transpose(scan.array, (0, 3, 2, 1))
        aff = scan.affine[:, [2, 1, 0, 3]]
        src = save_volume(Volume(np.ascontiguousarray(arr), aff), tmp_path / "in" / "sag.nii.gz")
        case = "sag"
    want = predict_volume(load_bundle(bundle, device="cpu"), load_volume(src))

    def refuse(*args, **kwargs):
        raise AssertionError("the scan was loaded whole")

    monkeypatch.setattr(medseg.io.dicom, "read_dicom_series", refuse)
    monkeypatch.setattr(medseg.io.nifti, "read_nifti", refuse)
    monkeypatch.setattr(medseg.io._slabs.RawSlabs, "load", refuse)
    assert _predict(bundle, [src], tmp_path / "out") == 0
    got = nib.load(str(tmp_path / "out" / f"{case}.nii.gz"))
    np.testing.assert_array_equal(np.asarray(got.dataobj), want.array[0])
    assert want.array.any()


def test_probabilities_match_the_label_map(bundle: Path, tmp_path: Path) -> None:
    save_volume(_scan(AFFINES["LPS"]), tmp_path / "in" / "c1.nii.gz")
    out = tmp_path / "out"
    assert _predict(bundle, [tmp_path / "in" / "c1.nii.gz"], out, "--save-probabilities", "--tta") == 0
    probs = np.load(out / "c1_probabilities.npy", mmap_mode="r")
    side = json.loads((out / "c1_probabilities.json").read_text())
    labels = load_volume(out / "c1.nii.gz").array[0]
    assert probs.dtype == np.float16 and probs.shape == (3, *labels.shape)
    assert side["channels"] == ["background", "a", "b"]
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=3e-3)
    p = probs.astype(np.float32)
    chosen = np.take_along_axis(p, labels[None].astype(np.int64), 0)[0]  # label values 1, 2 = channels
    # the label is the most probable class, up to float16 rounding of near-ties
    assert np.all(chosen >= p.max(0) - 2e-3)
    manifest = json.loads((out / "predict.json").read_text())
    assert manifest["options"]["tta"] is True
    case = manifest["cases"][0]
    assert case["windows_run"] <= case["windows"] and set(case["seconds"]) == {
        "read",
        "predict",
        "write",
        "total",
    }
    assert {"medseg", "torch", "monai"} <= set(manifest["versions"])
    assert manifest["cpu_threads"] == __import__("torch").get_num_threads()


def test_coarse_roi_and_resample_flags_reach_the_engine(bundle: Path, tmp_path: Path) -> None:
    save_volume(_scan(AFFINES["RAS"]), tmp_path / "in" / "c1.nii.gz")
    out = tmp_path / "out"
    assert _predict(bundle, [tmp_path / "in" / "c1.nii.gz"], out, "--coarse-roi", "--resample", "logits") == 0
    manifest = json.loads((out / "predict.json").read_text())
    assert manifest["options"]["coarse_roi"] is True and manifest["options"]["resample"] == "logits"
    assert manifest["cases"][0]["coarse_windows_run"] > 0
    assert load_volume(out / "c1.nii.gz").spatial_shape == _scan(AFFINES["RAS"]).spatial_shape


def test_memory_refusal_names_the_flags_and_writes_nothing(bundle: Path, tmp_path: Path) -> None:
    save_volume(_scan(AFFINES["RAS"]), tmp_path / "in" / "big.nii.gz")
    out = tmp_path / "out"
    assert _predict(bundle, [tmp_path / "in" / "big.nii.gz"], out, "--max-memory", "0.0001") == 1
    err = json.loads((out / "predict.json").read_text())["failures"][0]["error"]
    assert "but the limit is 0.00 GB (--max-memory)" in err and "--low-memory" in err
    assert not (out / "big.nii.gz").exists()


def test_report_after_prediction(bundle: Path, tmp_path: Path) -> None:
    save_volume(_scan(AFFINES["RAS"]), tmp_path / "in" / "r1.nii.gz")
    out = tmp_path / "out"
    assert _predict(bundle, [tmp_path / "in" / "r1.nii.gz"], out, "--report") == 0
    report = json.loads((out / "r1_report" / "report.json").read_text())
    assert (out / "r1_report" / "report.html").stat().st_size > 1000
    assert str(bundle) in json.dumps(report)


def test_channel_files_are_grouped_into_one_case(tmp_path: Path) -> None:
    from medseg.errors import DataError
    from medseg.inference.predict import group_inputs, load_channels

    files = [tmp_path / n for n in ("b_0001.nii.gz", "a_0000.nii.gz", "b_0000.nii.gz", "a_0001.nii.gz")]
    groups = dict(group_inputs(files, 2))
    assert [p.name for p in groups["b"]] == ["b_0000.nii.gz", "b_0001.nii.gz"]
    with pytest.raises(DataError, match="found \\['c_0000.nii.gz'\\]"):
        group_inputs([tmp_path / "c_0000.nii.gz"], 2)
    with pytest.raises(DataError, match="same output name"):
        group_inputs([tmp_path / "a_0000.nii.gz", tmp_path / "x" / "a.nii.gz"], 1)
    save_volume(_scan(AFFINES["RAS"]), tmp_path / "a_0000.nii.gz")
    save_volume(_scan(AFFINES["RAS"]).with_array(_scan(AFFINES["RAS"]).array + 5), tmp_path / "a_0001.nii.gz")
    two = load_channels(groups["a"])
    assert two.num_channels == 2 and int(two.array[1].max() - two.array[0].max()) == 5
    save_volume(_scan(AFFINES["LPS"]), tmp_path / "a_0001.nii.gz")
    with pytest.raises(DataError, match="a_0001.nii.gz: channel grid"):
        load_channels(groups["a"])


def test_case_names_keep_four_digit_ids(tmp_path: Path) -> None:
    """`amos_0500.nii.gz` is case amos_0500 for a one-channel model (only _0000 is a channel suffix)."""
    from medseg.inference.predict import group_inputs

    files = [tmp_path / "amos_0500.nii.gz", tmp_path / "amos_0501.nii.gz", tmp_path / "kits_0007_0000.nii.gz"]
    assert [name for name, _ in group_inputs(files, 1)] == ["amos_0500", "amos_0501", "kits_0007"]


def test_rerun_with_more_outputs_is_not_skipped(bundle: Path, tmp_path: Path) -> None:
    save_volume(_scan(AFFINES["RAS"]), tmp_path / "in" / "c.nii.gz")
    out = tmp_path / "out"
    assert _predict(bundle, [tmp_path / "in" / "c.nii.gz"], out) == 0
    assert _predict(bundle, [tmp_path / "in" / "c.nii.gz"], out, "--save-probabilities") == 0
    manifest = json.loads((out / "predict.json").read_text())
    assert not manifest["cases"][0].get("skipped") and (out / "c_probabilities.npy").is_file()
    first = json.loads((out / "predict.json").read_text())
    assert _predict(bundle, [tmp_path / "in" / "c.nii.gz"], out, "--save-probabilities") == 0
    row = json.loads((out / "predict.json").read_text())["cases"][0]
    # the skipped case keeps what the run that made its outputs recorded
    assert row["skipped"] is True and row["outputs"] == first["cases"][0]["outputs"]
    assert row["seconds"] == first["cases"][0]["seconds"] and row["predicted"] == first["created"]
    # once more: the run that predicted it is still the one named, not the run that skipped it
    (out / "predict.json").write_text((out / "predict.json").read_text().replace(first["created"], "T-first"))
    assert _predict(bundle, [tmp_path / "in" / "c.nii.gz"], out, "--save-probabilities") == 0
    assert json.loads((out / "predict.json").read_text())["cases"][0]["predicted"] == "T-first"
    # another input with the same case name: nothing of the earlier row is claimed for it
    save_volume(_scan(AFFINES["LPS"]), tmp_path / "other" / "c.nii.gz")
    assert _predict(bundle, [tmp_path / "other" / "c.nii.gz"], out, "--save-probabilities") == 0
    rows = json.loads((out / "predict.json").read_text())["cases"]
    row = next(r for r in rows if r["input"] == str(tmp_path / "other" / "c.nii.gz"))
    assert row == {"input": str(tmp_path / "other" / "c.nii.gz"), "case": "c", "skipped": True}
    assert len(rows) == 2  # the earlier input's row stays in the folder's manifest


def test_failed_write_leaves_no_probability_file(bundle: Path, tmp_path: Path, monkeypatch) -> None:
    import medseg.inference.predict as pred_mod

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pred_mod, "write_prediction", disk_full)
    save_volume(_scan(AFFINES["RAS"]), tmp_path / "in" / "c.nii.gz")
    out = tmp_path / "out"
    assert _predict(bundle, [tmp_path / "in" / "c.nii.gz"], out, "--save-probabilities") == 1
    assert sorted(p.name for p in out.iterdir() if p.name != ".predict.json.lock") == ["predict.json"]


def test_bad_options_and_wrong_inputs_are_clear_errors(bundle: Path, tmp_path: Path, capsys) -> None:
    save_volume(_scan(AFFINES["RAS"]), tmp_path / "in" / "c.nii.gz")
    assert _predict(bundle, [tmp_path / "in" / "c.nii.gz"], tmp_path / "o1", "--overlap", "-0.5") == 2
    assert "overlap must be in [0, 1)" in capsys.readouterr().err
    two = _scan(AFFINES["RAS"])
    save_volume(two.with_array(np.concatenate([two.array, two.array])), tmp_path / "in2" / "d.nii.gz")
    assert _predict(bundle, [tmp_path / "in2" / "d.nii.gz"], tmp_path / "o2") == 1
    err = json.loads((tmp_path / "o2" / "predict.json").read_text())["failures"][0]["error"]
    assert "2 channel(s), the model expects 1" in err and not err.startswith(str(tmp_path))  # path once
    assert _predict(bundle, [tmp_path / "in" / "c.nii.gz"], tmp_path / "o3", "--max-memory", "-1") == 2
    assert "--max-memory -1.0: expected a positive number" in capsys.readouterr().err
    assert _predict(bundle, [tmp_path / "in" / "c.nii.gz"], tmp_path / "o3", "--max-memory", "inf") == 2
    assert "--max-memory inf: expected a positive number" in capsys.readouterr().err
    assert _predict(bundle, [tmp_path / "in" / "c.nii.gz"], tmp_path / "o4", "--device", "gpu") == 2
    assert "--device 'gpu': expected auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    # a 2D image for a 3D model: a clear error (before any memory estimate), the batch goes on
    save_volume(Volume(np.zeros((1, 20, 16), np.uint8), np.eye(4)), tmp_path / "in3" / "xray.png")
    assert (
        _predict(bundle, [tmp_path / "in3" / "xray.png", tmp_path / "in" / "c.nii.gz"], tmp_path / "o5") == 1
    )
    manifest = json.loads((tmp_path / "o5" / "predict.json").read_text())
    assert "a 2D image (20x16), but the model is 3D" in manifest["failures"][0]["error"]
    assert len(manifest["cases"]) == 1


def test_run_directory_problems_are_explained(bundle: Path, tmp_path: Path, capsys) -> None:
    import shutil

    save_volume(_scan(AFFINES["RAS"]), tmp_path / "in" / "c.nii.gz")
    run = tmp_path / "run"
    shutil.copytree(bundle, run)
    (run / "checkpoints" / "best.pt").rename(run / "checkpoints" / "last.pt")
    assert _predict(run, [tmp_path / "in" / "c.nii.gz"], tmp_path / "o1") == 0
    err = capsys.readouterr().err
    assert "no checkpoints/best.pt" in err and "using checkpoints/last.pt" in err
    assert err.count("no config.yaml; predicting with built-in defaults and no post-processing") == 1
    manifest = json.loads((tmp_path / "o1" / "predict.json").read_text())
    assert manifest["checkpoint"] == "last.pt"
    assert manifest["postprocessing"] == {
        "single_component": [],
        "min_component_mm3": 0.0,
        "fill_holes": False,
        "crf": CRFConfig().model_dump(mode="json"),  # off
    }
    (run / "checkpoints" / "last.pt").unlink()
    assert _predict(run, [tmp_path / "in" / "c.nii.gz"], tmp_path / "o2") == 2
    assert (
        "no checkpoint (looked for checkpoints/best.pt, then checkpoints/last.pt)" in capsys.readouterr().err
    )


def test_files_named_like_further_channels_are_flagged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from medseg.inference.predict import group_inputs

    files = [tmp_path / "pat_0000.nii.gz", tmp_path / "pat_0001.nii.gz"]
    with caplog.at_level("WARNING"):
        assert [name for name, _ in group_inputs(files, 1)] == ["pat", "pat_0001"]
    assert "pat_0001: named like further channels of the cases pat" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        group_inputs([tmp_path / "amos_0500.nii.gz", tmp_path / "amos_0501.nii.gz"], 1)
    assert caplog.text == ""


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_cuda_without_a_gpu_names_the_flag(bundle: Path, tmp_path: Path, capsys) -> None:
    save_volume(_scan(AFFINES["RAS"]), tmp_path / "in" / "c.nii.gz")
    assert _predict(bundle, [tmp_path / "in" / "c.nii.gz"], tmp_path / "o", "--device", "cuda") == 2
    assert (
        "--device is 'cuda' but no CUDA device is available here; use cpu or auto" in capsys.readouterr().err
    )


def test_predict_process_tunes_its_allocator(bundle: Path, tmp_path: Path) -> None:
    """`medseg predict` in its own process keeps freed memory for reuse (unless MEDSEG_MALLOC=default)."""
    import os
    import subprocess
    import sys

    save_volume(_scan(AFFINES["RAS"]), tmp_path / "in" / "c.nii.gz")
    cmd = [sys.executable, "-m", "medseg", "-v", "predict", "--model", str(bundle), "--no-progress"]
    cmd += ["--input", str(tmp_path / "in" / "c.nii.gz"), "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k != "MEDSEG_MALLOC"}
    res = subprocess.run([*cmd, "--output", str(tmp_path / "o1")], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "allocator: freed memory kept for reuse" in res.stderr
    res = subprocess.run(
        [*cmd, "--output", str(tmp_path / "o2")],
        env={**env, "MEDSEG_MALLOC": "default"},
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and "allocator:" not in res.stderr
    assert (
        load_volume(tmp_path / "o1" / "c.nii.gz").array.tolist()
        == load_volume(tmp_path / "o2" / "c.nii.gz").array.tolist()
    )


def test_sigterm_removes_the_temporary_scan_file(bundle: Path, tmp_path: Path) -> None:
    """A `medseg predict` stopped by SIGTERM while streaming a DICOM series leaves no decoded copy."""
    import signal

    from factories import signal_while_streaming

    series = write_dicom_series(_scan(AFFINES["LPS"], shape=(160, 160, 96)), tmp_path / "in" / "series1")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    code, streaming = signal_while_streaming(bundle, [series], tmp_path / "o", tmp, signal.SIGTERM)
    assert streaming, "the series is streamed through a temporary file"
    assert code == 128 + signal.SIGTERM
    assert list(tmp.iterdir()) == []
    assert not (tmp_path / "o" / "series1.nii.gz").exists()


def test_progress_bar_only_on_a_terminal_and_not_with_quiet(
    bundle: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    import sys

    save_volume(_scan(AFFINES["RAS"]), tmp_path / "in" / "c.nii.gz")
    args = [
        "predict",
        "--model",
        str(bundle),
        "--input",
        str(tmp_path / "in" / "c.nii.gz"),
        "--device",
        "cpu",
    ]
    assert main([*args, "--output", str(tmp_path / "o0")]) == 0  # stderr is not a terminal here
    assert "predict:" not in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main([*args, "--output", str(tmp_path / "o1")]) == 0
    assert "predict: 100%" in capsys.readouterr().err
    assert main(["-q", *args, "--output", str(tmp_path / "o2")]) == 0
    assert "predict:" not in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "o3"), "-q"]) == 0  # after the subcommand too
    assert "predict:" not in capsys.readouterr().err


def test_series_uid_picks_one_of_several_series_in_a_folder(bundle: Path, tmp_path: Path, capsys) -> None:
    import shutil

    mixed = tmp_path / "mixed"
    write_dicom_series(_scan(AFFINES["LPS"]), mixed, series_uid="1.2.826.0.1.3680043.8.498.1")
    other = write_dicom_series(
        _scan(AFFINES["RAS"], shape=(32, 28, 10)), tmp_path / "b", series_uid="1.2.826.0.1.3680043.8.498.2"
    )
    for f in other.iterdir():
        shutil.copy(f, mixed / f"B{f.name}")
    base = ["predict", "--model", str(bundle), "--input", str(mixed), "--device", "cpu", "--no-progress"]
    assert main([*base, "--output", str(tmp_path / "o1")]) == 1
    assert "choose one with --series-uid" in capsys.readouterr().out
    args = [
        *base,
        "--output",
        str(tmp_path / "o2"),
        "--series-uid",
        "1.2.826.0.1.3680043.8.498.2",
        "--format",
        "both",
    ]
    assert main(args) == 0
    pred = load_volume(tmp_path / "o2" / "mixed.nii.gz")
    ref = load_volume(other)
    assert pred.spatial_shape == ref.spatial_shape and np.allclose(pred.affine, ref.affine, atol=1e-4)
    assert (tmp_path / "o2" / "mixed_seg.dcm").is_file()


def test_dicom_seg_carries_the_patient_module_unless_anonymized(
    bundle: Path, tmp_path: Path, monkeypatch
) -> None:
    import pydicom
    from pydicom.dataset import Dataset

    from medseg.names import pseudonym

    monkeypatch.setenv("MEDSEG_PSEUDONYM_KEY", "site-secret")
    series = write_dicom_series(
        _scan(AFFINES["LPS"]), tmp_path / "in" / "s1", patient_id="12345678", patient_name="Doe^Jane"
    )
    identifying = {  # what a clinical export carries besides name and ID
        "PatientBirthDate": "19700101",
        "AccessionNumber": "ACC123",
        "PatientSex": "F",
        "IssuerOfPatientID": "St Mary Hospital",
        "PatientComments": "Jane Doe, 5 Main St",
        "StudyDescription": "CT abdomen Jane Doe",
        "PhysiciansOfRecord": "House^Gregory",
        "AdditionalPatientHistory": "seen by Dr Quinn",
        "StudyDate": "20240102",
    }
    for f in series.iterdir():
        ds = pydicom.dcmread(f)
        for keyword, value in identifying.items():
            setattr(ds, keyword, value)
        other = Dataset()
        other.PatientID = "OTHER-99"
        ds.OtherPatientIDsSequence = [other]
        ds.save_as(f)
    base = [
        "predict",
        "--model",
        str(bundle),
        "--input",
        str(series),
        "--device",
        "cpu",
        "--format",
        "dicom-seg",
    ]
    assert main([*base, "--output", str(tmp_path / "plain"), "--no-progress"]) == 0
    seg = pydicom.dcmread(tmp_path / "plain" / "s1_seg.dcm")
    assert (seg.PatientID, str(seg.PatientName), seg.PatientBirthDate) == ("12345678", "Doe^Jane", "19700101")
    assert main([*base, "--output", str(tmp_path / "anon"), "--no-progress", "--anonymize"]) == 0
    seg = pydicom.dcmread(tmp_path / "anon" / "s1_seg.dcm")
    code = pseudonym("12345678")
    assert (seg.PatientID, str(seg.PatientName)) == (code, code)
    assert (
        seg.PatientBirthDate == ""
        and seg.get("AccessionNumber", "") == ""
        and seg.get("PatientSex", "") == ""
    )
    source = pydicom.dcmread(sorted(series.iterdir())[0])
    assert seg.StudyInstanceUID == source.StudyInstanceUID  # still linked to its source images
    text = (tmp_path / "anon" / "s1_seg.dcm").read_bytes()
    for value in ["Doe", "12345678", "OTHER-99", *identifying.values()]:
        assert value.encode() not in text, value
