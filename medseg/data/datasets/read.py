"""Reading a discovered case: the image (channels stacked) and its label map or masks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medseg.errors import DataError
from medseg.io import label_dtype, load_volume
from medseg.labels import Mode
from medseg.types import Volume

if TYPE_CHECKING:
    from medseg.config import DataConfig
from medseg.data.datasets._common import (
    Case,
)
from medseg.data.datasets.grids import (
    _nearest_resize,
    grid_mismatches,
    mask_geometry_problems,
    squeeze_2d,
)


def _read(case: Case, path: Path, what: str) -> Volume:

    try:
        return load_volume(path)
    except DataError as exc:
        raise DataError(f"case {case.case_id}: cannot read {what}: {exc}") from exc


def load_case_masks(case: Case, structures: Sequence[str], reference: Volume) -> np.ndarray:
    """Read a case's structure masks as one stack on the image grid.

    Any nonzero value is foreground (SCR masks use 255). A 2D mask with another pixel grid size than
    the image (same field of view, e.g. half resolution) is resampled with nearest neighbour on the
    pixel-frame geometry: image pixel ``i`` takes mask pixel ``floor((i + 0.5) * mask_size / image_size)``.

    Args:
        case: The case.
        structures: Structure names, in channel order.
        reference: The case's image; defines the output grid.

    Returns:
        uint8 array of shape ``(S, *reference.spatial_shape)`` with values 0 and 1.

    Raises:
        DataError: A mask is missing or unreadable, its aspect ratio differs from the image's by more
            than 1 %, or (3D, or same size) its grid differs from the image's; names the case and file.
    """
    out = np.zeros((len(structures), *reference.spatial_shape), dtype=np.uint8)
    for i, s in enumerate(structures):
        path = case.masks.get(s)
        if path is None:
            raise DataError(
                f"case {case.case_id}: no mask for structure {s!r} (expected masks/{s}/{case.case_id}.png); "
                "run `medseg data check` to list every missing mask"
            )
        mask = _read(case, Path(path), f"mask of {s!r}")
        if reference.spatial_dims == 2:
            mask = squeeze_2d(mask)
        issues = mask_geometry_problems(reference, mask, what=f"mask {Path(path).name}")
        if issues:
            raise DataError(f"case {case.case_id}: {path}: {issues[0][1]}")
        fg = np.any(mask.array != 0, axis=0)
        out[i] = fg if fg.shape == reference.spatial_shape else _nearest_resize(fg, reference.spatial_shape)
    return out


def _stack_channels(case: Case, vols: list[Volume]) -> Volume:
    first = vols[0]
    if len(vols) == 1:
        return first
    for k, v in enumerate(vols[1:], start=1):
        issues = grid_mismatches(first, v, what=f"channel {k}", ref_what="channel 0")
        if issues:
            raise DataError(f"case {case.case_id}: {case.images[k]}: {issues[0][1]}")
    arr = np.concatenate([v.array for v in vols], axis=0)
    return Volume(arr, first.affine, {**first.meta, "source": [str(p) for p in case.images]})


def load_case(case: Case, data: DataConfig | None = None) -> tuple[Volume, Volume | None]:
    """Read a case: the image (channels stacked) and its label.

    Args:
        case: The case to read.
        data: The data config: ``spatial_dims`` (a 3D file with one slice is read as 2D when 2D is
            expected) and ``labels``/``structures`` (which kind of label to return). Without it the
            case's files decide: its label map if it has one, else its masks in sorted name order.

    Returns:
        ``(image, label)``. ``image`` is ``(C, X, Y[, Z])``. ``label`` is the exclusive label map
        ``(1, X, Y[, Z])`` (uint8/uint16), or for overlapping structures a uint8 0/1 stack
        ``(S, X, Y[, Z])`` in structure order on the image grid (``meta["structures"]`` names them);
        ``None`` for an unlabelled held-out (``split == "test"``) case.

    Raises:
        DataError: A training case has no label/masks, a file is unreadable or missing, channels or
            label lie on different grids, the label has non-integer values, or the image is not
            ``data.spatial_dims``-D; the message names the case and the file.
    """

    if not case.images:
        raise DataError(f"case {case.case_id}: no image files")
    vols = [_read(case, Path(p), f"image channel {k}") for k, p in enumerate(case.images)]
    if data is not None and data.spatial_dims == 2:
        vols = [squeeze_2d(v) for v in vols]
    image = _stack_channels(case, vols)
    if data is not None and image.spatial_dims != data.spatial_dims:
        raise DataError(
            f"case {case.case_id}: {case.images[0]}: image is {image.spatial_dims}D with shape "
            f"{image.spatial_shape} but data.spatial_dims is {data.spatial_dims}"
        )
    sigmoid = data.mode == Mode.SIGMOID if data is not None else (case.label is None and bool(case.masks))
    if sigmoid:
        if not case.masks and case.label is not None:
            raise DataError(
                f"case {case.case_id}: has a label map {case.label} but data.structures (overlapping "
                "masks) is configured; use data.labels for label maps"
            )
        if not case.masks and case.split == "test":
            return image, None  # unlabelled held-out case
        structures = list(data.structures or []) if data is not None else sorted(case.masks)
        stack = load_case_masks(case, structures, image)
        return image, Volume(stack, image.affine.copy(), {"structures": structures, "case": case.case_id})
    if case.label is None:
        if case.split == "test":
            return image, None  # unlabelled held-out case
        raise DataError(
            f"case {case.case_id}: training case without a label map; add it or move the case to the "
            "test split (run `medseg data check` to list every unpaired case)"
        )
    label = _read(case, Path(case.label), "label")
    if data is not None and data.spatial_dims == 2:
        label = squeeze_2d(label)
    if label.num_channels != 1:
        raise DataError(
            f"case {case.case_id}: {case.label}: a label map has one channel, got {label.num_channels} "
            f"(array shape {label.array.shape})"
        )
    issues = grid_mismatches(image, label)
    if issues:
        raise DataError(
            f"case {case.case_id}: {case.label}: {issues[0][1]}. "
            "Run `medseg data check` to list every affected case"
        )
    dtype = label_dtype(label.array, where=f"case {case.case_id}: {case.label}")
    if label.array.dtype != dtype:
        label = label.with_array(label.array.astype(dtype))
    return image, label
