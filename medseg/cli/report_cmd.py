"""``medseg report``: the organ-volume report (CSV, JSON, HTML, PDF) of one scan and its mask."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from medseg.errors import DataError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="organ-volume report (CSV, JSON, HTML, PDF) of one scan and its segmentation",
        description="Measure every structure of a mask on the scan's own grid (volume in mL, or area in "
        "cm² for 2D images; mean and SD of intensity, HU for CT; incomplete when cut by the field of view) "
        "and write volumes.csv, report.json, a self-contained report.html with overlays, and report.pdf.",
    )
    p.add_argument(
        "--image", required=True, type=Path, help="the scan: NIfTI/NRRD/PNG file or DICOM series folder"
    )
    p.add_argument(
        "--mask",
        required=True,
        type=Path,
        help="label map file on the scan's grid, or a folder of per-structure masks <structure>.nii.gz/.png "
        "(as `medseg predict` writes for overlapping structures)",
    )
    p.add_argument("--output", required=True, type=Path, help="output folder (never an input folder)")
    p.add_argument(
        "--labels",
        help="structure names: a run directory, config, dataset.json or JSON map (FILE.json:KEY); "
        "default label_<value> (label map) or the mask file names (folder)",
    )
    p.add_argument("--model", type=Path, help="run directory that produced the mask (shown as provenance)")
    p.add_argument("--series-uid", help="which series of a DICOM folder holding several")
    p.add_argument("--no-pdf", action="store_true", help="skip report.pdf")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medseg.io import load_volume
    from medseg.labels import load_labels
    from medseg.report import write_report

    spec = load_labels(args.labels) if args.labels else None
    if spec is None and args.model is not None and (args.model / "plan.json").is_file():
        spec = load_labels(args.model)
    image = load_volume(args.image, series_uid=args.series_uid)
    if args.mask.is_dir() and not _is_dicom_folder(args.mask):
        mask, spec = load_mask_folder(args.mask, spec)
    else:
        mask = load_volume(args.mask)
    paths = write_report(
        image, mask, args.output, spec=spec, provenance=_provenance(args), pdf=not args.no_pdf
    )
    doc = json.loads(paths["json"].read_text())
    n_incomplete = sum(1 for s in doc["structures"] if not s["complete"])
    print(
        f"{len(doc['structures'])} structures ({n_incomplete} incomplete, {len(doc['not_found'])} not found) "
        f"-> {paths['html']}"
    )
    return 0


def load_mask_folder(folder: Path, spec: Any) -> tuple[Any, Any]:
    """Stack ``<structure>.nii.gz``/``.png`` masks of a folder into ``(S, *spatial)`` binary channels.

    With a sigmoid label spec the files are read in its order (each must exist); without one, every mask
    file of the folder is read in name order and named after its file.
    """
    import numpy as np

    from medseg.io import case_id, load_volume
    from medseg.labels import LabelLayout, Mode
    from medseg.report import align_mask

    files = {
        case_id(f): f for f in sorted(folder.iterdir()) if not f.name.startswith(".") and _is_mask_file(f)
    }
    if spec is None:
        if not files:
            raise DataError(
                f"--mask {folder}: no mask files (.nii.gz, .nii, .nrrd, .mha, .png) in this folder"
            )
        spec = LabelLayout.overlapping(tuple(files), source=str(folder))
    elif spec.mode != Mode.SIGMOID:
        raise DataError(
            f"--mask {folder} is a folder of per-structure masks, but --labels ({spec.source}) describes an "
            "exclusive label map; pass the label map file as --mask, or labels of per-structure masks."
        )
    missing = [n for n in spec.names if n not in files]
    if missing or not spec.names:
        raise DataError(
            f"--mask {folder}: no mask file for {missing} (expected <structure>.nii.gz or .png per structure "
            f"of {spec.source}; found {sorted(files)})"
        )
    first: Any = None
    channels = []
    for name in spec.names:
        vol = load_volume(files[name])
        if first is None:
            first = vol
        else:
            vol = align_mask(first, vol)  # every mask on one grid; the image grid is checked later
        channels.append((vol.array[0] != 0).astype(np.uint8))
    return first.with_array(np.stack(channels), source=str(folder)), spec


def _provenance(args: argparse.Namespace) -> dict[str, Any]:
    prov: dict[str, Any] = {}
    if args.model is not None:
        prov["run_dir"] = str(args.model)
        env = args.model / "env.json"
        if env.is_file():
            try:
                prov["config_hash"] = json.loads(env.read_text()).get("config_hash")
            except json.JSONDecodeError:
                pass
    prov["image"] = str(args.image)
    prov["mask"] = str(args.mask)
    if args.labels:
        prov["labels"] = str(args.labels)
    return prov


def _is_mask_file(f: Path) -> bool:
    return f.is_file() and f.name.lower().endswith((".nii.gz", ".nii", ".nrrd", ".mha", ".png"))


def _is_dicom_folder(folder: Path) -> bool:
    from medseg.io import is_dicom_file

    return any(is_dicom_file(f) for f in folder.iterdir() if f.is_file())
