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

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medseg.data.plan import Plan
from medseg.data.preprocess import check_input
from medseg.errors import DataError
from medseg.inference.engine import EngineOptions, EngineStats, ProbabilitySink
from medseg.inference.postprocess import postprocess_label_map, postprocess_masks
from medseg.inference.process import peak_rss_bytes
from medseg.io._atomic import atomic_write
from medseg.labels import Mode, label_dtype_for
from medseg.names import safe_join
from medseg.runtime.bundle import Bundle, load_bundle
from medseg.types import Volume

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
    from medseg.data.datasets import squeeze_2d
    from medseg.inference.engine import segment

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


def output_extension(path: Path, plan: Plan) -> str:
    """``.png`` for 2D raster or DICOM-radiograph inputs of a 2D model, else ``.nii.gz``."""
    from medseg.io import is_dicom_file
    from medseg.io.image2d import is_raster

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
    from medseg.io import save_label_map

    if plan.mode == Mode.SOFTMAX:
        return [save_label_map(pred, safe_join(out_dir, f"{case}{ext}"))]
    final = safe_join(out_dir, case)
    tmp = safe_join(out_dir, f".{case}.tmp-{os.getpid()}")
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
    from medseg.io import save_label_map

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
        from medseg.data.canonical import oriented_view
        from medseg.data.geometry import canonical_ornt

        self.final = safe_join(out_dir, f"{case}_probabilities.npy")
        self.tmp = safe_join(out_dir, f".{case}_probabilities.tmp-{os.getpid()}.npy")
        shape = (plan.out_channels, *image.spatial_shape)
        # Fortran order: slabs along the last axis are contiguous in the file, as the engine writes them
        self.mm = np.lib.format.open_memmap(
            self.tmp, mode="w+", dtype=np.float16, shape=shape, fortran_order=True
        )
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


def group_inputs(inputs: list[Path], in_channels: int) -> list[tuple[str, list[Path]]]:
    """Inputs -> ``(case, [channel files])``; a multi-channel model takes ``<case>_0000``,
    ``<case>_0001``, ... (nnU-Net naming) as the channels of one case.

    Raises :class:`DataError` when two inputs would write the same output, or a case lacks channels.
    """
    from medseg.io import case_id

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


def load_channels(paths: list[Path]) -> Volume:
    """One file per channel -> one multi-channel Volume; all channels must share one stored grid
    (same shape and affine: the arrays are stacked as they are)."""
    from medseg.io import load_volume

    vols = [load_volume(p) for p in paths]
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
    import platform

    import monai
    import nibabel
    import SimpleITK
    import torch

    from medseg._version import __version__

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
    from medseg.inference.engine import estimate_memory
    from medseg.inference.process import available_memory

    est = estimate_memory(vol, bundle.plan, opts, params=bundle.n_params)
    avail = limit if limit is not None else available_memory()
    gb = 2.0**30
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
        return _predict_loaded(bundle, stream or load_channels(paths), paths, out_dir, case, opts, batch, t0)
    finally:
        if stream is not None:
            stream.close()


def _open_streaming(paths: list[Path], plan: Plan, batch: BatchOptions) -> Any:
    """A slab reader for a single 3D NIfTI file (:class:`~medseg.io.nifti.NiftiSlabs`) or DICOM series
    folder (:class:`~medseg.io.dicom.DicomSlabs`), so that the scan is read block by block instead of
    held whole; None for other inputs and for ``--report`` (which needs the voxels): those are loaded."""
    from medseg.io._slabs import NotStreamable
    from medseg.io.dicom import DicomSlabs
    from medseg.io.nifti import NiftiSlabs, is_nifti

    if len(paths) != 1 or plan.spatial_dims != 3 or batch.report:
        return None
    path = paths[0]
    opener = NiftiSlabs if is_nifti(path) else DicomSlabs if path.is_dir() else None
    if opener is None:
        return None
    try:
        return opener(path)
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
    from medseg.data.datasets import squeeze_2d

    source = paths[0]
    t_read = time.perf_counter()
    image = squeeze_2d(vol) if bundle.plan.spatial_dims == 2 else vol
    check_input(image, bundle.plan)  # before the memory estimate, which assumes a fitting input
    est = check_memory(image, bundle, opts, batch.max_memory_bytes)
    stats = EngineStats()
    writer = ProbabilityWriter(out_dir, case, image, bundle.plan) if batch.save_probabilities else None
    try:
        pred = predict_volume(bundle, vol, opts, sink=writer, stats=stats)
        t_pred = time.perf_counter()
        files: list[Path] = []
        if batch.output_format in ("nifti", "both"):
            ext = output_extension(source, bundle.plan)
            files += write_prediction(pred, bundle.plan, out_dir, case, ext=ext)
            if batch.combined_labels and bundle.plan.mode == Mode.SIGMOID:
                files += write_combined_labels(pred, bundle.plan, out_dir, case, ext=ext)
        if batch.output_format in ("dicom-seg", "both"):
            files.append(_write_seg(pred, bundle, source, safe_join(out_dir, f"{case}_seg.dcm")))
        if writer is not None:
            files += writer.close()
            writer = None
        if batch.report:
            files += _write_report(vol, pred, bundle, safe_join(out_dir, f"{case}_report"))
    except BaseException:
        if writer is not None:  # a half-written probability file must not stay behind
            writer.abort()
        raise
    t_end = time.perf_counter()
    return {
        "input": [str(p) for p in paths] if len(paths) > 1 else str(source),
        "case": case,
        "outputs": [str(f) for f in files],
        "windows": stats.windows,
        "windows_run": stats.windows_run,
        "coarse_windows_run": stats.coarse_windows_run,
        "memory_estimate_gb": round(est["total"] / 2**30, 3),
        "seconds": {
            "read": round(t_read - t0, 3),
            "predict": round(t_pred - t_read, 3),
            "write": round(t_end - t_pred, 3),
            "total": round(t_end - t0, 3),
        },
    }


def _write_seg(pred: Volume, bundle: Bundle, series_dir: Path, path: Path) -> Path:
    from medseg.io.dicom_seg import write_dicom_seg

    plan = bundle.plan
    values = plan.label_values if plan.mode == Mode.SOFTMAX else None
    return write_dicom_seg(pred, series_dir, path, names=plan.structure_names, values=values)


def _write_report(image: Volume, pred: Volume, bundle: Bundle, out: Path) -> list[Path]:
    from medseg.report import write_report

    plan = bundle.plan
    spec = replace(plan.labels, source=str(bundle.path / "plan.json"))
    prov = bundle.provenance()
    provenance = {"run_dir": prov.pop("model"), **prov}
    return list(write_report(image, pred, out, spec=spec, provenance=provenance).values())


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


def _earlier_rows(manifest: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Case rows of an earlier ``predict.json`` in the output folder, by ``(case, input)``: a re-run
    that skips a case keeps what is known about its output. A row of a case that run predicted gets
    that run's time (``predicted``); a row it skipped keeps its own ``predicted``, if it had one."""
    try:
        old = json.loads(manifest.read_text())
        rows = {}
        for r in old.get("cases", []):
            if isinstance(r, dict) and "case" in r:
                stamp = {} if r.get("skipped") else {"predicted": old.get("created")}
                rows[r["case"], str(r.get("input"))] = {**stamp, **r}
        return rows
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


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
    import torch
    from tqdm.auto import tqdm

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
    earlier = _earlier_rows(out_dir / "predict.json")
    rows, failures = [], []
    t_start = time.perf_counter()
    for name, paths in tqdm(cases, desc="predict", disable=not batch.progress):
        try:
            case_batch = batch
            if batch.output_format == "both" and not paths[0].is_dir():
                logger.warning("%s: not a DICOM series folder: NIfTI output only (no DICOM SEG)", paths[0])
                case_batch = replace(batch, output_format="nifti")
            expected = _expected_outputs(out_dir, name, paths[0], bundle.plan, case_batch)
            if all(p.exists() for p in expected) and not batch.overwrite:
                row_input = [str(p) for p in paths] if len(paths) > 1 else str(paths[0])
                key = (name, str(row_input))
                rows.append({**earlier.get(key, {"input": row_input, "case": name}), "skipped": True})
                continue
            rows.append(predict_case(bundle, paths, out_dir, name, opts, case_batch))
        except Exception as exc:  # noqa: BLE001 - one bad input must not stop the batch
            msg = str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
            msg = msg.removeprefix(f"{paths[0]}: ")  # the path is printed beside it
            logger.error("%s: %s", paths[0], msg)
            failures.append({"input": str(paths[0]), "error": msg})
    pp = bundle.postprocessing
    manifest = {
        "model": str(bundle.path),
        "checkpoint": bundle.checkpoint,
        "config_hash": bundle.meta.get("config_hash"),
        "device": str(bundle.device),
        "cpu_threads": torch.get_num_threads(),
        "options": {
            **{k: v for k, v in asdict(opts).items() if k != "progress"},
            "format": batch.output_format,
            "save_probabilities": batch.save_probabilities,
            "report": batch.report,
            "combined_labels": batch.combined_labels,
        },
        "postprocessing": {
            "single_component": sorted(pp.single),
            "min_component_mm3": pp.min_component_mm3,
            "fill_holes": pp.fill_holes,
        },
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": round(time.perf_counter() - t_start, 3),
        "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1),
        "cases": rows,
        "failures": failures,
    }
    with atomic_write(out_dir / "predict.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2))
    return manifest
