"""Post-processing of predicted label maps on the scan's own grid (all optional, from the config).

* ``data.single_component``: structures that are one connected object (liver, spleen, ...) keep
  only their largest connected component;
* ``predict.min_component_mm3``: connected components smaller than this volume are removed;
* ``predict.fill_holes``: holes inside a structure (background voxels it encloses) are filled.

Removed voxels become background. Each structure is processed inside its own bounding box
(``scipy.ndimage.find_objects``), so the cost does not grow with the number of structures times the
volume size. Connectivity is full (26 neighbours in 3D, 8 in 2D), so thin oblique structures stay one
object.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from medseg.runtime.bundle import PostProcessing

__all__ = ["PostProcessing", "postprocess_label_map", "postprocess_masks"]


def _clean(mask: np.ndarray, *, largest: bool, min_voxels: float, fill: bool) -> np.ndarray:
    """Apply the steps to one binary mask (a crop) and return the new mask."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    if largest or min_voxels > 0:
        comp, n = ndimage.label(mask, structure=structure)
        if n > 0:
            sizes = np.bincount(comp.ravel())[1:]
            keep = np.zeros(n + 1, bool)
            keep[1:] = sizes >= min_voxels
            if largest:
                only = np.zeros(n + 1, bool)
                only[1 + int(np.argmax(sizes))] = keep[1 + int(np.argmax(sizes))]
                keep = only
            mask = keep[comp]
    if fill:
        mask = ndimage.binary_fill_holes(mask)
    return mask


def postprocess_label_map(
    labels: np.ndarray,
    values: Sequence[int],
    names: Sequence[str],
    spacing_mm: Sequence[float],
    pp: PostProcessing,
) -> np.ndarray:
    """Post-process an exclusive label map ``(1, *spatial)`` in place-safe fashion (returns a copy).

    Hole filling only claims background voxels, never another structure's.
    """
    out = labels.copy()
    if not pp.active:
        return out
    lab = out[0]
    voxel_mm3 = float(np.prod(spacing_mm))
    min_voxels = pp.min_component_mm3 / voxel_mm3 if voxel_mm3 > 0 else 0.0
    boxes = ndimage.find_objects(lab) if lab.size and lab.max() > 0 else []
    for value, name in zip(values, names, strict=True):
        if value > len(boxes) or boxes[value - 1] is None:
            continue
        box = boxes[value - 1]  # an enclosed hole lies inside the structure's bounding box
        crop = lab[box]
        mask = crop == value
        new = _clean(mask, largest=name in pp.single, min_voxels=min_voxels, fill=pp.fill_holes)
        crop[mask & ~new] = 0
        crop[new & (crop == 0)] = value
    return out


def postprocess_masks(
    masks: np.ndarray, names: Sequence[str], spacing_mm: Sequence[float], pp: PostProcessing
) -> np.ndarray:
    """Post-process overlapping binary masks ``(S, *spatial)`` channel by channel (returns a copy)."""
    out = masks.copy()
    if not pp.active:
        return out
    voxel_mm3 = float(np.prod(spacing_mm))
    min_voxels = pp.min_component_mm3 / voxel_mm3 if voxel_mm3 > 0 else 0.0
    for k, name in enumerate(names):
        objs = ndimage.find_objects(out[k].astype(np.uint8))
        if not objs or objs[0] is None:
            continue
        box = objs[0]
        crop = out[k][box]
        crop[...] = _clean(crop > 0, largest=name in pp.single, min_voxels=min_voxels, fill=pp.fill_holes)
    return out
