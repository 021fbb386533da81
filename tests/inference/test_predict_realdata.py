"""`medseg predict` on real scans (MEDSEG_TEST_DATA): the outputs lie on exactly the grids of the
TotalSegmentator reference label maps, for a NIfTI CT and for the DICOM series."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from factories import build_plan

from medseg.cli.main import main
from medseg.data.plan import ChannelNorm
from medseg.io import load_volume
from medseg.types import same_physical_grid

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, save_run) -> Path:
    """A CT run directory with a tiny random network at 4 mm (weights do not change geometry)."""
    plan = build_plan(
        structure_names=("liver", "spleen"),
        label_values=(5, 1),
        target_spacing_mm=(4.0, 4.0, 4.0),
        patch_size=(32, 32, 16),
        normalization=(ChannelNorm("ct", -1000, 1000, 0, 400),),
    )
    return save_run(tmp_path_factory.mktemp("run"), plan)


def test_nifti_ct_output_has_the_reference_affine_and_shape(real_data: Path, tiny_run: Path, tmp_path: Path):
    base = real_data / "ct_totalsegmentator"
    out = tmp_path / "out"
    args = [
        "predict",
        "--model",
        str(tiny_run),
        "--input",
        str(base / "example_ct.nii.gz"),
        "--output",
        str(out),
    ]
    assert main([*args, "--no-progress"]) == 0
    pred = nib.load(out / "example_ct.nii.gz")
    ref = nib.load(base / "example_seg_fast_force_split.nii.gz")
    assert pred.shape == ref.shape
    np.testing.assert_array_equal(pred.affine, ref.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 5}


def test_dicom_output_lies_on_the_reference_grid(real_data: Path, tiny_run: Path, tmp_path: Path):
    base = real_data / "ct_totalsegmentator"
    out = tmp_path / "out"
    series = base / "example_ct_dicom"
    args = ["predict", "--model", str(tiny_run), "--input", str(series), "--output", str(out)]
    assert main([*args, "--no-progress", "--format", "both"]) == 0
    pred = load_volume(out / "example_ct_dicom.nii.gz")
    ref = load_volume(base / "example_seg_dicom.nii.gz")  # rows stored in the opposite order
    assert same_physical_grid(pred.spatial_shape, pred.affine, ref.spatial_shape, ref.affine, atol_mm=1e-3)
    assert pred.spatial_shape == load_volume(series).spatial_shape
    assert (out / "example_ct_dicom_seg.dcm").is_file()
