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

from medseg.io.dicom_seg._common import GRID_TOL_VOXELS, SEG_SOP_CLASS_UIDS
from medseg.io.dicom_seg.read import read_dicom_seg
from medseg.io.dicom_seg.write import write_dicom_seg

__all__ = ["write_dicom_seg", "read_dicom_seg", "GRID_TOL_VOXELS", "SEG_SOP_CLASS_UIDS"]
