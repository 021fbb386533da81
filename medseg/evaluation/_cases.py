"""Inputs of ``medseg evaluate``: matching cases by name, loading each side, checking grids.

A *side* (prediction or reference) of one case is either an exclusive label map ``<case>.nii.gz``
(softmax models, most datasets) or a folder ``<case>/`` of one binary mask per structure,
``<structure>.nii.gz`` or ``.png`` (what ``medseg predict`` writes for sigmoid models). Every array
is checked against the *reference grid* (the geometry of the case's first reference file): the same
grid is used as is, the same voxels stored in another axis order or direction are reoriented, and
anything else is refused with both files named.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.errors import DataError
from medseg.io import case_id, label_dtype, load_volume
from medseg.types import Volume, orientation_code, same_physical_grid

logger = logging.getLogger(__name__)

MASK_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png")
GRID_ATOL_MM = 0.01  # voxel centres may differ by this much (1 % of a 1 mm voxel): header rounding


@dataclass(frozen=True)
class CasePair:
    """One case to evaluate: its name and the two inputs (``pred`` is None for a missing prediction)."""

    case: str
    pred: Path | None
    ref: Path


def image_suffix(path: Path) -> str | None:
    """The image suffix of a file name (``.nii.gz``, ``.png``, ...), or None if it is not an image."""
    name = path.name.lower()
    return next((s for s in MASK_SUFFIXES if name.endswith(s)), None)


def discover(root: Path, side: str) -> dict[str, Path]:
    """``{case: path}`` of a folder: label-map files ``<case>.nii.gz`` and mask folders ``<case>/``.

    Hidden entries (e.g. ``.case.tmp-123`` left by an interrupted ``medseg predict``) and non-image
    files (``predict.json``) are skipped.
    """

    found: dict[str, list[Path]] = {}
    for child in sorted(root.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            found.setdefault(child.name, []).append(child)
        elif image_suffix(child) is not None:
            found.setdefault(case_id(child), []).append(child)
    clashes = {c: ps for c, ps in found.items() if len(ps) > 1}
    if clashes:
        listing = "; ".join(f"{c}: {', '.join(p.name for p in ps)}" for c, ps in sorted(clashes.items()))
        raise DataError(
            f"--{side} {root}: several entries give the same case name ({listing}). Keep one label map "
            "<case>.nii.gz or one mask folder <case>/ per case."
        )
    return {c: ps[0] for c, ps in found.items()}


def match_cases(pred: Path, ref: Path, *, allow_missing: bool) -> tuple[list[CasePair], list[str]]:
    """Pair predictions with references by case name.

    Two files (or a file and a mask folder) form one case. Two folders are matched by
    :func:`medseg.io.case_id` of their entries.

    Returns:
        The pairs sorted by case, and the names of predictions that have no reference (not evaluated).

    Raises:
        DataError: An input does not exist, no case matches, or references have no prediction and
            `allow_missing` is False (the message lists them).
    """

    for what, p in (("pred", pred), ("ref", ref)):
        if not p.exists():
            raise DataError(f"--{what} {p}: no such file or folder")
    if pred.is_file() or ref.is_file():  # a single case; a folder on one side is its mask folder
        name = case_id(ref) if ref.is_file() else ref.name
        return [CasePair(name, pred, ref)], []
    preds, refs = discover(pred, "pred"), discover(ref, "ref")
    if not refs:
        raise DataError(
            f"--ref {ref}: no reference found; expected label maps <case>.nii.gz (or .nii, .nrrd, .mha, "
            ".png) or mask folders <case>/<structure>.nii.gz"
        )
    missing = sorted(set(refs) - set(preds))
    extra = sorted(set(preds) - set(refs))
    if missing and not allow_missing:
        shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
        raise DataError(
            f"{len(missing)} of {len(refs)} reference cases have no prediction in {pred}: {shown}. "
            "Predict them (`medseg predict`), point --pred at the right folder, or pass --allow-missing "
            "to score them as empty predictions (Dice 0 for every structure in the reference)."
        )
    if not set(refs) & set(preds) and not allow_missing:
        raise DataError(f"no case of --pred {pred} matches a case of --ref {ref}")
    if extra:
        logger.warning(
            "%d prediction(s) without a reference, not evaluated: %s", len(extra), ", ".join(extra)
        )
    return [CasePair(c, preds.get(c), refs[c]) for c in sorted(refs)], extra


# --------------------------------------------------------------------------- loading


@dataclass
class Grid:
    """The reference grid of a case: spatial shape, affine and the file they come from."""

    shape: tuple[int, ...]
    affine: np.ndarray
    path: Path

    @property
    def spacing_mm(self) -> tuple[float, ...]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, : len(self.shape)], axis=0))


@dataclass
class Side:
    """One side of a case: a label map (loaded) or a folder of mask files (loaded one at a time)."""

    path: Path
    label_map: np.ndarray | None = None  # (X, Y[, Z]) integer, on the reference grid
    mask_files: dict[str, Path] = field(default_factory=dict)
    missing: bool = False  # a missing prediction scored as empty (--allow-missing)

    @property
    def is_masks(self) -> bool:
        return self.label_map is None

    def mask(self, name: str, value: int | None, grid: Grid) -> np.ndarray:
        """Boolean mask of one structure on the reference grid (``label_map == value`` or its file)."""
        if self.missing:
            return np.zeros(grid.shape, dtype=bool)
        if self.label_map is not None:
            if value is None:
                raise DataError(f"{self.path}: no label value known for structure {name!r}")
            return self.label_map == value
        return load_mask(self.mask_files[name], grid)


def mask_files(folder: Path) -> dict[str, Path]:
    """``{structure: file}`` of a per-structure mask folder."""
    out = {}
    for f in sorted(folder.iterdir()):
        suffix = image_suffix(f)
        if f.is_file() and suffix is not None and not f.name.startswith("."):
            out[f.name[: -len(suffix)]] = f
    if not out:
        raise DataError(
            f"{folder}: a mask folder without masks; expected one file per structure, "
            "<structure>.nii.gz or <structure>.png (as `medseg predict` writes for overlapping structures)"
        )
    return out


def open_side(path: Path, grid: Grid | None) -> tuple[Side, Grid]:
    """Load a label-map file (or list a mask folder) and check it against `grid` (None: it defines it)."""

    if path.is_dir():
        files = mask_files(path)
        if grid is None:
            vol = load_volume(next(iter(files.values())))
            grid = Grid(vol.spatial_shape, vol.affine, next(iter(files.values())))
        return Side(path, mask_files=files), grid
    vol = load_volume(path)
    if vol.num_channels != 1:
        raise DataError(
            f"{path}: expected a label map with one channel, found {vol.num_channels} channels (shape "
            f"{vol.array.shape}). For overlapping structures use a folder <case>/<structure>.nii.gz."
        )
    if grid is None:
        grid = Grid(vol.spatial_shape, vol.affine, path)
    return Side(path, label_map=_as_labels(vol, path, grid)), grid


def load_mask(path: Path, grid: Grid) -> np.ndarray:
    """One structure's binary mask (nonzero = inside; PNG masks hold 0/255) on the reference grid."""

    vol = load_volume(path)
    arr = vol.array[0] if vol.num_channels == 1 else None
    if arr is None or (np.issubdtype(arr.dtype, np.floating) and not np.all(np.isin(arr, (0, 1)))):
        raise DataError(
            f"{path}: expected a binary mask (one channel, values 0/1 or 0/255), got shape "
            f"{vol.array.shape} dtype {vol.array.dtype}. Threshold probabilities first (e.g. > 0.5)."
        )
    return on_grid(arr != 0, vol, path, grid)


def _as_labels(vol: Volume, path: Path, grid: Grid) -> np.ndarray:

    arr = vol.array[0]
    if arr.dtype not in (np.uint8, np.uint16):
        arr = arr.astype(label_dtype(arr, where=str(path)))  # refuses fractional/negative labels
    return on_grid(arr, vol, path, grid)


def on_grid(arr: np.ndarray, vol: Volume, path: Path, grid: Grid) -> np.ndarray:
    """`arr` (on `vol`'s grid) on the reference grid: as is, reoriented, or refused with a clear error."""
    shape, affine = vol.spatial_shape, vol.affine
    if same_physical_grid(shape, affine, grid.shape, grid.affine, atol_mm=GRID_ATOL_MM):
        if shape == grid.shape and np.allclose(affine[:3, :3], grid.affine[:3, :3], atol=GRID_ATOL_MM):
            return arr
        out = _reorient(arr, affine, grid)
        if out is not None:
            return out
    raise DataError(grid_mismatch_message(path, shape, affine, grid))


def _reorient(arr: np.ndarray, affine: np.ndarray, grid: Grid) -> np.ndarray | None:
    """The same voxels stored in another axis order/direction, flipped and transposed onto `grid`."""

    if arr.ndim != 3:
        return None
    ornt = nib.orientations
    t = ornt.ornt_transform(ornt.io_orientation(affine), ornt.io_orientation(grid.affine))
    out = ornt.apply_orientation(arr, t)
    new_affine = affine @ ornt.inv_ornt_aff(t, arr.shape)
    if out.shape == grid.shape and np.allclose(new_affine, grid.affine, atol=GRID_ATOL_MM):
        return np.ascontiguousarray(out)
    return None


def grid_mismatch_message(path: Path, shape: tuple[int, ...], affine: np.ndarray, grid: Grid) -> str:
    """What differs between two grids, both files named, and how to fix it."""

    def describe(shape: tuple[int, ...], affine: np.ndarray) -> str:
        spacing = np.linalg.norm(affine[:3, : len(shape)], axis=0)
        code = orientation_code(affine)[: len(shape)]
        return (
            f"shape {tuple(shape)}, spacing {tuple(round(float(s), 4) for s in spacing)} mm, origin "
            f"{tuple(round(float(v), 3) for v in affine[:3, 3])} mm, orientation {code}"
        )

    return (
        f"{path} and {grid.path} are not on the same voxel grid:\n"
        f"  {path}: {describe(shape, affine)}\n"
        f"  {grid.path}: {describe(grid.shape, grid.affine)}\n"
        "Metrics compare voxel by voxel, so the prediction must lie on the reference's grid. Predict on "
        "the reference's own image with `medseg predict` (it writes labels on the input's grid), or "
        "resample the prediction onto the reference grid with nearest-neighbour interpolation."
    )
