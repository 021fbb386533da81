"""Dataset discovery (MSD/nnU-Net, SCR, CSV/YAML lists) and case loading on tiny files in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medseg.config import DataConfig
from medseg.data.datasets import (
    Case,
    Dataset,
    dataset_from_folder,
    detect_layout,
    grid_mismatches,
    load_case,
    load_case_masks,
    load_dataset,
)
from medseg.errors import DataError
from medseg.io import load_volume, save_label_map, save_volume
from medseg.types import Volume

SHAPE = (8, 8, 4)
AFFINE = np.array([[1.0, 0, 0, -10.0], [0, 1.0, 0, 5.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1]])


def write_image(path: Path, value: float = 0.0, *, shape: tuple[int, ...] = SHAPE) -> Path:
    arr = np.full((1, *shape), value, dtype=np.float32)
    return save_volume(Volume(arr, AFFINE), path)


def write_label(
    path: Path, value: int = 1, *, shape: tuple[int, ...] = SHAPE, affine: np.ndarray = AFFINE
) -> Path:
    arr = np.zeros((1, *shape), dtype=np.uint8)
    arr[0, 2:5, 2:5, 1:3] = value
    return save_label_map(Volume(arr, affine), path)


def write_png(path: Path, arr2d: np.ndarray) -> Path:
    """``arr2d`` is (X, Y) = (width, height) in the pixel frame."""
    return save_volume(Volume(arr2d[None].astype(np.uint8), np.eye(4)), path)


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def checks(ds: Dataset) -> set[tuple[str, str]]:
    return {(p.case, p.check) for p in ds.problems}


# --------------------------------------------------------------------------------------------
# MSD / nnU-Net


def test_nnunet_v2_multichannel(tmp_path: Path) -> None:
    root = tmp_path / "Dataset001_X"
    write_json(
        root / "dataset.json",
        {
            "channel_names": {"0": "T1", "1": "T2"},
            "labels": {"background": 0, "liver": 1},
            "file_ending": ".nii.gz",
        },
    )
    for cid in ("b", "a"):
        write_image(root / "imagesTr" / f"{cid}_0000.nii.gz", 10.0)
        write_image(root / "imagesTr" / f"{cid}_0001.nii.gz", 20.0)
        write_label(root / "labelsTr" / f"{cid}.nii.gz")
    write_image(root / "imagesTs" / "t_0000.nii.gz")
    write_image(root / "imagesTs" / "t_0001.nii.gz")
    (root / "imagesTr" / "._a_0000.nii.gz").write_bytes(b"macOS resource fork")

    ds = dataset_from_folder(root)
    assert ds.layout == "msd"
    assert ds.problems == []
    assert ds.label_names == {"liver": 1}
    assert ds.channel_names == ["T1", "T2"]
    assert [c.case_id for c in ds.train_cases] == ["a", "b"]
    assert [c.case_id for c in ds.test_cases] == ["t"]
    a = ds.case("a")
    assert [p.name for p in a.images] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    assert a.label == root / "labelsTr" / "a.nii.gz"
    assert ds.case("t").label is None and ds.case("t").split == "test"

    image, label = load_case(a)
    assert image.array.shape == (2, *SHAPE)
    assert np.all(image.array[0] == 10.0) and np.all(image.array[1] == 20.0)
    assert label is not None and label.array.shape == (1, *SHAPE) and label.array.dtype == np.uint8
    np.testing.assert_allclose(label.affine, AFFINE)
    assert load_case(ds.case("t"))[1] is None


def test_msd_style_labels_and_no_channel_suffix(tmp_path: Path) -> None:
    root = tmp_path / "Task09_Spleen"
    write_json(
        root / "dataset.json",
        {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen", "2": "liver"}},
    )
    # MSD case names may end in digits; they are not channel suffixes here
    write_image(root / "imagesTr" / "spleen_0002.nii.gz")
    write_label(root / "labelsTr" / "spleen_0002.nii.gz")
    write_image(root / "imagesTs" / "spleen_0009.nii.gz")
    ds = dataset_from_folder(root)
    assert ds.label_names == {"spleen": 1, "liver": 2}
    assert ds.channel_names == ["CT"]
    assert [c.case_id for c in ds.cases] == ["spleen_0002", "spleen_0009"]
    assert ds.cases[0].label is not None
    assert ds.problems == []


def test_config_labels_are_authoritative(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_json(root / "dataset.json", {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}})
    write_image(root / "imagesTr" / "a_0000.nii.gz")
    write_label(root / "labelsTr" / "a.nii.gz")
    ds = load_dataset(DataConfig(root=root, labels={"organ": 1, "tumour": 2}))
    assert ds.label_names == {"organ": 1, "tumour": 2}
    assert ("", "label_names") in checks(ds)
    ds2 = load_dataset(DataConfig(root=root, labels={"liver": 1}))
    assert ds2.problems == []


def test_msd_pairing_problems(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_json(
        root / "dataset.json", {"channel_names": {"0": "a", "1": "b"}, "labels": {"background": 0, "x": 1}}
    )
    write_image(root / "imagesTr" / "ok_0000.nii.gz")
    write_image(root / "imagesTr" / "ok_0001.nii.gz")
    write_label(root / "labelsTr" / "ok.nii.gz")
    write_image(root / "imagesTr" / "nolab_0000.nii.gz")
    write_image(root / "imagesTr" / "nolab_0001.nii.gz")
    write_label(root / "labelsTr" / "noimg.nii.gz")
    write_image(root / "imagesTr" / "onechan_0000.nii.gz")
    write_label(root / "labelsTr" / "onechan.nii.gz")
    (root / "imagesTr" / "notes.txt").write_text("hello")
    ds = dataset_from_folder(root)
    found = checks(ds)
    assert ("nolab", "missing_label") in found
    assert ("noimg", "missing_image") in found
    assert ("onechan", "missing_channel") in found
    assert ("", "unexpected_file") in found
    assert not any(p.case == "ok" for p in ds.problems)
    p = next(p for p in ds.problems if p.check == "missing_image")
    assert p.severity == "error" and p.file == "labelsTr/noimg.nii.gz"
    assert "imagesTr/noimg_0000.nii.gz" in p.message


def test_detect_layout(tmp_path: Path) -> None:
    (tmp_path / "m" / "imagesTr").mkdir(parents=True)
    (tmp_path / "s" / "images").mkdir(parents=True)
    (tmp_path / "s" / "masks").mkdir()
    (tmp_path / "e").mkdir()
    assert detect_layout(tmp_path / "m") == "msd"
    assert detect_layout(tmp_path / "s") == "scr"
    with pytest.raises(DataError, match="not a recognised dataset layout.*imagesTr.*masks/<structure>"):
        detect_layout(tmp_path / "e")
    with pytest.raises(DataError, match="data.layout is msd.*set data.layout: scr"):
        load_dataset(DataConfig(root=tmp_path / "s", layout="msd", labels={"x": 1}))


def test_invalid_dataset_json(tmp_path: Path) -> None:
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="dataset.json: not valid JSON"):
        dataset_from_folder(tmp_path)


def test_load_case_refuses_mismatched_label(tmp_path: Path) -> None:
    write_image(tmp_path / "imagesTr" / "c.nii.gz")
    shifted = AFFINE.copy()
    shifted[:3, 3] += 5.0
    write_label(tmp_path / "labelsTr" / "c.nii.gz", affine=shifted)
    ds = dataset_from_folder(tmp_path)
    with pytest.raises(
        DataError, match=r"case c: .*label origin .* differs from image origin .*nearest-neighbour"
    ):
        load_case(ds.case("c"))


def test_grid_mismatches_tolerances() -> None:
    ref = Volume(np.zeros((1, *SHAPE)), AFFINE)
    close = AFFINE.copy()
    close[:3, 3] += 1e-4  # float32 header rounding: fine
    assert grid_mismatches(ref, Volume(np.zeros((1, *SHAPE)), close)) == []
    flipped = AFFINE.copy()
    flipped[0, 0] = -1.0
    names = [c for c, _ in grid_mismatches(ref, Volume(np.zeros((1, *SHAPE)), flipped))]
    assert names == ["direction_mismatch"]


# --------------------------------------------------------------------------------------------
# SCR


def make_scr(root: Path) -> None:
    for cid in ("c1", "c2", "c3"):
        img = np.arange(8 * 6, dtype=np.uint8).reshape(8, 6)  # 8 wide, 6 high
        write_png(root / "images" / f"{cid}.png", img)
        lungs = np.zeros((4, 3), dtype=np.uint8)  # half resolution
        lungs[1, 2] = 255
        write_png(root / "masks" / "lungs" / f"{cid}.png", lungs)
        heart = np.zeros((8, 6), dtype=np.uint8)  # full resolution
        heart[0, 0] = 1
        write_png(root / "masks" / "heart" / f"{cid}.png", heart)
    (root / "test.txt").write_text("# held out\nc3\n\n")


def test_scr_discovery_and_half_resolution_masks(tmp_path: Path) -> None:
    make_scr(tmp_path)
    ds = dataset_from_folder(tmp_path)
    assert ds.layout == "scr"
    assert ds.structures == ["heart", "lungs"]  # sorted folder names
    assert ds.problems == []
    assert [c.case_id for c in ds.train_cases] == ["c1", "c2"]
    assert [c.case_id for c in ds.test_cases] == ["c3"]
    case = ds.case("c1")
    image = load_volume(case.images[0])
    assert image.spatial_shape == (8, 6)
    masks = load_case_masks(case, ["lungs", "heart"], image)
    assert masks.shape == (2, 8, 6) and masks.dtype == np.uint8
    expected = np.zeros((8, 6), dtype=np.uint8)
    expected[2:4, 4:6] = 1  # mask pixel (1, 2) covers image pixels x 2..3, y 4..5
    np.testing.assert_array_equal(masks[0], expected)
    assert masks[1].sum() == 1 and masks[1, 0, 0] == 1

    cfg = DataConfig(root=tmp_path, layout="scr", spatial_dims=2, structures=["lungs", "heart"])
    ds2 = load_dataset(cfg)
    assert ds2.structures == ["lungs", "heart"]
    img, lab = load_case(ds2.case("c2"), cfg)
    assert img.array.shape == (1, 8, 6)
    assert lab is not None and lab.array.shape == (2, 8, 6) and lab.meta["structures"] == ["lungs", "heart"]
    np.testing.assert_array_equal(lab.array[0], expected)


def test_scr_mask_with_other_aspect_ratio_is_refused(tmp_path: Path) -> None:
    write_png(tmp_path / "images" / "x.png", np.zeros((8, 6)))
    write_png(tmp_path / "masks" / "lungs" / "x.png", np.zeros((4, 4)))
    ds = dataset_from_folder(tmp_path)
    image = load_volume(ds.case("x").images[0])
    with pytest.raises(DataError, match=r"case x: .*4x4 pixels .* image is 8x6: the aspect ratios differ"):
        load_case_masks(ds.case("x"), ["lungs"], image)


def test_scr_missing_masks_and_dataset_json_test(tmp_path: Path) -> None:
    write_png(tmp_path / "images" / "a.png", np.zeros((4, 4)))
    write_png(tmp_path / "images" / "b.png", np.zeros((4, 4)))
    write_png(tmp_path / "images" / "t.png", np.zeros((4, 4)))
    write_png(tmp_path / "masks" / "lungs" / "a.png", np.zeros((4, 4)))
    write_png(tmp_path / "masks" / "lungs" / "orphan.png", np.zeros((4, 4)))
    write_png(tmp_path / "masks" / "other" / "a.png", np.zeros((4, 4)))
    write_json(tmp_path / "dataset.json", {"structures": ["lungs"], "test": ["t", "ghost"]})
    ds = dataset_from_folder(tmp_path)
    assert ds.structures == ["lungs"]
    assert [c.case_id for c in ds.test_cases] == ["t"]
    found = checks(ds)
    assert ("b", "missing_mask") in found
    assert ("t", "missing_mask") not in found  # unlabelled held-out image is fine
    assert ("orphan", "missing_image") in found
    assert ("", "undeclared_structure") in found
    assert ("", "test_split") in found
    with pytest.raises(DataError, match="case b: no mask for structure 'lungs'"):
        load_case(ds.case("b"), DataConfig(root=tmp_path, layout="scr", spatial_dims=2, structures=["lungs"]))


def test_scr_test_subfolder(tmp_path: Path) -> None:
    write_png(tmp_path / "images" / "a.png", np.zeros((4, 4)))
    write_png(tmp_path / "masks" / "lungs" / "a.png", np.zeros((4, 4)))
    write_png(tmp_path / "test" / "images" / "z.png", np.zeros((4, 4)))
    write_png(tmp_path / "test" / "masks" / "lungs" / "z.png", np.zeros((4, 4)))
    ds = dataset_from_folder(tmp_path)
    assert [(c.case_id, c.split) for c in ds.cases] == [("a", "train"), ("z", "test")]
    assert ds.case("z").masks["lungs"] == tmp_path / "test" / "masks" / "lungs" / "z.png"


# --------------------------------------------------------------------------------------------
# explicit lists


def test_csv_list_multichannel(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_image(data / "img" / "p1_0000.nii.gz", 1.0)
    write_image(data / "img" / "p1_0001.nii.gz", 2.0)
    write_label(data / "seg" / "p1.nii.gz")
    write_image(data / "img" / "p2_0000.nii.gz")
    write_image(data / "img" / "p2_0001.nii.gz")
    lists = tmp_path / "lists"
    lists.mkdir()
    # p2 paths are relative to the list file's folder, not to data.root
    (lists / "cases.csv").write_text(
        "image_0000,image_0001,label,split\n"
        "img/p1_0000.nii.gz,img/p1_0001.nii.gz,seg/p1.nii.gz,train\n"
        "../data/img/p2_0000.nii.gz,../data/img/p2_0001.nii.gz,,test\n"
    )
    cfg = DataConfig(root=data, layout="list", list_file=lists / "cases.csv", labels={"liver": 1})
    ds = load_dataset(cfg)
    assert ds.problems == []
    assert [(c.case_id, c.split) for c in ds.cases] == [("p1", "train"), ("p2", "test")]
    assert ds.cases[1].images[0].resolve() == (data / "img" / "p2_0000.nii.gz").resolve()
    image, label = load_case(ds.cases[0], cfg)
    assert image.array.shape == (2, *SHAPE) and float(image.array[1].mean()) == 2.0
    assert label is not None and int(label.array.max()) == 1


def test_yaml_list_structures(tmp_path: Path) -> None:
    img = np.zeros((8, 6), dtype=np.uint8)
    write_png(tmp_path / "x.png", img)
    lung = np.zeros((8, 6), dtype=np.uint8)
    lung[1:3, 1:3] = 255
    write_png(tmp_path / "x_lung.png", lung)
    write_png(tmp_path / "x_heart.png", np.zeros((4, 3)))
    (tmp_path / "list.yaml").write_text(
        "- {case: patient1, image: x.png, mask_lung: x_lung.png, heart: x_heart.png}\n"
        "- {image: missing.png, mask_lung: x_lung.png, heart: x_heart.png, split: test}\n"
    )
    cfg = DataConfig(
        root=tmp_path,
        layout="list",
        list_file=tmp_path / "list.yaml",
        spatial_dims=2,
        structures=["lung", "heart"],
    )
    ds = load_dataset(cfg)
    assert [c.case_id for c in ds.cases] == ["patient1", "missing"]
    assert set(ds.cases[0].masks) == {"lung", "heart"}
    assert ds.cases[1].split == "test"
    assert {(p.case, p.check) for p in ds.problems} == {("missing", "missing_file")}
    _, lab = load_case(ds.cases[0], cfg)
    assert lab is not None and lab.array.shape == (2, 8, 6)
    assert lab.array[0].sum() == 4 and lab.array[1].sum() == 0


def test_list_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("label,case\na.nii.gz,a\n")
    cfg = DataConfig(root=tmp_path, layout="list", list_file=tmp_path / "bad.csv", labels={"x": 1})
    with pytest.raises(DataError, match="no 'image' column"):
        load_dataset(cfg)
    (tmp_path / "bad.yaml").write_text("image: a.nii.gz\n")
    cfg = DataConfig(root=tmp_path, layout="list", list_file=tmp_path / "bad.yaml", labels={"x": 1})
    with pytest.raises(DataError, match="expected a YAML list of mappings"):
        load_dataset(cfg)


def test_load_case_unreadable_names_case(tmp_path: Path) -> None:
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"this is not a nifti file")
    with pytest.raises(DataError, match=r"case broken: cannot read image channel 0: .*bad.nii.gz"):
        load_case(Case("broken", (bad,)))
