"""DICOM SEG writing and reading: synthetic series in several orientations, refusals, and real data.

Round trips compare voxel for voxel on the grid ``load_volume(series_dir)`` returns. Real-data tests
(marked ``realdata``) read ``$MEDSEG_TEST_DATA`` and are skipped when it is unset.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from medseg.errors import DataError
from medseg.io import load_volume, save_label_map
from medseg.io.dicom_seg import read_dicom_seg, write_dicom_seg
from medseg.io.dicom_write import write_dicom_series
from medseg.types import Volume, same_physical_grid

SPACING = (0.8, 0.7, 2.5)  # distinct, so a swapped axis or PixelSpacing shows
ORIGIN = (10.5, -20.25, -300.0)
SHAPE = (9, 7, 5)
NAMES = ["liver", "spleen", "left_kidney", "aorta"]
VALUES = [1, 2, 3, 5]


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


def _series(folder: Path, code: str = "LPS", shape: tuple[int, int, int] = SHAPE) -> Volume:
    """Write a small random CT series in orientation ``code``; return what load_volume reads back."""
    rng = np.random.default_rng(1)
    img = rng.integers(-1000, 1000, size=(1, *shape)).astype(np.int16)
    write_dicom_series(Volume(img, _affine(code)), folder, study_date="20240101")
    return load_volume(folder)


def _label_map(shape: tuple[int, ...]) -> np.ndarray:
    """(1, X, Y, Z) uint8: blocks of labels 1, 2 and 5 (label 3 absent), asymmetric in every axis."""
    lab = np.zeros((1, *shape), dtype=np.uint8)
    lab[0, 1:4, 1:3, 0:2] = 1
    lab[0, 5:8, 2:6, 1:4] = 2
    lab[0, 0, 6, 4] = 5
    lab[0, 8, 0, 2] = 5
    return lab


def _to_label_map(masks: np.ndarray, values: list[int]) -> np.ndarray:
    out = np.zeros(masks.shape[1:], dtype=np.uint8)
    for channel, value in enumerate(values):
        out[masks[channel] > 0] = value
    return out


def _onto_grid(vol: Volume, ref: Volume) -> Volume:
    """``vol`` reordered (axis flips/permutations only) onto ``ref``'s voxel order; the grids must
    hold the same voxel centres."""
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(vol.affine), nib.orientations.io_orientation(ref.affine)
    )
    arr = np.stack([nib.orientations.apply_orientation(a, transform) for a in vol.array])
    aff = vol.affine @ nib.orientations.inv_ornt_aff(transform, vol.array.shape[1:])
    assert np.allclose(aff, ref.affine, atol=1e-4), (aff, ref.affine)
    return Volume(arr, ref.affine.copy(), dict(vol.meta))


def _write_quiet(*args: object, **kwargs: object) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return write_dicom_seg(*args, **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# synthetic round trips


@pytest.mark.parametrize("code", ["LPS", "RAS", "LAS", "PSR", "oblique"])
def test_label_map_round_trip_voxel_for_voxel(tmp_path: Path, code: str) -> None:
    ref = _series(tmp_path / "ct", code)
    lab = _label_map(ref.spatial_shape)
    out = tmp_path / "pred" / "seg.dcm"
    with pytest.warns(UserWarning, match=r"absent from the prediction get no segment: \['left_kidney'\]"):
        write_dicom_seg(Volume(lab, ref.affine), tmp_path / "ct", out, names=NAMES, values=VALUES)
    masks, names = read_dicom_seg(out, reference=ref)
    assert names == ["liver", "spleen", "aorta"]
    assert masks.array.shape == (3, *ref.spatial_shape) and masks.array.dtype == np.uint8
    assert np.array_equal(masks.affine, ref.affine)
    assert np.array_equal(_to_label_map(masks.array, [1, 2, 5]), lab[0])
    # and equal to the NIfTI of the same prediction, reloaded
    nifti = load_volume(save_label_map(Volume(lab, ref.affine), tmp_path / "pred.nii.gz"))
    assert same_physical_grid(nifti.spatial_shape, nifti.affine, masks.spatial_shape, masks.affine)
    assert np.array_equal(_to_label_map(masks.array, [1, 2, 5]), nifti.array[0])


def test_synthetic_phantom_reference_labels_round_trip(tmp_path: Path) -> None:
    from medseg.data.synthetic import synth_ct

    root = synth_ct(tmp_path / "phantom", cases=1, seed=3)
    labels = json.loads((root / "dataset.json").read_text())["labels"]
    names = [n for n in labels if n != "background"]
    values = [labels[n] for n in names]
    (case,) = sorted((root / "dicomTs").iterdir())
    ref = load_volume(case)
    truth = _onto_grid(load_volume(root / "labelsTs" / f"{case.name}.nii.gz"), ref)
    assert len(np.unique(truth.array)) == 7  # all six organs present
    out = write_dicom_seg(truth, case, tmp_path / "pred" / f"{case.name}.dcm", names=names, values=values)
    masks, got = read_dicom_seg(out, reference=ref)
    assert got == names == ["liver", "spleen", "left_kidney", "right_kidney", "aorta", "spine"]
    assert np.array_equal(_to_label_map(masks.array, values), truth.array[0])


def test_read_without_reference_gives_the_same_voxels_in_world_space(tmp_path: Path) -> None:
    ref = _series(tmp_path / "ct", "LPS")
    lab = np.zeros((1, *ref.spatial_shape), dtype=np.uint8)
    lab[0, 2:5, 1:4, 1:4] = 1  # slices 1..3 hold frames: the SEG's own grid covers only those
    lab[0, 6, 5, 2] = 2
    out = write_dicom_seg(
        Volume(lab, ref.affine), tmp_path / "ct", tmp_path / "s.dcm", names=["a", "b"], values=[1, 2]
    )
    masks, names = read_dicom_seg(out)
    assert names == ["a", "b"] and masks.array.shape[0] == 2
    # every foreground voxel of the own-grid read maps to a foreground voxel with the same label
    inv = np.linalg.inv(ref.affine)
    for channel, value in enumerate([1, 2]):
        ijk = np.argwhere(masks.array[channel] > 0)
        world = masks.voxel_to_world(ijk)
        idx = np.rint(world @ inv[:3, :3].T + inv[:3, 3]).astype(int)
        assert len(idx) == int((lab[0] == value).sum())
        assert np.all(lab[0][tuple(idx.T)] == value)


def test_labels_in_flipped_and_permuted_voxel_order_map_by_world_position(tmp_path: Path) -> None:
    ref = _series(tmp_path / "ct", "LPS")
    lab = _label_map(ref.spatial_shape)
    # the same voxels stored with the first axis reversed and the first two axes swapped
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = ref.spatial_shape[0] - 1
    swap = np.eye(4)[[1, 0, 2, 3]]
    moved = Volume(np.transpose(lab[:, ::-1], (0, 2, 1, 3)).copy(), ref.affine @ flip @ swap)
    assert same_physical_grid(moved.spatial_shape, moved.affine, ref.spatial_shape, ref.affine)
    out = _write_quiet(moved, tmp_path / "ct", tmp_path / "seg.dcm", names=NAMES, values=VALUES)
    masks, _ = read_dicom_seg(out, reference=ref)
    assert np.array_equal(_to_label_map(masks.array, [1, 2, 5]), lab[0])
    masks_moved, _ = read_dicom_seg(out, reference=moved)  # onto the moved grid too
    assert np.array_equal(_to_label_map(masks_moved.array, [1, 2, 5]), moved.array[0])


def test_frames_reference_the_source_instance_at_their_position(tmp_path: Path) -> None:
    ref = _series(tmp_path / "ct", "LAS")  # left-handed: file order is reversed relative to the array
    # rename the files so that name order no longer follows position
    files = sorted((tmp_path / "ct").iterdir())
    for path, new in zip(files, reversed(files), strict=True):
        path.rename(path.with_name("x" + new.name))
    lab = np.zeros((1, *ref.spatial_shape), dtype=np.uint8)
    lab[0, 2, 3, :] = 1  # every source instance gets a frame ...
    for k in range(ref.spatial_shape[2]):
        lab[0, k + 3, 5, k] = 1  # ... and a voxel that moves with the slice index
    out = write_dicom_seg(
        Volume(lab, ref.affine), tmp_path / "ct", tmp_path / "seg.dcm", names=["x"], values=[1]
    )
    by_uid = {
        str(ds.SOPInstanceUID): ds
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in (tmp_path / "ct").iterdir())
    }
    seg = pydicom.dcmread(out)
    assert int(seg.NumberOfFrames) == ref.spatial_shape[2]
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    found = []
    for item, frame in zip(seg.PerFrameFunctionalGroupsSequence, pixels, strict=True):
        src = by_uid[str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)]
        frame_pos = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(frame_pos, [float(v) for v in src.ImagePositionPatient], atol=1e-4)
        # the frame's pixels, placed with the *source file's* geometry (independent of medseg's reader)
        ipp = np.array([float(v) for v in src.ImagePositionPatient])
        iop = np.array([float(v) for v in src.ImageOrientationPatient])
        row_mm, col_mm = (float(v) for v in src.PixelSpacing)
        for r, c in np.argwhere(frame > 0):
            found.append(ipp + c * col_mm * iop[:3] + r * row_mm * iop[3:])
    expected = ref.voxel_to_world(np.argwhere(lab[0] > 0)) * [-1.0, -1.0, 1.0]  # RAS -> LPS
    found_arr = np.array(found)
    assert len(found_arr) == len(expected) == 2 * ref.spatial_shape[2]
    dist = np.linalg.norm(found_arr[:, None] - expected[None], axis=-1)
    assert dist.min(axis=0).max() < 1e-3 and dist.min(axis=1).max() < 1e-3


def test_overlapping_masks_round_trip(tmp_path: Path) -> None:
    ref = _series(tmp_path / "ct", "RAS")
    masks = np.zeros((3, *ref.spatial_shape), dtype=bool)
    masks[0, 1:6, 1:5, 0:3] = True
    masks[1, 4:8, 3:7, 2:5] = True  # overlaps channel 0
    masks[2, 1:6, 1:5, 0:3] = True  # identical to channel 0
    names = ["tumor", "liver", "kidney_right"]
    out = write_dicom_seg(
        Volume(masks, ref.affine), tmp_path / "ct", tmp_path / "seg.dcm", names=names, values=None
    )
    back, got_names = read_dicom_seg(out, reference=ref)
    assert got_names == names
    assert back.array.dtype == np.uint8 and np.array_equal(back.array, masks.astype(np.uint8))
    assert (back.array.sum(axis=0) > 1).any()  # the overlap survived


def test_segment_descriptions_codes_colours_and_algorithm(tmp_path: Path) -> None:
    ref = _series(tmp_path / "ct", "LPS")
    masks = np.zeros((4, *ref.spatial_shape), dtype=np.uint8)
    for c in range(4):
        masks[c, c, c, c] = 1
    names = ["liver", "kidney_left", "adrenal_gland_right", "my structure"]
    out = write_dicom_seg(
        Volume(masks, ref.affine),
        tmp_path / "ct",
        tmp_path / "seg.dcm",
        names=names,
        values=None,
        algorithm="net",
        algorithm_version="1.2",
    )
    seg = hd.seg.segread(out)
    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
    items = list(seg.SegmentSequence)
    assert [int(i.SegmentNumber) for i in items] == [1, 2, 3, 4]
    assert [i.SegmentLabel for i in items] == names
    types = [
        (i.SegmentedPropertyTypeCodeSequence[0].CodeValue, i.SegmentedPropertyTypeCodeSequence[0].CodeMeaning)
        for i in items
    ]
    assert types == [
        ("10200004", "Liver"),
        ("18639004", "Left kidney"),
        ("23451007", "Adrenal gland"),
        ("85756007", "Tissue"),
    ]
    modifier = items[2].SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
    assert (modifier.CodeValue, modifier.CodeMeaning) == ("24028007", "Right")
    assert items[0].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    assert items[3].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "85756007"
    colours = {tuple(i.RecommendedDisplayCIELabValue) for i in items}
    assert len(colours) == 4
    assert all(i.SegmentAlgorithmType == "AUTOMATIC" for i in items)
    algo = items[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("net", "1.2")
    assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
    src = pydicom.dcmread(next((tmp_path / "ct").iterdir()), stop_before_pixels=True)
    assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID


def test_uids_are_deterministic_and_depend_on_the_content(tmp_path: Path) -> None:
    ref = _series(tmp_path / "ct", "LPS")
    lab = _label_map(ref.spatial_shape)
    a = _write_quiet(Volume(lab, ref.affine), tmp_path / "ct", tmp_path / "a.dcm", names=NAMES, values=VALUES)
    b = _write_quiet(Volume(lab, ref.affine), tmp_path / "ct", tmp_path / "b.dcm", names=NAMES, values=VALUES)
    lab2 = lab.copy()
    lab2[0, 0, 0, 0] = 1
    c = _write_quiet(
        Volume(lab2, ref.affine), tmp_path / "ct", tmp_path / "c.dcm", names=NAMES, values=VALUES
    )
    uid = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in (a, b, c)]
    assert uid[0] == uid[1] != uid[2]
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left no temporary file


def test_source_series_without_uids_gets_generated_ones(tmp_path: Path) -> None:
    ref = _series(tmp_path / "ct", "LPS")
    for path in (tmp_path / "ct").iterdir():  # an anonymised export, as TotalSegmentator's example
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = ds.SeriesInstanceUID = ds.SOPInstanceUID = ds.SOPClassUID = ""
        del ds.PatientID, ds.StudyID
        ds.save_as(path)
    lab = _label_map(ref.spatial_shape)
    with pytest.warns(UserWarning, match="no SeriesInstanceUID, StudyInstanceUID; generated them"):
        out = write_dicom_seg(
            Volume(lab, ref.affine),
            tmp_path / "ct",
            tmp_path / "s.dcm",
            names=["a", "b", "c"],
            values=[1, 2, 5],
        )
    seg = pydicom.dcmread(out, stop_before_pixels=True)
    assert seg.StudyInstanceUID and seg.SeriesInstanceUID
    meta_uids = {pydicom.dcmread(p).file_meta.MediaStorageSOPInstanceUID for p in (tmp_path / "ct").iterdir()}
    refd = {
        str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert refd == meta_uids
    masks, _ = read_dicom_seg(out, reference=load_volume(tmp_path / "ct"))
    assert np.array_equal(_to_label_map(masks.array, [1, 2, 5]), lab[0])


# ---------------------------------------------------------------------------------------------------
# refusals


def test_refuses_to_write_into_the_series_folder(tmp_path: Path) -> None:
    ref = _series(tmp_path / "ct")
    lab = Volume(_label_map(ref.spatial_shape), ref.affine)
    for target in (tmp_path / "ct" / "seg.dcm", tmp_path / "ct" / "sub" / "seg.dcm"):
        with pytest.raises(DataError, match="refusing to write the SEG into the source series folder"):
            write_dicom_seg(lab, tmp_path / "ct", target, names=NAMES, values=VALUES)
    assert sorted(p.name for p in (tmp_path / "ct").iterdir()) == [f"IM{k:04d}.dcm" for k in range(1, 6)]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("shift_half", "does not lie on the voxel grid"),
        ("shift_one", "outside the voxel grid"),
        ("spacing", "does not lie on the voxel grid"),
        ("shape", r"spatial shape \(9, 7, 4\)\) are not on the grid of the DICOM series"),
    ],
)
def test_refuses_labels_on_another_grid(tmp_path: Path, change: str, match: str) -> None:
    ref = _series(tmp_path / "ct")
    lab, aff = _label_map(ref.spatial_shape), ref.affine.copy()
    if change == "shift_half":
        aff[:3, 3] += 0.5 * aff[:3, 0]
    elif change == "shift_one":
        aff[:3, 3] += aff[:3, 2]
    elif change == "spacing":
        aff[:3, 1] *= 1.05
    else:
        lab = lab[..., :4]
    with pytest.raises(DataError, match=match):
        write_dicom_seg(Volume(lab, aff), tmp_path / "ct", tmp_path / "seg.dcm", names=NAMES, values=VALUES)
    assert not (tmp_path / "seg.dcm").exists()


def test_refuses_bad_names_values_and_masks(tmp_path: Path) -> None:
    ref = _series(tmp_path / "ct")
    lab = Volume(_label_map(ref.spatial_shape), ref.affine)
    with pytest.raises(DataError, match=r"label values \[5\] occur in the label map but have no name"):
        write_dicom_seg(lab, tmp_path / "ct", tmp_path / "s.dcm", names=["liver", "spleen"], values=[1, 2])
    with pytest.raises(DataError, match="one distinct positive label value per name"):
        write_dicom_seg(lab, tmp_path / "ct", tmp_path / "s.dcm", names=["a", "b"], values=[1, 1])
    with pytest.raises(DataError, match="per-structure masks must be binary"):
        write_dicom_seg(lab, tmp_path / "ct", tmp_path / "s.dcm", names=["a"], values=None)
    with pytest.raises(DataError, match="needs a 3D prediction"):
        write_dicom_seg(
            Volume(lab.array[..., 0], np.eye(4)), tmp_path / "ct", tmp_path / "s.dcm", names=["a"], values=[1]
        )
    empty = lab.with_array(np.zeros_like(lab.array))
    with pytest.raises(DataError, match="the prediction is empty"):
        write_dicom_seg(empty, tmp_path / "ct", tmp_path / "s.dcm", names=NAMES, values=VALUES)
    assert not (tmp_path / "s.dcm").exists()


def test_refuses_projection_and_multiframe_sources(tmp_path: Path) -> None:
    ref = _series(tmp_path / "ct")
    lab = Volume(_label_map(ref.spatial_shape), ref.affine)
    for path in (tmp_path / "ct").iterdir():
        ds = pydicom.dcmread(path)
        ds.Modality = "DX"
        ds.save_as(path)
    with pytest.raises(DataError, match="2D projection image .*write the 2D mask as PNG or NIfTI"):
        write_dicom_seg(lab, tmp_path / "ct", tmp_path / "s.dcm", names=NAMES, values=VALUES)
    for path in (tmp_path / "ct").iterdir():
        ds = pydicom.dcmread(path)
        ds.Modality, ds.NumberOfFrames = "CT", 2
        ds.save_as(path)
    with pytest.raises(DataError, match="multi-frame DICOM file .*not supported"):
        write_dicom_seg(lab, tmp_path / "ct", tmp_path / "s.dcm", names=NAMES, values=VALUES)


def test_read_refuses_non_seg_other_grid_and_other_frame_of_reference(tmp_path: Path) -> None:
    ref = _series(tmp_path / "ct")
    out = _write_quiet(
        Volume(_label_map(ref.spatial_shape), ref.affine),
        tmp_path / "ct",
        tmp_path / "s.dcm",
        names=NAMES,
        values=VALUES,
    )
    with pytest.raises(DataError, match="not a DICOM Segmentation"):
        read_dicom_seg(tmp_path / "ct" / "IM0001.dcm")
    with pytest.raises(DataError, match="no such file"):
        read_dicom_seg(tmp_path / "missing.dcm")
    shifted = ref.affine.copy()
    shifted[:3, 3] += 0.5 * shifted[:3, 1]
    with pytest.raises(DataError, match="does not lie on the voxel grid"):
        read_dicom_seg(out, reference=Volume(ref.array, shifted))
    other = Volume(ref.array, ref.affine, {**ref.meta, "frame_of_reference_uid": "1.2.3"})
    with pytest.raises(DataError, match="FrameOfReferenceUID .* differs from the reference's 1.2.3"):
        read_dicom_seg(out, reference=other)


# ---------------------------------------------------------------------------------------------------
# real data


@pytest.mark.realdata
def test_real_dcmqi_liver_seg_matches_the_nrrd(real_data: Path) -> None:
    root = real_data / "ct_dcmqi"
    ref = load_volume(root / "ct-3slice")
    nrrd = load_volume(root / "liver_seg.nrrd")
    assert np.allclose(nrrd.affine, ref.affine, atol=1e-5)  # origins differ by < 1e-6 mm
    masks, names = read_dicom_seg(root / "liver.dcm", reference=ref)
    assert names == ["Liver"] and masks.array.shape == (1, 512, 512, 3)
    assert int(masks.array.sum()) == int((nrrd.array > 0).sum()) > 100_000
    assert np.array_equal(masks.array[0], (nrrd.array[0] > 0).astype(np.uint8))


@pytest.mark.realdata
def test_real_dcmqi_write_liver_spine_and_read_back(real_data: Path, tmp_path: Path) -> None:
    root = real_data / "ct_dcmqi"
    ref = load_volume(root / "ct-3slice")
    nrrd = load_volume(root / "liver_spine_seg.nrrd")
    assert np.allclose(nrrd.affine, ref.affine, atol=1e-5)
    lab = Volume(nrrd.array.astype(np.uint8), ref.affine)
    out = write_dicom_seg(
        lab, root / "ct-3slice", tmp_path / "seg.dcm", names=["liver", "spine"], values=[1, 2]
    )
    masks, names = read_dicom_seg(out, reference=ref)
    assert names == ["liver", "spine"]
    assert np.array_equal(_to_label_map(masks.array, [1, 2]), lab.array[0])
    assert int(masks.array[1].sum()) == int((lab.array == 2).sum()) > 10_000


@pytest.mark.realdata
def test_real_totalsegmentator_dicom_series_round_trip(real_data: Path, tmp_path: Path) -> None:
    root = real_data / "ct_totalsegmentator"
    series = root / "example_ct_dicom"  # JPEG 2000, empty Study/Series/SOP instance UIDs
    ref = load_volume(series)
    seg_nii = _onto_grid(load_volume(root / "example_seg_dicom.nii.gz"), ref)  # stored rows reversed
    class_map = json.loads((root / "class_map_total.json").read_text())["total"]
    values = [1, 5, 7, 52, 86]  # spleen, liver, pancreas, aorta, autochthon_left
    names = [class_map[str(v)] for v in values]
    keep = np.where(np.isin(seg_nii.array, values), seg_nii.array, 0).astype(np.uint8)
    lab = Volume(keep, ref.affine)
    t0 = time.perf_counter()
    with pytest.warns(UserWarning, match="no SeriesInstanceUID, StudyInstanceUID; generated them"):
        out = write_dicom_seg(lab, series, tmp_path / "seg.dcm", names=names, values=values)
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    masks, got = read_dicom_seg(out, reference=ref)
    t_read = time.perf_counter() - t0
    print(f"SEG write {t_write:.2f} s, read {t_read:.2f} s (512x512x20, {len(values)} segments)")
    assert got == names
    assert np.array_equal(_to_label_map(masks.array, values), keep[0])
    assert [int(masks.array[c].sum()) for c in range(5)] == [int((keep == v).sum()) for v in values]
    seg = pydicom.dcmread(out, stop_before_pixels=True)
    file_uids = {
        pydicom.dcmread(p, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID
        for p in series.iterdir()
    }
    refd = {
        str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert refd == file_uids and len(refd) == 20


@pytest.mark.realdata
def test_real_dcmqi_overlapping_segments_match_the_nrrds(real_data: Path) -> None:
    root = real_data / "ct_dcmqi"
    ref = load_volume(root / "ct-3slice")
    masks, names = read_dicom_seg(root / "partial_overlaps.dcm", reference=ref)
    assert names == ["GREEN", "ORANGE", "PURPLE", "LIGHT_BLUE", "DARK_BLUE"]
    # segment s is label value s in one of the three label maps (1, 4, 5 / 2 / 3)
    maps = [load_volume(root / f"partial_overlaps-{i}.nrrd") for i in (1, 2, 3)]
    for channel, value in enumerate(range(1, 6)):
        (source,) = [m for m in maps if np.any(m.array == value)]
        assert np.allclose(source.affine, ref.affine, atol=1e-5)
        assert np.array_equal(masks.array[channel], (source.array[0] == value).astype(np.uint8))
    assert (masks.array.sum(axis=0) > 1).any()
