"""Label-name sources for evaluate/report: run dirs, configs, dataset.json, JSON maps."""

import json
from pathlib import Path

import pytest

from medseg.errors import ConfigError, DataError
from medseg.labels import default_labels, load_labels

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_config_softmax_and_sigmoid():
    ct = load_labels(CONFIGS / "demo_ct.yaml")
    assert ct.mode == "softmax"
    assert ct.as_dict()[1] == "liver" and ct.values == tuple(sorted(ct.values))
    cxr = load_labels(CONFIGS / "chest_xray.yaml")
    assert cxr.mode == "sigmoid" and "left_clavicle" in cxr.names
    assert cxr.values == tuple(range(1, len(cxr.names) + 1))


def test_json_maps_both_directions_and_nested_key(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"0": "background", "2": "spleen", "1": "liver"}))
    (tmp_path / "b.json").write_text(json.dumps({"background": 0, "liver": 1, "spleen": 2}))
    (tmp_path / "c.json").write_text(json.dumps({"total": {"1": "liver", "2": "spleen"}, "mr": {"1": "x"}}))
    for src in (tmp_path / "a.json", tmp_path / "b.json", f"{tmp_path / 'c.json'}:total"):
        spec = load_labels(src)
        assert spec.as_dict() == {1: "liver", 2: "spleen"}, src
    assert load_labels(tmp_path / "c.json:mr").names == ("x",)


def test_dataset_json_folder(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "kidney": 3}}))
    assert load_labels(tmp_path).as_dict() == {3: "kidney"}


def test_bad_sources_are_refused_with_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_labels(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"liver": "one"}))
    with pytest.raises(ConfigError, match="bad.json"):
        load_labels(tmp_path / "bad.json")
    (tmp_path / "c.json").write_text(json.dumps({"total": {"1": "liver"}}))
    with pytest.raises(ConfigError, match="no key 'mr'"):
        load_labels(f"{tmp_path / 'c.json'}:mr")


def test_default_names():
    spec = default_labels([0, 5, 2, 5])
    assert spec.as_dict() == {2: "label_2", 5: "label_5"}
    assert spec.name_of(7) == "label_7"


def test_one_label_layout_for_plan_and_label_maps() -> None:
    import numpy as np
    from factories import build_plan

    from medseg.labels import LabelLayout, Mode, label_dtype_for

    plan = build_plan(
        structure_names=("left_kidney", "right_kidney", "liver"),
        label_values=(3, 2, 6),
        left_right_pairs=(("left_kidney", "right_kidney"),),
    )
    lay = plan.labels
    assert lay.mode is Mode.SOFTMAX and lay.exclusive and plan.mode is Mode.SOFTMAX
    assert lay.channel_names == ("background", "left_kidney", "right_kidney", "liver")
    assert lay.out_channels == plan.out_channels == 4
    assert lay.lr_channel_pairs() == [(1, 2)] and lay.lr_channel_permutation() == [0, 2, 1, 3]
    assert lay.as_dict() == {3: "left_kidney", 2: "right_kidney", 6: "liver"}
    assert lay.dtype == np.uint8
    masks = LabelLayout.overlapping(["lung", "clavicle"], left_right_pairs=())
    assert masks.mode == "sigmoid" and masks.values == (1, 2) and masks.channel_names == ("lung", "clavicle")
    assert masks.lr_channel_permutation() == [0, 1]
    assert (label_dtype_for(255), label_dtype_for(256), label_dtype_for(65535)) == (
        np.uint8,
        np.uint16,
        np.uint16,
    )
    with pytest.raises(DataError, match="0..65535"):
        label_dtype_for(65536)
    assert LabelLayout("softmax", ("a",), (300,)).dtype == np.uint16
    with pytest.raises(ConfigError, match="left_right_pairs name unknown"):
        LabelLayout.overlapping(["a"], left_right_pairs=(("a", "b"),))
