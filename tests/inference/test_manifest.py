"""predict.json stays true: written after every case, kept when a run is interrupted, and merged under a
lock when several runs write into one folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from factories import build_plan, signal_while_streaming, write_run

from medseg.inference.manifest import Manifest
from medseg.io import save_volume
from medseg.io.dicom_write import write_dicom_series
from medseg.types import Volume


def _scan(shape=(30, 26, 9), seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    arr = np.full((1, *shape), -1000, np.int16)
    arr[0, 3:-3, 3:-3, 1:-1] = rng.integers(-100, 200, size=(shape[0] - 6, shape[1] - 6, shape[2] - 2))
    return Volume(arr, np.diag([0.8, 0.8, 2.5, 1.0]))


def _predict(run: Path, inputs: list[Path], out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "medseg", "predict", "--model", str(run), "--input", *map(str, inputs)]
    env = {**os.environ, "MEDSEG_MALLOC": "default"}
    return subprocess.Popen(
        [*cmd, "--output", str(out), "--no-progress", "--device", "cpu"], env=env, stderr=subprocess.PIPE
    )


def test_two_runs_into_one_folder_both_end_up_in_the_manifest(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", build_plan())
    inputs = [save_volume(_scan(seed=k), tmp_path / "in" / f"case{k}.nii.gz") for k in range(6)]
    out = tmp_path / "out"
    procs = [_predict(run, inputs[:3], out), _predict(run, inputs[3:], out)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:] if p.stderr else ""
    manifest = json.loads((out / "predict.json").read_text())
    assert sorted(r["case"] for r in manifest["cases"]) == [f"case{k}" for k in range(6)]
    assert all(not r.get("skipped") for r in manifest["cases"]) and manifest["failures"] == []


def test_an_interrupted_run_keeps_its_finished_cases_in_the_manifest(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", build_plan())
    first = save_volume(_scan(), tmp_path / "in" / "a_first.nii.gz")
    series = write_dicom_series(_scan(shape=(160, 160, 96)), tmp_path / "in" / "b_series")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    code, _ = signal_while_streaming(run, [first, series], tmp_path / "o", tmp, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM  # stopped while the second case was being decoded
    manifest = json.loads((tmp_path / "o" / "predict.json").read_text())
    assert [r["case"] for r in manifest["cases"]] == ["a_first"]
    assert manifest["failures"] == [
        {"case": "b_series", "input": str(series), "error": "interrupted before this case was finished"}
    ]


def test_merge_keeps_other_rows_and_replaces_its_own(tmp_path: Path) -> None:
    (tmp_path / "predict.json").write_text(
        json.dumps(
            {
                "created": "T0",
                "cases": [{"case": "a", "input": "a.nii"}, {"case": "b", "input": "b.nii"}],
                "failures": [{"input": "c.nii", "error": "bad"}],
            }
        )
    )
    m = Manifest(tmp_path, {"model": "m"})
    m.add({"case": "b", "input": "b.nii", "outputs": ["b.nii.gz"]})
    m.add({"case": "c", "input": "c.nii", "outputs": ["c.nii.gz"]})
    doc = json.loads((tmp_path / "predict.json").read_text())
    assert doc["cases"] == [
        {"predicted": "T0", "case": "a", "input": "a.nii"},
        {"case": "b", "input": "b.nii", "outputs": ["b.nii.gz"]},
        {"case": "c", "input": "c.nii", "outputs": ["c.nii.gz"]},
    ]
    assert doc["failures"] == [] and doc["model"] == "m"


def test_a_killed_runs_temporary_scan_is_removed_by_the_next_run(tmp_path: Path) -> None:
    """SIGKILL cannot clean up: the decoded copy of the series stays, and the next run removes it."""
    run = write_run(tmp_path / "run", build_plan())
    series = write_dicom_series(_scan(shape=(160, 160, 96)), tmp_path / "in" / "series1")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    signal_while_streaming(run, [series], tmp_path / "o", tmp, signal.SIGKILL)
    left = list(tmp.glob("medseg-dicom-*"))
    assert left, "a killed run leaves its temporary scan"
    other = tmp_path / "in2"
    save_volume(_scan(), other / "small.nii.gz")
    env = {**os.environ, "TMPDIR": str(tmp), "MEDSEG_MALLOC": "default"}
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "medseg",
            "predict",
            "--model",
            str(run),
            "--input",
            str(other / "small.nii.gz"),
            "--output",
            str(tmp_path / "o2"),
            "--no-progress",
            "--device",
            "cpu",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert list(tmp.iterdir()) == []
    assert "left behind by a process that no longer runs" in again.stderr


def test_a_failure_replaces_the_earlier_row_of_its_case_and_a_success_clears_the_failure(
    tmp_path: Path,
) -> None:
    first = Manifest(tmp_path, {"model": "m1"})
    first.add({"case": "x", "input": "x.nii", "outputs": ["x.nii.gz"]})
    first.add({"case": "y", "input": ["y_0000.nii", "y_0001.nii"], "outputs": ["y.nii.gz"]})
    second = Manifest(tmp_path, {"model": "m2"})
    second.fail("x", "x.nii", "unreadable")
    second.fail("y", ["y_0000.nii", "y_0001.nii"], "disk full")
    doc = json.loads((tmp_path / "predict.json").read_text())
    assert doc["cases"] == [] and [f["case"] for f in doc["failures"]] == ["x", "y"]
    third = Manifest(tmp_path, {"model": "m3"})
    third.add({"case": "y", "input": ["y_0000.nii", "y_0001.nii"], "outputs": ["y.nii.gz"]})
    doc = json.loads((tmp_path / "predict.json").read_text())
    assert [r["case"] for r in doc["cases"]] == ["y"] and [f["case"] for f in doc["failures"]] == ["x"]


def test_a_damaged_manifest_is_replaced_with_a_warning(tmp_path: Path, caplog) -> None:
    (tmp_path / "predict.json").write_text('{"cases": [], "failures": null}')
    Manifest(tmp_path, {"model": "m"}).add({"case": "a", "input": "a.nii"})
    assert json.loads((tmp_path / "predict.json").read_text())["cases"] == [{"case": "a", "input": "a.nii"}]
    assert "'failures' is not a list" in caplog.text
    (tmp_path / "predict.json").write_text("{not json")
    Manifest(tmp_path, {"model": "m"}).add({"case": "b", "input": "b.nii"})
    assert "not readable" in caplog.text
    assert [r["case"] for r in json.loads((tmp_path / "predict.json").read_text())["cases"]] == ["b"]


def test_predict_removes_half_written_outputs_of_a_killed_run(tmp_path: Path) -> None:
    from medseg.cli.main import main
    from medseg.io._atomic import host_tag

    run = write_run(tmp_path / "run", build_plan())
    scan = save_volume(_scan(), tmp_path / "in" / "c.nii.gz")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".c_probabilities.tmp-{int(dead.stdout)}-{host_tag()}.npy"
    stale.write_bytes(b"half a probability map")
    assert (
        main(["predict", "--model", str(run), "--input", str(scan), "--output", str(out), "--no-progress"])
        == 0
    )
    assert not stale.exists()
