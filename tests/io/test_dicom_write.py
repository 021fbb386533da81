"""DICOM series writer: geometry and voxel values read back with SimpleITK (independent reader)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medseg.errors import DataError
from medseg.io._sitk import sitk_to_volume
from medseg.io.dicom_write import write_dicom_series
from medseg.types import Volume, same_physical_grid

SPACING = (0.8, 0.7, 2.5)  # distinct, so a swapped PixelSpacing shows
ORIGIN = (10.5, -20.25, -300.0)


def _affine(code: str) -> np.ndarray:
    """Voxel->RAS affine with SPACING along the array axes; ``oblique`` rotates an LPS grid."""
    aff = np.zeros((4, 4))
    aff[3, 3] = 1.0
    if code == "oblique":
        th, ph = np.deg2rad(17.0), np.deg2rad(9.0)
        rz = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, np.cos(ph), -np.sin(ph)], [0, np.sin(ph), np.cos(ph)]])
        aff[:3, :3] = rz @ rx @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(SPACING)
    else:
        for a, (w, flip) in enumerate(nib.orientations.axcodes2ornt(tuple(code))):
            aff[int(w), a] = flip * SPACING[a]
    aff[:3, 3] = ORIGIN
    return aff


def _volume(code: str, shape: tuple[int, int, int] = (7, 5, 4), seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    arr = rng.integers(-1024, 3000, size=(1, *shape)).astype(np.int16)
    return Volume(arr, _affine(code))


def _read_sitk(folder: Path) -> Volume:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return sitk_to_volume(reader.Execute())


def _canonical(vol: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Array and affine reoriented to the closest RAS voxel order (exact permutation/flip)."""
    ornt = nib.orientations.io_orientation(vol.affine)
    arr = nib.orientations.apply_orientation(vol.array[0], ornt)
    aff = vol.affine @ nib.orientations.inv_ornt_aff(ornt, vol.array.shape[1:])
    return arr, aff


@pytest.mark.parametrize("code", ["RAS", "LPS", "LAS", "PSR", "oblique"])
def test_geometry_and_values_round_trip_through_simpleitk(tmp_path: Path, code: str) -> None:
    vol = _volume(code)
    folder = write_dicom_series(vol, tmp_path / "series", study_date="20240101")
    assert folder == tmp_path / "series"
    assert len(list(folder.glob("IM*.dcm"))) == vol.array.shape[3]
    back = _read_sitk(folder)
    assert same_physical_grid(vol.spatial_shape, vol.affine, back.spatial_shape, back.affine, atol_mm=1e-4)
    a0, f0 = _canonical(vol)
    a1, f1 = _canonical(back)
    np.testing.assert_allclose(f1, f0, atol=1e-4)
    np.testing.assert_array_equal(a1, a0)
    if np.linalg.det(vol.affine[:3, :3]) > 0:  # right-handed grids come back in the same voxel order
        np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)
        np.testing.assert_array_equal(back.array, vol.array)


def test_tags_follow_the_dicom_conventions(tmp_path: Path) -> None:
    vol = _volume("LPS", shape=(6, 4, 3))
    folder = write_dicom_series(vol, tmp_path / "s", series_description="test", study_date="20240102")
    files = sorted(folder.glob("IM*.dcm"))
    assert [f.name for f in files] == ["IM0001.dcm", "IM0002.dcm", "IM0003.dcm"]
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage
        assert ds.Modality == "CT" and ds.InstanceNumber == k + 1 and ds.StudyDate == "20240102"
        assert (ds.Rows, ds.Columns) == (4, 6)  # rows = Y (j), columns = X (i)
        # PixelSpacing = (between rows = step of j, between columns = step of i)
        np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [SPACING[1], SPACING[0]])
        np.testing.assert_allclose(float(ds.SliceThickness), SPACING[2])
        # an LPS voxel grid is the identity direction in DICOM's LPS frame
        np.testing.assert_allclose(
            [float(v) for v in ds.ImageOrientationPatient], [1, 0, 0, 0, 1, 0], atol=1e-12
        )
        lps_origin = np.array([-ORIGIN[0], -ORIGIN[1], ORIGIN[2] + SPACING[2] * k])
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], lps_origin, atol=1e-6)
        assert float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == 0.0
        assert ds.PixelRepresentation == 1 and ds.BitsAllocated == 16
        px = ds.pixel_array
        assert px.dtype == np.int16
        np.testing.assert_array_equal(
            px, vol.array[0, :, :, k].T
        )  # pixel (row j, column i) = voxel (i, j, k)
        assert px[2, 5] == vol.array[0, 5, 2, k]
    uids = {pydicom.dcmread(f).SOPInstanceUID for f in files}
    assert len(uids) == len(files)


def test_uids_are_reproducible_and_overridable(tmp_path: Path) -> None:
    vol = _volume("RAS")
    a = write_dicom_series(vol, tmp_path / "a", study_date="20240101")
    b = write_dicom_series(vol, tmp_path / "b", study_date="20240101")
    da, db = pydicom.dcmread(a / "IM0001.dcm"), pydicom.dcmread(b / "IM0001.dcm")
    assert da.SeriesInstanceUID == db.SeriesInstanceUID and da.SOPInstanceUID == db.SOPInstanceUID
    c = write_dicom_series(
        vol, tmp_path / "c", study_uid="1.2.3.4", series_uid="1.2.3.4.5", study_date="20240101"
    )
    dc = pydicom.dcmread(c / "IM0002.dcm")
    assert dc.StudyInstanceUID == "1.2.3.4" and dc.SeriesInstanceUID == "1.2.3.4.5"
    other = Volume(vol.array + 1, vol.affine)
    d = write_dicom_series(other, tmp_path / "d", study_date="20240101")
    assert pydicom.dcmread(d / "IM0001.dcm").SeriesInstanceUID != da.SeriesInstanceUID


def test_fractional_values_are_rescaled(tmp_path: Path) -> None:
    arr = np.linspace(-3.7, 12.9, 5 * 4 * 3, dtype=np.float32).reshape(1, 5, 4, 3)
    vol = Volume(arr, _affine("RAS"))
    back = _read_sitk(write_dicom_series(vol, tmp_path / "f", modality="MR", study_date="20240101"))
    ds = pydicom.dcmread(tmp_path / "f" / "IM0001.dcm")
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage
    slope = float(ds.RescaleSlope)
    np.testing.assert_allclose(back.array, arr, atol=slope)


def test_rewrite_replaces_series_and_refuses_foreign_folders(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    write_dicom_series(_volume("RAS", shape=(4, 4, 5)), folder, study_date="20240101")
    write_dicom_series(_volume("RAS", shape=(4, 4, 2)), folder, study_date="20240101")
    assert sorted(p.name for p in folder.iterdir()) == ["IM0001.dcm", "IM0002.dcm"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="holds other files"):
        write_dicom_series(_volume("RAS"), other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_rejects_what_dicom_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="single-channel 3D"):
        write_dicom_series(Volume(np.zeros((1, 4, 4), np.int16), np.eye(4)), tmp_path / "a")
    with pytest.raises(DataError, match="single-channel 3D"):
        write_dicom_series(Volume(np.zeros((2, 4, 4, 2), np.int16), np.eye(4)), tmp_path / "b")
    shear = np.eye(4)
    shear[0, 1] = 0.5
    with pytest.raises(DataError, match="shear"):
        write_dicom_series(Volume(np.zeros((1, 4, 4, 2), np.int16), shear), tmp_path / "c")
    with pytest.raises(DataError, match="NaN"):
        write_dicom_series(Volume(np.full((1, 4, 4, 2), np.nan, np.float32), np.eye(4)), tmp_path / "d")


@pytest.mark.parametrize("code", ["LPS", "LAS"])
def test_medseg_reader_agrees(tmp_path: Path, code: str) -> None:
    pytest.importorskip("medseg.io.dicom", reason="medseg's DICOM reader is not available yet")
    from medseg.io import load_volume

    vol = _volume(code)
    back = load_volume(write_dicom_series(vol, tmp_path / "s", study_date="20240101"))
    a0, f0 = _canonical(vol)
    a1, f1 = _canonical(back)
    np.testing.assert_allclose(f1, f0, atol=1e-4)
    np.testing.assert_array_equal(a1, a0)
