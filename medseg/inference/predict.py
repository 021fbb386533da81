"""Prediction with a trained run directory: the training preprocessing, MONAI sliding windows, and
the inverse geometry, so the written label map has exactly the input's shape and affine.

This is the first slice of the inference issue: probabilities are restored to the original grid
(linear resampling of each class's probability, then argmax/threshold — never nearest-neighbour on
labels) one class at a time, which bounds memory to two full-resolution float maps plus the
preprocessed-grid probabilities. Slab-wise accumulation for very large scans is still to come.
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


def load_bundle(run_dir: str | Path, *, device: str = "auto", checkpoint: str = "best") -> ModelBundle:
    """Load ``plan.json`` and ``checkpoints/<checkpoint>.pt`` from a run directory."""

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
        run_dir, plan, model, dev, path.name, {"epoch": ck.get("epoch"), "config_hash": ck.get("config_hash")}
    )


def predict_probabilities(
    bundle: ModelBundle, image: np.ndarray, *, overlap: float = 0.5, batch_size: int = 2
) -> np.ndarray:
    """Sliding-window (Gaussian-blended) probabilities ``(K, *spatial)`` float32 on a preprocessed image."""
    import torch
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.array(image, dtype=np.float32))[None]
    with torch.no_grad():
        logits = sliding_window_inference(
            x,
            roi_size=bundle.plan.patch_size,
            sw_batch_size=batch_size,
            predictor=bundle.model,
            overlap=overlap,
            mode="gaussian",
            padding_mode="constant",
            cval=float(x.min()),  # pad like training patches: with the image minimum (air), not 0
            sw_device=bundle.device,
            device=torch.device("cpu"),
        )[0]
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
    from medseg.data.geometry import _interp, invert_ornt, reorient

    crop = [slice(a, b) for a, b in props["crop"]]
    crop_shape = tuple(s.stop - s.start for s in crop)
    canonical = tuple(props["canonical_shape"])
    if plan.mode == "softmax":
        best = np.zeros(canonical, np.float32)
        winner = np.zeros(canonical, np.uint16 if max(plan.label_values, default=0) > 255 else np.uint8)
        best[...] = -1.0
        region = (slice(None),)  # noqa: F841 - documents that channels are handled one by one
        for k in range(probs.shape[0]):
            full = np.zeros(canonical, np.float32) if k else np.ones(canonical, np.float32)
            full[tuple(crop)] = _interp(probs[k : k + 1], crop_shape, linear=True)[0]
            upd = full > best
            best[upd] = full[upd]
            winner[upd] = 0 if k == 0 else plan.label_values[k - 1]
        out = winner[None]
    else:
        out = np.zeros((probs.shape[0], *canonical), np.uint8)
        for k in range(probs.shape[0]):
            out[k][tuple(crop)] = _interp(probs[k : k + 1], crop_shape, linear=True)[0] >= threshold
    back, _ = reorient(out, np.eye(4), invert_ornt(np.asarray(props["ornt"])))
    if tuple(back.shape[1:]) != tuple(props["original_shape"]):
        raise AssertionError(f"restored shape {back.shape[1:]} != input shape {props['original_shape']}")
    return back


def predict_volume(
    bundle: ModelBundle, image: Volume, *, overlap: float = 0.5, batch_size: int = 2, threshold: float = 0.5
) -> Volume:
    """Predict one scan; the result lies on exactly the input's grid (shape and affine)."""
    from medseg.data.preprocess import preprocess_volume

    arr, props = preprocess_volume(image, bundle.plan)
    probs = predict_probabilities(bundle, arr, overlap=overlap, batch_size=batch_size)
    labels = restore_to_original(probs, props, bundle.plan, threshold=threshold)
    return Volume(labels, image.affine.copy(), {"source": None, "prediction_of": image.meta.get("source")})


def write_prediction(pred: Volume, plan: Plan, out_dir: Path, case: str, *, source_format: str) -> list[Path]:
    """Write ``<case>.nii.gz`` (exclusive labels) or ``<case>/<structure>.<ext>`` masks (overlapping)."""
    from medseg.io import save_label_map

    written = []
    ext = (
        ".png"
        if source_format in ("raster",) or (pred.spatial_dims == 2 and source_format == "dicom")
        else ".nii.gz"
    )
    if plan.mode == "softmax":
        written.append(save_label_map(pred, out_dir / f"{case}{ext}"))
    else:
        for k, name in enumerate(plan.structure_names):
            mask = pred.with_array(pred.array[k : k + 1] * (255 if ext == ".png" else 1))
            written.append(save_label_map(mask, out_dir / case / f"{name}{ext}"))
    return written


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
    cases, failures = [], []
    for path in tqdm(inputs, desc="predict", disable=not progress):
        name = case_id(path)
        t0 = time.time()
        try:
            target = out_dir / (f"{name}.nii.gz" if bundle.plan.mode == "softmax" else name)
            if target.exists() and not overwrite:
                cases.append({"input": str(path), "case": name, "skipped": True})
                continue
            vol = load_volume(path)
            pred = predict_volume(bundle, vol, overlap=overlap, batch_size=batch_size)
            files = write_prediction(
                pred, bundle.plan, out_dir, name, source_format=vol.meta.get("format", "")
            )
            cases.append(
                {
                    "input": str(path),
                    "case": name,
                    "outputs": [str(f) for f in files],
                    "seconds": round(time.time() - t0, 3),
                }
            )
        except DataError as exc:
            logger.error("%s: %s", path, exc)
            failures.append({"input": str(path), "error": str(exc)})
    manifest = {
        "model": str(bundle.run_dir),
        "checkpoint": bundle.checkpoint,
        "device": str(bundle.device),
        "cases": cases,
        "failures": failures,
    }
    (out_dir / "predict.json").write_text(json.dumps(manifest, indent=2))
    return manifest
