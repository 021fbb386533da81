"""What ``medseg predict`` writes for a case: label maps or per-structure mask folders (NIfTI or PNG),
the combined label map of overlapping structures, probabilities, DICOM SEG and the report.

Every path is joined with :func:`~medseg.names.safe_join` (names from the data never leave the output
folder) and every file is written atomically or under a temporary name renamed when complete, so an
interrupted run never leaves a half-written output that a later run would skip.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from medseg.data.canonical import oriented_view
from medseg.data.geometry import canonical_ornt
from medseg.data.plan import Plan
from medseg.io import is_dicom_file, save_label_map
from medseg.io._atomic import atomic_write, temp_tag
from medseg.io.dicom_seg import write_dicom_seg
from medseg.io.image2d import is_raster
from medseg.labels import Mode, label_dtype_for
from medseg.names import safe_join
from medseg.report import write_report
from medseg.runtime.bundle import Bundle
from medseg.types import Volume

__all__ = [
    "ProbabilityWriter",
    "combined_label_map",
    "output_extension",
    "output_path",
    "write_combined_labels",
    "write_prediction",
    "write_report_of",
    "write_seg",
]


def output_extension(path: Path, plan: Plan) -> str:
    """``.png`` for 2D raster or DICOM-radiograph inputs of a 2D model, else ``.nii.gz``."""
    if plan.spatial_dims == 2 and (is_raster(path) or is_dicom_file(path)):
        return ".png"
    return ".nii.gz"


def output_path(out_dir: Path, case: str, plan: Plan, ext: str) -> Path:
    """``<case><ext>`` (exclusive labels) or the folder ``<case>/`` of per-structure masks."""
    return safe_join(out_dir, f"{case}{ext}" if plan.mode == Mode.SOFTMAX else case)


def write_prediction(pred: Volume, plan: Plan, out_dir: Path, case: str, *, ext: str) -> list[Path]:
    """Write ``<case><ext>`` (exclusive labels) or ``<case>/<structure><ext>`` masks (overlapping).

    The mask folder is written under a temporary name and renamed when complete, so an interrupted
    run never leaves a half-written case that a later run would skip.
    """
    if plan.mode == Mode.SOFTMAX:
        return [save_label_map(pred, safe_join(out_dir, f"{case}{ext}"))]
    final = safe_join(out_dir, case)
    tmp = safe_join(out_dir, f".{case}.{temp_tag()}")
    shutil.rmtree(tmp, ignore_errors=True)
    scale = 255 if ext == ".png" else 1
    for k, name in enumerate(plan.structure_names):
        save_label_map(pred.with_array(pred.array[k : k + 1] * scale), safe_join(tmp, f"{name}{ext}"))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return [final / f"{name}{ext}" for name in plan.structure_names]


def combined_label_map(masks: np.ndarray) -> np.ndarray:
    """``(S, *shape)`` 0/1 masks of overlapping structures -> ``(1, *shape)`` label map.

    Structure ``k`` (0-based, the run's structure order) gets value ``k + 1``; where structures
    overlap, the one listed later wins (in the chest X-ray configs the clavicles, listed after the
    lungs, are drawn over them). uint8 up to 255 structures, else uint16.
    """
    n = masks.shape[0]
    out = np.zeros((1, *masks.shape[1:]), label_dtype_for(n))
    for k in range(n):
        out[0][masks[k] > 0] = k + 1
    return out


def write_combined_labels(pred: Volume, plan: Plan, out_dir: Path, case: str, *, ext: str) -> list[Path]:
    """``<case>_labels<ext>`` (:func:`combined_label_map` of a sigmoid model's masks) and
    ``<case>_labels.json`` naming the values and the overlap rule."""
    side = safe_join(out_dir, f"{case}_labels.json")
    info = {
        "labels": {str(k + 1): name for k, name in enumerate(plan.structure_names)},
        "background": 0,
        "overlap_rule": "where structures overlap, the one with the higher value (listed later) wins; the "
        f"per-structure masks in {case}/ keep every overlap",
    }
    with atomic_write(side) as tmp:  # first: a case counts as done only once the label map exists
        tmp.write_text(json.dumps(info, indent=2))
    path = save_label_map(
        pred.with_array(combined_label_map(pred.array)), safe_join(out_dir, f"{case}_labels{ext}")
    )
    return [path, side]


class ProbabilityWriter:
    """Writes the probabilities of one scan, float16 ``(K, *shape)`` in the input's storage order, to
    ``<case>_probabilities.npy`` (a memory-mappable ``.npy``) as the engine finalises them, plus
    ``<case>_probabilities.json`` (channel names, affine). Voxels outside the body crop are background.

    NIfTI has no float16 type, hence ``.npy``; it is written under a temporary name and renamed by
    :meth:`close`, so a crash never leaves a file that looks complete.
    """

    def __init__(self, out_dir: Path, case: str, image: Volume, plan: Plan) -> None:
        self.final = safe_join(out_dir, f"{case}_probabilities.npy")
        self.tmp = safe_join(out_dir, f".{case}_probabilities.{temp_tag()}.npy")
        shape = (plan.out_channels, *image.spatial_shape)
        try:
            # Fortran order: slabs along the last axis are contiguous in the file, as the engine writes
            self.mm = np.lib.format.open_memmap(
                self.tmp, mode="w+", dtype=np.float16, shape=shape, fortran_order=True
            )
        except BaseException:  # interrupted (SIGTERM) while the file is being made: none stays behind
            self.tmp.unlink(missing_ok=True)
            raise
        if plan.mode == Mode.SOFTMAX:
            self.mm[0] = 1.0
        self.view = oriented_view(self.mm, canonical_ornt(image.affine, image.spatial_dims))
        self.sidecar = {
            "channels": list(plan.labels.channel_names),
            "mode": plan.mode,
            "shape": list(shape),
            "affine": image.affine.tolist(),
            "order": "channel first, then the input file's own voxel order",
        }

    def __call__(self, box: tuple[slice, ...], probs: np.ndarray) -> None:
        self.view[(slice(None), *box)] = np.moveaxis(probs, 0, -1)

    def close(self) -> list[Path]:
        self.mm.flush()
        del self.mm, self.view
        os.replace(self.tmp, self.final)
        side = self.final.with_suffix(".json")
        with atomic_write(side) as tmp:
            tmp.write_text(json.dumps(self.sidecar, indent=2))
        return [self.final, side]

    def abort(self) -> None:
        self.tmp.unlink(missing_ok=True)


def write_seg(
    pred: Volume,
    bundle: Bundle,
    series_dir: Path,
    path: Path,
    *,
    series_uid: str | None = None,
    anonymize: bool = False,
) -> Path:
    """``<case>_seg.dcm``: a DICOM SEG of the prediction referencing the input series (``anonymize``:
    pseudonymous patient identifiers only)."""
    plan = bundle.plan
    values = plan.label_values if plan.mode == Mode.SOFTMAX else None
    names = plan.structure_names
    return write_dicom_seg(
        pred, series_dir, path, names=names, values=values, series_uid=series_uid, anonymize=anonymize
    )


def write_report_of(
    image: Volume, pred: Volume, bundle: Bundle, out: Path, input_warnings: Sequence[str] = ()
) -> list[Path]:
    """``<case>_report/``: the organ-volume report of the prediction, with the model's provenance."""
    plan = bundle.plan
    spec = replace(plan.labels, source=str(bundle.path / "plan.json"))
    prov = bundle.provenance()
    provenance = {"run_dir": prov.pop("model"), **prov}
    report = write_report(image, pred, out, spec=spec, provenance=provenance, input_warnings=input_warnings)
    return list(report.values())
