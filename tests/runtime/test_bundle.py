"""load_bundle: the one way a trained model is loaded; networks come from the plan's record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from factories import build_plan, write_run

from medseg.cli.main import main
from medseg.errors import ConfigError, DataError
from medseg.models import NetworkSpec
from medseg.runtime.bundle import BUNDLE_FORMATS, load_bundle
from medseg.runtime.checkpoint import save_checkpoint


def test_bundle_builds_the_recorded_network_with_its_weights(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", build_plan(), seed=4)
    bundle = load_bundle(run, device="cpu")
    assert bundle.format == "medseg-run" and bundle.checkpoint == "best.pt"
    assert not bundle.model.training
    saved = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["model"]
    for key, value in bundle.model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert bundle.plan.network is not None
    assert bundle.model.level_strides == list(bundle.plan.network.strides)
    assert bundle.provenance()["epoch"] == 1


def test_recorded_strides_win_over_rederiving_them(tmp_path: Path) -> None:
    """A plan whose record differs from what the patch would give today loads its own record."""
    run = write_run(tmp_path / "run", build_plan())
    d = json.loads((run / "plan.json").read_text())
    d["network"]["strides"] = [[1, 1, 1], [2, 2, 2], [2, 2, 1]]  # not what plan_strides would choose
    (run / "plan.json").write_text(json.dumps(d))
    spec = NetworkSpec.from_dict(d["network"])
    from medseg.models import create_network

    net = create_network(spec, in_channels=1, out_channels=3)
    save_checkpoint(run / "checkpoints" / "best.pt", {"model": net.state_dict(), "epoch": 2})
    bundle = load_bundle(run, device="cpu")
    assert bundle.model.level_strides == [(1, 1, 1), (2, 2, 2), (2, 2, 1)]


def test_old_plan_without_a_network_record_derives_it_once_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = write_run(tmp_path / "run", build_plan(target_spacing_mm=(1.0, 1.0, 3.0)))
    d = json.loads((run / "plan.json").read_text())
    recorded = d.pop("network")
    (run / "plan.json").write_text(json.dumps(d))
    with pytest.warns(DeprecationWarning, match="predates network records"):
        bundle = load_bundle(run, device="cpu")
    assert [list(s) for s in bundle.model.level_strides] == recorded["strides"]
    assert main(["convert-run", str(run)]) == 0
    assert "network recorded" in capsys.readouterr().out
    assert json.loads((run / "plan.json").read_text())["network"] == recorded


def test_weights_of_another_network_are_a_clear_error(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", build_plan())
    other = write_run(tmp_path / "other", build_plan(), channels=(8, 16, 32))
    (run / "checkpoints" / "best.pt").write_bytes((other / "checkpoints" / "best.pt").read_bytes())
    with pytest.raises(DataError, match="do not fit the network plan.json records"):
        load_bundle(run, device="cpu")


def test_not_a_model_folder_and_bad_choices(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not a model folder.*known formats: medseg-run"):
        load_bundle(tmp_path, device="cpu")
    run = write_run(tmp_path / "run", build_plan())
    with pytest.raises(ConfigError, match="checkpoint 'newest'"):
        load_bundle(run, checkpoint="newest")
    with pytest.raises(DataError, match=r"looked for last\.pt"):
        load_bundle(run, checkpoint="last")
    assert "medseg-run" in BUNDLE_FORMATS.names_in_order()


def test_best_falls_back_to_last_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = write_run(tmp_path / "run", build_plan())
    (run / "checkpoints" / "best.pt").rename(run / "checkpoints" / "last.pt")
    bundle = load_bundle(run, device="cpu")
    assert bundle.checkpoint == "last.pt"
    assert "using checkpoints/last.pt" in caplog.text


def test_an_older_run_with_spaces_in_its_names_still_loads_but_paths_do_not(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", build_plan())
    d = json.loads((run / "plan.json").read_text())
    d["structure_names"] = ["left kidney", "right kidney"]  # what older configs allowed
    (run / "plan.json").write_text(json.dumps(d))
    assert load_bundle(run, device="cpu").plan.structure_names == ("left kidney", "right kidney")
    d["structure_names"] = ["left kidney", "../x"]
    (run / "plan.json").write_text(json.dumps(d))
    before = (run / "checkpoints" / "best.pt").read_bytes()
    with pytest.raises(DataError, match=r"not a valid medseg plan.json.*'\.\./x' is not allowed"):
        load_bundle(run, device="cpu")
    assert main(["convert-run", str(run)]) == 2
    assert (run / "checkpoints" / "best.pt").read_bytes() == before  # refused before any rewrite
