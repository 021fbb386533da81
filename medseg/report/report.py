"""The clinician-facing organ-volume report of one scan: ``volumes.csv``, ``report.json``,
``report.html`` (self-contained: pictures embedded, no network access) and ``report.pdf``.

:func:`write_report` is the single entry point (``medseg report`` and ``medseg predict --report``).
The mask must lie on the scan's own grid (volumes are counted there); a mask stored with its axes in
another order or direction but covering the same voxel centres is reordered to the scan's storage
order, anything else is refused. Patient identifiers are never written: a DICOM ``PatientID`` appears
only as a pseudonym (:func:`medseg.names.pseudonym`: keyed by a site secret, or by a random key of
the run).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DataError
from medseg.io._atomic import atomic_write, ensure_writable_folder
from medseg.labels import LabelLayout, Mode, default_labels
from medseg.names import pseudonym
from medseg.report.figures import RowLayers, is_ct, overview_png, render_figures
from medseg.report.html import render_html
from medseg.report.table import StructureTable, structure_table, table_csv
from medseg.types import Volume, same_physical_grid

logger = logging.getLogger(__name__)

__all__ = ["write_report", "align_mask", "scan_facts", "pseudonym", "RESEARCH_NOTE"]

RESEARCH_NOTE = (
    "For research use only, not for diagnosis. Volumes come from an automatic segmentation that has not "
    "been checked by a clinician."
)
COMPLETENESS_NOTE = (
    "A structure that touches the edge of the scanned field of view is marked incomplete (with the sides "
    "it touches): its size is a lower bound. Structures of the label list with no voxel in the mask are "
    "listed as not found, not as 0."
)
PSEUDONYM_NOTE = (
    "first 16 hex digits of HMAC-SHA256(PatientID), keyed by the site's MEDSEG_PSEUDONYM_KEY (else by a "
    "random key of this run); the patient ID itself is not stored"
)


def write_report(
    image: Volume,
    mask: Volume,
    out_dir: Path,
    *,
    spec: LabelLayout | None = None,
    provenance: dict | None = None,
    pdf: bool = True,
    input_warnings: Sequence[str] = (),
) -> dict[str, Path]:
    """Write the organ-volume report of one scan into `out_dir`.

    Args:
        image: The scan on its original grid, ``(C, *spatial)`` (channel 0 is measured and shown).
        mask: On the image's grid (see :func:`align_mask`): an exclusive label map ``(1, *spatial)``, or
            per-structure binary masks ``(S, *spatial)`` with ``spec.mode == 'sigmoid'``.
        out_dir: Output folder (created); must not be the folder of the image or of the mask.
        spec: Structure names (:func:`medseg.labels.load_labels`); default ``label_<value>`` for the
            values present (label map) or ``structure_<k>`` (per-structure masks).
        provenance: Model provenance shown in the report, e.g. ``run_dir``, ``config_hash``,
            ``checkpoint``; ``medseg_version`` and ``created`` are filled in when absent.
        pdf: Also write ``report.pdf``.
        input_warnings: Why the scan may lie outside the model's training range (from prediction); shown
            prominently as "input outside the model's training range".

    Returns:
        ``{"csv": volumes.csv, "json": report.json, "html": report.html[, "pdf": report.pdf]}``.

    Raises:
        DataError: The mask is not on the image grid, its channels do not match `spec`, or `out_dir` is
            an input folder.
    """
    out_dir = Path(out_dir)
    _refuse_input_folder(out_dir, image, mask)
    mask = align_mask(image, mask)
    spec = _resolve_spec(spec, mask)
    ensure_writable_folder(out_dir)  # after the input checks (nothing is created for a refused input)
    table = structure_table(image, mask, spec)
    figs = render_figures(image, _row_layers(mask, spec, table), table)
    doc = _document(image, mask, table, figs.window, provenance)
    doc["input_warnings"] = list(input_warnings)
    doc["warnings"] = _report_warnings(image, spec, table)
    for text in doc["warnings"]:
        logger.warning("%s: %s", image.meta.get("source", "image"), text)

    paths = {
        k: out_dir / n for k, n in (("csv", "volumes.csv"), ("json", "report.json"), ("html", "report.html"))
    }
    _write_text(paths["csv"], table_csv(table))
    _write_text(paths["json"], json.dumps(doc, indent=2, allow_nan=False) + "\n")
    overview = overview_png(figs, table)
    _write_text(paths["html"], render_html(doc, table, figs, overview))
    if pdf:
        from medseg.report.pdf import write_pdf

        paths["pdf"] = out_dir / "report.pdf"
        with atomic_write(paths["pdf"]) as tmp:
            write_pdf(tmp, doc, table, figs, overview)
    logger.debug("report of %d structures -> %s", len(table.rows), out_dir)
    return paths


def align_mask(image: Volume, mask: Volume) -> Volume:
    """The mask on the image's voxel grid, or a :class:`DataError` that names both files.

    Identical grids pass unchanged. A mask covering the same voxel centres with its axes stored in
    another order or direction (e.g. LPS vs RAS) is transposed/flipped to the image's order (no
    interpolation). Any other difference is refused: volumes must be counted on the scan's grid.
    """
    if image.spatial_dims == mask.spatial_dims and image.spatial_shape == mask.spatial_shape:
        if np.allclose(image.affine, mask.affine, atol=1e-3):
            return mask
    if image.spatial_dims == mask.spatial_dims and same_physical_grid(
        image.spatial_shape, image.affine, mask.spatial_shape, mask.affine
    ):
        reordered = _reorder_axes(image, mask)
        if reordered is not None:
            logger.info("mask axes reordered to the image's storage order (%s)", image.orientation)
            return reordered
    raise DataError(
        f"mask {_src(mask)} is not on the grid of image {_src(image)}: image shape {image.spatial_shape}, "
        f"spacing {_fmt(image.spacing_mm)} mm, origin {_fmt(image.origin_mm)} mm, orientation "
        f"{image.orientation}; mask shape {mask.spatial_shape}, spacing {_fmt(mask.spacing_mm)} mm, origin "
        f"{_fmt(mask.origin_mm)} mm, orientation {mask.orientation}. Volumes are measured on the scan's own "
        "grid: pass the mask predicted for this scan (`medseg predict` writes it on the input's grid), or "
        "resample the mask onto the image grid with nearest-neighbour interpolation."
    )


def scan_facts(image: Volume) -> dict[str, Any]:
    """Scan facts for the report header: modality, geometry, dates and a pseudonymised patient ID.

    Never includes the patient's ID or name; ``patient_pseudonym`` is :func:`pseudonym` of the DICOM
    ``PatientID`` when there is one.
    """
    meta = image.meta
    ct, why = is_ct(image)
    modality = str(meta.get("modality") or "") or ("CT (by intensity range)" if ct else "unknown")
    facts: dict[str, Any] = {
        "source": Path(str(meta["source"])).name if meta.get("source") else None,
        "format": meta.get("format"),
        "modality": modality,
        "modality_basis": why,
        "spatial_dims": image.spatial_dims,
        "shape": list(image.spatial_shape),
        "spacing_mm": [round(s, 6) for s in image.spacing_mm],
        "field_of_view_mm": [
            round(n * s, 3) for n, s in zip(image.spatial_shape, image.spacing_mm, strict=True)
        ],
        "orientation": image.orientation if image.spatial_dims == 3 else "pixel frame (no patient axes)",
        "intensity_unit": "HU" if ct else "image units",
    }
    for key in ("acquisition_date", "study_date"):
        if meta.get(key):
            facts[key] = _date(str(meta[key]))
    if meta.get("patient_id"):
        facts["patient_pseudonym"] = pseudonym(str(meta["patient_id"]))
        facts["patient_pseudonym_method"] = PSEUDONYM_NOTE
    return facts


# ------------------------------------------------------------------------------------------------
# helpers


def _document(
    image: Volume, mask: Volume, table: StructureTable, window: str, provenance: dict | None
) -> dict[str, Any]:
    prov: dict[str, Any] = {k: _jsonable(v) for k, v in (provenance or {}).items()}
    if not prov.get("medseg_version"):
        from medseg._version import __version__

        prov["medseg_version"] = __version__
    prov.setdefault("created", _dt.datetime.now().astimezone().isoformat(timespec="seconds"))
    facts = scan_facts(image)
    return {
        "title": "Organ volume report",
        "note": RESEARCH_NOTE,
        "scan": facts,
        "mask": {"source": Path(str(mask.meta["source"])).name if mask.meta.get("source") else None},
        "units": {
            table.size_key: "mL" if table.spatial_dims == 3 else "cm²",
            "mean_intensity": facts["intensity_unit"],
            "std_intensity": facts["intensity_unit"],
        },
        "size_column": table.size_key,
        "size_note": (
            "volume = voxel count x voxel volume from the image header, on the scan's own grid"
            if table.spatial_dims == 3
            else "2D image: areas in cm² (pixel count x pixel area), not volumes"
        ),
        "completeness": COMPLETENESS_NOTE,
        "std_definition": "population standard deviation (ddof = 0) of the voxel values inside the structure",
        "display_window": window,
        "structures": table.records(),
        "not_found": table.not_found,
        "provenance": prov,
    }


def _report_warnings(image: Volume, spec: LabelLayout, table: StructureTable) -> list[str]:
    """What the reader of the report must know about how it was measured."""
    out = []
    if image.num_channels > 1:
        out.append(
            f"the image has {image.num_channels} channels (volumes); intensities are measured on the first "
            "and the pictures show it"
        )
    if spec.source != "default":
        undeclared = sorted(r.label for r in table.rows if spec.exclusive and r.label not in spec.values)
        if undeclared:
            out.append(
                f"label value(s) {undeclared} of the mask are not named by {spec.source}; they are "
                "reported as label_<value>"
            )
    arr = image.array[0]
    if arr.dtype.kind == "f":
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            out.append(
                f"{bad} voxel(s) of the image are NaN or infinite; intensity statistics leave them out"
            )
    return out


def _resolve_spec(spec: LabelLayout | None, mask: Volume) -> LabelLayout:
    if spec is None:
        if mask.num_channels == 1:
            arr = mask.array
            values = np.unique(arr[arr != 0]) if arr.dtype != bool else [1]
            return default_labels(int(v) for v in values)
        names = tuple(f"structure_{k}" for k in range(1, mask.num_channels + 1))
        return LabelLayout.overlapping(names)
    if spec.mode == Mode.SOFTMAX and mask.num_channels != 1:
        raise DataError(
            f"{_src(mask)}: {mask.num_channels} mask channels, but the label list ({spec.source}) describes "
            "an exclusive label map (one channel, one value per structure). Pass a label map, or labels for "
            "per-structure masks (a sigmoid run's plan.json)."
        )
    return spec


def _row_layers(mask: Volume, spec: LabelLayout, table: StructureTable) -> RowLayers:
    if spec.mode == Mode.SOFTMAX:
        labels = mask.array[0]
        values = [r.label for r in table.rows]
        lut = np.zeros((max(values) if values else 0) + 1, dtype=np.int32)
        lut[values] = np.arange(1, len(values) + 1)
        return RowLayers([labels], [lut])
    return RowLayers([mask.array[r.label - 1] for r in table.rows], list(range(1, len(table.rows) + 1)))


def _reorder_axes(image: Volume, mask: Volume) -> Volume | None:
    """Transpose/flip the mask's axes so that its affine equals the image's (same voxel centres)."""
    nd = image.spatial_dims
    cols_i = image.affine[:3, :nd].T
    cols_m = mask.affine[:3, :nd].T
    perm: list[int] = []
    flips: list[int] = []
    for i in range(nd):
        for j in range(nd):
            if j in perm or mask.spatial_shape[j] != image.spatial_shape[i]:
                continue
            if np.allclose(cols_i[i], cols_m[j], atol=1e-3) or image.spatial_shape[i] == 1:
                perm.append(j)
                break
            if np.allclose(cols_i[i], -cols_m[j], atol=1e-3):
                perm.append(j)
                flips.append(i + 1)
                break
        else:
            return None
    arr = np.flip(np.transpose(mask.array, (0, *[p + 1 for p in perm])), axis=tuple(flips))
    out = Volume(np.ascontiguousarray(arr), image.affine.copy(), dict(mask.meta))
    return (
        out
        if np.allclose(image.voxel_to_world(np.zeros(nd)), mask.voxel_to_world(_origin_in(mask, perm, flips)))
        else None
    )


def _origin_in(mask: Volume, perm: list[int], flips: list[int]) -> np.ndarray:
    """Index in the mask of the voxel that becomes index 0 after the reordering."""
    idx = np.zeros(mask.spatial_dims)
    for i, j in enumerate(perm):
        if i + 1 in flips:
            idx[j] = mask.spatial_shape[j] - 1
    return idx


def _refuse_input_folder(out_dir: Path, image: Volume, mask: Volume) -> None:
    out = out_dir.resolve()
    for what, vol in (("image", image), ("mask", mask)):
        src = vol.meta.get("source")
        if not src:
            continue
        p = Path(str(src)).resolve()
        folder = p if p.is_dir() else p.parent
        if out == folder or (p.is_dir() and folder in out.parents):
            raise DataError(
                f"--output {out_dir}: this is the folder of the input {what} ({src}); the report never "
                "writes into an input folder. Choose another output folder (e.g. a new folder next to it)."
            )


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _date(value: str) -> str:
    v = value.strip()
    return f"{v[:4]}-{v[4:6]}-{v[6:8]}" if len(v) >= 8 and v[:8].isdigit() else v


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, bool)) or v is None:
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


def _src(vol: Volume) -> str:
    return str(vol.meta.get("source") or "(in memory)")


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
