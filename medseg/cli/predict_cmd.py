"""``medseg predict``: run a trained model on scans; outputs lie on each input's own grid."""

from __future__ import annotations

import argparse
from pathlib import Path

from medseg.errors import MedsegError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="predict label maps for scans with a trained run directory",
        description="Repeat the training preprocessing (plan.json), run sliding-window inference "
        "(Gaussian blending) and write the labels on exactly the input's grid (shape, spacing, origin, "
        "direction). Exclusive classes -> <case>.nii.gz; overlapping structures -> <case>/<structure>.nii.gz "
        "(or .png for 2D PNG/DICOM radiographs). A predict.json manifest lists inputs, outputs and timings.",
    )
    p.add_argument("--model", required=True, type=Path, help="run directory written by `medseg train`")
    p.add_argument(
        "--input",
        required=True,
        nargs="+",
        type=Path,
        help="NIfTI/NRRD/PNG files, DICOM series folders, folders of such inputs, or .txt lists of them",
    )
    p.add_argument("--output", required=True, type=Path, help="output folder (never an input folder)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    p.add_argument("--batch-size", type=int, default=2, help="windows per forward pass (default 2)")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose output already exists")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def expand_inputs(items: list[Path]) -> list[Path]:
    """Files, DICOM folders, folders of inputs, and text files listing inputs -> a flat input list."""
    from medseg.io import is_dicom_file

    out: list[Path] = []
    for item in items:
        if item.suffix == ".txt" and item.is_file():
            base = item.parent
            lines = [
                ln.strip() for ln in item.read_text().splitlines() if ln.strip() and not ln.startswith("#")
            ]
            out.extend(
                expand_inputs([(base / ln) if not Path(ln).is_absolute() else Path(ln) for ln in lines])
            )
        elif item.is_dir():
            files = sorted(f for f in item.iterdir() if not f.name.startswith("."))
            if any(is_dicom_file(f) for f in files if f.is_file()):
                out.append(item)  # a DICOM series folder
            else:
                out.extend(
                    f
                    for f in files
                    if f.is_dir()
                    or f.suffix.lower() in (".gz", ".nii", ".nrrd", ".mha", ".png", ".jpg", ".dcm")
                )
        elif item.exists():
            out.append(item)
        else:
            raise MedsegError(f"--input {item}: no such file or folder")
    return out


def run(args: argparse.Namespace) -> int:
    from medseg.inference.predict import predict_files

    inputs = expand_inputs(args.input)
    if not inputs:
        raise MedsegError(f"no inputs found in {[str(i) for i in args.input]}")
    manifest = predict_files(
        args.model,
        inputs,
        args.output,
        device=args.device,
        overlap=args.overlap,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    done = [c for c in manifest["cases"] if not c.get("skipped")]
    skipped = [c for c in manifest["cases"] if c.get("skipped")]
    print(
        f"{len(done)} predicted, {len(skipped)} skipped (output exists; --overwrite to redo), "
        f"{len(manifest['failures'])} failed -> {args.output}"
    )
    for f in manifest["failures"]:
        print(f"  failed: {f['input']}: {f['error']}")
    return 1 if manifest["failures"] else 0
