"""DICOM reading on small synthetic files written here with pydicom (no external data)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medseg.errors import DataError
from medseg.io import load_volume
from medseg.io.dicom import DicomSeries, list_dicom_series, read_dicom_file, read_dicom_series
from medseg.io.dicom_write import write_dicom_series
from medseg.types import Volume, same_physical_grid

SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "EMR": "1.2.840.10008.5.1.4.1.1.4.1",
}
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


# --------------------------------------------------------------------------------------------------
# writers


def _base(modality: str, sop_class: str, rows: int, cols: int, **tags: object) -> Dataset:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = "PAT-001"
    ds.StudyDate = "20240102"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def _pixels(plane_xy: np.ndarray, ds: Dataset) -> bytes:
    """(X, Y) stored values -> DICOM pixel bytes (rows = Y, columns = X)."""
    dtype = np.int16 if ds.PixelRepresentation == 1 else np.uint16
    return np.ascontiguousarray(plane_xy.T).astype(dtype).tobytes()


def _geometry(affine_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]:
    lps = LPS @ affine_ras
    sx, sy = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    iop = np.r_[lps[:3, 0] / sx, lps[:3, 1] / sy]
    return lps[:3, 3], lps[:3, 2], iop, (float(sy), float(sx))


def write_series(
    folder: Path,
    values: np.ndarray,
    affine_ras: np.ndarray,
    *,
    modality: str = "CT",
    slope: float | list[float] = 1.0,
    intercept: float = -1024.0,
    series_uid: str | None = None,
    description: str = "synthetic",
    **tags: object,
) -> list[Path]:
    """Write an (X, Y, Z) array of rescaled values as one file per slice; file names run *against*
    the slice order so that the reader has to sort by position."""
    folder.mkdir(parents=True, exist_ok=True)
    origin, step, iop, spacing = _geometry(affine_ras)
    series_uid = generate_uid() if series_uid is None else series_uid
    nz = values.shape[2]
    slopes = [slope] * nz if np.isscalar(slope) else list(slope)
    paths = []
    for k in range(nz):
        ds = _base(modality, SOP_CLASS[modality], values.shape[1], values.shape[0], **tags)
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = description
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in origin + k * step]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.PixelSpacing = list(spacing)
        ds.SliceThickness = float(np.linalg.norm(step))
        ds.RescaleSlope, ds.RescaleIntercept = slopes[k], intercept
        stored = (values[:, :, k] - intercept) / slopes[k]
        assert np.allclose(stored, np.round(stored))
        ds.PixelData = _pixels(np.round(stored), ds)
        path = folder / f"IM{nz - k:04d}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_multiframe(
    path: Path, values: np.ndarray, affine_ras: np.ndarray, *, frame_order: list[int], slopes: list[float]
) -> None:
    """Enhanced MR with per-frame positions and rescale; frame ``f`` holds slice ``frame_order[f]``."""
    origin, step, iop, spacing = _geometry(affine_ras)
    ds = _base("MR", SOP_CLASS["EMR"], values.shape[1], values.shape[0], PixelRepresentation=0)
    ds.SeriesInstanceUID = generate_uid()
    ds.NumberOfFrames = len(frame_order)
    ds.AcquisitionDateTime = "20240103101010"

    def item(**kw: object) -> Dataset:
        d = Dataset()
        for key, value in kw.items():
            setattr(d, key, value)
        return d

    ds.SharedFunctionalGroupsSequence = DicomSequence(
        [
            item(
                PlaneOrientationSequence=DicomSequence(
                    [item(ImageOrientationPatient=[float(v) for v in iop])]
                ),
                PixelMeasuresSequence=DicomSequence([item(PixelSpacing=list(spacing), SliceThickness=9.0)]),
            )
        ]
    )
    frames, per_frame = [], []
    for f, k in enumerate(frame_order):
        pos = [float(v) for v in origin + k * step]
        per_frame.append(
            item(
                PlanePositionSequence=DicomSequence([item(ImagePositionPatient=pos)]),
                PixelValueTransformationSequence=DicomSequence(
                    [item(RescaleSlope=slopes[f], RescaleIntercept=0, RescaleType="US")]
                ),
            )
        )
        frames.append(np.round(values[:, :, k] / slopes[f]).T)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = np.stack(frames).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_radiograph(
    path: Path, stored_yx: np.ndarray, *, photometric: str = "MONOCHROME2", **tags: object
) -> None:
    ds = _base("DX", SOP_CLASS["DX"], *stored_yx.shape, PixelRepresentation=0, BitsStored=12, HighBit=11)
    ds.PhotometricInterpretation = photometric
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(stored_yx).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def hu_values(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 2000, size=shape).astype(np.int32)


def rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    a = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    t = np.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def make_affine(
    direction: np.ndarray, spacing: tuple[float, float, float], origin: tuple[float, float, float]
) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = direction * np.asarray(spacing)[None, :]
    aff[:3, 3] = origin
    return aff


def assert_same_world_values(vol: Volume, ref: np.ndarray, ref_affine: np.ndarray) -> None:
    """Every reference voxel centre maps onto a voxel centre of ``vol`` holding the same value."""
    assert same_physical_grid(vol.spatial_shape, vol.affine, ref.shape, ref_affine, atol_mm=1e-3)
    ijk = np.array(list(itertools.product(*map(range, ref.shape))), dtype=float)
    world = ijk @ ref_affine[:3, :3].T + ref_affine[:3, 3]
    ours = (world - vol.affine[:3, 3]) @ np.linalg.inv(vol.affine[:3, :3]).T
    idx = np.rint(ours).astype(int)
    np.testing.assert_allclose(ours, idx, atol=1e-4)
    got = vol.array[0][tuple(idx.T)]
    np.testing.assert_allclose(got, ref[tuple(ijk.astype(int).T)], rtol=1e-6, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# series geometry and values


def test_axial_lps_series_reads_back_exactly(tmp_path: Path) -> None:
    values = hu_values((6, 5, 4))
    affine = make_affine(np.diag([-1.0, -1.0, 1.0]), (0.7, 0.8, 2.5), (120.0, 80.5, -300.0))  # LPS
    write_series(tmp_path / "ct", values, affine, SeriesDescription="abdomen", AcquisitionDate="20240105")
    vol = read_dicom_series(tmp_path / "ct")
    assert vol.orientation == "LPS" and vol.spatial_shape == (6, 5, 4)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-6)
    assert vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array[0], values)
    meta = vol.meta
    assert meta["format"] == "dicom" and meta["source"] == str(tmp_path / "ct") and meta["modality"] == "CT"
    assert meta["n_slices"] == 4 and meta["patient_id"] == "PAT-001" and meta["study_date"] == "20240102"
    assert meta["acquisition_date"] == "20240105" and meta["series_description"] == "synthetic"
    assert meta["series_uid"] and meta["rescale_intercept"] == -1024.0


@pytest.mark.parametrize(
    ("name", "direction"),
    [
        # sagittal: columns run anterior, rows inferior, slices left->right (positions *descending* along
        # the DICOM normal, so the reader stores the slices in reverse order)
        ("sagittal", np.array([[0.0, 0, -1], [1, 0, 0], [0, -1, 0]])),
        ("coronal", np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])),
        ("oblique", rotation((1.0, 2.0, 0.5), 27.0) @ np.diag([-1.0, -1.0, 1.0])),
    ],
)
def test_non_axial_series_matches_reference_in_world(
    tmp_path: Path, name: str, direction: np.ndarray
) -> None:
    values = hu_values((5, 4, 3), seed=1)
    affine = make_affine(direction, (0.9, 1.1, 3.0), (10.0, -20.0, 30.0))
    write_series(tmp_path / name, values, affine, modality="MR", intercept=0.0, slope=1.0)
    vol = read_dicom_series(tmp_path / name)
    assert vol.spatial_shape == (5, 4, 3)
    np.testing.assert_allclose(vol.spacing_mm, (0.9, 1.1, 3.0), atol=1e-6)
    assert_same_world_values(vol, values, affine)
    # in-plane axes come straight from ImageOrientationPatient; the slice axis runs along the normal
    np.testing.assert_allclose(vol.affine[:3, :2], affine[:3, :2], atol=1e-6)
    normal_ras = np.cross((LPS @ affine)[:3, 0], (LPS @ affine)[:3, 1])
    assert np.dot(LPS[:3, :3] @ vol.affine[:3, 2], normal_ras) > 0


def test_fractional_rescale_gives_float32(tmp_path: Path) -> None:
    stored = np.random.default_rng(2).integers(0, 3000, size=(4, 3, 3))
    values = stored * 0.25 - 100.5
    write_series(tmp_path / "pet", values, np.diag([1.0, 1, 2, 1]), slope=0.25, intercept=-100.5)
    vol = read_dicom_series(tmp_path / "pet")
    assert vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.array[0], values, rtol=1e-6)


def test_per_slice_rescale_is_applied_per_slice(tmp_path: Path) -> None:
    values = np.random.default_rng(3).integers(0, 500, size=(4, 3, 3)) * 6
    write_series(tmp_path / "s", values, np.diag([1.0, 1, 2, 1]), slope=[1.0, 2.0, 3.0], intercept=0.0)
    vol = read_dicom_series(tmp_path / "s")
    assert np.issubdtype(vol.array.dtype, np.integer) and "rescale_slope" not in vol.meta
    np.testing.assert_array_equal(vol.array[0], values)


def test_single_slice_series_is_3d_with_slice_thickness(tmp_path: Path) -> None:
    values = hu_values((4, 3, 1))
    affine = make_affine(np.diag([-1.0, -1.0, 1.0]), (0.5, 0.5, 5.0), (0.0, 0.0, 12.0))
    (path,) = write_series(tmp_path / "one", values, affine)
    vol = read_dicom_series(tmp_path / "one")
    assert vol.spatial_shape == (4, 3, 1) and vol.spacing_mm == pytest.approx((0.5, 0.5, 5.0))
    np.testing.assert_allclose(vol.affine, affine, atol=1e-6)
    ds = pydicom.dcmread(path)
    ds.SpacingBetweenSlices = 6.0  # preferred over SliceThickness
    ds.save_as(path)
    assert read_dicom_file(path).spacing_mm[2] == pytest.approx(6.0)
    # a size-1 axis has no step between voxel centres: the grids are the same whatever its length
    thin = affine.copy()
    thin[2, 2] = 1.0
    assert same_physical_grid(vol.spatial_shape, vol.affine, (4, 3, 1), thin)


def test_enhanced_multiframe_sorts_frames_and_applies_per_frame_rescale(tmp_path: Path) -> None:
    values = np.random.default_rng(4).integers(0, 1000, size=(5, 4, 4)) * 12
    affine = make_affine(rotation((0.0, 1.0, 1.0), 20.0), (0.6, 0.7, 1.5), (5.0, 6.0, 7.0))
    path = tmp_path / "enhanced.dcm"
    write_multiframe(path, values, affine, frame_order=[2, 0, 3, 1], slopes=[1.0, 2.0, 3.0, 4.0])
    vol = read_dicom_file(path)
    assert vol.spatial_shape == (5, 4, 4) and vol.meta["n_slices"] == 4
    assert vol.meta["acquisition_date"] == "20240103"
    np.testing.assert_allclose(vol.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(vol.array[0], values)
    # the same file as a one-file series folder
    folder_vol = load_volume(tmp_path)
    np.testing.assert_array_equal(folder_vol.array, vol.array)
    assert folder_vol.meta["source"] == str(tmp_path)


def test_enhanced_multiframe_with_shared_fractional_rescale(tmp_path: Path) -> None:
    values = np.random.default_rng(5).integers(0, 1000, size=(3, 4, 3)) * 2.5
    affine = make_affine(np.eye(3), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    path = tmp_path / "e.dcm"
    write_multiframe(path, values, affine, frame_order=[2, 1, 0], slopes=[2.5, 2.5, 2.5])
    vol = read_dicom_file(path)
    assert vol.array.dtype == np.float32 and vol.meta["rescale_slope"] == 2.5
    np.testing.assert_allclose(vol.affine, affine, atol=1e-6)
    np.testing.assert_allclose(vol.array[0], values)


def test_multiframe_without_frame_positions_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cine.dcm"
    write_multiframe(path, np.zeros((3, 3, 2)), np.eye(4), frame_order=[0, 1], slopes=[1.0, 1.0])
    ds = pydicom.dcmread(path)
    for item in ds.PerFrameFunctionalGroupsSequence:
        del item.PlanePositionSequence
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.save_as(path)
    with pytest.raises(DataError, match="2 frames but no per-frame PlanePositionSequence"):
        read_dicom_file(path)


def test_missing_pixel_spacing_warns_and_assumes_1mm(tmp_path: Path) -> None:
    for path in write_series(tmp_path, hu_values((3, 3, 2)), np.diag([-0.5, -0.5, 2.0, 1.0])):
        ds = pydicom.dcmread(path)
        del ds.PixelSpacing
        ds.save_as(path)
    with pytest.warns(UserWarning, match="no PixelSpacing"):
        vol = read_dicom_series(tmp_path)
    assert vol.spacing_mm == pytest.approx((1.0, 1.0, 2.0))


# --------------------------------------------------------------------------------------------------
# several series, bad stacks


def test_two_series_in_one_folder(tmp_path: Path) -> None:
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    ct = hu_values((3, 3, 3), seed=6)
    mr = hu_values((3, 3, 2), seed=7) + 1024
    write_series(tmp_path, ct, affine, series_uid="1.2.3.4", description="CT abdomen")
    for p in write_series(
        tmp_path / "tmp", mr, affine, modality="MR", intercept=0.0, series_uid="1.2.3.5", description="T2 ax"
    ):
        p.rename(tmp_path / f"MR_{p.name}")
    series = list_dicom_series(tmp_path)
    assert [(s.uid, s.modality, s.description, s.n_files) for s in series] == [
        ("1.2.3.4", "CT", "CT abdomen", 3),
        ("1.2.3.5", "MR", "T2 ax", 2),
    ]
    assert isinstance(series[0], DicomSeries)
    assert [p.name for p in series[0].files] == ["IM0003", "IM0002", "IM0001"]  # sorted by position
    with pytest.raises(DataError) as err:
        read_dicom_series(tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "2 DICOM series" in msg and "--series-uid" in msg
    assert '1.2.3.4  CT  "CT abdomen"  3 file(s)' in msg and '1.2.3.5  MR  "T2 ax"  2 file(s)' in msg
    np.testing.assert_array_equal(read_dicom_series(tmp_path, series_uid="1.2.3.4").array[0], ct)
    vol = load_volume(tmp_path, series_uid="1.2.3.5")
    np.testing.assert_array_equal(vol.array[0], mr)
    assert vol.meta["series_uid"] == "1.2.3.5"
    with pytest.raises(
        DataError, match=r"(?s)no series with SeriesInstanceUID '9\.9'.*1\.2\.3\.4.*1\.2\.3\.5"
    ):
        read_dicom_series(tmp_path, series_uid="9.9")


def test_empty_series_uid_is_a_series(tmp_path: Path) -> None:
    write_series(tmp_path, hu_values((3, 3, 2)), np.diag([-1.0, -1.0, 2.0, 1.0]), series_uid="")
    (series,) = list_dicom_series(tmp_path)
    assert series.uid == "" and series.n_files == 2
    assert read_dicom_series(tmp_path, series_uid="").meta["series_uid"] == ""


def test_missing_slice_is_refused(tmp_path: Path) -> None:
    paths = write_series(tmp_path, hu_values((3, 3, 6)), np.diag([-1.0, -1.0, 2.5, 1.0]))
    paths[3].unlink()
    with pytest.raises(DataError) as err:
        read_dicom_series(tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "not uniform" in msg and "2.5 mm" in msg
    assert "gap 5 mm between slices at 5.0000 and 10.0000 mm (~1 missing slice(s))" in msg


def _shift_slice(path: Path, dz: float) -> None:
    ds = pydicom.dcmread(path)
    pos = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [pos[0], pos[1], pos[2] + dz]
    ds.save_as(path)


def test_uneven_spacing_is_refused_but_jitter_is_tolerated(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "uneven", hu_values((3, 3, 5)), np.diag([-1.0, -1.0, 2.0, 1.0]))
    _shift_slice(paths[2], 0.5)
    with pytest.raises(DataError, match=r"expected every gap .* to be 2 mm .* found gap 2\.5 mm"):
        read_dicom_series(tmp_path / "uneven")
    paths = write_series(tmp_path / "jitter", hu_values((3, 3, 5)), np.diag([-1.0, -1.0, 2.0, 1.0]))
    _shift_slice(paths[2], 0.004)  # 0.2 % of the spacing
    vol = read_dicom_series(tmp_path / "jitter")
    assert vol.spacing_mm[2] == pytest.approx(2.0)


def test_gantry_tilt_is_refused_with_the_angle(tmp_path: Path) -> None:
    # image planes tilted 10 degrees about the x axis, slices stacked straight along z (table motion)
    tilt = np.radians(10.0)
    affine = np.eye(4)
    affine[:3, 0] = [-0.5, 0, 0]
    affine[:3, 1] = [0, -0.5 * np.cos(tilt), 0.5 * np.sin(tilt)]
    affine[:3, 2] = [0, 0, 3.0]
    write_series(tmp_path, hu_values((4, 4, 4)), affine)
    with pytest.raises(DataError, match=r"gantry tilt of 10\.00 degrees") as err:
        read_dicom_series(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_two_volumes_in_one_series_are_refused(tmp_path: Path) -> None:
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    write_series(tmp_path, hu_values((3, 3, 3)), affine, series_uid="1.2.3")
    for p in write_series(tmp_path / "echo2", hu_values((3, 3, 3)), affine, series_uid="1.2.3"):
        p.rename(tmp_path / f"E2_{p.name}")
    with pytest.raises(DataError, match="(?s)share a position.*6 frames at 3 distinct positions"):
        read_dicom_series(tmp_path)


def test_mixed_orientations_are_refused(tmp_path: Path) -> None:
    write_series(tmp_path, hu_values((3, 3, 2)), np.diag([-1.0, -1.0, 2.0, 1.0]), series_uid="1.2.3")
    sag = make_affine(np.array([[0.0, 0, -1], [1, 0, 0], [0, -1, 0]]), (1, 1, 2), (0, 0, 0))
    for p in write_series(tmp_path / "loc", hu_values((3, 3, 2)), sag, series_uid="1.2.3"):
        p.rename(tmp_path / f"L_{p.name}")
    with pytest.raises(DataError, match="different orientations"):
        read_dicom_series(tmp_path)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such folder"):
        read_dicom_series(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("not dicom")
    with pytest.raises(DataError, match="no DICOM image files directly in this folder"):
        read_dicom_series(tmp_path)
    write_series(tmp_path / "SE0001", hu_values((3, 3, 2)), np.diag([1.0, 1, 1, 1]))
    with pytest.raises(DataError, match="sub-folders SE0001/"):
        read_dicom_series(tmp_path)
    assert list_dicom_series(tmp_path) == []


def test_undecodable_pixels_raise_data_error(tmp_path: Path) -> None:
    (path,) = write_series(tmp_path, hu_values((8, 8, 1)), np.diag([1.0, 1, 1, 1]))
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:10]  # truncated
    ds.save_as(path)
    with pytest.raises(DataError, match=r"pixel data is truncated \(10 bytes, expected 128"):
        read_dicom_series(tmp_path)
    # a file cut short in the middle of its pixel data
    (cut,) = write_series(tmp_path / "cut", hu_values((32, 32, 1)), np.diag([1.0, 1, 1, 1]))
    cut.write_bytes(cut.read_bytes()[:-1000])
    with pytest.raises(DataError, match=str(cut)):
        read_dicom_file(cut)


def test_non_image_dicom_file(tmp_path: Path) -> None:
    ds = _base("SR", "1.2.840.10008.5.1.4.1.1.88.11", 1, 1)
    del ds.Rows, ds.Columns
    ds.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    with pytest.raises(DataError, match="without an image"):
        read_dicom_file(tmp_path / "report.dcm")
    (tmp_path / "x.dcm").write_bytes(b"hello")
    with pytest.raises(DataError, match="not a DICOM file"):
        read_dicom_file(tmp_path / "x.dcm")


# --------------------------------------------------------------------------------------------------
# single files


def test_radiograph_is_2d_in_pixel_frame(tmp_path: Path) -> None:
    stored = np.arange(12).reshape(3, 4) * 100  # 3 rows, 4 columns
    write_radiograph(tmp_path / "dx.dcm", stored, ImagerPixelSpacing=[0.2, 0.1])
    vol = read_dicom_file(tmp_path / "dx.dcm")
    assert vol.spatial_dims == 2 and vol.array.shape == (1, 4, 3)
    np.testing.assert_array_equal(vol.affine, np.diag([0.1, 0.2, 1.0, 1.0]))
    np.testing.assert_array_equal(vol.array[0], stored.T)  # x along columns, y along rows
    assert vol.meta["spacing_source"] == "ImagerPixelSpacing" and vol.meta["modality"] == "DX"
    assert "monochrome1_inverted" not in vol.meta
    # PixelSpacing (calibrated at the patient) wins over ImagerPixelSpacing
    write_radiograph(tmp_path / "dx2.dcm", stored, ImagerPixelSpacing=[0.2, 0.1], PixelSpacing=[0.15, 0.05])
    assert read_dicom_file(tmp_path / "dx2.dcm").spacing_mm == pytest.approx((0.05, 0.15))
    write_radiograph(tmp_path / "dx3.dcm", stored)
    vol3 = read_dicom_file(tmp_path / "dx3.dcm")
    assert vol3.spacing_mm == (1.0, 1.0) and vol3.meta["spacing_source"] == "default"


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    stored = np.array([[0, 1000, 4095], [10, 20, 30]])
    write_radiograph(tmp_path / "cr.dcm", stored, photometric="MONOCHROME1", Modality="CR")
    vol = read_dicom_file(tmp_path / "cr.dcm")
    assert vol.meta["monochrome1_inverted"] is True
    # ITK maps MONOCHROME1 to MONOCHROME2 against the BitsStored (12-bit) range: bright stays bright
    np.testing.assert_array_equal(vol.array[0], (4095 - stored).T)


def test_image_without_position_is_2d(tmp_path: Path) -> None:
    # a secondary-capture-like CT image with no patient geometry
    ds = _base("OT", "1.2.840.10008.5.1.4.1.1.7", 2, 3, PixelSpacing=[0.5, 0.25])
    ds.PixelData = _pixels(np.arange(6).reshape(3, 2), ds)
    ds.save_as(tmp_path / "sc.dcm", enforce_file_format=True)
    vol = read_dicom_file(tmp_path / "sc.dcm")
    assert vol.array.shape == (1, 3, 2) and vol.spacing_mm == pytest.approx((0.25, 0.5))


def test_single_ct_slice_file_is_3d(tmp_path: Path) -> None:
    values = hu_values((4, 3, 2))
    affine = make_affine(np.diag([-1.0, -1.0, 1.0]), (0.5, 0.6, 3.0), (1.0, 2.0, 3.0))
    paths = write_series(tmp_path, values, affine)
    vol = read_dicom_file(paths[1])
    assert vol.spatial_shape == (4, 3, 1) and vol.meta["file"] == str(paths[1])
    np.testing.assert_allclose(vol.affine[:3, 3], affine[:3, 3] + affine[:3, 2])
    np.testing.assert_array_equal(vol.array[0, :, :, 0], values[:, :, 1])


def test_pydicom_test_files(tmp_path: Path) -> None:
    root = Path(pydicom.data.__file__).parent / "test_files"
    ct_small, j2k = root / "CT_small.dcm", root / "JPEG2000.dcm"
    if not ct_small.exists() or not j2k.exists():
        pytest.skip("pydicom test files not installed")
    ds = pydicom.dcmread(ct_small)
    vol = read_dicom_file(ct_small)
    assert vol.spatial_shape == (ds.Columns, ds.Rows, 1) and vol.meta["modality"] == "CT"
    expected = ds.pixel_array.T * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(vol.array[0, :, :, 0], expected)
    # NM image without ImagePositionPatient, JPEG 2000 compressed: 2D in the pixel frame
    nm = read_dicom_file(j2k)
    assert (
        nm.spatial_dims == 2
        and nm.array.shape == (1, 256, 1024)
        and nm.spacing_mm == pytest.approx((2.26, 2.26))
    )


def test_load_volume_dispatches(tmp_path: Path) -> None:
    values = hu_values((3, 3, 3))
    paths = write_series(tmp_path / "series", values, np.diag([-1.0, -1.0, 2.0, 1.0]))
    vol = load_volume(tmp_path / "series")  # folder -> read_dicom_series
    assert vol.spatial_shape == (3, 3, 3) and vol.meta["format"] == "dicom"
    one = load_volume(paths[0])  # file without suffix, DICM preamble -> read_dicom_file
    assert one.spatial_shape == (3, 3, 1)
    write_radiograph(tmp_path / "dx.dcm", np.zeros((2, 2)), ImagerPixelSpacing=[0.1, 0.1])
    assert load_volume(tmp_path / "dx.dcm").spatial_dims == 2


# --------------------------------------------------------------------------------------------------
# streamed reading (DicomSlabs)


@pytest.mark.parametrize(
    ("name", "direction", "slope", "intercept"),
    [
        ("axial-ct", np.diag([-1.0, -1.0, 1.0]), 1.0, -1024.0),
        ("sagittal", np.array([[0.0, 0, -1], [1, 0, 0], [0, -1, 0]]), 1.0, 0.0),
        ("per-slice-rescale", np.diag([1.0, 1.0, 1.0]), [1.0, 2.0, 3.0, 1.0, 2.0], 0.0),
        ("fractional", np.diag([1.0, 1.0, 1.0]), 0.25, -100.5),
    ],
)
def test_streamed_series_equals_the_loaded_series(tmp_path: Path, name, direction, slope, intercept) -> None:
    """DicomSlabs gives read_dicom_series' affine, meta and values, for any block, and removes its
    temporary file."""
    from medseg.io.dicom import DicomSlabs

    if name == "fractional":
        values = np.random.default_rng(2).integers(0, 3000, size=(6, 4, 5)) * 0.25 - 100.5
    else:
        values = np.random.default_rng(3).integers(0, 500, size=(6, 4, 5)) * 6
    affine = make_affine(direction, (0.9, 1.1, 3.0), (10.0, -20.0, 30.0))
    write_series(tmp_path / name, values, affine, slope=slope, intercept=intercept)
    want = read_dicom_series(tmp_path / name)
    with DicomSlabs(tmp_path / name) as src:
        assert src.spatial_shape == want.spatial_shape and src.meta == want.meta
        np.testing.assert_array_equal(src.affine, want.affine)
        assert src.spacing_mm == pytest.approx(want.spacing_mm)
        np.testing.assert_array_equal(src.load().array, want.array)
        box = (slice(1, 5), slice(2, 4), slice(1, 4))
        np.testing.assert_array_equal(src.read_block(box)[0], want.array[0][box])
        assert src.read_block(box).dtype == (np.float32 if name == "fractional" else np.int16)
        tmp = src._tmp
        assert tmp.exists()
    assert not tmp.exists()


def test_series_that_are_not_streamed_say_so(tmp_path: Path) -> None:
    from medseg.io._slabs import NotStreamable
    from medseg.io.dicom import DicomSlabs

    write_series(tmp_path / "one", hu_values((4, 3, 1)), np.eye(4))
    with pytest.raises(NotStreamable, match="one file"):
        DicomSlabs(tmp_path / "one")
    paths = write_series(tmp_path / "gap", hu_values((4, 3, 6)), np.eye(4))
    paths[3].unlink()
    with pytest.raises(DataError, match="missing") as err:  # the loaded reader's checks, not a fallback
        DicomSlabs(tmp_path / "gap")
    assert not isinstance(err.value, NotStreamable)


def test_streamed_series_widens_its_type_when_a_later_slice_needs_it(tmp_path: Path, monkeypatch) -> None:
    import tempfile

    from medseg.io.dicom import DicomSlabs

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))

    values = np.random.default_rng(4).integers(-1000, 1000, size=(5, 4, 6))
    values[:, :, 3] += 39000  # beyond int16 from the fourth slice on (stored values still fit)
    write_series(tmp_path / "wide", values, np.eye(4), intercept=10000.0)
    with DicomSlabs(tmp_path / "wide") as src:
        assert src.dtype == np.int32
        np.testing.assert_array_equal(src.load().array[0], values)
        np.testing.assert_array_equal(src.load().array, read_dicom_series(tmp_path / "wide").array)
        tmp = src._tmp
        assert list((tmp_path / "tmp").iterdir()) == [tmp], "the narrower first file is removed"
    assert not tmp.exists()


@pytest.mark.parametrize("which", ["end", "middle"])
def test_a_damaged_slice_of_a_series_is_named_not_dropped(tmp_path: Path, which: str) -> None:
    """A truncated file that says it is DICOM is refused with its name: skipping it would silently drop a
    slice (the end one without any other sign)."""
    vol = Volume(np.arange(8 * 6 * 5, dtype=np.int16).reshape(1, 8, 6, 5), np.diag([0.8, 0.8, 2.5, 1.0]))
    folder = write_dicom_series(vol, tmp_path / "series")
    files = sorted(folder.iterdir())
    damaged = files[-1] if which == "end" else files[len(files) // 2]
    damaged.write_bytes(damaged.read_bytes()[:400])
    with pytest.raises(
        DataError,
        match=rf"{damaged.name}: a DICOM (image )?file of this folder (cannot be read|is cut short)",
    ):
        read_dicom_series(folder)
