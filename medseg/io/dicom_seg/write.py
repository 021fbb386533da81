"""Writing a prediction on a DICOM series as a DICOM Segmentation (highdicom)."""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg._version import __version__
from medseg.errors import DataError
from medseg.io._atomic import atomic_write
from medseg.io.dicom._headers import (
    _classic_plane,
)
from medseg.io.dicom_seg._common import (
    _derived_uid,
    _plane_view,
    _plane_voxels,
    _PlaneIndex,
    _repair_headers,
    _segment_description,
    _select_source,
)
from medseg.names import pseudonym
from medseg.types import Volume

logger = logging.getLogger(__name__)


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
        anonymize: A SEG carries the source's patient and study modules (the standard requires them):
            the patient's name, ID and birth date, the accession number, whatever else the source has.
            With ``anonymize`` only an allow-list of structural attributes of the source is used and
            the patient appears as a pseudonym (:func:`medseg.names.pseudonym`); UIDs are kept, as they
            link the SEG to its source images.

    Returns:
        ``out_path``.

    Raises:
        DataError: The labels are not on the series' grid, names/values do not fit the labels, the
            prediction is empty, the source is a 2D or multi-frame image, or ``out_path`` is inside
            ``series_dir``.

    Long because it is the ordered sequence of one SEG's checks and highdicom's constructor arguments.
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
        headers = _pseudonymised(headers)
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


def _pseudonymised(headers: Sequence[Any]) -> list[Any]:
    """Copies of the source headers with only what the SEG needs of them: an allow-list of the
    structural attributes (UIDs that link the SEG to its images, geometry, pixel description), the
    patient's pseudonym (:func:`medseg.names.pseudonym`) as PatientID and PatientName, and the type-2
    patient and study attributes the standard requires, empty. highdicom copies the whole patient and
    study modules of its source, so a block-list would leave whatever tag it did not foresee (other IDs,
    comments, physicians, descriptions naming the patient)."""
    from pydicom.dataset import Dataset

    out = []
    for ds in headers:
        new = Dataset()
        if hasattr(ds, "file_meta"):
            new.file_meta = ds.file_meta
        for keyword in _STRUCTURAL:
            if keyword in ds:
                new[keyword] = ds[keyword]
        code = pseudonym(str(ds.get("PatientID", "")))
        new.PatientID, new.PatientName = code, code
        for keyword in _REQUIRED_EMPTY:
            setattr(new, keyword, "")
        out.append(new)
    return out


_STRUCTURAL = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "Modality",
    "SeriesNumber",
    "InstanceNumber",
    "ImageType",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
)
"""What ``anonymize`` keeps of a source header."""
_REQUIRED_EMPTY = (
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
"""Type-2 patient and study attributes: present (the standard requires them) and empty."""
