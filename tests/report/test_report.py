"""write_report and `medseg report`: files, self-contained HTML, PDF, grids, DICOM pseudonyms, 2D images."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import DataError
from medseg.labels import LabelLayout
from medseg.report import pseudonym, write_report
from medseg.types import Volume


class _Tags(HTMLParser):
    """Every start tag with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(html: str) -> list[tuple[str, dict[str, str | None]]]:
    p = _Tags()
    p.feed(html)
    return p.tags


def _pdf_pages(path: Path) -> int:
    return len(re.findall(rb"/Type\s*/Page\b(?!s)", path.read_bytes()))


def test_write_report_files_and_json(ph: tuple[Volume, Volume], spec: LabelLayout, tmp_path: Path) -> None:
    img, lab = ph
    paths = write_report(
        img, lab, tmp_path / "out", spec=spec, provenance={"run_dir": "runs/a", "config_hash": "abc"}
    )
    assert set(paths) == {"csv", "json", "html", "pdf"} and all(p.is_file() for p in paths.values())
    doc = json.loads(paths["json"].read_text())
    rows = {r["structure"]: r for r in doc["structures"]}
    assert set(rows) == {"liver", "spleen"} and doc["not_found"] == ["kidney"]
    assert rows["liver"]["volume_ml"] == pytest.approx(0.16) and rows["liver"]["complete"] is True
    assert rows["spleen"]["complete"] is False and rows["spleen"]["incomplete_sides"] == ["inferior"]
    assert doc["units"] == {"volume_ml": "mL", "mean_intensity": "HU", "std_intensity": "HU"}
    assert doc["scan"]["modality"] == "CT" and doc["scan"]["shape"] == [12, 10, 8]
    prov = doc["provenance"]
    assert prov["run_dir"] == "runs/a" and prov["config_hash"] == "abc"
    assert prov["medseg_version"] and re.match(r"\d{4}-\d\d-\d\dT", prov["created"])
    assert "research use" in doc["note"].lower() and "not for diagnosis" in doc["note"]
    assert not list((tmp_path / "out").glob(".*tmp*"))  # atomic writes leave no temporary file


def test_html_is_self_contained(ph: tuple[Volume, Volume], spec: LabelLayout, tmp_path: Path) -> None:
    img, lab = ph
    html = write_report(img, lab, tmp_path / "out", spec=spec, pdf=False)["html"].read_text()
    assert not re.search(r"https?:|//[a-z0-9.-]+\.[a-z]{2,}/", html, re.IGNORECASE)  # no URL at all
    tags = _tags(html)
    imgs = [a for t, a in tags if t == "img"]
    assert len(imgs) == 1 + 2  # overview + one per structure present
    assert all((a.get("src") or "").startswith("data:image/png;base64,") for a in imgs)
    assert not [t for t, _ in tags if t in ("script", "link", "iframe", "object", "embed")]
    assert all(not (a.get("href") or "") for _, a in tags)
    overlays = {a["data-structure"] for a in imgs if a.get("class") == "structure-overlay"}
    assert overlays == {"liver", "spleen"}
    rows = [a["data-structure"] for t, a in tags if t == "tr" and a.get("data-structure")]
    assert rows == ["liver", "spleen"]  # kidney is not a 0 mL row ...
    assert re.search(r"Not found</b>[^<]*: kidney", html)  # ... but listed as not found
    assert "incomplete: inferior" in html and "Volume (mL)" in html and "Mean (HU)" in html
    assert "@media print" in html and "For research use only, not for diagnosis" in html
    # the colour of the table swatch is the colour of the structure's caption swatch
    swatches = re.findall(r'class="swatch" style="background:(#[0-9a-f]{6})"', html)
    assert len(swatches) == 4 and swatches[:2] == swatches[2:]


def test_pdf_has_pages(ph: tuple[Volume, Volume], spec: LabelLayout, tmp_path: Path) -> None:
    img, lab = ph
    pdf = write_report(img, lab, tmp_path / "out", spec=spec)["pdf"]
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert _pdf_pages(pdf) == 4  # table, notes + provenance, overview, structures


def test_mask_on_another_grid_is_refused_naming_both_files(ph: tuple[Volume, Volume], tmp_path: Path) -> None:
    img, lab = ph
    img = Volume(img.array, img.affine, {"source": "/data/scan.nii.gz", "modality": "CT"})
    small = Volume(lab.array[:, :, :, :6], lab.affine, {"source": "/data/seg.nii.gz"})
    with pytest.raises(
        DataError, match=r"seg\.nii\.gz is not on the grid of image /data/scan\.nii\.gz"
    ) as exc:
        write_report(img, small, tmp_path / "out", pdf=False)
    msg = str(exc.value)
    assert (
        "(12, 10, 8)" in msg and "(12, 10, 6)" in msg and "(1, 1, 2.5)" in msg and "nearest-neighbour" in msg
    )
    shifted = np.array(lab.affine)
    shifted[0, 3] = 1.0  # same shape and spacing, moved by 1 mm
    with pytest.raises(DataError, match="origin"):
        write_report(img, Volume(lab.array, shifted), tmp_path / "out", pdf=False)
    assert not (tmp_path / "out").exists()


def test_mask_stored_in_another_axis_order_is_reordered(
    ph: tuple[Volume, Volume], spec: LabelLayout, tmp_path: Path
) -> None:
    img, lab = ph
    # the same voxels stored LPS and z-first: flip x and y, move z to the front
    aff = np.array(lab.affine)
    arr = lab.array[:, ::-1, ::-1, :]
    aff[:3, 0] *= -1
    aff[:3, 1] *= -1
    aff[:3, 3] = lab.voxel_to_world(np.array([[11, 9, 0]]))[0]
    arr = np.transpose(arr, (0, 3, 1, 2))
    aff = aff[:, [2, 0, 1, 3]]
    other = Volume(np.ascontiguousarray(arr), aff)
    assert other.spatial_shape == (8, 12, 10)
    doc = json.loads(write_report(img, other, tmp_path / "out", spec=spec, pdf=False)["json"].read_text())
    assert [(r["structure"], r["n_voxels"], r["mean_intensity"]) for r in doc["structures"]] == [
        ("liver", 64, 31.5),
        ("spleen", 8, 100.0),
    ]


def test_output_into_input_folder_is_refused(scan_files: dict[str, Path]) -> None:
    from medseg.io import load_volume

    img, lab = load_volume(scan_files["image"]), load_volume(scan_files["mask"])
    with pytest.raises(DataError, match="never writes into an input folder"):
        write_report(img, lab, scan_files["image"].parent, pdf=False)
    assert not (scan_files["image"].parent / "report.html").exists()


def test_dicom_input_gives_pseudonym_not_patient_id(
    ph: tuple[Volume, Volume], spec: LabelLayout, tmp_path: Path
) -> None:
    from medseg.io import load_volume
    from medseg.io.dicom_write import write_dicom_series

    img, lab = ph
    write_dicom_series(
        img, tmp_path / "dcm", patient_id="MRN-4711-SECRET", patient_name="Doe^Jane", study_date="20240102"
    )
    scan = load_volume(tmp_path / "dcm")
    assert scan.meta["patient_id"] == "MRN-4711-SECRET"
    paths = write_report(scan, lab, tmp_path / "out", spec=spec)
    doc = json.loads(paths["json"].read_text())
    assert doc["scan"]["patient_pseudonym"] == pseudonym("MRN-4711-SECRET")
    assert doc["scan"]["study_date"] == "2024-01-02" and doc["scan"]["modality"] == "CT"
    html = paths["html"].read_text()
    assert pseudonym("MRN-4711-SECRET") in html and "2024-01-02" in html
    for p in paths.values():
        data = p.read_bytes()
        for secret in (b"MRN-4711", b"SECRET", b"Doe", b"Jane"):
            assert secret not in data, (p.name, secret)
    assert [r["volume_ml"] for r in doc["structures"]] == pytest.approx([0.16, 0.02])


def test_2d_png_report_has_areas_and_one_view(tmp_path: Path) -> None:
    from medseg.cli.main import main
    from medseg.io import save_label_map, save_volume

    rng = np.random.default_rng(0)
    img = Volume(rng.integers(0, 255, (1, 40, 30)).astype(np.uint8), np.diag([0.5, 0.5, 1.0, 1.0]))
    lab = np.zeros((1, 40, 30), dtype=np.uint8)
    lab[0, 5:15, 10:20] = 1  # 100 px at 0.25 mm² = 0.25 cm², inside
    lab[0, 30:40, 20:30] = 2  # touches the right (x_max) and bottom (y_max) edges
    save_volume(img, tmp_path / "in" / "cxr.png")
    save_label_map(img.with_array(lab), tmp_path / "in" / "cxr_seg.png")
    (tmp_path / "labels.json").write_text(json.dumps({"lung_right": 1, "heart": 2, "lung_left": 3}))
    rc = main(
        [
            "report",
            "--image",
            str(tmp_path / "in" / "cxr.png"),
            "--mask",
            str(tmp_path / "in" / "cxr_seg.png"),
            "--output",
            str(tmp_path / "out"),
            "--labels",
            str(tmp_path / "labels.json"),
            "--no-pdf",
        ]
    )
    assert rc == 0 and not (tmp_path / "out" / "report.pdf").exists()
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert doc["size_column"] == "area_cm2" and "not volumes" in doc["size_note"]
    rows = {r["structure"]: r for r in doc["structures"]}
    assert rows["lung_right"]["area_cm2"] == pytest.approx(0.25) and "volume_ml" not in rows["lung_right"]
    assert rows["heart"]["incomplete_sides"] == ["right edge", "bottom edge"]
    assert doc["not_found"] == ["lung_left"]
    assert (tmp_path / "out" / "volumes.csv").read_text().startswith("structure,label,area_cm2,")
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Area (cm²)" in html and "Volume (mL)" not in html and "(image)" in html


def test_cli_end_to_end_label_map(
    scan_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from medseg.cli.main import main

    out = tmp_path / "report"
    rc = main(
        [
            "report",
            "--image",
            str(scan_files["image"]),
            "--mask",
            str(scan_files["mask"]),
            "--output",
            str(out),
            "--labels",
            str(scan_files["labels"]),
        ]
    )
    assert rc == 0
    assert "2 structures (1 incomplete, 1 not found)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "report.html",
        "report.json",
        "report.pdf",
        "volumes.csv",
    ]
    assert _pdf_pages(out / "report.pdf") >= 3
    rc = main(
        [
            "report",
            "--image",
            str(scan_files["image"]),
            "--mask",
            str(scan_files["mask"]),
            "--output",
            str(scan_files["image"].parent),
        ]
    )
    assert rc == 2 and "input folder" in capsys.readouterr().err


def test_cli_folder_of_per_structure_masks(scan_files: dict[str, Path], tmp_path: Path) -> None:
    from medseg.cli.main import main
    from medseg.io import load_volume, save_label_map

    lab = load_volume(scan_files["mask"])
    folder = tmp_path / "pred" / "scan"
    save_label_map(lab.with_array((lab.array == 1).astype(np.uint8)), folder / "liver.nii.gz")
    save_label_map(
        lab.with_array((lab.array > 0).astype(np.uint8)), folder / "organs.nii.gz"
    )  # overlaps liver
    out = tmp_path / "report"
    rc = main(
        [
            "report",
            "--image",
            str(scan_files["image"]),
            "--mask",
            str(folder),
            "--output",
            str(out),
            "--no-pdf",
        ]
    )
    assert rc == 0
    doc = json.loads((out / "report.json").read_text())
    assert [(r["structure"], r["n_voxels"]) for r in doc["structures"]] == [("liver", 64), ("organs", 72)]
    assert doc["structures"][1]["complete"] is False


def test_report_does_not_import_torch(scan_files: dict[str, Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    argv = ["report", "--image", str(scan_files["image"]), "--mask", str(scan_files["mask"])]
    argv += ["--output", str(tmp_path / "out"), "--no-pdf"]
    code = (
        f"import sys; from medseg.cli.main import main; rc = main({argv!r}); "
        "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "out" / "report.html").is_file()


def test_empty_mask_lists_everything_as_not_found(
    ph: tuple[Volume, Volume], spec: LabelLayout, tmp_path: Path
) -> None:
    img, lab = ph
    paths = write_report(img, lab.with_array(np.zeros_like(lab.array)), tmp_path / "out", spec=spec)
    doc = json.loads(paths["json"].read_text())
    assert doc["structures"] == [] and doc["not_found"] == ["liver", "spleen", "kidney"]
    assert paths["csv"].read_text().count("\n") == 1  # header only
    assert "No structure was found" in paths["html"].read_text() and _pdf_pages(paths["pdf"]) == 3


def test_report_says_what_it_left_out(ph: tuple[Volume, Volume], spec: LabelLayout, tmp_path: Path) -> None:
    """NaN voxels are left out of the intensity statistics (no 'nan' cell, no numpy warning), a
    multi-channel image and label values the label list does not name are reported, not silent."""
    import csv
    import warnings

    img, lab = ph
    arr = img.array.astype(np.float32)
    arr[0, 2, 2, 2] = np.nan  # inside the liver: value 0 becomes NaN
    two = np.concatenate([arr, arr * 2])
    lab_arr = lab.array.copy()
    lab_arr[0, 0:2, 0:2, 6:8] = 7  # a value the spec does not name
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from numpy on the NaN
        paths = write_report(
            Volume(two, img.affine, img.meta), lab.with_array(lab_arr), tmp_path / "r", spec=spec
        )
    rows = {r["structure"]: r for r in csv.DictReader(open(paths["csv"], newline=""))}
    assert float(rows["liver"]["mean_intensity"]) == pytest.approx(np.mean(np.arange(1, 64)))
    assert rows["liver"]["n_voxels"] == "64"  # the NaN voxel still counts in the volume
    assert "nan" not in paths["csv"].read_text()
    assert "label_7" in rows
    doc = json.loads(paths["json"].read_text())
    joined = " ".join(doc["warnings"])
    assert (
        "2 channels" in joined
        and "label value(s) [7]" in joined
        and "1 voxel(s) of the image are NaN" in joined
    )
    assert "Please note:" in paths["html"].read_text()
