"""Reading a DICOM Segmentation back onto a reference grid or its own."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DataError
from medseg.io.dicom._headers import (
    _group_item,
    _plane_from,
)
from medseg.io.dicom_seg._common import (
    SEG_SOP_CLASS_UIDS,
    _plane_points,
    _plane_voxels,
)
from medseg.types import Volume

logger = logging.getLogger(__name__)


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
