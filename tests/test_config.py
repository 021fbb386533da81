"""Config loading: strict keys with did-you-mean, type errors, overrides, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from medseg.config import apply_overrides, config_hash, config_to_dict, load_config, parse_override
from medseg.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))

MINIMAL = {"data": {"root": "/tmp/x", "labels": {"liver": 1, "spleen": 2}}}


def write(tmp_path: Path, raw: dict) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    cfg = load_config(path)
    # scripts rely on these names
    assert cfg.data.root is not None and cfg.train.epochs >= 1
    assert isinstance(cfg.train.seed, int) and cfg.train.device in ("auto", "cpu", "cuda")


def test_chest_config_is_sigmoid_and_ct_configs_softmax() -> None:
    cfgs = {p.stem: load_config(p) for p in CONFIGS}
    assert cfgs["chest_xray"].data.mode == "sigmoid"
    assert cfgs["chest_xray"].data.structure_names == [
        "left_lung",
        "right_lung",
        "heart",
        "left_clavicle",
        "right_clavicle",
    ]
    assert cfgs["chest_xray"].data.spatial_dims == 2
    assert cfgs["ct_organs"].data.mode == "softmax" and cfgs["ct_organs"].data.spatial_dims == 3
    assert cfgs["demo_ct"].data.labels == {
        "liver": 1,
        "spleen": 2,
        "left_kidney": 3,
        "right_kidney": 4,
        "aorta": 5,
        "spine": 6,
    }


def test_unknown_key_did_you_mean(tmp_path: Path) -> None:
    raw = {**MINIMAL, "train": {"lr_rate": 1e-3, "epocs": 3}}
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and "2 problems" in msg
    assert "train.lr_rate: unknown key (did you mean 'lr'?)" in msg
    assert "train.epocs: unknown key (did you mean 'epochs'?)" in msg


def test_unknown_section_and_nested_key(tmp_path: Path) -> None:
    raw = {**MINIMAL, "trian": {}, "loss": {"border_weights": {"sigma": 3}}}
    with pytest.raises(ConfigError, match=r"trian: unknown key \(did you mean 'train'\?\)") as info:
        load_config(write(tmp_path, raw))
    assert "loss.border_weights.sigma: unknown key (did you mean 'sigma_mm'?)" in str(info.value)


def test_all_problems_listed_at_once(tmp_path: Path) -> None:
    raw = {
        "data": {"labels": {"liver": 1}},
        "train": {"epochs": "many", "device": "gpu"},
        "model": {"nrom": 1},
    }
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, raw))
    msg = str(info.value)
    assert "4 problems" in msg
    assert "data.root: required key is missing" in msg
    assert "train.epochs:" in msg and "'many'" in msg
    assert "train.device: device must be auto, cpu, cuda or cuda:N" in msg
    assert "model.nrom: unknown key (did you mean 'norm'?)" in msg


def test_wrong_type_and_value_errors() -> None:
    with pytest.raises(ConfigError, match=r"data.labels: label values must be >= 1"):
        load_config({"data": {"root": "x", "labels": {"background": 0, "liver": 1}}})
    with pytest.raises(ConfigError, match="give exactly one of data.labels"):
        load_config({"data": {"root": "x", "labels": {"a": 1}, "structures": ["b"]}})
    with pytest.raises(ConfigError, match="patch_size has 2 values but data.spatial_dims is 3"):
        load_config({**MINIMAL, "train": {"patch_size": [64, 64]}})


def test_overrides_parse_and_apply(tmp_path: Path) -> None:
    assert parse_override("train.epochs=3") == (["train", "epochs"], 3)
    assert parse_override("train.device=cuda:1") == (["train", "device"], "cuda:1")
    assert parse_override("train.patch_size=[32, 32, 16]") == (["train", "patch_size"], [32, 32, 16])
    assert parse_override("loss.border_weights.enabled=false") == (
        ["loss", "border_weights", "enabled"],
        False,
    )
    cfg = load_config(
        write(tmp_path, MINIMAL),
        [
            "train.epochs=7",
            "train.seed=42",
            "train.device=cpu",
            "data.root=/data/other",
            "loss.border_weights.w0=5",
        ],
    )
    assert (cfg.train.epochs, cfg.train.seed, cfg.train.device) == (7, 42, "cpu")
    assert cfg.data.root == Path("/data/other") and cfg.loss.border_weights.w0 == 5.0
    raw = apply_overrides({"a": {"b": 1}}, ["a.c.d=2"])
    assert raw == {"a": {"b": 1, "c": {"d": 2}}}


def test_override_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not of the form key.path=value"):
        parse_override("train.epochs")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("train..epochs=3")
    with pytest.raises(ConfigError, match="train.epochs is a value, not a section"):
        load_config(write(tmp_path, MINIMAL), ["train.epochs=3", "train.epochs.x=1"])
    with pytest.raises(ConfigError, match=r"train.lr_rate: unknown key \(did you mean 'lr'\?\)"):
        load_config(write(tmp_path, MINIMAL), ["train.lr_rate=0.1"])


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_relative_root_resolves_against_config_folder(tmp_path: Path) -> None:
    (tmp_path / "mydata").mkdir()
    cfg = load_config(write(tmp_path, {"data": {"root": "mydata", "labels": {"a": 1}}}))
    assert cfg.data.root == (tmp_path / "mydata").resolve()


def test_hash_is_stable_and_sensitive() -> None:
    a, b = load_config(MINIMAL), load_config(MINIMAL)
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(load_config(MINIMAL, ["train.seed=1"]))
    assert config_to_dict(a)["train"]["epochs"] == 100


def test_config_is_frozen() -> None:
    cfg = load_config(MINIMAL)
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.epochs = 5  # type: ignore[misc]


def test_prediction_resamples_logits_by_default() -> None:
    """nnU-Net's rule: the blended logits are resampled to the input grid (probabilities on request)."""
    from medseg.config import PredictConfig
    from medseg.inference.engine import EngineOptions

    assert PredictConfig().resample == "logits"
    assert EngineOptions().resample == "logits"
    assert EngineOptions.from_config(PredictConfig(resample="probabilities")).resample == "probabilities"
