"""Prediction with a trained run directory: the training preprocessing, MONAI sliding windows, and
the inverse geometry, so the written label map has exactly the input's shape and affine.

This is the first slice of the inference issue: probabilities are restored to the original grid
(linear resampling of each class's probability, then argmax/threshold — never nearest-neighbour on
labels) one class at a time, which bounds memory to two full-resolution float maps plus the
preprocessed-grid probabilities; then the optional post-processing of :mod:`medseg.inference.postprocess`
(from the run's ``config.yaml``). Slab-wise accumulation for very large scans is still to come.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.plan import Plan
from medseg.errors import DataError
from medseg.inference.postprocess import PostProcessing, postprocess_label_map, postprocess_masks
from medseg.io._atomic import atomic_write
from medseg.types import Volume

logger = logging.getLogger(__name__)


@dataclass
class ModelBundle:
    """A loaded run directory: plan, network (eval mode) and where it came from."""

    run_dir: Path
    plan: Plan
    model: Any
    device: Any
    checkpoint: str
    meta: dict[str, Any] = field(default_factory=dict)
    postprocessing: PostProcessing = field(default_factory=PostProcessing)


def load_bundle(run_dir: str | Path, *, device: str = "auto", checkpoint: str = "best") -> ModelBundle:
    """Load ``plan.json``, ``checkpoints/<checkpoint>.pt`` and the post-processing settings of
    ``config.yaml`` from a run directory."""
    from medseg.config import ModelConfig
    from medseg.models.unet import create_model
    from medseg.training.checkpoint import load_checkpoint
    from medseg.training.loop import resolve_device

    run_dir = Path(run_dir)
    if not (run_dir / "plan.json").is_file():
        raise DataError(
            f"{run_dir}: not a medseg run directory (no plan.json); pass the folder `medseg train` made"
        )
    plan = Plan.load(run_dir / "plan.json")
    path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if not path.is_file() and checkpoint == "best":
        path = run_dir / "checkpoints" / "last.pt"
    dev = resolve_device(device)
    ck = load_checkpoint(path, map_location="cpu")
    model = create_model(
        ModelConfig(**ck["model_config"]),
        spatial_dims=plan.spatial_dims,
        in_channels=plan.in_channels,
        out_channels=plan.out_channels,
        patch_size=plan.patch_size,
        spacing_mm=plan.target_spacing_mm,
    )
    model.load_state_dict(ck["model"])
    model.to(dev).eval()
    return ModelBundle(
        run_dir,
        plan,
        model,
        dev,
        path.name,
        {"epoch": ck.get("epoch"), "config_hash": ck.get("config_hash")},
        _postprocessing(run_dir),
    )


def _postprocessing(run_dir: Path) -> PostProcessing:
    """Post-processing settings from the run's ``config.yaml`` (none if the file is missing)."""
    from medseg.config import load_config

    path = run_dir / "config.yaml"
    if not path.is_file():
        return PostProcessing()
    cfg = load_config(path, resolve_paths=False)
    return PostProcessing(
        single=frozenset(cfg.data.single_component),
        min_component_mm3=cfg.predict.min_component_mm3,
        fill_holes=cfg.predict.fill_holes,
    )


def predict_probabilities(
    bundle: ModelBundle, image: np.ndarray, *, overlap: float = 0.5, batch_size: int = 2
) -> np.ndarray:
    """Sliding-window (Gaussian-blended) probabilities ``(K, *spatial)`` float32 on a preprocessed image."""
    import torch

    from medseg.inference.sliding_window import sliding_window_logits

    logits = sliding_window_logits(
        bundle.model, image, bundle.plan.patch_size, bundle.device, overlap=overlap, batch_size=batch_size
    )
    probs = torch.softmax(logits, 0) if bundle.plan.mode == "softmax" else torch.sigmoid(logits)
    return probs.numpy().astype(np.float32, copy=False)


def restore_to_original(
    probs: np.ndarray, props: dict[str, Any], plan: Plan, *, threshold: float = 0.5
) -> np.ndarray:
    """Map preprocessed-grid probabilities back to the input grid and decide labels there.

    softmax: returns ``(1, *original)`` label values (plan's ``label_values``); sigmoid: ``(S, *original)``
    0/1 masks. Each class's probability is resampled linearly to the cropped canonical grid (the exact
    inverse of the forward resampling), placed into the canonical grid (outside the crop: background),
    and the result is reoriented back to the input's storage order.
    """
    from medseg.data.geometry import invert_ornt, reorient, resample_image

    crop = [slice(a, b) for a, b in props["crop"]]
    crop_shape = tuple(s.stop - s.start for s in crop)
    canonical = tuple(props["canonical_shape"])
    if plan.mode == "softmax":
        best = np.zeros(canonical, np.float32)
        winner = np.zeros(canonical, np.uint16 if max(plan.label_values, default=0) > 255 else np.uint8)
        best[...] = -1.0
        for k in range(probs.shape[0]):
            full = np.zeros(canonical, np.float32) if k else np.ones(canonical, np.float32)
            full[tuple(crop)] = resample_image(probs[k : k + 1], crop_shape)[0]
            upd = full > best
            best[upd] = full[upd]
            winner[upd] = 0 if k == 0 else plan.label_values[k - 1]
        out = winner[None]
    else:
        out = np.zeros((probs.shape[0], *canonical), np.uint8)
        for k in range(probs.shape[0]):
            out[k][tuple(crop)] = resample_image(probs[k : k + 1], crop_shape)[0] >= threshold
    back, _ = reorient(out, np.eye(4), invert_ornt(np.asarray(props["ornt"])))
    if tuple(back.shape[1:]) != tuple(props["original_shape"]):
        raise AssertionError(f"restored shape {back.shape[1:]} != input shape {props['original_shape']}")
    return back


def predict_volume(
    bundle: ModelBundle, image: Volume, *, overlap: float = 0.5, batch_size: int = 2, threshold: float = 0.5
) -> Volume:
    """Predict one scan; the result lies on exactly the input's grid (shape and affine).

    A 2D model accepts 2D images and single-slice 3D files (nnU-Net stores 2D data as X x Y x 1); the
    output keeps the input's own shape either way.
    """
    from medseg.data.datasets import squeeze_2d
    from medseg.data.preprocess import preprocess_volume

    source = image
    if bundle.plan.spatial_dims == 2:
        image = squeeze_2d(image)
    arr, props = preprocess_volume(image, bundle.plan)
    probs = predict_probabilities(bundle, arr, overlap=overlap, batch_size=batch_size)
    labels = restore_to_original(probs, props, bundle.plan, threshold=threshold)
    plan, pp = bundle.plan, bundle.postprocessing
    if pp.active:
        if plan.mode == "softmax":
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
    return out_dir / (f"{case}{ext}" if plan.mode == "softmax" else case)


def write_prediction(pred: Volume, plan: Plan, out_dir: Path, case: str, *, ext: str) -> list[Path]:
    """Write ``<case><ext>`` (exclusive labels) or ``<case>/<structure><ext>`` masks (overlapping).

    The mask folder is written under a temporary name and renamed when complete, so an interrupted
    run never leaves a half-written case that a later run would skip.
    """
    import os
    import shutil

    from medseg.io import save_label_map

    if plan.mode == "softmax":
        return [save_label_map(pred, out_dir / f"{case}{ext}")]
    final = out_dir / case
    tmp = out_dir / f".{case}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    scale = 255 if ext == ".png" else 1
    for k, name in enumerate(plan.structure_names):
        save_label_map(pred.with_array(pred.array[k : k + 1] * scale), tmp / f"{name}{ext}")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return [final / f"{name}{ext}" for name in plan.structure_names]


def predict_files(
    run_dir: str | Path,
    inputs: list[Path],
    out_dir: str | Path,
    *,
    device: str = "auto",
    overlap: float = 0.5,
    batch_size: int = 2,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Predict every input (files or DICOM folders) into ``out_dir``; returns the run manifest."""
    from tqdm.auto import tqdm

    from medseg.io import case_id, load_volume

    bundle = load_bundle(run_dir, device=device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in inputs:
        if out_dir.resolve() == Path(p).resolve().parent or out_dir.resolve() == Path(p).resolve():
            raise DataError(f"--output {out_dir} is the input folder of {p}; choose another folder")
    names: dict[str, list[str]] = {}
    for p in inputs:
        names.setdefault(case_id(p), []).append(str(p))
    clashes = {n: ps for n, ps in names.items() if len(ps) > 1}
    if clashes:
        listing = "; ".join(f"{n}: {', '.join(ps)}" for n, ps in sorted(clashes.items()))
        raise DataError(
            f"several inputs would write the same output name ({listing}); predict them into separate "
            "--output folders or rename them"
        )
    cases, failures = [], []
    for path in tqdm(inputs, desc="predict", disable=not progress):
        name = case_id(path)
        t0 = time.time()
        try:
            ext = output_extension(Path(path), bundle.plan)
            if output_path(out_dir, name, bundle.plan, ext).exists() and not overwrite:
                cases.append({"input": str(path), "case": name, "skipped": True})
                continue
            vol = load_volume(path)
            pred = predict_volume(bundle, vol, overlap=overlap, batch_size=batch_size)
            files = write_prediction(pred, bundle.plan, out_dir, name, ext=ext)
            cases.append(
                {
                    "input": str(path),
                    "case": name,
                    "outputs": [str(f) for f in files],
                    "seconds": round(time.time() - t0, 3),
                }
            )
        except Exception as exc:  # noqa: BLE001 - one bad input must not stop the batch
            msg = str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
            logger.error("%s: %s", path, msg)
            failures.append({"input": str(path), "error": msg})
    manifest = {
        "model": str(bundle.run_dir),
        "checkpoint": bundle.checkpoint,
        "device": str(bundle.device),
        "cases": cases,
        "failures": failures,
    }
    with atomic_write(out_dir / "predict.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2))
    return manifest
