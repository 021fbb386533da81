"""DICOM reading on real scans from ``$MEDSEG_TEST_DATA`` (see its README.md); skipped when unset.

Geometry is compared as voxel-centre grids in world coordinates (several references store slices or
rows in the opposite order), and voxel values after reordering both arrays to the closest canonical
orientation, which maps the same world position to the same array index.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import DataError
from medseg.io import load_volume
from medseg.io.dicom import list_dicom_series, read_dicom_series
from medseg.types import Volume, same_physical_grid

pytestmark = pytest.mark.realdata

# Every series under dicom_vendor_series/ with a ``<name>_ground_truth.nii.gz`` next to it (checked
# against the data by ``test_vendor_list_is_complete``).
VENDOR_SERIES = [
    "failing/slicecount/001",
    "ge/anatomical/001",
    "ge/anatomical/001_implicit",
    "ge/anatomical/001_single_slice",
    "generic/anatomical/001",
    "generic/anatomical/001_implicit",
    "generic/compressed_j2k/001",
    "hitachi/anatomical/001",
    "hitachi/anatomical/001_implicit",
    "hyperfine/anatomical/001",
    "philips/anatomical/001",
    "philips/anatomical/001_implicit",
    "philips_enhanced/anatomical/001",
    "philips_enhanced/anatomical/001_implicit",
    "siemens/anatomical/001",
    "siemens/anatomical/001_implicit",
]


@pytest.fixture(scope="module")
def data(real_data: Path) -> Path:
    """The shared data root (skips every test of this module when MEDSEG_TEST_DATA is unset)."""
    return real_data


def canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder a 3D array (and its affine) to the closest canonical (RAS) orientation."""
    ornt = nib.orientations.io_orientation(affine)
    return nib.orientations.apply_orientation(array, ornt), affine @ nib.orientations.inv_ornt_aff(
        ornt, array.shape
    )


def assert_same_grid_and_values(
    vol: Volume, ref_array: np.ndarray, ref_affine: np.ndarray, *, exact: bool
) -> None:
    assert same_physical_grid(vol.spatial_shape, vol.affine, ref_array.shape, ref_affine, atol_mm=1e-3), (
        f"grids differ:\n{vol.spatial_shape}\n{vol.affine}\nvs\n{ref_array.shape}\n{ref_affine}"
    )
    ours, ours_aff = canonical(vol.array[0], vol.affine)
    theirs, theirs_aff = canonical(ref_array, ref_affine)
    np.testing.assert_allclose(ours_aff[:3, 3], theirs_aff[:3, 3], atol=1e-3)  # same voxel at index 0
    assert ours.shape == theirs.shape
    if exact:
        np.testing.assert_array_equal(ours, theirs)
    else:
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-3)


def test_vendor_list_is_complete(data: Path) -> None:
    root = data / "dicom_vendor_series"
    found = sorted(
        str(p.relative_to(root))[: -len("_ground_truth.nii.gz")] for p in root.rglob("*_ground_truth.nii.gz")
    )
    assert found == sorted(VENDOR_SERIES)


@pytest.mark.parametrize("series", VENDOR_SERIES)
def test_vendor_series_matches_ground_truth(data: Path, series: str) -> None:
    folder = data / "dicom_vendor_series" / series
    vol = read_dicom_series(folder)
    assert vol.meta["format"] == "dicom" and vol.meta["modality"] == "MR"
    assert vol.spatial_dims == 3 and vol.num_channels == 1
    ref = nib.load(str(folder) + "_ground_truth.nii.gz")
    ref_array = np.asanyarray(ref.dataobj)
    ref_array = ref_array.reshape(ref_array.shape[:3])  # the enhanced references are (X, Y, Z, 1)
    # The references are dicom2nifti conversions with RescaleSlope applied: the Philips enhanced ones
    # (slope 4.26 / 14.6 in PixelValueTransformationSequence) are float32, the others integers.
    exact = not np.issubdtype(ref_array.dtype, np.floating)
    assert np.issubdtype(vol.array.dtype, np.integer) == exact
    assert_same_grid_and_values(vol, ref_array, ref.affine, exact=exact)
    assert vol.meta["n_slices"] == ref_array.shape[2]


def test_enhanced_multiframe_uses_per_frame_geometry(data: Path) -> None:
    # oblique enhanced MR: the affine must come from the per-frame PlanePositionSequence, not from the
    # half-pixel-shifted ImagePositionPatient in Philips' private sequence
    folder = data / "dicom_vendor_series/philips_enhanced/anatomical/001_implicit"
    vol = read_dicom_series(folder)
    assert vol.spatial_shape == (256, 256, 8)
    np.testing.assert_allclose(vol.spacing_mm, (0.9375, 0.9375, 1.0), atol=1e-4)
    assert vol.meta["n_slices"] == 8 and vol.meta["rescale_slope"] == pytest.approx(14.5965811965811)


def test_slice_increment_is_refused(data: Path) -> None:
    folder = data / "dicom_vendor_series/failing/sliceincrement/001"
    with pytest.raises(DataError) as err:
        read_dicom_series(folder)
    msg = str(err.value)
    assert str(folder) in msg and "not uniform" in msg and "5 mm" in msg and "gap 10 mm" in msg
    assert "missing slice" in msg


def test_gantry_tilt_is_refused(data: Path) -> None:
    folder = data / "dicom_vendor_series/failing/gantrytilting/001"
    with pytest.raises(DataError, match=r"gantry tilt of 14\.00 degrees") as err:
        read_dicom_series(folder)
    assert str(folder) in str(err.value) and "dcm2niix" in str(err.value)


def test_totalsegmentator_dicom_matches_label_grid(data: Path) -> None:
    root = data / "ct_totalsegmentator"
    folder = root / "example_ct_dicom"
    (series,) = list_dicom_series(folder)
    assert series.uid == "" and series.n_files == 20 and series.modality == "CT"
    ct = load_volume(folder)
    assert ct.meta["series_uid"] == "" and ct.meta["n_slices"] == 20
    assert ct.array.dtype == np.int16 and ct.spatial_shape == (512, 512, 20)
    np.testing.assert_allclose(ct.spacing_mm, (0.9765625, 0.9765625, 2.0), atol=1e-6)
    seg = load_volume(root / "example_seg_dicom.nii.gz")
    assert ct.orientation == "LPS" and seg.orientation == "LAS"  # rows stored in opposite order
    assert same_physical_grid(ct.spatial_shape, ct.affine, seg.spatial_shape, seg.affine, atol_mm=1e-3)
    hu, hu_affine = canonical(ct.array[0], ct.affine)
    labels, labels_affine = canonical(seg.array[0], seg.affine)
    np.testing.assert_allclose(hu_affine, labels_affine, atol=1e-3)  # index-for-index the same grid
    # the labels sit on the body: liver (5) is soft tissue, the background is mostly air
    assert 30 < hu[labels == 5].mean() < 150
    assert hu[labels == 0].mean() < -500
    assert hu.min() == -1024


def test_dcmqi_ct_aligns_with_liver_segmentation(data: Path) -> None:
    root = data / "ct_dcmqi"
    ct = load_volume(root / "ct-3slice")
    assert ct.meta["modality"] == "CT" and ct.spatial_shape == (512, 512, 3)
    np.testing.assert_allclose(ct.spacing_mm, (0.810547, 0.810547, 1.0), atol=1e-6)
    liver = load_volume(root / "liver_seg.nrrd")
    assert same_physical_grid(ct.spatial_shape, ct.affine, liver.spatial_shape, liver.affine, atol_mm=1e-3)
    np.testing.assert_allclose(ct.affine, liver.affine, atol=1e-3)  # same storage order here
    hu = ct.array[0][liver.array[0] > 0]
    assert hu.size > 10_000
    assert 0 < hu.mean() < 100  # soft tissue (flipping rows or columns gives a negative mean)
    assert np.mean((hu > -100) & (hu < 200)) > 0.9
