"""Synthetic CT and chest X-ray phantoms: layout, determinism, intensities, geometry and anatomy."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medseg.data.synthetic import LABELS, make_ct_case, num_test_cases, synth_ct
from medseg.data.synthetic_cxr import STRUCTURES, make_cxr_case, synth_chest_xray
from medseg.errors import DataError
from medseg.io import load_volume
from medseg.io._sitk import sitk_to_volume
from medseg.types import Volume

logger = logging.getLogger(__name__)

CT_CASES, CT_SEED = 6, 3
CXR_CASES, CXR_SEED = 5, 3
ORGANS = {name: i for name, i in LABELS.items() if name != "background"}


@pytest.fixture(scope="module")
def ct_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_ct(tmp_path_factory.mktemp("ct") / "phantom", cases=CT_CASES, seed=CT_SEED)


@pytest.fixture(scope="module")
def ct_cases(ct_dir: Path) -> dict[str, tuple[Volume, Volume]]:
    ds = json.loads((ct_dir / "dataset.json").read_text())
    out = {}
    for entry in ds["training"] + ds["test"]:
        cid = Path(entry["label"]).name.removesuffix(".nii.gz")
        out[cid] = (load_volume(ct_dir / entry["image"]), load_volume(ct_dir / entry["label"]))
    return out


@pytest.fixture(scope="module")
def cxr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_chest_xray(tmp_path_factory.mktemp("cxr") / "phantom", cases=CXR_CASES, seed=CXR_SEED)


def _canonical(vol: Volume) -> tuple[np.ndarray, np.ndarray]:
    ornt = nib.orientations.io_orientation(vol.affine)
    arr = nib.orientations.apply_orientation(vol.array[0], ornt)
    return arr, vol.affine @ nib.orientations.inv_ornt_aff(ornt, vol.array.shape[1:])


def _touching(lab: np.ndarray, a: int, b: int) -> bool:
    """True if a voxel of label ``a`` has a 6-neighbour of label ``b``."""
    ma, mb = lab == a, lab == b
    for ax in range(lab.ndim):
        lo = [slice(None)] * lab.ndim
        hi = [slice(None)] * lab.ndim
        lo[ax], hi[ax] = slice(None, -1), slice(1, None)
        if np.any(ma[tuple(lo)] & mb[tuple(hi)]) or np.any(mb[tuple(lo)] & ma[tuple(hi)]):
            return True
    return False


def _world_centroid(lab: Volume, label: int) -> np.ndarray:
    idx = np.argwhere(lab.array[0] == label)
    return lab.voxel_to_world(idx.mean(axis=0, keepdims=True))[0]


# ---------------------------------------------------------------------------------------------- splits


@pytest.mark.parametrize(
    ("cases", "expected"), [(1, 1), (2, 1), (3, 1), (5, 1), (7, 1), (8, 2), (10, 2), (13, 3), (20, 4)]
)
def test_held_out_split_is_a_fifth(cases: int, expected: int) -> None:
    assert num_test_cases(cases) == expected


def test_zero_cases_is_an_error() -> None:
    with pytest.raises(DataError, match="at least 1"):
        num_test_cases(0)


# ---------------------------------------------------------------------------------------------- CT


def test_ct_layout_and_dataset_json(ct_dir: Path) -> None:
    ds = json.loads((ct_dir / "dataset.json").read_text())
    assert ds["labels"] == LABELS
    assert list(ds["labels"])[:6] == ["background", "liver", "spleen", "left_kidney", "right_kidney", "aorta"]
    assert ds["channel_names"] == {"0": "CT"} and ds["modality"] == {"0": "CT"}
    assert ds["file_ending"] == ".nii.gz" and ds["tensorImageSize"] == "3D"
    assert ds["numTraining"] == CT_CASES - 1 and len(ds["training"]) == CT_CASES - 1 and len(ds["test"]) == 1
    assert ds["phantom"]["seed"] == CT_SEED and ds["phantom"]["version"] >= 1
    ids = [f"phantom_{k:03d}" for k in range(CT_CASES)]
    assert sorted(ds["phantom"]["cases"]) == ids
    assert sorted(p.name for p in (ct_dir / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in ids[:-1]]
    assert sorted(p.name for p in (ct_dir / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in ids[:-1]]
    assert sorted(p.name for p in (ct_dir / "imagesTs").iterdir()) == [f"{ids[-1]}_0000.nii.gz"]
    assert sorted(p.name for p in (ct_dir / "labelsTs").iterdir()) == [f"{ids[-1]}.nii.gz"]
    for entry in ds["training"] + ds["test"]:
        assert (ct_dir / entry["image"]).is_file() and (ct_dir / entry["label"]).is_file()
    assert ds["test"][0]["dicom"] == f"dicomTs/{ids[-1]}"
    assert [p.name for p in (ct_dir / "dicomTs").iterdir()] == [ids[-1]]


def test_ct_files_are_int16_images_and_uint8_labels_on_one_grid(ct_dir: Path, ct_cases: dict) -> None:
    for cid, (img, lab) in ct_cases.items():
        split = "Tr" if (ct_dir / "imagesTr" / f"{cid}_0000.nii.gz").exists() else "Ts"
        assert nib.load(ct_dir / f"images{split}" / f"{cid}_0000.nii.gz").get_data_dtype() == np.int16
        assert nib.load(ct_dir / f"labels{split}" / f"{cid}.nii.gz").get_data_dtype() == np.uint8
        assert img.array.shape == lab.array.shape
        np.testing.assert_array_equal(img.affine, lab.affine)


def test_ct_is_deterministic_per_case_and_seed(ct_dir: Path, ct_cases: dict, tmp_path: Path) -> None:
    img, lab, _ = make_ct_case(2, seed=CT_SEED)
    disk_img, disk_lab = ct_cases["phantom_002"]
    np.testing.assert_array_equal(disk_img.array, img.array)
    np.testing.assert_array_equal(disk_lab.array, lab.array)
    np.testing.assert_array_equal(disk_img.affine, img.affine)  # affines are float32-exact
    # case k does not depend on the number of cases
    small = synth_ct(tmp_path / "small", cases=2, seed=CT_SEED, dicom_cases=0)
    assert not (small / "dicomTs").exists()
    again = load_volume(small / "imagesTr" / "phantom_000_0000.nii.gz")
    np.testing.assert_array_equal(again.array, ct_cases["phantom_000"][0].array)
    np.testing.assert_array_equal(again.affine, ct_cases["phantom_000"][0].affine)
    other, _, _ = make_ct_case(2, seed=CT_SEED + 1)
    assert other.array.shape != img.array.shape or not np.array_equal(other.array, img.array)


def test_ct_intensities_are_plausible_hu(ct_cases: dict) -> None:
    for cid, (img, lab) in ct_cases.items():
        hu, lb = img.array[0], lab.array[0]
        corner = hu[:4, :4, :]
        assert -1050 < np.median(corner) < -950, cid  # air outside the body
        med = {n: float(np.median(hu[lb == i])) for n, i in ORGANS.items()}
        assert 40 <= med["liver"] <= 85, (cid, med)
        assert 25 <= med["spleen"] <= 75, (cid, med)
        assert 100 <= med["left_kidney"] <= 210 and 100 <= med["right_kidney"] <= 210, (cid, med)
        assert med["aorta"] > med["liver"] + 100, (cid, med)
        assert med["spine"] > med["aorta"], (cid, med)  # bone is the brightest structure
        assert np.percentile(hu[lb == ORGANS["spine"]], 99) > 600, cid
        assert hu.min() >= -1024 and hu.max() <= 3071


def test_ct_every_label_present_and_touching_pairs(ct_cases: dict) -> None:
    for cid, (_, lab) in ct_cases.items():
        lb = lab.array[0]
        assert set(np.unique(lb).tolist()) == set(LABELS.values()), cid
        assert _touching(lb, LABELS["aorta"], LABELS["spine"]), cid
        assert _touching(lb, LABELS["liver"], LABELS["right_kidney"]), cid


def test_ct_orientations_are_mixed(ct_cases: dict) -> None:
    codes = [img.orientation for img, _ in ct_cases.values()]
    assert codes == ["RAS", "LPS", "LAS", "PSR", "RAS", "LPS"]


def test_ct_anatomy_is_consistent_in_world_space(ct_cases: dict) -> None:
    """Liver on the patient's right (RAS +x), spine posterior, whatever the storage orientation."""
    for cid, (img, lab) in ct_cases.items():
        c = {n: _world_centroid(lab, i) for n, i in ORGANS.items()}
        assert c["liver"][0] > c["spleen"][0] + 10, cid  # +x is the patient's right in RAS+
        assert c["right_kidney"][0] > c["left_kidney"][0] + 10, cid
        assert c["aorta"][0] < c["liver"][0], cid
        assert c["spine"][1] < c["aorta"][1] and c["spine"][1] < c["liver"][1], cid  # posterior = -y
        assert c["liver"][2] > c["right_kidney"][2] - 5, cid  # liver above the kidney
        body = np.argwhere(img.array[0] > -500).mean(axis=0, keepdims=True)
        assert c["spine"][1] < img.voxel_to_world(body)[0][1], cid
        # the same in a canonical RAS voxel order, as a viewer would show it
        arr, aff = _canonical(lab)
        assert "".join(nib.aff2axcodes(aff)) == "RAS"
        xs = {n: np.argwhere(arr == i)[:, 0].mean() for n, i in ORGANS.items()}
        assert xs["liver"] > xs["spleen"] and xs["right_kidney"] > xs["left_kidney"], cid


def test_ct_spacing_is_anisotropic_within_stated_ranges(ct_cases: dict) -> None:
    for cid, (img, _) in ct_cases.items():
        direction = np.abs(img.direction)
        z_axis = int(np.argmax(direction[2]))  # voxel axis along the patient's S-I axis
        spacing = np.array(img.spacing_mm)
        in_plane = np.delete(spacing, z_axis)
        matrix = np.delete(np.array(img.spatial_shape), z_axis)
        assert np.all((in_plane >= 0.7 - 1e-6) & (in_plane <= 0.9 + 1e-6)), (cid, spacing)
        assert 1.5 - 1e-6 <= spacing[z_axis] <= 5.0 + 1e-6, (cid, spacing)
        assert spacing[z_axis] > 1.5 * in_plane.max(), (cid, spacing)
        assert 24 <= img.spatial_shape[z_axis] <= 64 and np.all((matrix >= 128) & (matrix <= 160)), cid
    origins = {tuple(np.round(img.origin_mm, 1)) for img, _ in ct_cases.values()}
    assert len(origins) == len(ct_cases)


def test_ct_dicom_series_holds_the_same_image(ct_dir: Path, ct_cases: dict) -> None:
    folder = ct_dir / "dicomTs" / f"phantom_{CT_CASES - 1:03d}"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    dicom = sitk_to_volume(reader.Execute())
    nifti = ct_cases[folder.name][0]
    a0, f0 = _canonical(nifti)
    a1, f1 = _canonical(dicom)
    np.testing.assert_allclose(f1, f0, atol=1e-4)
    np.testing.assert_array_equal(a1, a0)


def test_ct_oblique_option(tmp_path: Path) -> None:
    img, lab, info = make_ct_case(4, seed=0, oblique=True)
    assert 8.0 <= info["oblique_deg"] <= 20.0
    d = img.direction
    assert not np.allclose(np.abs(d), np.round(np.abs(d)), atol=1e-3)  # not axis-aligned
    assert _world_centroid(lab, LABELS["liver"])[0] > _world_centroid(lab, LABELS["spleen"])[0]


def test_ct_output_folder_rules(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "scan.nii.gz").write_bytes(b"")
    with pytest.raises(DataError, match="not empty"):
        synth_ct(foreign, cases=2)
    out = synth_ct(tmp_path / "again", cases=3, seed=1, dicom_cases=0)
    synth_ct(out, cases=2, seed=1, dicom_cases=0)  # re-running replaces the earlier phantom
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["phantom_000_0000.nii.gz"]
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["phantom_001_0000.nii.gz"]


# ---------------------------------------------------------------------------------------------- CXR


def _read_png_rows_cols(path: Path) -> np.ndarray:
    """PNG as a (rows, columns) array, read by SimpleITK directly (independent of medseg.io)."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_cxr_layout_and_splits(cxr_dir: Path) -> None:
    ids = [f"cxr_{k:03d}" for k in range(CXR_CASES)]
    assert sorted(p.name for p in (cxr_dir / "images").iterdir()) == [f"{c}.png" for c in ids]
    assert sorted(p.name for p in (cxr_dir / "masks").iterdir()) == sorted(STRUCTURES)
    for s in STRUCTURES:
        assert sorted(p.name for p in (cxr_dir / "masks" / s).iterdir()) == [f"{c}.png" for c in ids]
    assert (cxr_dir / "test.txt").read_text().split() == ids[-1:]
    ds = json.loads((cxr_dir / "dataset.json").read_text())
    assert ds["layout"] == "scr" and ds["structures"] == list(STRUCTURES)
    assert ds["test"] == ids[-1:] and ds["training"] == ids[:-1]
    assert ds["phantom"]["seed"] == CXR_SEED


def test_cxr_masks_are_binary_and_half_resolution_for_odd_cases(cxr_dir: Path) -> None:
    for k in range(CXR_CASES):
        cid = f"cxr_{k:03d}"
        image = _read_png_rows_cols(cxr_dir / "images" / f"{cid}.png")
        assert image.dtype == np.uint8 and image.shape == (256, 256)
        for s in STRUCTURES:
            m = _read_png_rows_cols(cxr_dir / "masks" / s / f"{cid}.png")
            assert set(np.unique(m).tolist()) == {0, 255}, (cid, s)
            expected = (128, 128) if k % 2 else (256, 256)
            assert m.shape == expected, (cid, s)


def test_cxr_left_is_on_the_image_right(cxr_dir: Path) -> None:
    for k in range(CXR_CASES):
        cid = f"cxr_{k:03d}"
        cols = {}
        for s in ("left_lung", "right_lung", "heart"):
            m = _read_png_rows_cols(cxr_dir / "masks" / s / f"{cid}.png") > 0
            cols[s] = np.argwhere(m)[:, 1].mean() / m.shape[1]
        assert cols["left_lung"] > 0.5 > cols["right_lung"], (cid, cols)
        assert cols["heart"] > 0.5, (cid, cols)  # the heart lies mostly on the patient's left
        # medial.io's reader gives (1, X=columns, Y=rows): the same answer along axis 1
        vol = load_volume(cxr_dir / "masks" / "left_lung" / f"{cid}.png")
        assert np.argwhere(vol.array[0] > 0)[:, 0].mean() / vol.array.shape[1] > 0.5


def test_cxr_clavicles_overlap_the_lungs_in_every_case(cxr_dir: Path) -> None:
    for k in range(CXR_CASES):
        cid = f"cxr_{k:03d}"
        m = {s: _read_png_rows_cols(cxr_dir / "masks" / s / f"{cid}.png") > 0 for s in STRUCTURES}
        assert np.any(m["left_clavicle"] & m["left_lung"]), cid
        assert np.any(m["right_clavicle"] & m["right_lung"]), cid
        assert np.any(m["heart"] & (m["left_lung"] | m["right_lung"])), cid
    for k in range(20):  # more cases in memory
        _, masks = make_cxr_case(k, seed=11)
        assert np.any(masks["left_clavicle"] & masks["left_lung"]), k
        assert np.any(masks["right_clavicle"] & masks["right_lung"]), k


def test_cxr_looks_like_a_radiograph(cxr_dir: Path) -> None:
    for k in range(CXR_CASES):
        image, masks = make_cxr_case(k, seed=CXR_SEED)
        lungs = masks["left_lung"] | masks["right_lung"]
        clav = masks["left_clavicle"] | masks["right_clavicle"]
        heart_only = masks["heart"] & ~lungs
        assert image[lungs & ~clav].mean() + 40 < image[heart_only].mean(), k  # dark lungs, bright heart
        assert image[lungs & clav].mean() > image[lungs & ~clav].mean() + 10, k  # bone over lung
        assert image[:8, :8].mean() < image[lungs].mean(), k  # air above the shoulders
        np.testing.assert_array_equal(_read_png_rows_cols(cxr_dir / "images" / f"cxr_{k:03d}.png"), image)


def test_cxr_is_deterministic() -> None:
    a, ma = make_cxr_case(3, seed=5)
    b, mb = make_cxr_case(3, seed=5)
    np.testing.assert_array_equal(a, b)
    for s in STRUCTURES:
        np.testing.assert_array_equal(ma[s], mb[s])
    c, _ = make_cxr_case(3, seed=6)
    assert not np.array_equal(a, c)


def test_time_per_case_is_logged() -> None:
    t0 = time.perf_counter()
    make_ct_case(0, seed=123)
    t1 = time.perf_counter()
    make_cxr_case(0, seed=123)
    t2 = time.perf_counter()
    logger.info("phantom generation: CT %.2f s/case, CXR %.2f s/case (in memory)", t1 - t0, t2 - t1)
