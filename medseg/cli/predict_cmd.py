"""``medseg predict``: run a trained model on scans; outputs lie on each input's own grid."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from medseg.cli._common import show_progress
from medseg.errors import MedsegError

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """The ``predict`` subcommand: a flat list of argparse options, grouped as ``--help`` shows them."""
    p = sub.add_parser(
        "predict",
        help="predict label maps for scans with a trained run directory",
        description="Repeat the training preprocessing (plan.json), run sliding-window inference "
        "(Gaussian blending) and write the labels on exactly the input's grid (shape, spacing, origin, "
        "direction). Exclusive classes -> <case>.nii.gz; overlapping structures -> <case>/<structure>.nii.gz "
        "(or .png for 2D PNG/DICOM radiographs). A predict.json manifest lists inputs, outputs and timings.",
    )
    p.add_argument(
        "--model",
        required=True,
        type=Path,
        help="run directory written by `medseg train` (uses checkpoints/best.pt, else last.pt)",
    )
    p.add_argument(
        "--input",
        required=True,
        nargs="+",
        type=Path,
        help="NIfTI/NRRD/PNG files, DICOM series folders, folders of such inputs (one level deep), or .txt "
        "files listing them one per line (relative to the list's folder)",
    )
    p.add_argument("--output", required=True, type=Path, help="output folder (never an input folder)")
    p.add_argument(
        "--device", default="auto", help="auto, cpu, cuda or cuda:N for the network (default auto)"
    )
    p.add_argument(
        "--series-uid",
        metavar="UID",
        help="which series to read from DICOM folders that hold several (`medseg info FOLDER` lists them)",
    )
    g = p.add_argument_group("sliding windows (defaults: the run config's predict section)")
    g.add_argument("--overlap", type=float, help="fraction of a window shared with its neighbour (0.5)")
    g.add_argument("--batch-size", type=int, help="windows per forward pass (2)")
    g.add_argument(
        "--tta", action=argparse.BooleanOptionalAction, help="mirror test-time augmentation (off; ~2x slower)"
    )
    g.add_argument(
        "--threshold", type=float, help="probability threshold of overlapping-structure models (0.5)"
    )
    g.add_argument(
        "--crf",
        action=argparse.BooleanOptionalAction,
        help="dense CRF refinement of the probabilities on the scan's grid before the decision, with the run "
        "config's predict.crf settings (off; slow on a CPU for 3D scans with many classes)",
    )
    g.add_argument(
        "--no-skip-air",
        dest="skip_air",
        action="store_false",
        help="run windows that lie entirely in air too (CT models skip them by default)",
    )
    g.add_argument(
        "--resample",
        choices=["logits", "probabilities"],
        help="what is resampled to the input grid before the decision when the spacing changed: logits "
        "(default, nnU-Net v2's rule: agrees with nnU-Net's output near boundaries) or probabilities",
    )
    g.add_argument(
        "--coarse-roi",
        action="store_true",
        help="first a pass of non-overlapping windows, then overlapping windows only near the structures "
        "it found (faster when they fill a small part of the scan, e.g. one organ in a whole-body CT)",
    )
    g.add_argument(
        "--low-memory",
        action="store_true",
        help="float16 logit accumulator: half the memory, rare argmax ties",
    )
    g.add_argument(
        "--max-memory",
        type=float,
        metavar="GB",
        help="memory the estimate may use before predicting is refused (default: what the OS reports free)",
    )
    o = p.add_argument_group("outputs")
    o.add_argument(
        "--format",
        choices=["nifti", "dicom-seg", "both"],
        default="nifti",
        help="nifti: label maps/masks (PNG for 2D raster inputs); dicom-seg: <case>_seg.dcm for DICOM series "
        "inputs (segment names from the model's labels); both",
    )
    o.add_argument(
        "--save-probabilities",
        action="store_true",
        help="also write <case>_probabilities.npy (float16, channels first, input voxel order) + .json",
    )
    o.add_argument(
        "--anonymize",
        action="store_true",
        help="DICOM SEG: replace the patient's name and ID (copied from the source series, as the standard "
        "requires) by a pseudonym and empty birth date, sex, accession number and similar identifiers",
    )
    o.add_argument("--report", action="store_true", help="also write the organ-volume report <case>_report/")
    o.add_argument(
        "--combined-labels",
        action="store_true",
        help="overlapping-structure models: also write one label map <case>_labels.nii.gz/.png (structure k "
        "= value k+1 in the run's order; where structures overlap the later one wins) with a .json naming "
        "the values",
    )
    o.add_argument("--overwrite", action="store_true", help="redo cases whose outputs already exist")
    o.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    o.add_argument(
        "--window-progress", action="store_true", help="a progress bar over the windows of each case"
    )
    p.set_defaults(func=run)


def _input_suffixes() -> tuple[str, ...]:
    from medseg.io.image2d import RASTER_SUFFIXES
    from medseg.io.itkfile import ITK_SUFFIXES
    from medseg.io.nifti import NIFTI_SUFFIXES

    return (*NIFTI_SUFFIXES, *ITK_SUFFIXES, *RASTER_SUFFIXES, ".dcm")


def expand_inputs(items: list[Path]) -> list[Path]:
    """Files, DICOM folders, folders of inputs, and text files listing inputs -> a flat input list.

    A folder holding DICOM files is one series. Any other folder is scanned one level deep: image
    files by suffix (NIfTI, NRRD/MHA, PNG/JPEG/..., ``.dcm``) and sub-folders, each taken as a DICOM
    series (one that is not fails as its own case, with the reason); other files are skipped with a
    warning. A ``.txt`` file lists inputs, one per line (``#`` comments and blank lines are
    ignored; relative paths are relative to the list's folder).
    """
    from medseg.io import is_dicom_file

    def holds_dicom(folder: Path) -> bool:
        return any(f.is_file() and not f.name.startswith(".") and is_dicom_file(f) for f in folder.iterdir())

    suffixes = _input_suffixes()
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
            if holds_dicom(item):
                out.append(item)  # a DICOM series folder
                continue
            skipped = []
            for f in sorted(f for f in item.iterdir() if not f.name.startswith(".")):
                if f.is_dir() or f.name.lower().endswith(suffixes):
                    out.append(f)
                else:
                    skipped.append(f.name)
            if skipped:
                logger.warning(
                    "%s: skipped %d file%s that %s not an image (%s): %s",
                    item,
                    len(skipped),
                    "" if len(skipped) == 1 else "s",
                    "is" if len(skipped) == 1 else "are",
                    " ".join(suffixes),
                    ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else ""),
                )
        elif item.exists():
            out.append(item)
        else:
            raise MedsegError(f"--input {item}: no such file or folder")
    return out


def _exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM (a scheduler's time limit, ``kill``) into SystemExit, so that temporary files
    (decompressed NIfTI, decoded DICOM series) and half-written outputs are removed on the way out."""
    import signal

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    try:
        signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread (e.g. called from a worker): leave the default
        pass


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from medseg.inference.predict import BatchOptions, check_output_folder, predict_files
    from medseg.io._atomic import ensure_writable_folder
    from medseg.units import GB

    if args.max_memory is not None and not 0 < args.max_memory < float("inf"):
        raise MedsegError(f"--max-memory {args.max_memory}: expected a positive number of GB (e.g. 8)")
    folders = [item for item in args.input if item.is_dir()]
    check_output_folder(args.output, folders=folders)  # before any work; predict_files checks files too
    ensure_writable_folder(args.output)
    _exit_cleanly_on_sigterm()
    from medseg.inference.process import tune_allocator
    from medseg.io._slabs import sweep_stale_temp_files

    for path in sweep_stale_temp_files():  # left by a predict that was killed (SIGKILL cannot clean up)
        logger.info("removed %s, left behind by a process that no longer runs", path)
    if tune_allocator():
        logger.debug("allocator: freed memory kept for reuse (MEDSEG_MALLOC=default to turn off)")
    inputs = expand_inputs(args.input)
    if not inputs:
        raise MedsegError(f"no inputs found in {[str(i) for i in args.input]}")
    bundle_defaults = _engine_defaults(args.model)
    overrides = {
        k: v
        for k, v in {
            "overlap": args.overlap,
            "batch_size": args.batch_size,
            "tta": args.tta,
            "threshold": args.threshold,
            "resample": args.resample,
        }.items()
        if v is not None
    }
    if args.crf is not None:
        overrides["crf"] = bundle_defaults.crf.model_copy(update={"enabled": args.crf})
    engine = replace(
        bundle_defaults,
        **overrides,
        skip_air=args.skip_air,
        coarse_roi=args.coarse_roi,
        accumulator_dtype="float16" if args.low_memory else "float32",
        progress=args.window_progress and show_progress(args),
    )
    batch = BatchOptions(
        output_format=args.format,
        save_probabilities=args.save_probabilities,
        report=args.report,
        combined_labels=args.combined_labels,
        overwrite=args.overwrite,
        progress=show_progress(args),
        max_memory_bytes=int(args.max_memory * GB) if args.max_memory is not None else None,
        series_uid=args.series_uid,
        anonymize=args.anonymize,
    )
    manifest = predict_files(
        args.model, inputs, args.output, device=args.device, engine=engine, batch=batch, input_folders=folders
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


def _engine_defaults(run_dir: Path) -> Any:
    """The run config's inference settings (checked here so a bad --model fails before any work)."""
    from medseg.inference.engine import EngineOptions
    from medseg.runtime.bundle import run_settings

    if not (run_dir / "plan.json").is_file():
        raise MedsegError(f"--model {run_dir}: not a medseg run directory (no plan.json)")
    return EngineOptions.from_config(run_settings(run_dir, warn=False)[1])  # load_bundle warns if missing
