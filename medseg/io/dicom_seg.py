"""DICOM Segmentation (SEG) objects for predictions on DICOM series: write with highdicom, read back.

Who does what:

* **highdicom** builds and parses the Segmentation IOD (``BINARY`` type, one segment per structure,
  bit-packed frames, explicit VR little endian): references to the source instances, the shared and
  per-frame functional groups, and (for reading without a reference grid) ``get_volume``.
* **pydicom** reads the source series' headers (no pixel data is decoded, so JPEG 2000 series need no
  extra decoder) and provides the coded concepts.
* **This module** maps every voxel slice of the medseg array to the source instance at the same
  *world position*: each instance's plane (``ImagePositionPatient``, ``ImageOrientationPatient``,
  ``PixelSpacing``) is expressed in the voxel indices of the medseg grid, which must give whole voxel
  steps along two array axes and a whole slice index on the third (within :data:`GRID_TOL_VOXELS`).
  File order, InstanceNumber and the axis order or directions of the medseg array therefore do not
  matter, and a label map on another grid is refused instead of being written shifted. Reading with a
  ``reference`` grid uses the same mapping frame by frame (per-frame ``PlanePositionSequence``).

Choices (documented behaviour):

* **Empty structures are skipped, with a warning.** A structure named in ``names`` but absent from the
  prediction gets no segment: a segment without frames is legal but several readers (and highdicom's
  own ``get_volume`` of that segment) cannot handle it, and an empty segment is indistinguishable from
  a failed export. The warning names the skipped structures; a prediction with no structure at all is
  refused (:class:`~medseg.errors.DataError`), since a SEG needs at least one segment.
* **Segment labels** are the names as given (at most 64 characters, the DICOM LO limit). Segmented
  property category/type codes come from a small SNOMED CT table of common structures (liver, spleen,
  kidneys, aorta, spine, ...), found by the words of the name (``left_kidney`` and ``kidney_left`` both
  match, with a laterality modifier where SNOMED has no lateral concept); other names get the generic
  ``Tissue``/``Tissue`` pair (as 3D Slicer does for unknown terms). Display colours: 3D Slicer's
  anatomy colours for known structures, else a fixed 12-colour palette by structure index, converted to
  CIELab.
* **Algorithm identification**: ``SegmentAlgorithmType`` AUTOMATIC, family "Artificial Intelligence"
  (DCM 123110), name/version from the arguments (``medseg`` and its version by default).
* **UIDs are deterministic**: the SEG's SeriesInstanceUID and SOPInstanceUID derive from the source
  series UIDs, the masks, names and algorithm, so writing the same prediction twice gives the same
  file, and different predictions different UIDs.
* **Source series with missing UIDs** (anonymised exports, e.g. TotalSegmentator's example series has
  empty StudyInstanceUID, SeriesInstanceUID, SOPClassUID and SOPInstanceUID): SOP class/instance UIDs
  are taken from the file meta header (``MediaStorageSOP*``) when present; missing study, series and
  frame-of-reference UIDs are generated deterministically from the instance UIDs, and a warning says
  so. The SEG is then self-consistent, but a PACS cannot link it to the source series, which does not
  carry those UIDs: give the series proper UIDs before archiving both.
* **Unsupported sources are refused** with :class:`~medseg.errors.DataError`: 2D projection images
  (radiographs), enhanced multi-frame files and single-file series; the message says what to use.
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from medseg._version import __version__
from medseg.errors import DataError
from medseg.io._atomic import atomic_write
from medseg.io.dicom._headers import (
    PROJECTION_MODALITIES,
    _classic_plane,
    _group_item,
    _n_frames,
    _Plane,
    _plane_from,
)
from medseg.io.dicom.series import list_dicom_series
from medseg.types import Volume

logger = logging.getLogger(__name__)

__all__ = ["write_dicom_seg", "read_dicom_seg", "GRID_TOL_VOXELS", "SEG_SOP_CLASS_UIDS"]

#: Largest allowed distance (in voxels, per index) between a DICOM plane's pixel centres and the
#: medseg grid's voxel centres. Slice positions may deviate from a uniform stack by up to 1 % of the
#: gap (what :func:`~medseg.io.dicom.read_dicom_series` accepts); half a voxel would be ambiguous.
GRID_TOL_VOXELS = 0.1
#: Segmentation Storage and Label Map Segmentation Storage.
SEG_SOP_CLASS_UIDS = frozenset({"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"})
_LPS_TO_RAS3 = np.diag([-1.0, -1.0, 1.0])
_MAX_LABEL_CHARS = 64  # DICOM LO

# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
# write


def _check_labels(labels: Volume, names: Sequence[str], values: Sequence[int] | None, *, where: str) -> None:
    if labels.spatial_dims != 3:
        raise DataError(
            f"{where}: DICOM SEG output needs a 3D prediction on a DICOM series grid, got a "
            f"{labels.spatial_dims}D Volume of shape {labels.array.shape}. Write 2D masks as PNG or NIfTI "
            "instead."
        )
    if not names or any(not str(n).strip() for n in names) or len(set(names)) != len(names):
        raise DataError(f"{where}: names must be non-empty, distinct strings, got {list(names)}")
    if values is None:
        if labels.num_channels != len(names):
            raise DataError(
                f"{where}: per-structure masks need one name per channel: {labels.num_channels} channel(s), "
                f"{len(names)} name(s) {list(names)}"
            )
        arr = labels.array
        if arr.dtype != np.bool_ and not (
            np.issubdtype(arr.dtype, np.integer) and arr.min() >= 0 and arr.max() <= 1
        ):
            raise DataError(
                f"{where}: per-structure masks must be binary (bool or 0/1 integers), got dtype {arr.dtype}"
                + (f" with values {arr.min()}..{arr.max()}" if arr.size else "")
                + ". Threshold probabilities first, or pass an exclusive label map with values=."
            )
        return
    if labels.num_channels != 1:
        raise DataError(
            f"{where}: an exclusive label map has one channel, got {labels.num_channels}; pass values=None "
            "for per-structure masks"
        )
    if len(values) != len(names) or len(set(values)) != len(values) or any(int(v) <= 0 for v in values):
        raise DataError(
            f"{where}: values must give one distinct positive label value per name: names {list(names)}, "
            f"values {list(values)}"
        )
    if not np.issubdtype(labels.array.dtype, np.integer):
        raise DataError(
            f"{where}: an exclusive label map must have an integer dtype, got {labels.array.dtype}"
        )
    present = np.unique(labels.array)
    unknown = sorted(set(present.tolist()) - {0} - {int(v) for v in values})
    if unknown:
        raise DataError(
            f"{where}: label values {unknown[:10]} occur in the label map but have no name (named values "
            f"{sorted(int(v) for v in values)}); add them to names/values or set them to 0"
        )


def _map_instances(
    labels: Volume, files: Sequence[Path], headers: Sequence[Any], *, where: str
) -> list[_PlaneIndex]:
    """For each source instance, where its plane lies in the labels' grid.

    Raises:
        DataError: The labels do not lie on the series' grid (each voxel must belong to exactly one
            pixel of one instance).
    """
    shape = labels.spatial_shape
    rows, cols = int(headers[0].Rows), int(headers[0].Columns)
    if sorted(shape) != sorted((rows, cols, len(files))):
        raise DataError(
            f"{where}: the labels (spatial shape {shape}) are not on the grid of the DICOM series in "
            f"{files[0].parent} ({len(files)} slices of {rows} rows x {cols} columns). Predict on (or "
            "resample with nearest neighbour onto) the grid medseg.io.load_volume(series_dir) returns."
        )
    mapped, axes = [], set()
    for path, ds in zip(files, headers, strict=True):
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise DataError(f"{path}: {ds.Rows} x {ds.Columns} pixels, other slices {rows} x {cols}")
        plane = _classic_plane(ds, where=str(path))
        try:
            mapped.append(_plane_voxels(plane, rows, cols, shape, labels.affine, where=str(path)))
        except DataError as exc:
            raise DataError(
                f"{where}: the labels are not on the grid of the DICOM series in {files[0].parent}. {exc} "
                "Predict on (or resample with nearest neighbour onto) the grid that "
                "medseg.io.load_volume(series_dir) returns."
            ) from exc
        axes.add(mapped[-1].slice_axis)
    slices = sorted(m.slice_index for m in mapped)
    if len(axes) != 1 or slices != list(range(len(files))) or shape[axes.pop()] != len(files):
        raise DataError(
            f"{where}: the {len(files)} slices of the DICOM series in {files[0].parent} do not cover the "
            f"labels' grid (shape {shape}) once each (slice indices {slices[:10]}...); the series may hold "
            "duplicate or missing slices. Check it with medseg.io.load_volume(series_dir)."
        )
    return mapped


def _frames(
    labels: Volume, values: Sequence[int] | None, mapped: Sequence[_PlaneIndex]
) -> tuple[np.ndarray, list[int]]:
    """highdicom pixel array for the mapped instances and the indices (into names) of the present
    structures. Exclusive label maps give a label-map style ``(N, rows, cols)`` array of segment numbers,
    masks a stacked ``(N, rows, cols, S)`` array."""
    arr = labels.array
    if values is not None:
        counts = {int(v): c for v, c in zip(*np.unique(arr, return_counts=True), strict=True)}
        present = [i for i, v in enumerate(values) if counts.get(int(v), 0) > 0]
        lut = np.zeros(max(int(v) for v in values) + 1, dtype=np.uint16)
        for number, i in enumerate(present, start=1):
            lut[int(values[i])] = number
        dtype = np.uint8 if len(present) < 256 else np.uint16
        frames = np.stack([lut[_plane_view(arr[0], m)] for m in mapped]).astype(dtype, copy=False)
        return frames, present
    flat = arr.reshape(arr.shape[0], -1)
    present = [i for i in range(arr.shape[0]) if flat[i].any()]
    sub = arr[present].astype(np.uint8, copy=False)
    frames = np.stack([np.moveaxis(_plane_view(sub, m), 0, -1) for m in mapped])
    return frames, present


def _content_hash(
    labels: Volume, names: Sequence[str], values: Sequence[int] | None, extra: Sequence[str]
) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(labels.array).tobytes())
    h.update(str(labels.array.dtype).encode())
    h.update(np.ascontiguousarray(labels.affine).tobytes())
    h.update(repr((list(names), None if values is None else [int(v) for v in values], list(extra))).encode())
    return h.hexdigest()


def write_dicom_seg(
    labels: Volume,
    series_dir: str | Path,
    out_path: str | Path,
    *,
    names: Sequence[str],
    values: Sequence[int] | None,
    series_uid: str | None = None,
    algorithm: str = "medseg",
    algorithm_version: str = __version__,
    series_description: str = "medseg segmentation",
    anonymize: bool = False,
) -> Path:
    """Write a prediction on a DICOM series as a DICOM Segmentation (BINARY, one segment per structure).

    Each frame references the source instance at the same world position (see the module docstring),
    so the medseg array may have any axis order or direction as long as its voxels are the series'.
    Structures absent from the prediction get no segment (a warning names them).

    Args:
        labels: Prediction on the series' grid, as returned by ``medseg.io.load_volume(series_dir)``
            (same voxel centres): an exclusive label map ``(1, X, Y, Z)`` with integer labels (then
            ``values`` is required), or per-structure binary masks ``(S, X, Y, Z)`` (bool or 0/1; masks
            may overlap) with ``values=None``.
        series_dir: Folder holding the source DICOM series (single-frame slices).
        out_path: The ``.dcm`` file to write (atomically); must not be inside ``series_dir``.
        names: Structure name of each label value / mask channel; used as SegmentLabel and to choose
            coded terms and colours.
        values: Label value of each name in an exclusive label map; ``None`` for masks.
        series_uid: SeriesInstanceUID of the *source* series to use when ``series_dir`` holds several
            (as in :func:`medseg.io.load_volume`).
        algorithm: Algorithm name recorded in the segments' algorithm identification.
        algorithm_version: Its version.
        series_description: SeriesDescription of the SEG.
        anonymize: A SEG carries the source's patient module (the standard requires it): the patient's
            name, ID and birth date, the accession number. With ``anonymize`` they are replaced by a
            pseudonym (SHA-256 of the PatientID, first 10 hex digits) or emptied; UIDs are kept, as
            they link the SEG to its source images.

    Returns:
        ``out_path``.

    Raises:
        DataError: The labels are not on the series' grid, names/values do not fit the labels, the
            prediction is empty, the source is a 2D or multi-frame image, or ``out_path`` is inside
            ``series_dir``.
    """
    import highdicom as hd
    from pydicom.sr.coding import Code

    series_dir, out_path = Path(series_dir), Path(out_path)
    where = f"DICOM SEG {out_path}"
    if (
        out_path.resolve().parent == series_dir.resolve()
        or series_dir.resolve() in out_path.resolve().parents
    ):
        raise DataError(
            f"{out_path}: refusing to write the SEG into the source series folder {series_dir} (a later read "
            "of the folder would find two series); write it next to the folder or into the output folder."
        )
    if out_path.is_dir():
        raise DataError(f"{out_path}: is a folder; pass the path of the .dcm file to write")
    _check_labels(labels, names, values, where=where)
    files, headers = _select_source(series_dir, series_uid)
    mapped = _map_instances(labels, files, headers, where=where)
    frames, present = _frames(labels, values, mapped)
    skipped = [names[i] for i in range(len(names)) if i not in present]
    if not present:
        raise DataError(
            f"{where}: the prediction is empty (none of {list(names)} is present); a DICOM SEG needs at "
            "least one segment. Nothing was written; report the case as 'no structure found' instead."
        )
    if skipped:
        warnings.warn(
            f"{where}: {len(skipped)} structure(s) absent from the prediction get no segment: {skipped}",
            stacklevel=2,
        )
    generated = _repair_headers(files, headers, where=str(series_dir))
    if anonymize:
        _pseudonymise(headers)
    if generated:
        warnings.warn(
            f"{series_dir}: the source series has no {', '.join(generated)}; generated them "
            "(deterministically from the instance UIDs) for the SEG. The SEG cannot be linked to the source "
            "in a PACS until the series itself carries these UIDs.",
            stacklevel=2,
        )
    family = Code("123110", "DCM", "Artificial Intelligence")
    algo = hd.AlgorithmIdentificationSequence(name=algorithm, family=family, version=algorithm_version)
    descriptions = [
        _segment_description(number, names[i], i, algo) for number, i in enumerate(present, start=1)
    ]
    digest = _content_hash(labels, names, values, [algorithm, algorithm_version, series_description])
    src_series = str(headers[0].SeriesInstanceUID)
    seg_series_uid = _derived_uid("series", src_series, digest)
    try:
        number = int(headers[0].get("SeriesNumber") or 0) + 1000
    except (TypeError, ValueError):
        number = 1000
    with warnings.catch_warnings():
        # highdicom checks the source's PatientName; a single-component name is not ours to fix
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        seg = hd.seg.Segmentation(
            source_images=headers,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=seg_series_uid,
            series_number=number,
            sop_instance_uid=_derived_uid("instance", seg_series_uid),
            instance_number=1,
            manufacturer="medseg",
            manufacturer_model_name=algorithm,
            software_versions=algorithm_version,
            device_serial_number="0",
            content_description=f"{algorithm} {algorithm_version}"[:64],
            content_label="SEGMENTATION",
            series_description=series_description[:64],
        )
    with atomic_write(out_path) as tmp:
        seg.save_as(str(tmp))
    logger.info(
        "wrote DICOM SEG %s (%d segments, %d frames)", out_path, len(present), int(seg.NumberOfFrames)
    )
    return out_path


def _pseudonymise(headers: Sequence[Any]) -> None:
    """Replace what identifies the patient in the (in-memory) source headers the SEG copies its patient
    and study modules from: PatientID and PatientName become the first 10 hex digits of the SHA-256 of
    the PatientID (the pseudonym the report shows); birth date, sex, accession number, referring
    physician, study ID and other patient identifiers are emptied. UIDs are kept: they are what links
    the SEG to its source images."""
    import hashlib

    for ds in headers:
        code = hashlib.sha256(str(ds.get("PatientID", "")).strip().encode("utf-8")).hexdigest()[:10]
        ds.PatientID = code
        ds.PatientName = code
        for keyword in _IDENTIFYING:
            if keyword in ds:
                setattr(ds, keyword, "")


_IDENTIFYING = (
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "InstitutionName",
    "InstitutionAddress",
)
"""Patient and study attributes emptied by ``anonymize`` (besides PatientID and PatientName)."""


# ---------------------------------------------------------------------------------------------------
# read


def _read_seg(path: Path) -> Any:
    """The SEG as a pydicom dataset, checked to be a Segmentation with the attributes read here."""
    import pydicom

    if not path.is_file():
        raise DataError(f"{path}: no such file (expected a DICOM SEG .dcm file)")
    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:  # pydicom raises many types for non-DICOM input
        raise DataError(f"{path}: not a DICOM file ({type(exc).__name__}: {exc})") from exc
    sop = str(ds.get("SOPClassUID", "") or "")
    if sop not in SEG_SOP_CLASS_UIDS:
        raise DataError(
            f"{path}: not a DICOM Segmentation (SOP class {sop or '?'}, Modality {ds.get('Modality', '?')}); "
            f"expected one of {sorted(SEG_SOP_CLASS_UIDS)}. To read images use medseg.io.load_volume."
        )
    missing = [
        k for k in ("SegmentSequence", "SegmentationType", "Rows", "Columns", "PixelData") if k not in ds
    ]
    if missing:
        raise DataError(f"{path}: invalid DICOM Segmentation: no {', '.join(missing)}")
    return ds


def _segment_numbers_and_names(seg: Any) -> tuple[list[int], list[str]]:
    items = sorted(seg.SegmentSequence, key=lambda item: int(item.SegmentNumber))
    return [int(item.SegmentNumber) for item in items], [str(item.get("SegmentLabel", "")) for item in items]


def _frame_masks(seg: Any, pixels: np.ndarray, numbers: Sequence[int]) -> list[tuple[int, np.ndarray]]:
    """(channel index, boolean frame) pairs of one stored frame: one pair with channel -1 (look up the
    frame's segment) for BINARY/FRACTIONAL frames, one per present segment for LABELMAP frames."""
    seg_type = str(seg.SegmentationType)
    if seg_type == "LABELMAP":
        return [(c, pixels == n) for c, n in enumerate(numbers) if np.any(pixels == n)]
    if seg_type == "FRACTIONAL":
        return [(-1, pixels.astype(np.float64) >= float(seg.MaximumFractionalValue) / 2)]
    return [(-1, pixels > 0)]


def _place_on_reference(seg: Any, reference: Volume, *, path: Path) -> np.ndarray:
    """The SEG's frames as ``(S, *reference.spatial_shape)`` uint8 masks, frame by frame."""
    numbers, _ = _segment_numbers_and_names(seg)
    channel_of = {n: c for c, n in enumerate(numbers)}
    out = np.zeros((len(numbers), *reference.spatial_shape), dtype=np.uint8)
    rows, cols = int(seg.Rows), int(seg.Columns)
    n = int(seg.get("NumberOfFrames", 1) or 1)
    try:
        pixels = np.asarray(seg.pixel_array).reshape(n, rows, cols)
    except Exception as exc:  # pydicom raises many types for missing decoders or short data
        raise DataError(
            f"{path}: cannot decode the SEG's pixel data ({type(exc).__name__}: {exc}); decompress it first "
            "(`gdcmconv --raw`) or install the pydicom plugin for its transfer syntax"
        ) from exc
    for f in range(n):
        pos = _group_item(seg, f, "PlanePositionSequence")
        ori = _group_item(seg, f, "PlaneOrientationSequence")
        pix = _group_item(seg, f, "PixelMeasuresSequence")
        if pos is None or ori is None or pix is None:
            raise DataError(
                f"{path}: frame {f + 1} has no plane position/orientation/pixel spacing, so it cannot be "
                "placed on a 3D grid (a SEG of 2D or tiled images); read it without reference="
            )
        plane = _plane_from(
            pos.get("ImagePositionPatient"),
            ori.get("ImageOrientationPatient"),
            pix.get("PixelSpacing"),
            None,
            where=f"{path} (frame {f + 1})",
        )
        target = _plane_voxels(
            plane, rows, cols, reference.spatial_shape, reference.affine, where=f"{path} (frame {f + 1})"
        )
        for channel, mask in _frame_masks(seg, pixels[f], numbers):
            if channel < 0:
                ident = _group_item(seg, f, "SegmentIdentificationSequence")
                channel = channel_of[int(ident.ReferencedSegmentNumber)]
            r, c = np.nonzero(mask)  # frames are sparse: touch only the foreground voxels
            if r.size:
                out[(channel, *_plane_points(target, r, c))] = 1
    return out


def _own_grid(seg: Any, *, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The SEG's masks on the grid its frames span (highdicom ``get_volume``): ``(S, X, Y, Z)`` and
    a voxel-to-RAS affine."""
    import highdicom as hd

    numbers, _ = _segment_numbers_and_names(seg)
    try:
        seg = hd.seg.Segmentation.from_dataset(seg, copy=False)
    except (ValueError, AttributeError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: invalid DICOM Segmentation ({exc})") from exc
    try:
        vol = seg.get_volume(segment_numbers=numbers, dtype=np.uint8)
    except (ValueError, RuntimeError) as exc:
        raise DataError(
            f"{path}: the SEG's frames do not form a regular 3D grid ({exc}); read it with reference= (the "
            "source series' Volume) to place the frames on that grid."
        ) from exc
    arr = vol.array if vol.array.ndim == 4 else vol.array[..., None]
    masks = np.ascontiguousarray(np.transpose(arr, (3, 2, 1, 0)))  # (slice, row, col, S) -> (S, X, Y, Z)
    perm = np.zeros((4, 4))
    perm[0, 2] = perm[1, 1] = perm[2, 0] = perm[3, 3] = 1.0  # (i, j, k) -> (slice, row, col)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(vol.affine, dtype=np.float64) @ perm
    return masks, affine


def read_dicom_seg(path: str | Path, *, reference: Volume | None = None) -> tuple[Volume, list[str]]:
    """Read a DICOM Segmentation into per-segment binary masks.

    Args:
        path: The SEG file (BINARY, FRACTIONAL or LABELMAP; FRACTIONAL values are binarised at half
            the maximum fractional value).
        reference: Grid to place the frames on, typically ``load_volume(series_dir)`` of the source
            series (or a NIfTI of the same grid). Nothing is resampled: every frame must lie on the
            grid's voxel centres, and voxels without a frame are 0. Without it the masks are on the
            grid the SEG's frames span (only the slices that hold frames).

    Returns:
        ``(masks, labels)``: a Volume ``(S, X, Y, Z)`` uint8 (0/1), one channel per segment in
        SegmentNumber order, with a voxel-to-RAS affine (the reference's when given); ``meta`` has
        ``source``, ``format`` ("dicom-seg"), ``segment_numbers``, ``series_uid`` and the referenced
        ``frame_of_reference_uid``. ``labels`` are the segments' SegmentLabels.

    Raises:
        DataError: Not a SEG, frames not on the reference grid, a different frame of reference than
            the reference's, or frames without plane positions.
    """
    path = Path(path)
    seg = _read_seg(path)
    numbers, names = _segment_numbers_and_names(seg)
    for_uid = str(seg.get("FrameOfReferenceUID", "") or "")
    meta = {
        "source": str(path),
        "format": "dicom-seg",
        "segment_numbers": numbers,
        "series_uid": str(seg.get("SeriesInstanceUID", "") or ""),
        "frame_of_reference_uid": for_uid,
    }
    if reference is None:
        masks, affine = _own_grid(seg, path=path)
        return Volume(masks, affine, meta), names
    if reference.spatial_dims != 3:
        raise DataError(f"{path}: reference must be a 3D Volume, got shape {reference.array.shape}")
    ref_for = str(reference.meta.get("frame_of_reference_uid", "") or "")
    if ref_for and for_uid and ref_for != for_uid:
        raise DataError(
            f"{path}: the SEG's FrameOfReferenceUID {for_uid} differs from the reference's {ref_for} "
            f"({reference.meta.get('source', 'reference')}); the SEG was made on another scan. Pass the "
            "series the SEG references."
        )
    masks = _place_on_reference(seg, reference, path=path)
    return Volume(masks, reference.affine.copy(), meta), names
