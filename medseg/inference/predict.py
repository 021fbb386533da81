"""Prediction with a trained run directory: the training preprocessing, sliding windows, and the
inverse geometry, so the written label map has exactly the input's shape and affine.

The work per scan is :func:`medseg.inference.engine.segment` (slab-wise: lazy preprocessing, a
Gaussian-blended logit accumulator only a window thick, probabilities resampled to the input's grid
before the argmax/threshold), then the optional post-processing of
:mod:`medseg.inference.postprocess` (from the run's ``config.yaml``). :func:`predict_files` is the
batch driver behind ``medseg predict``: memory check, outputs (NIfTI/PNG, DICOM SEG, probabilities,
report), skip/overwrite, continue past failures, and the ``predict.json`` manifest.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import monai
import nibabel
import numpy as np
import SimpleITK
import torch
from tqdm.auto import tqdm

from medseg._version import __version__
from medseg.data.datasets import squeeze_2d
from medseg.data.plan import Plan
from medseg.data.preprocess import check_input
from medseg.errors import DataError
from medseg.inference.engine import EngineOptions, EngineStats, ProbabilitySink, estimate_memory, segment
from medseg.inference.manifest import Manifest
from medseg.inference.postprocess import postprocess_label_map, postprocess_masks
from medseg.inference.process import available_memory, peak_rss_bytes
from medseg.inference.writers import (
    ProbabilityWriter,
    output_extension,
    output_path,
    write_combined_labels,
    write_prediction,
    write_report_of,
    write_seg,
)
from medseg.io import case_id, load_volume
from medseg.io._atomic import sweep_stale_temps
from medseg.io._slabs import NotStreamable
from medseg.io.dicom import DicomSlabs
from medseg.io.nifti import NiftiSlabs, is_nifti
from medseg.labels import Mode
from medseg.names import safe_join
from medseg.runtime.bundle import Bundle, load_bundle
from medseg.types import Volume
from medseg.units import GB, MB

logger = logging.getLogger(__name__)

OutputFormat = Literal["nifti", "dicom-seg", "both"]


def predict_volume(
    bundle: Bundle,
    image: Volume,
    opts: EngineOptions | None = None,
    *,
    threshold: float | None = None,
    sink: ProbabilitySink | None = None,
    stats: EngineStats | None = None,
) -> Volume:
    """Predict one scan; the result lies on exactly the input's grid (shape and affine).

    Runs :func:`medseg.inference.engine.segment` (slab-wise, memory-bounded) and then the run's
    post-processing. ``opts`` defaults to the run config's ``predict`` section; ``threshold``
    overrides the sigmoid threshold. A 2D model accepts 2D images and single-slice 3D files (nnU-Net
    stores 2D data as X x Y x 1); the output keeps the input's own shape either way.
    """

    opts = opts or EngineOptions.from_config(bundle.predict)
    if threshold is not None:
        opts = replace(opts, threshold=threshold)
    source = image
    if bundle.plan.spatial_dims == 2:
        image = squeeze_2d(image)
    pp = bundle.postprocessing
    labels = segment(
        image, bundle.plan, bundle.model, bundle.device, opts, sink=sink, stats=stats, single=pp.single
    )
    plan = bundle.plan
    if pp.active:
        if plan.mode == Mode.SOFTMAX:
            labels = postprocess_label_map(
                labels, plan.label_values, plan.structure_names, image.spacing_mm, pp
            )
        else:
            labels = postprocess_masks(labels, plan.structure_names, image.spacing_mm, pp)
    labels = labels.reshape(labels.shape[0], *source.spatial_shape)
    meta = {k: source.meta[k] for k in ("sform_code", "qform_code") if k in source.meta}
    return Volume(labels, source.affine.copy(), {**meta, "prediction_of": source.meta.get("source")})


@dataclass(frozen=True)
class BatchOptions:
    """What :func:`predict_files` writes and how it treats existing outputs and memory."""

    output_format: OutputFormat = "nifti"
    save_probabilities: bool = False
    report: bool = False
    overwrite: bool = False
    progress: bool = True
    max_memory_bytes: int | None = None  # None: the kernel's MemAvailable
    combined_labels: bool = False  # sigmoid models: also <case>_labels<ext> (later structure wins)
    series_uid: str | None = None  # which series of DICOM folders that hold several
    anonymize: bool = False  # DICOM SEG: pseudonymous patient identifiers only


def group_inputs(inputs: list[Path], in_channels: int) -> list[tuple[str, list[Path]]]:
    """Inputs -> ``(case, [channel files])``; a multi-channel model takes ``<case>_0000``,
    ``<case>_0001``, ... (nnU-Net naming) as the channels of one case.

    Raises :class:`DataError` when two inputs would write the same output, or a case lacks channels.
    """

    groups: dict[str, list[Path]] = {}
    for p in inputs:
        groups.setdefault(case_id(p, channels=in_channels), []).append(Path(p))
    if in_channels == 1:
        extra = sorted(n for n in groups if n[-5:-4] == "_" and n[-4:].isdigit() and n[:-5] in groups)
        if extra:
            logger.warning(
                "%s: named like further channels of the cases %s (nnU-Net naming <case>_0000, <case>_0001, "
                "...), but the model takes one channel: each is predicted as a case of its own",
                ", ".join(extra[:5]) + (", ..." if len(extra) > 5 else ""),
                ", ".join(sorted({n[:-5] for n in extra})[:5]),
            )
        clashes = {n: ps for n, ps in groups.items() if len(ps) > 1}
        if clashes:
            listing = "; ".join(f"{n}: {', '.join(map(str, ps))}" for n, ps in sorted(clashes.items()))
            raise DataError(
                f"several inputs would write the same output name ({listing}); predict them into separate "
                "--output folders or rename them"
            )
        return [(n, ps) for n, ps in groups.items()]
    out = []
    for name, paths in groups.items():
        paths = sorted(paths, key=lambda p: p.name)
        want = [f"_{c:04d}" for c in range(in_channels)]
        got = [p.name[len(name) : len(name) + 5] for p in paths]
        if got != want:
            raise DataError(
                f"case {name}: the model takes {in_channels} channels as {name}_0000 ... "
                f"{name}_{in_channels - 1:04d}; found {[p.name for p in paths]}"
            )
        out.append((name, paths))
    return out


def load_channels(paths: list[Path], *, series_uid: str | None = None) -> Volume:
    """One file per channel -> one multi-channel Volume; all channels must share one stored grid
    (same shape and affine: the arrays are stacked as they are). ``series_uid`` picks the series of a
    DICOM folder that holds several."""
    vols = [load_volume(p, series_uid=series_uid) for p in paths]
    if len(vols) == 1:
        return vols[0]
    first = vols[0]
    for p, v in zip(paths[1:], vols[1:], strict=True):
        if v.spatial_shape != first.spatial_shape or not np.allclose(v.affine, first.affine, atol=1e-4):
            raise DataError(
                f"{p}: channel grid {v.spatial_shape} {v.orientation} spacing {v.spacing_mm} differs from "
                f"{paths[0]} {first.spatial_shape} {first.orientation} spacing {first.spacing_mm}; all "
                "channels of a case must be stored on one grid (resample them onto the _0000 image)"
            )
    return first.with_array(np.concatenate([v.array for v in vols]))


def _versions() -> dict[str, str]:

    return {
        "medseg": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "nibabel": nibabel.__version__,
        "SimpleITK": SimpleITK.Version_VersionString(),
    }


def check_memory(vol: Volume, bundle: Bundle, opts: EngineOptions, limit: int | None) -> dict[str, int]:
    """Estimate what predicting ``vol`` needs, log it, and refuse (:class:`DataError`) if it won't fit."""

    est = estimate_memory(vol, bundle.plan, opts, params=bundle.n_params)
    avail = limit if limit is not None else available_memory()
    gb = GB
    logger.info(
        "%s: memory needed ~%.2f GB (accumulator %.2f GB, output %.2f GB), available %s",
        vol.meta.get("source", "scan"),
        est["total"] / gb,
        est["accumulator"] / gb,
        est["output"] / gb,
        f"{avail / gb:.2f} GB" if avail is not None else "unknown",
    )
    if avail is not None and est["total"] > avail:
        hints = []
        if opts.accumulator_dtype == "float32":
            hints.append(f"--low-memory (float16 accumulator, saves ~{est['accumulator'] / 2 / gb:.2f} GB)")
        if opts.batch_size > 1:
            hints.append("a smaller --batch-size")
        hints.append("--max-memory GB to override the check")
        src, k = vol.meta.get("source", "scan"), bundle.plan.out_channels
        raise DataError(
            f"{src}: predicting {vol.spatial_shape} needs ~{est['total'] / gb:.2f} GB (accumulator "
            f"{est['accumulator'] / gb:.2f} GB for {k} channels), but "
            + (
                f"the limit is {avail / gb:.2f} GB (--max-memory)"
                if limit is not None
                else f"only {avail / gb:.2f} GB is available"
            )
            + "; lower it with "
            + ", or ".join(hints)
        )
    return est


def _expected_outputs(out_dir: Path, case: str, path: Path, plan: Plan, batch: BatchOptions) -> list[Path]:
    """Everything this run would write for a case: a case counts as done only when all of it exists."""
    fmt = batch.output_format
    outs = []
    if batch.save_probabilities:
        outs.append(safe_join(out_dir, f"{case}_probabilities.npy"))
    if batch.report:
        outs.append(safe_join(out_dir, f"{case}_report", "report.html"))
    if fmt in ("nifti", "both"):
        outs.append(output_path(out_dir, case, plan, output_extension(path, plan)))
        if batch.combined_labels and plan.mode == Mode.SIGMOID:
            outs.append(safe_join(out_dir, f"{case}_labels{output_extension(path, plan)}"))
    if fmt in ("dicom-seg", "both"):
        outs.append(safe_join(out_dir, f"{case}_seg.dcm"))
    return outs


def predict_case(
    bundle: Bundle,
    paths: list[Path],
    out_dir: Path,
    case: str,
    opts: EngineOptions,
    batch: BatchOptions,
) -> dict[str, Any]:
    """Predict one case (its channel files) and write every requested output; returns its manifest row."""
    t0 = time.perf_counter()
    source = paths[0]
    if batch.output_format != "nifti" and not source.is_dir():
        raise DataError(
            f"{source}: --format {batch.output_format} needs a DICOM series folder as input (a DICOM SEG "
            "references the scan's instances); use --format nifti for this input"
        )
    stream = _open_streaming(paths, bundle.plan, batch)
    try:
        vol = stream or load_channels(paths, series_uid=batch.series_uid)
        return _predict_loaded(bundle, vol, paths, out_dir, case, opts, batch, t0)
    finally:
        if stream is not None:
            stream.close()


def _open_streaming(paths: list[Path], plan: Plan, batch: BatchOptions) -> Any:
    """A slab reader for a single 3D NIfTI file (:class:`~medseg.io.nifti.NiftiSlabs`) or DICOM series
    folder (:class:`~medseg.io.dicom.DicomSlabs`), so that the scan is read block by block instead of
    held whole; None for other inputs and for ``--report`` (which needs the voxels): those are loaded."""

    if len(paths) != 1 or plan.spatial_dims != 3 or batch.report:
        return None
    path = paths[0]
    try:
        if is_nifti(path):
            return NiftiSlabs(path)
        if path.is_dir():
            return DicomSlabs(path, series_uid=batch.series_uid)
        return None
    except (NotStreamable, OSError) as exc:  # e.g. not 3D, one DICOM file, no room for the temp file
        logger.debug("%s: reading whole (%s)", path, exc)
        return None


def _predict_loaded(
    bundle: Bundle,
    vol: Any,
    paths: list[Path],
    out_dir: Path,
    case: str,
    opts: EngineOptions,
    batch: BatchOptions,
    t0: float,
) -> dict[str, Any]:

    source = paths[0]
    t_read = time.perf_counter()
    image = squeeze_2d(vol) if bundle.plan.spatial_dims == 2 else vol
    check_input(image, bundle.plan)  # before the memory estimate, which assumes a fitting input
    est = check_memory(image, bundle, opts, batch.max_memory_bytes)
    stats = EngineStats()
    writer = None
    try:
        if batch.save_probabilities:
            writer = ProbabilityWriter(out_dir, case, image, bundle.plan)
        pred = predict_volume(bundle, vol, opts, sink=writer, stats=stats)
        t_pred = time.perf_counter()
        files: list[Path] = []
        if batch.output_format in ("nifti", "both"):
            ext = output_extension(source, bundle.plan)
            files += write_prediction(pred, bundle.plan, out_dir, case, ext=ext)
            if batch.combined_labels and bundle.plan.mode == Mode.SIGMOID:
                files += write_combined_labels(pred, bundle.plan, out_dir, case, ext=ext)
        if batch.output_format in ("dicom-seg", "both"):
            seg_path = safe_join(out_dir, f"{case}_seg.dcm")
            uid, anon = batch.series_uid, batch.anonymize
            files.append(write_seg(pred, bundle, source, seg_path, series_uid=uid, anonymize=anon))
        if writer is not None:
            files += writer.close()
            writer = None
        if batch.report:
            report_dir = safe_join(out_dir, f"{case}_report")
            files += write_report_of(vol, pred, bundle, report_dir, stats.input_warnings)
    except BaseException:
        if writer is not None:  # a half-written probability file must not stay behind
            writer.abort()
        raise
    t_end = time.perf_counter()
    return {
        "input": row_input(paths),
        "case": case,
        "outputs": [str(f) for f in files],
        "windows": stats.windows,
        "windows_run": stats.windows_run,
        "coarse_windows_run": stats.coarse_windows_run,
        "memory_estimate_gb": round(est["total"] / GB, 3),
        **({"input_warnings": list(stats.input_warnings)} if stats.input_warnings else {}),
        "seconds": {
            "read": round(t_read - t0, 3),
            "predict": round(t_pred - t_read, 3),
            "write": round(t_end - t_pred, 3),
            "total": round(t_end - t0, 3),
        },
    }


def check_output_folder(out_dir: Path, inputs: Sequence[Path] = (), folders: Sequence[Path] = ()) -> None:
    """Refuse (:class:`DataError`) an output folder that is the folder of an input, or is or lies
    inside an input DICOM folder or a folder the inputs were gathered from (``folders``):
    predictions are never written among the inputs, where a later run would read them as scans."""
    ro = Path(out_dir).resolve()
    inside = [Path(p) for p in inputs if ro == Path(p).resolve().parent]
    inside += [
        Path(f)
        for f in (*inputs, *folders)
        if Path(f).is_dir() and (ro == Path(f).resolve() or Path(f).resolve() in ro.parents)
    ]
    if inside:
        raise DataError(
            f"--output {out_dir} lies inside the input folder of {inside[0]}: predictions are never "
            "written among the inputs (a later run over that folder would read them as scans); choose "
            "an output folder outside it"
        )


def predict_files(
    run_dir: str | Path,
    inputs: list[Path],
    out_dir: str | Path,
    *,
    device: str = "auto",
    engine: EngineOptions | None = None,
    batch: BatchOptions | None = None,
    input_folders: Sequence[Path] = (),
) -> dict[str, Any]:
    """Predict every input (files or DICOM folders) into ``out_dir``; returns the run manifest.

    ``input_folders`` are the folders the inputs were gathered from: ``out_dir`` may not lie in one
    (:func:`check_output_folder`).

    ``engine`` defaults to the run config's ``predict`` section. Cases whose outputs exist are
    skipped unless ``batch.overwrite``; a failing case is logged and listed under ``failures`` while
    the others go on. The manifest is written to ``out_dir/predict.json``.
    """

    bundle = load_bundle(run_dir, device=device)
    opts = engine or EngineOptions.from_config(bundle.predict)
    batch = batch or BatchOptions()
    out_dir = Path(out_dir)
    check_output_folder(out_dir, inputs, input_folders)
    if batch.combined_labels and (bundle.plan.mode != Mode.SIGMOID or batch.output_format == "dicom-seg"):
        logger.warning(
            "--combined-labels: ignored (%s)",
            "the model's classes are exclusive: its label map is already combined"
            if bundle.plan.mode != Mode.SIGMOID
            else "it is written with --format nifti or both",
        )
    cases = group_inputs(inputs, bundle.plan.in_channels)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in sweep_stale_temps(out_dir):  # half-written outputs of a run that was killed
        logger.info("removed %s, left behind by a process that no longer runs", path)
    manifest = Manifest(out_dir, _header(bundle, opts, batch))
    current = None
    try:
        for name, paths in tqdm(cases, desc="predict", disable=not batch.progress):
            current = name, paths
            _predict_or_skip(bundle, name, paths, out_dir, opts, batch, manifest)
            current = None
    finally:
        if current is not None:  # interrupted (SIGTERM, Ctrl-C): say so, keep what is done
            manifest.fail(current[0], row_input(current[1]), "interrupted before this case was finished")
    return manifest.write({"peak_rss_mb": round(peak_rss_bytes() / MB, 1)})


def row_input(paths: list[Path]) -> str | list[str]:
    """How a case's input is recorded in ``predict.json``: its file or folder, or its channel files."""
    return [str(p) for p in paths] if len(paths) > 1 else str(paths[0])


def _predict_or_skip(
    bundle: Bundle,
    name: str,
    paths: list[Path],
    out_dir: Path,
    opts: EngineOptions,
    batch: BatchOptions,
    manifest: Manifest,
) -> None:
    """Predict one case into the manifest, skip it when its outputs exist, or record its failure."""
    recorded = row_input(paths)
    try:
        case_batch = batch
        if batch.output_format == "both" and not paths[0].is_dir():
            logger.warning("%s: not a DICOM series folder: NIfTI output only (no DICOM SEG)", paths[0])
            case_batch = replace(batch, output_format="nifti")
        expected = _expected_outputs(out_dir, name, paths[0], bundle.plan, case_batch)
        if all(p.exists() for p in expected) and not batch.overwrite:
            earlier = manifest.earlier(name, recorded) or {"input": recorded, "case": name}
            manifest.add({**earlier, "skipped": True})
            return
        manifest.add(predict_case(bundle, paths, out_dir, name, opts, case_batch))
    except Exception as exc:  # noqa: BLE001 - one bad input must not stop the batch
        msg = str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
        msg = msg.removeprefix(f"{paths[0]}: ")  # the path is printed beside it
        logger.error("%s: %s", paths[0], msg)
        manifest.fail(name, recorded, msg)


def _header(bundle: Bundle, opts: EngineOptions, batch: BatchOptions) -> dict[str, Any]:
    """The run-level part of ``predict.json``."""
    pp = bundle.postprocessing
    return {
        "model": str(bundle.path),
        "checkpoint": bundle.checkpoint,
        "config_hash": bundle.meta.get("config_hash"),
        "device": str(bundle.device),
        "cpu_threads": torch.get_num_threads(),
        "options": {
            **{k: v for k, v in asdict(opts).items() if k not in ("progress", "crf")},
            "format": batch.output_format,
            "save_probabilities": batch.save_probabilities,
            "report": batch.report,
            "combined_labels": batch.combined_labels,
        },
        "postprocessing": {
            "single_component": sorted(pp.single),
            "min_component_mm3": pp.min_component_mm3,
            "fill_holes": pp.fill_holes,
            "crf": opts.crf.model_dump(mode="json"),  # before the decision, on the scan's grid
        },
        "versions": _versions(),
    }
