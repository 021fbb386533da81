"""A scan in the canonical (closest to RAS) voxel order, read slab by slab without copying it.

Preprocessing (eager for the training cache, lazy for prediction) and the prediction writers see every
scan through these views: :func:`oriented_view` reorders axes by a nibabel orientation transform
without a copy, and :class:`CanonicalSlabs` reads rows along the canonical last axis either from an
array in memory or block by block from a file reader, so no reoriented copy of a large scan exists.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import nibabel as nib
import numpy as np

from medseg.data.geometry import canonical_ornt, oriented_affine

__all__ = ["SLAB_BYTES", "CanonicalSlabs", "canonical_grid", "oriented_view"]

SLAB_BYTES = 128 * 2**20
"""Working-set target of one slab of the scan (or of one finalisation chunk of prediction)."""


def oriented_view(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """A view of a ``(C, *spatial)`` array reoriented by a nibabel orientation transform (no copy).

    Writing into the view writes into ``array``: this is how results are placed into the input's
    storage order without a reoriented copy.
    """

    if array.ndim - 1 == 2:
        return array
    moved = np.moveaxis(array, 0, -1)
    return np.moveaxis(nib.orientations.apply_orientation(moved, ornt), -1, 0)


class CanonicalSlabs:
    """Slabs along the canonical (RAS) last axis of a scan, from memory or lazily from its file.

    ``image`` is a :class:`~medseg.types.Volume` or a 3D object with the same geometry attributes and
    a ``read_block(index)`` method giving the voxels ``[index]`` (three slices in storage order) as
    ``(1, nx, ny, nz)`` (:class:`medseg.io.nifti.NiftiSlabs`, :class:`medseg.io.dicom.DicomSlabs`,
    which never hold the whole scan). A canonical slab is read as the matching box of the stored
    scan, whichever storage axis is the canonical last one (axial, sagittal or coronal storage).
    """

    def __init__(self, image: Any, ornt: np.ndarray, canonical_shape: Sequence[int]) -> None:
        self.ornt = np.asarray(ornt)
        self.channels = image.num_channels
        self.shape = tuple(int(n) for n in canonical_shape)
        self.stored_shape = tuple(int(n) for n in image.spatial_shape)
        reader = getattr(image, "read_block", None)
        self.reader = reader if image.spatial_dims == 3 else None
        self.view = None
        if self.reader is None:
            array = image.array if reader is None else image.load().array
            self.view = oriented_view(array, self.ornt)

    def slab(self, z0: int, z1: int, inplane: Sequence[slice] | None = None) -> np.ndarray:
        """Canonical rows ``z0:z1`` as ``(C, *inplane, z1 - z0)`` (a view when held in memory)."""
        if self.view is not None:
            out = self.view[..., z0:z1]
            return out if inplane is None else out[(slice(None), *inplane, slice(None))]
        wanted = [*(inplane or (slice(0, n) for n in self.shape[:-1])), slice(z0, z1)]
        index = []
        for (axis, flip), n in zip(self.ornt, self.stored_shape, strict=True):
            start, stop, _ = wanted[int(axis)].indices(self.shape[int(axis)])
            want = slice(start, stop)
            index.append(slice(n - want.stop, n - want.start) if flip < 0 else want)
        return oriented_view(self.reader(tuple(index)), self.ornt)

    def slabs(
        self, inplane: Sequence[slice] | None = None, z: slice | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(z0, slab)`` over rows ``z`` (default all) in chunks of about ``SLAB_BYTES`` as float32."""
        z = z or slice(0, self.shape[-1])
        plane = math.prod(s.stop - s.start for s in inplane) if inplane else math.prod(self.shape[:-1])
        step = max(1, int(SLAB_BYTES // max(1, 4 * plane * self.channels)))
        for z0 in range(z.start, z.stop, step):
            yield z0, self.slab(z0, min(z.stop, z0 + step), inplane)


def canonical_grid(image: Any) -> tuple[np.ndarray, tuple[int, ...], tuple[float, ...]]:
    """``(ornt, shape, spacing_mm)`` of ``image``'s grid in the canonical (closest to RAS) order."""
    ornt = np.asarray(canonical_ornt(image.affine, image.spatial_dims))
    shape = [0] * image.spatial_dims
    for i, (j, _) in enumerate(ornt):
        shape[int(j)] = int(image.spatial_shape[i])
    aff = oriented_affine(image.affine, ornt, image.spatial_shape)
    spacing = tuple(float(np.linalg.norm(aff[:3, i])) for i in range(image.spatial_dims))
    return ornt, tuple(shape), spacing
