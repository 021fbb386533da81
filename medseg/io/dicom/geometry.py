"""The geometry of a slice stack: order along the slice normal and the voxel-to-RAS affine, refusing
stacks one affine cannot describe (missing slices, duplicate positions, gantry tilt)."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DataError
from medseg.io._limits import check_memory
from medseg.io.dicom._headers import (
    _LPS_TO_RAS,
    ORIENTATION_ATOL,
    SPACING_ATOL_MM,
    SPACING_RTOL,
    TILT_ATOL_MM,
    TILT_TOL_PIXELS,
    DicomSeries,
    _classic_plane,
    _n_frames,
    _Plane,
    _rescale,
    _whole,
)

logger = logging.getLogger(__name__)


def _stack_geometry(planes: Sequence[_Plane], *, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Order of the frames along the slice normal and the voxel-to-RAS affine of the sorted stack.

    Raises:
        DataError: mixed orientations/spacings, duplicate positions, uneven gaps or gantry tilt.

    Long because each check of the stack (orientation, spacing, matrix, gaps, duplicates, tilt) needs
    the sorted positions and writes its own message with what to do.
    """
    ref = planes[0]
    for k, p in enumerate(planes[1:], start=1):
        if not (
            np.allclose(p.row, ref.row, atol=ORIENTATION_ATOL)
            and np.allclose(p.col, ref.col, atol=ORIENTATION_ATOL)
        ):
            raise DataError(
                f"{where}: slices have different orientations (ImageOrientationPatient "
                f"{np.round(np.r_[ref.row, ref.col], 5).tolist()} in slice 1, "
                f"{np.round(np.r_[p.row, p.col], 5).tolist()} in slice {k + 1}). The series mixes several "
                "stacks (e.g. a 3-plane localizer); export each stack as its own series."
            )
        if not np.allclose(p.spacing, ref.spacing, rtol=1e-4, atol=1e-6):
            raise DataError(
                f"{where}: slices have different PixelSpacing ({ref.spacing[::-1]} mm in slice 1, "
                f"{p.spacing[::-1]} mm in slice {k + 1}); one series must have one in-plane grid."
            )
    if not ref.spacing_known:
        warnings.warn(f"{where}: no PixelSpacing in the header; assuming 1 mm pixels", stacklevel=3)
    normal = ref.normal
    positions = np.stack([p.position for p in planes])
    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    dist_sorted = dist[order]
    pos_sorted = positions[order]
    n = len(planes)
    if n == 1:
        slice_step = normal * (ref.thickness or 1.0)
    else:
        gaps = np.diff(dist_sorted)
        extent = float(dist_sorted[-1] - dist_sorted[0])
        median_gap = float(np.median(gaps))
        tiny = max(1e-3, 1e-3 * float(min(ref.spacing)))
        dupes = np.flatnonzero(gaps < tiny)
        if len(dupes):
            where_dup = ", ".join(f"{dist_sorted[i]:.3f}" for i in dupes[:5])
            raise DataError(
                f"{where}: several frames share a position ({len(planes)} frames at "
                f"{len(planes) - len(dupes)} distinct positions; repeated at {where_dup} mm along the "
                "slice normal): the series holds several volumes (echoes, "
                "time points, b-values) or duplicated files. Split them into one folder per volume, or "
                "convert with dcm2niix, which writes one file per volume."
            )
        # tilt: every slice position must lie on the line through the first along the normal
        rel = pos_sorted - pos_sorted[0]
        off = np.linalg.norm(rel - np.outer(rel @ normal, normal), axis=1)
        tilt_tol = max(TILT_TOL_PIXELS * float(min(ref.spacing)), TILT_ATOL_MM)
        worst = int(np.argmax(off))
        if off[worst] > tilt_tol:
            travel = pos_sorted[-1] - pos_sorted[0]
            tilt = math.degrees(math.acos(float(np.clip(travel @ normal / np.linalg.norm(travel), -1, 1))))
            raise DataError(
                f"{where}: gantry tilt of {tilt:.2f} degrees: the slice positions advance along "
                f"{np.round(travel / np.linalg.norm(travel), 4).tolist()} (LPS) but the image planes' normal "
                f"is {np.round(normal, 4).tolist()}, so slice {worst + 1} lies {off[worst]:.3g} mm off the "
                f"stack axis (tolerance {tilt_tol:.3g} mm) and one affine cannot describe the stack. Convert "
                "with dcm2niix (it corrects gantry tilt by resampling) and load the NIfTI, or re-export the "
                "series without tilt."
            )
        bad = np.flatnonzero(np.abs(gaps - median_gap) > max(SPACING_RTOL * median_gap, SPACING_ATOL_MM))
        if len(bad):
            details = "; ".join(
                f"gap {gaps[i]:.4g} mm between slices at {dist_sorted[i]:.4f} and {dist_sorted[i + 1]:.4f} mm"
                + (
                    f" (~{round(gaps[i] / median_gap) - 1} missing slice(s))"
                    if gaps[i] > 1.5 * median_gap
                    else ""
                )
                for i in bad[:5]
            )
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise DataError(
                f"{where}: slice spacing is not uniform: expected every gap between consecutive slices "
                f"to be {median_gap:.4g} mm (the median gap, +-{100 * SPACING_RTOL:g} %), found "
                f"{details}{more} (positions along the slice normal). Check that the folder holds the "
                "complete series (re-export it), or convert with a tool that resamples irregular stacks "
                "(e.g. dcm2niix)."
            )
        slice_step = normal * (extent / (n - 1))
    lps = np.eye(4)
    lps[:3, 0] = ref.row * ref.spacing[0]
    lps[:3, 1] = ref.col * ref.spacing[1]
    lps[:3, 2] = slice_step
    lps[:3, 3] = pos_sorted[0]
    return order, _LPS_TO_RAS @ lps


def _stacked_series(
    folder: Path, series: DicomSeries, headers: list[Any]
) -> tuple[list[Path], list[Any], np.ndarray, list[tuple[float, float]]]:
    """Files and headers of a series of single-frame files in stack order, its affine and the
    rescale of every slice; refuses what one affine cannot describe (see the module docstring)."""
    multi = [p.name for p, ds in zip(series.files, headers, strict=True) if _n_frames(ds) > 1]
    if multi:
        raise DataError(
            f"{folder}: the series has {series.n_files} files of which {len(multi)} are multi-frame "
            f"({', '.join(multi[:3])}{'...' if len(multi) > 3 else ''}); series of several multi-frame "
            "files are not supported. Read one file with read_dicom_file, or convert with dcm2niix."
        )
    shapes = {
        (_whole(ds, "Rows", where=p), _whole(ds, "Columns", where=p))
        for p, ds in zip(series.files, headers, strict=True)
    }
    if len(shapes) > 1:
        raise DataError(
            f"{folder}: slices have different matrix sizes (Rows x Columns {sorted(shapes)}); one series "
            "must have one in-plane grid. The folder may mix several series with the same UID."
        )
    planes = [_classic_plane(ds, where=str(p)) for p, ds in zip(series.files, headers, strict=True)]
    order, affine = _stack_geometry(planes, where=str(folder))
    files = [series.files[i] for i in order]
    hdrs = [headers[i] for i in order]
    rescales = [_rescale(ds) for ds in hdrs]
    return files, hdrs, affine, rescales


def _check_stack_memory(folder: Path, headers: Sequence[Any], integral: bool) -> None:
    """Refuse a series whose slices, decoded and stacked, do not fit in the available memory (checked
    before the first slice is decoded; each file's own size is checked when it is read)."""
    ds = headers[0]
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 16) or 16)
    except (AttributeError, TypeError, ValueError):
        return  # decoding the first slice reports the broken header
    # GDCM gives float64 once a fractional rescale is applied
    stored = next((t for t in (np.uint8, np.uint16, np.uint32) if bits <= 8 * np.dtype(t).itemsize), None)
    dtype = np.dtype(stored if integral and stored is not None else np.float64)
    shape = (cols, rows, len(headers)) + ((samples,) if samples > 1 else ())
    # the decoded slices and their stack are held at once
    check_memory(folder, shape, dtype, copies=2)
