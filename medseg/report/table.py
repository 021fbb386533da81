"""The organ table of the clinician report: one row per structure present in a mask.

Per structure: voxel count, volume in mL (3D; ``n_voxels * prod(spacing_mm) / 1000`` on the scan's own
grid, see :func:`medseg.metrics.volume.volume_ml`) or area in cm² (2D images have no volume), mean and
standard deviation of the image intensity inside it (HU for CT; population standard deviation,
``ddof=0``), its centre voxel (for the overlays) and whether it is **complete**: a structure whose
bounding box reaches a face of the scanned field of view is cut by it, so its size is a lower bound.
It is flagged ``complete = False`` with the sides it touches, never reported as 0 and never silently as
complete. Sides are named anatomically from the affine (``inferior``, ``left``, ...) for 3D scans, and
as image edges (``top``, ``left``, ...) for 2D images, which have no patient frame.

Structures named by the label spec but absent from the mask are listed separately as *not found*; they
get no row in the volume table.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from medseg.errors import DataError
from medseg.labels import LabelLayout, Mode
from medseg.metrics.volume import AXIS_NAMES, touches_border, touches_border_labels, volume_ml
from medseg.names import spreadsheet_safe
from medseg.types import Volume

__all__ = [
    "StructureRow",
    "StructureTable",
    "anatomical_side",
    "format_intensity",
    "structure_table",
    "table_csv",
]

_SIDE_WORDS = {"R": "right", "L": "left", "A": "anterior", "P": "posterior", "S": "superior", "I": "inferior"}
_FLIP = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}
# 2D raster/projection images live in a pixel frame: x along columns (left to right), y along rows (down).
_EDGE_2D = {"x_min": "left edge", "x_max": "right edge", "y_min": "top edge", "y_max": "bottom edge"}
_CHUNK_VOXELS = 1 << 22

#: Columns of ``volumes.csv``, in order (``size`` is ``volume_ml`` for 3D and ``area_cm2`` for 2D).
CSV_COLUMNS = (
    "structure",
    "label",
    "{size}",
    "n_voxels",
    "mean_intensity",
    "std_intensity",
    "complete",
    "incomplete_sides",
    "border_sides",
)


@dataclass(frozen=True)
class StructureRow:
    """One structure present in the mask.

    Attributes:
        structure: Name from the label spec (``label_<v>`` when unnamed).
        label: Label value (exclusive label map) or 1-based channel position (per-structure masks).
        n_voxels: Voxels (pixels for 2D) of the structure.
        size: Volume in mL (3D) or area in cm² (2D); see :attr:`StructureTable.size_key`.
        mean_intensity: Mean image value inside the structure (HU for CT).
        std_intensity: Population standard deviation of the image values inside it.
        complete: False when the structure touches the edge of the field of view.
        incomplete_sides: Anatomical sides (3D) or image edges (2D) it touches, e.g. ``["inferior"]``.
        border_sides: The same sides as voxel-axis names (``z_min``; see ``medseg.metrics.volume``).
        centre: Voxel index of its centre (centre of mass, snapped to a voxel inside the structure).
        bbox: ``(start, stop)`` voxel index pairs of its bounding box, per spatial axis.
    """

    structure: str
    label: int
    n_voxels: int
    size: float
    mean_intensity: float
    std_intensity: float
    complete: bool
    incomplete_sides: list[str] = field(default_factory=list)
    border_sides: list[str] = field(default_factory=list)
    centre: tuple[int, ...] = ()
    bbox: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class StructureTable:
    """All rows of a report, plus the structures of the label spec that the mask does not contain.

    Attributes:
        rows: Structures present, in label order.
        not_found: Names of structures of the spec with no voxel in the mask.
        spatial_dims: 2 (areas in cm²) or 3 (volumes in mL).
    """

    rows: list[StructureRow]
    not_found: list[str]
    spatial_dims: int

    @property
    def size_key(self) -> str:
        """``volume_ml`` (3D) or ``area_cm2`` (2D): the name of the size column."""
        return "volume_ml" if self.spatial_dims == 3 else "area_cm2"

    def records(self) -> list[dict[str, Any]]:
        """Rows as JSON-able dicts with the size under :attr:`size_key` (``report.json``)."""
        out = []
        for row in self.rows:
            d = asdict(row)
            d[self.size_key] = d.pop("size")
            d["centre"] = list(row.centre)
            d["bbox"] = [list(b) for b in row.bbox]
            out.append({k: _json_float(v) for k, v in d.items()})
        return out


def anatomical_side(axis_side: str, affine: np.ndarray, spatial_dims: int = 3) -> str:
    """The anatomical side (3D) or image edge (2D) of a voxel-axis side such as ``z_min``.

    Args:
        axis_side: ``x_min``, ``x_max``, ``y_min``, ... (as returned by ``touches_border``).
        affine: 4x4 voxel-to-RAS affine of the grid.
        spatial_dims: 3 for scans in patient space, 2 for images in the pixel frame.

    Returns:
        E.g. ``"inferior"`` for ``z_min`` of an RAS volume, ``"top edge"`` for ``y_min`` of a 2D image.

    Example:
        >>> anatomical_side("z_min", np.eye(4)), anatomical_side("x_max", np.diag([-1, -1, 1, 1]))
        ('inferior', 'left')
    """
    if spatial_dims == 2:
        return _EDGE_2D[axis_side]

    axis = AXIS_NAMES.index(axis_side[0])
    code = nib.orientations.aff2axcodes(np.asarray(affine))[axis]  # where increasing index points to
    letter = code if axis_side.endswith("_max") else _FLIP[code]
    return _SIDE_WORDS[letter]


def structure_table(image: Volume, mask: Volume, spec: LabelLayout) -> StructureTable:
    """Measure every structure of `mask` on the grid of `image`.

    Args:
        image: Scan, ``(C, *spatial)``; channel 0 gives the intensities.
        mask: On the image's grid: an exclusive label map ``(1, *spatial)`` (``spec.mode == 'softmax'``)
            or per-structure binary masks ``(S, *spatial)`` (``'sigmoid'``, channel ``k`` is structure
            ``spec.names[k]``; any nonzero value is inside).
        spec: Structure names. Label values present in a label map but not named by the spec get a
            row named ``label_<value>``, so no structure is ever dropped silently.

    Returns:
        The table: rows for structures present, names of the spec's structures that are absent.

    Raises:
        DataError: If the mask is not an integer label map with values >= 0 (softmax), or its channel
            count differs from the number of structures (sigmoid).
    """
    intensity = image.array[0]
    nd = image.spatial_dims
    spacing = image.spacing_mm
    if spec.mode == Mode.SOFTMAX:
        raw = _stats_label_map(mask.array[0], intensity, spec, mask.meta.get("source", "mask"))
    else:
        raw = _stats_channels(mask.array, intensity, spec, mask.meta.get("source", "mask"))
    rows = []
    for name, label, n, mean, std, sides, centre, bbox in raw:
        size = volume_ml(n, spacing) if nd == 3 else n * math.prod(spacing) / 100.0
        rows.append(
            StructureRow(
                structure=name,
                label=label,
                n_voxels=n,
                size=size,
                mean_intensity=mean,
                std_intensity=std,
                complete=not sides,
                incomplete_sides=[anatomical_side(s, image.affine, nd) for s in sides],
                border_sides=sides,
                centre=centre,
                bbox=bbox,
            )
        )
    present = {r.structure for r in rows}
    not_found = [n for n in spec.names if n not in present]
    return StructureTable(rows=rows, not_found=not_found, spatial_dims=nd)


def format_intensity(value: float) -> str:
    """A mean or std for the tables: one decimal, or a dash when undefined (no finite voxel)."""
    return f"{value:.1f}" if math.isfinite(value) else "–"


def table_csv(table: StructureTable) -> str:
    """``volumes.csv`` text: the columns of :data:`CSV_COLUMNS`, one row per structure present."""
    buf = io.StringIO()
    columns = [c.format(size=table.size_key) for c in CSV_COLUMNS]
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in table.rows:
        writer.writerow(
            [
                spreadsheet_safe(row.structure),  # names come from label maps: never a formula
                row.label,
                f"{row.size:.6g}" if math.isfinite(row.size) else "",
                row.n_voxels,
                f"{row.mean_intensity:.6g}" if math.isfinite(row.mean_intensity) else "",
                f"{row.std_intensity:.6g}" if math.isfinite(row.std_intensity) else "",
                "true" if row.complete else "false",
                ";".join(row.incomplete_sides),
                ";".join(row.border_sides),
            ]
        )
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# measurement

_Raw = tuple[str, int, int, float, float, list[str], tuple[int, ...], tuple[tuple[int, int], ...]]


def _stats_label_map(labels: np.ndarray, intensity: np.ndarray, spec: LabelLayout, where: str) -> list[_Raw]:
    """One pass over a label map: counts, intensity sums (two passes for a stable std), boxes."""
    labels = _as_label_array(labels, where)
    present = [int(v) for v in np.unique(labels) if v != 0]
    if not present:
        return []
    lut = np.zeros(max(present) + 1, dtype=np.int32)  # value -> compact index (1..K), 0 elsewhere
    lut[present] = np.arange(1, len(present) + 1, dtype=np.int32)
    k = len(present) + 1
    n = np.zeros(k, dtype=np.int64)  # voxels (the volume)
    n_finite = np.zeros(k, dtype=np.int64)  # voxels with a finite intensity (the statistics)
    total = np.zeros(k, dtype=np.float64)
    for lab, img in _slabs(labels, intensity):
        idx = lut[lab].ravel()
        n += np.bincount(idx, minlength=k)
        idx, values = _finite(idx, img)
        n_finite += np.bincount(idx, minlength=k)
        total += np.bincount(idx, weights=values, minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n_finite > 0, total / np.maximum(n_finite, 1), np.nan)
    sq = np.zeros(k, dtype=np.float64)
    for lab, img in _slabs(labels, intensity):
        idx, values = _finite(lut[lab].ravel(), img)
        sq += np.bincount(idx, weights=(values - mean[idx]) ** 2, minlength=k)
    std = np.where(n_finite > 0, np.sqrt(sq / np.maximum(n_finite, 1)), np.nan)
    sides = touches_border_labels(labels, present)
    boxes = ndi.find_objects(lut[labels], max_label=len(present))
    out = []
    for i, value in enumerate(present, start=1):
        box = boxes[i - 1]
        centre = _centre(labels[box] == value, box)
        out.append(
            (
                spec.name_of(value),
                value,
                int(n[i]),
                float(mean[i]),
                float(std[i]),
                sides[value],
                centre,
                tuple((int(s.start), int(s.stop)) for s in box),
            )
        )
    return out


def _stats_channels(masks: np.ndarray, intensity: np.ndarray, spec: LabelLayout, where: str) -> list[_Raw]:
    if masks.shape[0] != len(spec.names):
        raise DataError(
            f"{where}: {masks.shape[0]} mask channel(s) but the label spec ({spec.source}) names "
            f"{len(spec.names)} structures {list(spec.names)[:5]}...; pass the --labels that belong to "
            "these masks (one name per mask, in channel order)."
        )
    out = []
    for k, (name, value) in enumerate(zip(spec.names, spec.values, strict=True)):
        m = masks[k] != 0
        (box,) = ndi.find_objects(m.view(np.uint8) if m.dtype == bool else m.astype(np.uint8), max_label=1)
        if box is None:
            continue
        inside = intensity[box][m[box]].astype(np.float64)
        finite = inside[np.isfinite(inside)]
        out.append(
            (
                name,
                int(value),
                int(inside.size),
                float(finite.mean()) if finite.size else math.nan,
                float(finite.std()) if finite.size else math.nan,
                touches_border(m),
                _centre(m[box], box),
                tuple((int(s.start), int(s.stop)) for s in box),
            )
        )
    return out


def _finite(idx: np.ndarray, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Structure indices and float64 intensities of the voxels whose intensity is finite (NaN or
    infinite voxels count in a structure's volume, not in its mean and std)."""
    values = img.ravel().astype(np.float64)
    ok = np.isfinite(values)
    return (idx, values) if ok.all() else (idx[ok], values[ok])


def _centre(crop: np.ndarray, box: tuple[slice, ...]) -> tuple[int, ...]:
    """Centre of mass of a binary crop, snapped to the nearest voxel inside it, in full-grid indices."""
    com = np.array(ndi.center_of_mass(crop))
    snapped = np.rint(com).astype(int)
    if not crop[tuple(snapped)]:
        pts = np.argwhere(crop)
        snapped = pts[np.argmin(((pts - com) ** 2).sum(axis=1))]
    return tuple(int(c + s.start) for c, s in zip(snapped, box, strict=True))


def _as_label_array(labels: np.ndarray, where: str) -> np.ndarray:
    if labels.dtype == bool:
        return labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        if not (np.all(np.isfinite(labels)) and np.all(np.mod(labels, 1) == 0)):
            raise DataError(
                f"{where}: a label map must hold whole numbers (one value per structure), found "
                f"fractional or NaN values (dtype {labels.dtype}). Pass the label map, not probabilities."
            )
        labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise DataError(f"{where}: label values must be >= 0, found {labels.min()}")
    return labels


def _slabs(labels: np.ndarray, intensity: np.ndarray):  # noqa: ANN202 - private generator
    step = max(1, _CHUNK_VOXELS // max(1, math.prod(labels.shape[1:])))
    for start in range(0, labels.shape[0], step):
        yield labels[start : start + step], intensity[start : start + step]


def _json_float(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
