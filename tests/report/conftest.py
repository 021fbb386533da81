"""Tiny phantoms for the report tests (hand-computable volumes and intensities)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medseg.labels import LabelLayout
from medseg.types import Volume

AFFINE = np.diag([1.0, 1.0, 2.5, 1.0])  # RAS, 1 x 1 x 2.5 mm


def phantom() -> tuple[Volume, Volume]:
    """12x10x8 scan at 1 x 1 x 2.5 mm (RAS).

    * label 1 (liver): the 4x4x4 cube [2:6, 2:6, 2:6], inside the field of view; its 64 voxels hold
      the values 0..63 (mean 31.5, population SD sqrt((64**2 - 1) / 12)); volume 64 * 2.5 mm³ = 0.16 mL.
    * label 2 (spleen): the 2x2x2 block [8:10, 4:6, 0:2], touching the first slice (z_min = inferior);
      value 100 everywhere; volume 8 * 2.5 mm³ = 0.02 mL.
    * label 3 (kidney) is named but absent. Background is -1000 HU (air).
    """
    img = np.full((1, 12, 10, 8), -1000, dtype=np.int16)
    lab = np.zeros((1, 12, 10, 8), dtype=np.uint8)
    img[0, 2:6, 2:6, 2:6] = np.arange(64, dtype=np.int16).reshape(4, 4, 4)
    lab[0, 2:6, 2:6, 2:6] = 1
    img[0, 8:10, 4:6, 0:2] = 100
    lab[0, 8:10, 4:6, 0:2] = 2
    meta = {"modality": "CT"}
    return Volume(img, AFFINE.copy(), dict(meta)), Volume(lab, AFFINE.copy(), {})


SPEC = LabelLayout("softmax", ("liver", "spleen", "kidney"), (1, 2, 3), "test")


@pytest.fixture
def ph() -> tuple[Volume, Volume]:
    """The :func:`phantom` (image, label map)."""
    return phantom()


@pytest.fixture
def spec() -> LabelLayout:
    """liver = 1, spleen = 2, kidney = 3 (absent from the phantom)."""
    return SPEC


@pytest.fixture
def scan_files(tmp_path: Path) -> dict[str, Path]:
    """The phantom written as NIfTI in ``tmp_path/in`` plus a JSON label map ``labels.json``."""
    from medseg.io import save_label_map, save_volume

    img, lab = phantom()
    inp = tmp_path / "in"
    save_volume(img, inp / "scan.nii.gz")
    save_label_map(lab, inp / "scan_seg.nii.gz")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"1": "liver", "2": "spleen", "3": "kidney"}))
    return {"image": inp / "scan.nii.gz", "mask": inp / "scan_seg.nii.gz", "labels": labels}
