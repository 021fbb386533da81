"""The report of a real CT (TotalSegmentator example, ~41 structures) against SimpleITK's label
statistics; needs ``MEDSEG_TEST_DATA`` (skipped when unset)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.realdata


def test_totalsegmentator_example_report(real_data: Path, tmp_path: Path) -> None:
    import SimpleITK as sitk

    from medseg.cli.main import main

    d = real_data / "ct_totalsegmentator"
    ct, seg = d / "example_ct_sm.nii.gz", d / "example_seg.nii.gz"
    out = tmp_path / "report"
    rc = main(["report", "--image", str(ct), "--mask", str(seg), "--output", str(out),
               "--labels", f"{d / 'class_map_total.json'}:total"])  # fmt: skip
    assert rc == 0
    doc = json.loads((out / "report.json").read_text())
    names = json.loads((d / "class_map_total.json").read_text())["total"]

    lab_img = sitk.ReadImage(str(seg))
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(lab_img)
    stats = sitk.LabelIntensityStatisticsImageFilter()
    stats.Execute(lab_img, sitk.Cast(sitk.ReadImage(str(ct)), sitk.sitkFloat64))
    labels = sorted(int(v) for v in shape.GetLabels())
    assert len(labels) >= 40

    rows = {r["label"]: r for r in doc["structures"]}
    assert sorted(rows) == labels  # one row per structure present, none for absent ones
    for v in labels:
        r = rows[v]
        assert r["structure"] == names[str(v)]
        expected_ml = shape.GetPhysicalSize(v) / 1000.0
        assert r["volume_ml"] == pytest.approx(expected_ml, rel=1e-6), r["structure"]
        assert r["n_voxels"] == shape.GetNumberOfPixels(v)
        assert r["mean_intensity"] == pytest.approx(stats.GetMean(v), rel=1e-9, abs=1e-9)
        n = r["n_voxels"]
        sd_pop = stats.GetStandardDeviation(v) * np.sqrt((n - 1) / n) if n > 1 else 0.0  # ITK uses n - 1
        assert r["std_intensity"] == pytest.approx(sd_pop, rel=1e-6, abs=1e-6)
    assert len(doc["not_found"]) == len(names) - len(labels)
    # a 30-slice crop cuts the liver at both ends
    liver = next(r for r in doc["structures"] if r["structure"] == "liver")
    assert liver["complete"] is False and set(liver["incomplete_sides"]) <= {"inferior", "superior"}

    html = (out / "report.html").read_text()
    overlays = re.findall(r'<img class="structure-overlay" data-structure="([^"]+)"', html)
    assert sorted(overlays) == sorted(names[str(v)] for v in labels)
    assert not re.search(r"https?:", html)
    assert len(html) < 3_000_000  # about 0.6 MB for 41 structures
    assert (out / "report.pdf").stat().st_size > 10_000
