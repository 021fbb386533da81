"""Shared by the DICOM SEG writer and reader: coded terms and colours, the mapping between DICOM planes and
medseg voxels, and the source series' headers."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from medseg.errors import DataError
from medseg.io.dicom._headers import (
    PROJECTION_MODALITIES,
    _n_frames,
    _Plane,
)
from medseg.io.dicom.series import list_dicom_series

logger = logging.getLogger(__name__)


#: Largest allowed distance (in voxels, per index) between a DICOM plane's pixel centres and the
#: medseg grid's voxel centres. Slice positions may deviate from a uniform stack by up to 1 % of the
#: gap (what :func:`~medseg.io.dicom.read_dicom_series` accepts); half a voxel would be ambiguous.
GRID_TOL_VOXELS = 0.1
#: Segmentation Storage and Label Map Segmentation Storage.
SEG_SOP_CLASS_UIDS = frozenset({"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"})
_LPS_TO_RAS3 = np.diag([-1.0, -1.0, 1.0])
_MAX_LABEL_CHARS = 64  # DICOM LO


# coded terms and colours

# (SNOMED CT code, meaning, category key, Slicer GenericAnatomyColors RGB); category keys below.
_TERMS: dict[str, tuple[str, str, str, tuple[int, int, int]]] = {
    "liver": ("10200004", "Liver", "anatomy", (221, 130, 101)),
    "spleen": ("78961009", "Spleen", "anatomy", (157, 108, 162)),
    "kidney": ("64033007", "Kidney", "anatomy", (185, 102, 83)),
    "left_kidney": ("18639004", "Left kidney", "anatomy", (185, 102, 83)),
    "right_kidney": ("9846003", "Right kidney", "anatomy", (185, 102, 83)),
    "aorta": ("15825003", "Aorta", "anatomy", (224, 97, 76)),
    "spine": ("421060004", "Spine", "anatomy", (241, 214, 145)),
    "vertebral_column": ("421060004", "Spine", "anatomy", (241, 214, 145)),
    "vertebra": ("51282000", "Vertebra", "anatomy", (241, 214, 145)),
    "spinal_cord": ("2748008", "Spinal cord", "anatomy", (244, 214, 49)),
    "heart": ("80891009", "Heart", "anatomy", (206, 110, 84)),
    "lung": ("39607008", "Lung", "anatomy", (197, 165, 145)),
    "pancreas": ("15776009", "Pancreas", "anatomy", (249, 180, 111)),
    "gallbladder": ("28231008", "Gallbladder", "anatomy", (139, 150, 98)),
    "stomach": ("69695003", "Stomach", "anatomy", (216, 132, 105)),
    "esophagus": ("32849002", "Esophagus", "anatomy", (211, 171, 143)),
    "duodenum": ("38848004", "Duodenum", "anatomy", (255, 253, 229)),
    "small_intestine": ("30315005", "Small intestine", "anatomy", (205, 167, 142)),
    "small_bowel": ("30315005", "Small intestine", "anatomy", (205, 167, 142)),
    "colon": ("71854001", "Colon", "anatomy", (204, 168, 143)),
    "rectum": ("34402009", "Rectum", "anatomy", (204, 168, 143)),
    "urinary_bladder": ("89837001", "Urinary bladder", "anatomy", (222, 154, 132)),
    "bladder": ("89837001", "Urinary bladder", "anatomy", (222, 154, 132)),
    "prostate": ("41216001", "Prostate", "anatomy", (230, 158, 140)),
    "adrenal_gland": ("23451007", "Adrenal gland", "anatomy", (249, 186, 150)),
    "trachea": ("44567001", "Trachea", "anatomy", (182, 228, 255)),
    "inferior_vena_cava": ("64131007", "Inferior vena cava", "anatomy", (0, 151, 206)),
    "portal_vein": ("32764006", "Portal vein", "anatomy", (0, 151, 206)),
    "brain": ("12738006", "Brain", "anatomy", (250, 250, 225)),
    "bone": ("272673000", "Bone", "anatomy", (241, 214, 145)),
    "muscle": ("71616004", "Muscle", "anatomy", (192, 104, 88)),
    "tumor": ("108369006", "Neoplasm", "abnormal", (144, 238, 144)),
    "tumour": ("108369006", "Neoplasm", "abnormal", (144, 238, 144)),
    "neoplasm": ("108369006", "Neoplasm", "abnormal", (144, 238, 144)),
    "lesion": ("52988006", "Lesion", "abnormal", (144, 238, 144)),
    "mass": ("4147007", "Mass", "abnormal", (144, 238, 144)),
}
_CATEGORIES = {  # DICOM CID 7150 Segmentation Property Categories
    "anatomy": ("123037004", "Anatomical Structure"),
    "abnormal": ("49755003", "Morphologically Abnormal Structure"),
    "tissue": ("85756007", "Tissue"),
}
_LATERALITY = {"left": ("7771000", "Left"), "right": ("24028007", "Right")}
#: Colours of structures without an entry in the table (tab10-like, then two extra), by index.
PALETTE_RGB: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (255, 215, 0),
    (0, 128, 128),
)


def _term(name: str) -> tuple[str, tuple[str, str], tuple[str, str], tuple[str, str] | None, tuple[int, ...]]:
    """(key, category code, type code, laterality modifier or None, RGB or ()) for a structure name.

    The name is split into lower-case words; ``left``/``right`` are taken out and the rest looked up
    (``kidney_left`` -> ``left_kidney`` first, then ``kidney`` with a Left modifier).
    """
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    sides = [w for w in words if w in _LATERALITY]
    core = "_".join(w for w in words if w not in _LATERALITY)
    side = sides[0] if len(sides) == 1 else None
    if side is not None and f"{side}_{core}" in _TERMS:
        core, side = f"{side}_{core}", None
    if core not in _TERMS:
        tissue = _CATEGORIES["tissue"]
        return "", tissue, tissue, None, ()
    code, meaning, cat, rgb = _TERMS[core]
    return core, _CATEGORIES[cat], (code, meaning), _LATERALITY[side] if side else None, rgb


def _segment_description(number: int, name: str, index: int, algorithm: Any) -> Any:
    """highdicom SegmentDescription for structure ``name`` (``index``: position in ``names``)."""
    import highdicom as hd
    from pydicom.sr.coding import Code

    _, category, prop, modifier, rgb = _term(name)
    color = rgb if rgb else PALETTE_RGB[index % len(PALETTE_RGB)]
    desc = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=name[:_MAX_LABEL_CHARS],
        segmented_property_category=Code(category[0], "SCT", category[1]),
        segmented_property_type=Code(prop[0], "SCT", prop[1]),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor.from_rgb(*color),
    )
    if modifier is not None:
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept(modifier[0], "SCT", modifier[1])
        ]
    return desc


# geometry: DICOM plane -> medseg voxel indices


class _PlaneIndex(NamedTuple):
    """Where one DICOM plane lies in a 3D medseg grid: pixel ``(r, c)`` is the voxel with index
    ``slice_index`` along ``slice_axis``, ``col_start + col_step * c`` along ``col_axis`` and
    ``row_start + row_step * r`` along ``row_axis`` (steps are +-1)."""

    slice_axis: int
    slice_index: int
    col_axis: int
    col_start: int
    col_step: int
    row_axis: int
    row_start: int
    row_step: int
    rows: int
    cols: int


def _plane_view(array: np.ndarray, plane: _PlaneIndex) -> np.ndarray:
    """View ``(..., rows, cols)`` of a plane's voxels in ``array`` (``(X, Y, Z)`` or ``(C, X, Y, Z)``)."""

    def steps(start: int, step: int, n: int) -> slice:
        stop = start + step * n
        return slice(start, None if stop < 0 else stop, step)

    index: list[int | slice] = [0, 0, 0]
    index[plane.col_axis] = steps(plane.col_start, plane.col_step, plane.cols)
    index[plane.row_axis] = steps(plane.row_start, plane.row_step, plane.rows)
    index[plane.slice_axis] = plane.slice_index
    view = array[(Ellipsis, *index)]
    return np.swapaxes(view, -1, -2) if plane.col_axis < plane.row_axis else view


def _plane_points(plane: _PlaneIndex, r: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, ...]:
    """Voxel index arrays ``(i, j, k)`` of the plane's pixels ``(r, c)``."""
    index: list[np.ndarray] = [r, r, r]
    index[plane.col_axis] = plane.col_start + plane.col_step * c
    index[plane.row_axis] = plane.row_start + plane.row_step * r
    index[plane.slice_axis] = np.full_like(r, plane.slice_index)
    return tuple(index)


def _plane_voxels(
    plane: _Plane, rows: int, cols: int, shape: Sequence[int], affine: np.ndarray, *, where: str
) -> _PlaneIndex:
    """Voxel indices, in a 3D medseg grid, of the pixel centres of one DICOM plane.

    Args:
        plane: The plane's geometry (LPS).
        rows: DICOM Rows of the plane.
        cols: DICOM Columns of the plane.
        shape: Spatial shape ``(X, Y, Z)`` of the medseg grid.
        affine: Voxel-to-RAS affine of the grid.
        where: What to name in errors.

    Returns:
        The plane's slice axis and index, and the index (slices) of its voxels; pixel ``(r, c)`` is
        voxel ``origin + c * column_step + r * row_step`` with unit steps along two array axes.

    Raises:
        DataError: The plane's pixels are not voxel centres of the grid (other orientation, spacing,
            a sub-voxel shift) or lie outside it.
    """
    inv = np.linalg.inv(affine)
    origin = inv[:3, :3] @ (_LPS_TO_RAS3 @ plane.position) + inv[:3, 3]
    d_col = inv[:3, :3] @ (_LPS_TO_RAS3 @ plane.row) * plane.spacing[0]  # one step to the next column
    d_row = inv[:3, :3] @ (_LPS_TO_RAS3 @ plane.col) * plane.spacing[1]  # one step to the next row
    o_r, c_r, r_r = np.rint(origin), np.rint(d_col), np.rint(d_row)
    corners = np.array([[0, 0], [0, cols - 1], [rows - 1, 0], [rows - 1, cols - 1]], dtype=np.float64)
    dev = (origin - o_r) + corners[:, 1:2] * (d_col - c_r) + corners[:, 0:1] * (d_row - r_r)
    worst = float(np.abs(dev).max())
    unit = (np.abs(c_r).sum() == 1 and np.abs(r_r).sum() == 1) and np.argmax(np.abs(c_r)) != np.argmax(
        np.abs(r_r)
    )
    if not unit or worst > GRID_TOL_VOXELS:
        raise DataError(
            f"{where}: the DICOM plane (ImagePositionPatient {np.round(plane.position, 4).tolist()} LPS, "
            f"pixel spacing {plane.spacing[::-1]} mm) does not lie on the voxel grid (shape {tuple(shape)}, "
            f"spacing {np.round(np.linalg.norm(affine[:3, :3], axis=0), 4).tolist()} mm, origin "
            f"{np.round(affine[:3, 3], 4).tolist()} RAS): its pixel centres map to voxel offsets "
            f"{np.round(origin, 3).tolist()} + column step {np.round(d_col, 3).tolist()} + row step "
            f"{np.round(d_row, 3).tolist()}, expected whole voxel steps (within {GRID_TOL_VOXELS} voxel)."
        )
    a, b = int(np.argmax(np.abs(c_r))), int(np.argmax(np.abs(r_r)))
    k = 3 - a - b
    col_idx = (o_r[a] + c_r[a] * np.arange(cols)).astype(np.intp)
    row_idx = (o_r[b] + r_r[b] * np.arange(rows)).astype(np.intp)
    ks = int(o_r[k])
    if not (
        0 <= ks < shape[k]
        and col_idx.min() >= 0
        and col_idx.max() < shape[a]
        and row_idx.min() >= 0
        and row_idx.max() < shape[b]
    ):
        raise DataError(
            f"{where}: the DICOM plane ({rows} x {cols} pixels) lies partly or wholly outside the voxel grid "
            f"of shape {tuple(shape)} (slice index {ks} along axis {k}, columns {col_idx.min()}.."
            f"{col_idx.max()} along axis {a}, rows {row_idx.min()}..{row_idx.max()} along axis {b})."
        )
    return _PlaneIndex(k, ks, a, int(col_idx[0]), int(c_r[a]), b, int(row_idx[0]), int(r_r[b]), rows, cols)


# source series


def _select_source(series_dir: Path, series_uid: str | None) -> tuple[list[Path], list[Any]]:
    """Files and headers (no pixel data) of the source series, checked to be single-frame slices."""
    import pydicom

    found = list_dicom_series(series_dir)
    if not found:
        raise DataError(f"{series_dir}: no DICOM image files directly in this folder; pass the series folder")
    if series_uid is not None:
        chosen = [s for s in found if s.uid == series_uid.strip()]
        if not chosen:
            uids = ", ".join(repr(s.uid) for s in found)
            raise DataError(f"{series_dir}: no series with SeriesInstanceUID {series_uid!r} (found {uids})")
    elif len(found) > 1:
        listing = "\n".join(f"  - {s.describe()}" for s in found)
        raise DataError(
            f"{series_dir}: {len(found)} DICOM series in one folder; pass series_uid= (the one the labels "
            f"were predicted on):\n{listing}"
        )
    else:
        chosen = found
    series = chosen[0]
    headers = [pydicom.dcmread(str(p), stop_before_pixels=True) for p in series.files]
    first = headers[0]
    modality = str(first.get("Modality", "") or "").upper()
    if modality in PROJECTION_MODALITIES or "ImagePositionPatient" not in first:
        raise DataError(
            f"{series.files[0]}: a 2D projection image (Modality {modality or '?'}, no "
            "ImagePositionPatient); expected a CT/MR/PET series of axial (or other cross-sectional) "
            "slices. DICOM SEG output is supported for cross-sectional series only: write the 2D mask as "
            "PNG or NIfTI instead."
        )
    multi = [p for p, ds in zip(series.files, headers, strict=True) if _n_frames(ds) > 1]
    if multi or "PerFrameFunctionalGroupsSequence" in first:
        raise DataError(
            f"{(multi or list(series.files))[0]}: an enhanced/multi-frame DICOM file (NumberOfFrames "
            f"{_n_frames(headers[0])}); expected a series of single-frame slices. DICOM SEG output for "
            "multi-frame sources is not supported: write the prediction as NIfTI, or convert the series to "
            "single-frame files (e.g. `emf2sf` of dcm4che) and predict on those."
        )
    return list(series.files), headers


def _derived_uid(kind: str, *parts: object) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[f"medseg-dicom-seg-{kind}", *[str(p) for p in parts]]))


def _repair_headers(files: Sequence[Path], headers: Sequence[Any], *, where: str) -> list[str]:
    """Fill UIDs and type-2 attributes highdicom needs into the (in-memory) source headers.

    Returns:
        The names of the UIDs that had to be generated (for one warning).
    """
    generated = []
    for path, ds in zip(files, headers, strict=True):
        meta = getattr(ds, "file_meta", None)
        for keyword, meta_keyword in (("SOPClassUID", "MediaStorageSOPClassUID"), ("SOPInstanceUID", None)):
            if str(ds.get(keyword, "") or "").strip():
                continue
            value = str(meta.get(meta_keyword or "MediaStorageSOPInstanceUID", "") or "") if meta else ""
            if not value.strip():
                if keyword == "SOPClassUID":
                    raise DataError(f"{path}: no SOPClassUID in the header or file meta; cannot reference it")
                value = _derived_uid("instance", path.name, list(ds.get("ImagePositionPatient", [])))
                generated.append("SOPInstanceUID")
            setattr(ds, keyword, value.strip())
    instance_uids = sorted(str(ds.SOPInstanceUID) for ds in headers)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds.get(keyword, "") or "").strip() for ds in headers}
        if values == {""}:
            uid = _derived_uid(keyword, *instance_uids)
            for ds in headers:
                setattr(ds, keyword, uid)
            generated.append(keyword)
        elif len(values) > 1:
            raise DataError(
                f"{where}: the slices disagree on {keyword} ({sorted(values)[:3]}); one series must have one "
                f"{keyword}. Pass a folder holding one consistent series."
            )
    for ds in headers:
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
            del ds.SpecificCharacterSet  # empty = the default repertoire, which highdicom cannot parse
        for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber"):
            if keyword not in ds:
                setattr(ds, keyword, "")
        for keyword in ("StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName"):
            if keyword not in ds:
                setattr(ds, keyword, "")
    return sorted(set(generated))
