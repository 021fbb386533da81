"""NIfTI/NRRD/PNG round trips keep shape, dtype and affine exactly; label maps get uint8/uint16."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import DataError
from medseg.io import describe_volume, load_volume, save_label_map, save_volume
from medseg.types import Volume


def _oblique_affine() -> np.ndarray:
    """A rotated (about z by 30 deg and x by 10 deg) anisotropic affine, float32-representable."""
    rz, rx = np.deg2rad(30), np.deg2rad(10)
    Rz = np.array([[np.cos(rz), -np.sin(rz), 0], [np.sin(rz), np.cos(rz), 0], [0, 0, 1]])
    Rx = np.array([[1, 0, 0], [0, np.cos(rx), -np.sin(rx)], [0, np.sin(rx), np.cos(rx)]])
    a = np.eye(4)
    a[:3, :3] = Rz @ Rx @ np.diag([0.8, 0.8, 2.5])
    a[:3, 3] = [-101.5, 22.25, 37.0]
    return a.astype(np.float32).astype(np.float64)


AFFINES = {
    "RAS": np.array([[0.8, 0, 0, -100], [0, 0.8, 0, -120], [0, 0, 2.5, 30], [0, 0, 0, 1]]),
    "LPS": np.array([[-0.75, 0, 0, 95], [0, -0.75, 0, 110], [0, 0, 3.0, -40], [0, 0, 0, 1]]),
    "LAS": np.array([[-0.875, 0, 0, 90], [0, 0.875, 0, -80], [0, 0, 1.5, 12.5], [0, 0, 0, 1]]),
    "oblique": _oblique_affine(),
}
EXPECTED_CODES = {"RAS": "RAS", "LPS": "LPS", "LAS": "LAS"}


@pytest.mark.parametrize("name", list(AFFINES))
def test_label_round_trip_is_bit_exact(tmp_path: Path, name: str) -> None:
    """A label map read from a NIfTI file and written back has the file's affine bit for bit."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, size=(7, 5, 3)).astype(np.uint8)
    src = tmp_path / f"src_{name}.nii.gz"
    nib.save(nib.Nifti1Image(labels, AFFINES[name]), str(src))
    file_affine = nib.load(str(src)).affine  # what the file stores (float32 srows)
    vol = load_volume(src)
    path = save_label_map(vol, tmp_path / f"{name}.nii.gz")
    back = load_volume(path)
    assert back.array.shape == (1, 7, 5, 3)
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array[0], labels)
    np.testing.assert_array_equal(back.affine, file_affine)  # bit for bit
    np.testing.assert_array_equal(nib.load(str(path)).affine, file_affine)
    if name in EXPECTED_CODES:
        assert back.orientation == EXPECTED_CODES[name]
    # the header's qform also carries the geometry (readers that ignore the sform agree)
    img = nib.load(str(path))
    np.testing.assert_allclose(img.get_qform(), AFFINES[name], atol=1e-4)
    assert int(img.header["sform_code"]) > 0 and int(img.header["qform_code"]) > 0
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_float64_affine_is_kept_to_nifti_precision(tmp_path: Path) -> None:
    """NIfTI-1 stores the affine as float32: an in-memory float64 affine comes back within 1e-5 mm."""
    aff = AFFINES["oblique"].copy()
    aff[:3, 3] += 1e-3 / 3  # not float32-representable
    path = save_label_map(Volume(np.ones((1, 3, 3, 3), np.uint8), aff), tmp_path / "f.nii.gz")
    back = load_volume(path)
    np.testing.assert_allclose(back.affine, aff, rtol=0, atol=1e-5)


def test_image_round_trip_keeps_dtype(tmp_path: Path) -> None:
    arr = np.arange(4 * 3 * 2, dtype=np.int16).reshape(1, 4, 3, 2) - 1000
    vol = Volume(arr, AFFINES["LPS"])
    back = load_volume(save_volume(vol, tmp_path / "img.nii"))
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, arr)
    np.testing.assert_array_equal(back.affine, AFFINES["LPS"])


def test_label_dtype_choice(tmp_path: Path) -> None:
    small = Volume(np.array([[[[0, 255]]]], dtype=np.int64), np.eye(4))
    big = Volume(np.array([[[[0, 300]]]], dtype=np.int64), np.eye(4))
    assert load_volume(save_label_map(small, tmp_path / "a.nii.gz")).array.dtype == np.uint8
    assert load_volume(save_label_map(big, tmp_path / "b.nii.gz")).array.dtype == np.uint16
    with pytest.raises(DataError, match="0..65535"):
        save_label_map(Volume(np.array([[[[-1, 2]]]]), np.eye(4)), tmp_path / "c.nii.gz")
    with pytest.raises(DataError, match="whole numbers"):
        save_label_map(Volume(np.array([[[[0.5, 2]]]]), np.eye(4)), tmp_path / "d.nii.gz")


def test_4d_nifti_becomes_channels(tmp_path: Path) -> None:
    arr = np.zeros((4, 3, 2, 5), dtype=np.float32)
    arr[..., 2] = 7
    nib.save(nib.Nifti1Image(arr, AFFINES["RAS"]), str(tmp_path / "t.nii.gz"))
    vol = load_volume(tmp_path / "t.nii.gz")
    assert vol.array.shape == (5, 4, 3, 2) and vol.meta["ndim_on_disk"] == 4
    assert np.all(vol.array[2] == 7)
    assert describe_volume(vol)["shape"] == [4, 3, 2, 5]


def test_nrrd_round_trip_keeps_geometry(tmp_path: Path) -> None:
    arr = np.random.default_rng(1).integers(-1000, 1000, size=(1, 6, 5, 4)).astype(np.int16)
    for name in ("RAS", "LPS", "oblique"):
        vol = Volume(arr, AFFINES[name])
        back = load_volume(save_volume(vol, tmp_path / f"{name}.nrrd"))
        np.testing.assert_array_equal(back.array, arr)
        np.testing.assert_allclose(back.affine, AFFINES[name], atol=1e-9)


def test_png_axes_are_columns_then_rows(tmp_path: Path) -> None:
    import SimpleITK as sitk

    # a 2D image 6 wide (x, columns) and 4 high (y, rows) with a bright pixel at column 5, row 1
    arr = np.zeros((1, 6, 4), dtype=np.uint8)
    arr[0, 5, 1] = 200
    path = save_volume(Volume(arr, np.eye(4)), tmp_path / "m.png")
    on_disk = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # (rows, cols)
    assert on_disk.shape == (4, 6) and on_disk[1, 5] == 200
    back = load_volume(path)
    assert back.spatial_dims == 2 and back.array.shape == (1, 6, 4)
    np.testing.assert_array_equal(back.array, arr)


def test_rgb_png_becomes_grey(tmp_path: Path) -> None:
    import SimpleITK as sitk

    rgb = np.zeros((4, 6, 3), dtype=np.uint8)
    rgb[1, 5] = [90, 90, 90]
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "rgb.png"))
    vol = load_volume(tmp_path / "rgb.png")
    assert vol.array.shape == (1, 6, 4) and vol.array[0, 5, 1] == 90


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_volume(tmp_path / "missing.nii.gz")
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    with pytest.raises(DataError, match=r"corrupt\.nii\.gz: cannot read as NIfTI"):
        load_volume(bad)
    other = tmp_path / "notes.txt"
    other.write_text("hi")
    with pytest.raises(DataError, match="unknown image format"):
        load_volume(other)


def test_never_overwrites_the_input(tmp_path: Path) -> None:
    path = save_label_map(Volume(np.zeros((1, 2, 2, 2), np.uint8), np.eye(4)), tmp_path / "in.nii.gz")
    vol = load_volume(path)
    with pytest.raises(DataError, match="refusing to overwrite the input"):
        save_label_map(vol, path)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_slab_reader_matches_the_whole_image(tmp_path, suffix):
    import nibabel as nib

    from medseg.io import load_volume
    from medseg.io.nifti import NiftiSlabs

    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 1000, (7, 5, 11)).astype(np.int16)
    path = tmp_path / f"x{suffix}"
    nib.save(nib.Nifti1Image(data, np.diag([0.7, 0.8, 2.0, 1.0])), str(path))
    with NiftiSlabs(path) as src:
        assert src.spatial_shape == (7, 5, 11) and src.spacing_mm == pytest.approx((0.7, 0.8, 2.0))
        np.testing.assert_array_equal(src.read_slab(3, 8)[0], data[..., 3:8])
        np.testing.assert_array_equal(src.load().array, load_volume(path).array)
        np.testing.assert_array_equal(src.affine, load_volume(path).affine)
        tmp = src._tmp
    assert tmp is None or not tmp.exists(), "the decompressed temporary file is removed"
    scaled = nib.Nifti1Image(data, np.eye(4))
    scaled.header.set_slope_inter(0.5, -3.0)
    nib.save(scaled, str(tmp_path / f"s{suffix}"))
    with NiftiSlabs(tmp_path / f"s{suffix}") as src:
        np.testing.assert_allclose(src.read_slab(0, 11)[0], data * 0.5 - 3.0)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_block_reader_reads_any_box(tmp_path, suffix, monkeypatch):
    """read_block gives ``data[box]`` for boxes along every axis, also when each mapping of the
    file covers fewer slices than the box (the bound on memory)."""
    import nibabel as nib

    from medseg.io import _slabs
    from medseg.io.nifti import NiftiSlabs

    data = np.random.default_rng(1).integers(-1000, 1000, (9, 7, 11)).astype(np.int16)
    path = tmp_path / f"x{suffix}"
    nib.save(nib.Nifti1Image(data, np.eye(4), nib.Nifti1Header(endianness=">")), str(path))
    assert nib.load(str(path)).header.endianness == ">"  # big-endian on disk
    monkeypatch.setattr(_slabs, "_MAP_BYTES", 3 * 9 * 7 * 2)  # three slices per mapping
    boxes = [
        (slice(None), slice(2, 5), slice(None)),
        (slice(4, 6), slice(None), slice(None)),
        (slice(1, 8), slice(0, 3), slice(2, 10)),
        (slice(0, 9), slice(0, 7), slice(10, 11)),
    ]
    with NiftiSlabs(path) as src:
        for box in boxes:
            got = src.read_block(box)
            assert got.shape == (1, *data[box].shape)
            np.testing.assert_array_equal(got[0], data[box])
