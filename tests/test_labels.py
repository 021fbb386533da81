"""Label-name sources for evaluate/report: run dirs, configs, dataset.json, JSON maps."""

import json
from pathlib import Path

import pytest

from medseg.errors import ConfigError
from medseg.labels import default_label_spec, load_label_spec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_config_softmax_and_sigmoid():
    ct = load_label_spec(CONFIGS / "demo_ct.yaml")
    assert ct.mode == "softmax"
    assert ct.as_dict()[1] == "liver" and ct.values == tuple(sorted(ct.values))
    cxr = load_label_spec(CONFIGS / "chest_xray.yaml")
    assert cxr.mode == "sigmoid" and "left_clavicle" in cxr.names
    assert cxr.values == tuple(range(1, len(cxr.names) + 1))


def test_json_maps_both_directions_and_nested_key(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"0": "background", "2": "spleen", "1": "liver"}))
    (tmp_path / "b.json").write_text(json.dumps({"background": 0, "liver": 1, "spleen": 2}))
    (tmp_path / "c.json").write_text(json.dumps({"total": {"1": "liver", "2": "spleen"}, "mr": {"1": "x"}}))
    for src in (tmp_path / "a.json", tmp_path / "b.json", f"{tmp_path / 'c.json'}:total"):
        spec = load_label_spec(src)
        assert spec.as_dict() == {1: "liver", 2: "spleen"}, src
    assert load_label_spec(tmp_path / "c.json:mr").names == ("x",)


def test_dataset_json_folder(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "kidney": 3}}))
    assert load_label_spec(tmp_path).as_dict() == {3: "kidney"}


def test_bad_sources_are_refused_with_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_label_spec(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"liver": "one"}))
    with pytest.raises(ConfigError, match="bad.json"):
        load_label_spec(tmp_path / "bad.json")
    (tmp_path / "c.json").write_text(json.dumps({"total": {"1": "liver"}}))
    with pytest.raises(ConfigError, match="no key 'mr'"):
        load_label_spec(f"{tmp_path / 'c.json'}:mr")


def test_default_names():
    spec = default_label_spec([0, 5, 2, 5])
    assert spec.as_dict() == {2: "label_2", 5: "label_5"}
    assert spec.name_of(7) == "label_7"
