"""The command line under faults: unwritable outputs are refused before any work, OS errors are one line
naming the path (exit 2), a closed pipe ends quietly, and the global flags work after the subcommand."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from factories import build_plan, write_run

from medseg.cli.main import main
from medseg.io import save_label_map, save_volume
from medseg.types import Volume


@pytest.fixture()
def scan(tmp_path: Path) -> Path:
    arr = np.full((1, 20, 20, 8), -1000, np.int16)
    arr[0, 4:16, 4:16, 2:6] = 40
    return save_volume(Volume(arr, np.eye(4)), tmp_path / "scan.nii.gz")


def test_an_output_that_cannot_be_written_is_refused_before_any_work(
    tmp_path: Path, scan: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import medseg.inference.predict as predict_module

    run = write_run(tmp_path / "run", build_plan())
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should go")
    monkeypatch.setattr(predict_module, "load_bundle", lambda *a, **k: pytest.fail("the model was loaded"))
    code = main(["predict", "--model", str(run), "--input", str(scan), "--output", str(blocker / "preds")])
    assert code == 2
    assert f"--output {blocker / 'preds'}: cannot write there" in capsys.readouterr().err
    mask = save_label_map(
        Volume(np.ones((1, 20, 20, 8), np.uint8), np.eye(4)), tmp_path / "m" / "scan.nii.gz"
    )
    assert main(["report", "--image", str(scan), "--mask", str(mask), "--output", str(blocker / "r")]) == 2
    assert "cannot write there" in capsys.readouterr().err
    args = ["evaluate", "--pred", str(mask.parent), "--ref", str(mask.parent), "--output", str(blocker / "e")]
    assert main(args) == 2
    assert "cannot write there" in capsys.readouterr().err


def test_os_errors_are_one_line_naming_the_path(
    scan: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import medseg.io

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", "/data/out/scan.nii.gz")

    monkeypatch.setattr(medseg.io, "load_volume", disk_full)
    assert main(["info", str(scan)]) == 2
    assert capsys.readouterr().err == "error: /data/out/scan.nii.gz: No space left on device\n"


def test_a_closed_pipe_ends_quietly(scan: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "medseg", "info", str(scan)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "MEDSEG_MALLOC": "default"},
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before anything was written (`| head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert err == ""


def test_global_flags_after_the_subcommand(scan: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["info", str(scan), "-q"]) == 0
    assert main(["info", str(scan), "--verbose"]) == 0
    assert main(["-v", "info", str(scan)]) == 0
    with pytest.raises(Exception, match="no such file"):  # --debug shows the traceback, wherever it is
        main(["info", str(scan.with_name("missing.nii.gz")), "--debug"])
    assert main(["info", str(scan.with_name("missing.nii.gz"))]) == 2
    with pytest.raises(SystemExit) as exc:  # still exclusive: argparse's usage error
        main(["info", str(scan), "-v", "-q"])
    assert exc.value.code == 2
