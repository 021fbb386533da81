"""Inference benchmark: ``medseg predict`` end to end vs MONAI's sliding window vs nnU-Net v2's predictor.

One run of this script measures three contenders on the same CT volume, with the same network weights
(``bundle.model`` of one medseg run directory), the same patch size (the run's ``plan.json``) and the same
window overlap, under the same allocator settings and torch thread count:

(a) medseg
    ``medseg.inference.predict.predict_files(run_dir, [volume], out_dir, device="cpu", engine=
    EngineOptions(overlap, batch_size, tta=False, ...), batch=BatchOptions(overwrite=True))``: the real
    user path (slab-wise engine, air windows skipped by default; ``--engine KEY=VALUE`` sets other
    ``EngineOptions`` fields, e.g. ``skip_air=false``), timed from loading the run directory and reading
    the file to the written label map, including the run's post-processing if its config enables any.
    Only the public functions are used, so the harness does not depend on the engine's internals.
(a2) medseg with ``--resample logits`` (optional)
    the same, with ``EngineOptions(resample="logits")``: the blended logits, not the probabilities, are
    resampled to the input grid before the argmax (what nnU-Net's export does).
(a3) medseg with ``--coarse-roi`` (optional)
    the same, with ``EngineOptions(coarse_roi=True)``: a first pass of non-overlapping windows, then the
    overlapping windows only near the structures it found.
(b) MONAI
    read with ``medseg.io.load_volume``, medseg's preprocessing (``preprocess_volume``), MONAI
    ``sliding_window_inference`` with its defaults except ``roi_size``/``overlap``/``sw_batch_size``
    (blending ``--monai-blend``, default MONAI's ``constant``; padding with 0), then the naive way
    back: softmax, full-volume ``torch.nn.functional.interpolate`` (trilinear) of all class probabilities
    to the cropped original grid, argmax, un-crop, reorient, ``medseg.io.save_label_map``.
(c) nnU-Net v2
    the same reading and preprocessing, then ``nnUNetPredictor.predict_sliding_window_return_logits``
    driven by hand (no plans file): ``network`` = the same model, ``configuration_manager.patch_size`` =
    the plan's patch, ``label_manager.num_segmentation_heads`` = the network's output channels,
    ``tile_step_size = 1 - overlap``, Gaussian blending, no mirroring, CPU (nnU-Net accumulates the
    logits in float16 and runs one window at a time), then nnU-Net's own export resampling
    (``resample_data_or_seg_to_shape`` with the default ``resampling_fn_probabilities_kwargs``: order 1,
    separate-z for anisotropic spacing) of the logits to the cropped original grid, argmax, un-crop,
    reorient and the same writer as (b).

Each contender runs in its own child process (this script with ``--child NAME``), started from this one run
with the same environment: ``--allocator tuned`` sets ``MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=68719476736`` for all children (contenders are compared under one allocator setting),
``default`` removes them; ``torch.set_num_threads(--threads)`` in all. ``--repeats N`` runs every contender
N times, each in a fresh
process, in rotating order (a b c, b c a, c a b, ...) so that drift on a shared machine spreads evenly;
the table gives the median seconds (and the minimum). The clock starts after the imports, before the run
directory is loaded. A child reports its own peak RSS (``VmHWM`` by
:func:`medseg.inference.process.peak_rss_bytes`, which includes the imports; ``ru_maxrss`` would include
this parent's peak; the RSS after the imports is in brackets) and its stage times. Windows are counted,
and the network's own time summed, by forward hooks on the loaded model (for (a) by wrapping
``load_bundle``); windows/s is windows over end-to-end seconds, ms/window is network seconds per window.

Dice agreement: per-label Dice (``medseg.metrics.count_overlaps`` + ``dice``) of each contender's label
map against medseg's on the original grid, over the plan's labels (labels empty in both maps are
skipped), reported as mean and min; and against the reference labels when known (``--reference``, or the
synthetic volume's truth). Speed ratio = nnU-Net's median seconds / the contender's. Goal of the issue:
medseg >= 1.5x nnU-Net with Dice agreement >= 0.995.

Defaults when ``--model``/``--volume`` are not given (made once under ``--work`` and reused):
model
    a short ``medseg train`` of ``configs/demo_ct.yaml`` (``--train-epochs``, post-processing off so all
    three contenders do the same work) on 3 adult-size synthetic CT phantoms generated like ``medseg data
    synth ct`` but on a 256x256x160 grid at 1.5 mm (the phantom fills ~80 % of the field of view, so a
    384 mm field gives adult anatomy). Trained weights give non-trivial label maps, which makes the Dice
    agreement meaningful; the model is not meant to be accurate.
volume
    a held-out phantom of the same kind on ``--shape`` at ``--spacing`` (default 256x256x160 at 1.5 mm,
    storage orientation PSR, i.e. the array is 256x160x256), with its reference labels. Keep the field
    of view (shape x spacing) near 384x384x240 mm to match the auto model's anatomy scale.

nnunetv2 is a benchmark-only dependency: install it in a separate environment with a constraints file
pinning torch, else pip replaces torch by a CUDA build::

    python3.11 -m venv /work/bench-venv
    /work/bench-venv/bin/pip install torch==2.13.0
    /work/bench-venv/bin/pip install -c scripts/bench-constraints.txt -e .
    /work/bench-venv/bin/pip install -c scripts/bench-constraints.txt nnunetv2 psutil

Without nnunetv2 the script runs (a) and (b), says so in the table and exits with status 2
(``--skip-nnunet``: leave it out on purpose, exit 0). Only softmax (exclusive-label) 3D models.

Examples::

    /work/bench-venv/bin/python scripts/bench_inference.py --repeats 3 --out results.md
    /work/bench-venv/bin/python scripts/bench_inference.py --model runs/ct --volume ct_0000.nii.gz \\
        --reference ct_labels.nii.gz --overlap 0.5 --repeats 3 --allocator tuned --write-doc
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONTENDERS = ("medseg", "medseg_probabilities", "medseg_roi", "monai", "nnunet")
TITLES = {
    "medseg": "(a) medseg predict (resamples logits)",
    "medseg_probabilities": "(a2) medseg predict --resample probabilities",
    "medseg_roi": "(a3) medseg predict --coarse-roi",
    "monai": "(b) MONAI sliding window",
    "nnunet": "(c) nnU-Net v2 predictor",
}
MEDSEG_VARIANTS = {"medseg_probabilities": {"resample": "probabilities"}, "medseg_roi": {"coarse_roi": True}}
"""EngineOptions fields of the medseg variants (run through the same public ``predict_files`` path)."""
TUNED_ALLOCATOR = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
CASE = "bench_ct"
WARM_IMPORTS = (
    "medseg.inference.predict",
    "medseg.inference.engine",
    "medseg.models.unet",
    "medseg.training.loop",
    "medseg.runtime.checkpoint",
    "medseg.data.preprocess",
    "medseg.data.geometry",
    "medseg.io",
    "medseg.config",
    "monai",
    "monai.inferers",
    "nibabel",
    "SimpleITK",
    "tqdm.auto",
    "yaml",
)
NNUNET_IMPORTS = (
    "nnunetv2.inference.predict_from_raw_data",
    "nnunetv2.preprocessing.resampling.default_resampling",
)
DOC_BEGIN, DOC_END = "<!-- bench_inference:begin -->", "<!-- bench_inference:end -->"
NNUNET_INSTALL = "pip install -c scripts/bench-constraints.txt nnunetv2  (in a separate venv; see --help)"


# ----------------------------------------------------------------------------------------------------
# children


class ForwardMeter:
    """Counts windows (sum of batch sizes) and network seconds via forward hooks on a model."""

    def __init__(self) -> None:
        self.windows = 0
        self.calls = 0
        self.seconds = 0.0
        self._t0 = 0.0

    def attach(self, model: Any) -> None:
        model.register_forward_pre_hook(self._pre)
        model.register_forward_hook(self._post)

    def _pre(self, module: Any, inputs: Any) -> None:
        self._t0 = time.perf_counter()
        x = inputs[0] if isinstance(inputs, tuple) and inputs else inputs
        self.windows += int(x.shape[0]) if hasattr(x, "shape") else 1
        self.calls += 1

    def _post(self, module: Any, inputs: Any, output: Any) -> None:
        self.seconds += time.perf_counter() - self._t0


class Stages:
    """Wall-clock seconds of consecutive stages."""

    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.times: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + now - self.last
        self.last = now

    @property
    def total(self) -> float:
        return self.last - self.t0


def _rss_mb() -> float:
    """Current resident set size (MiB) from /proc (0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _check_plan(plan: Any) -> None:
    if plan.spatial_dims != 3 or plan.mode != "softmax":
        raise SystemExit(
            "bench_inference: only softmax 3D models are supported "
            f"(this one: {plan.spatial_dims}D {plan.mode})"
        )


def _label_lut(plan: Any) -> Any:
    import numpy as np

    return np.array([0, *plan.label_values], dtype=np.uint8 if max(plan.label_values) < 256 else np.uint16)


def _back_to_original(class_idx: Any, props: dict[str, Any], plan: Any) -> Any:
    """Class indices on the cropped canonical grid -> ``(1, *original)`` label values on the input grid."""
    import numpy as np

    from medseg.data.geometry import invert_ornt, reorient

    lut = _label_lut(plan)
    full = np.zeros(tuple(props["canonical_shape"]), lut.dtype)
    full[tuple(slice(a, b) for a, b in props["crop"])] = lut[class_idx]
    back, _ = reorient(full[None], np.eye(4), invert_ornt(np.asarray(props["ornt"])))
    if tuple(back.shape[1:]) != tuple(props["original_shape"]):
        raise AssertionError(f"restored shape {back.shape[1:]} != input shape {props['original_shape']}")
    return back


def _crop_shape(props: dict[str, Any]) -> tuple[int, ...]:
    return tuple(b - a for a, b in props["crop"])


def _canonical_spacing(props: dict[str, Any]) -> list[float]:
    """Voxel spacing (mm) of the canonical (and cropped) original grid, in canonical axis order."""
    import numpy as np

    aff = np.asarray(props["original_affine"], dtype=float)
    storage = np.linalg.norm(aff[:3, :3], axis=0)
    out = [0.0] * 3
    for j, (axis, _flip) in enumerate(np.asarray(props["ornt"])):
        out[int(axis)] = float(storage[j])
    return out


def _child_medseg(args: argparse.Namespace, meter: ForwardMeter, st: Stages) -> dict[str, Any]:
    import medseg.inference.predict as predict_mod

    original = predict_mod.load_bundle

    def load_and_meter(*a: Any, **k: Any) -> Any:
        bundle = original(*a, **k)
        _check_plan(bundle.plan)
        meter.attach(bundle.model)
        return bundle

    predict_mod.load_bundle = load_and_meter  # count windows without touching the engine's internals
    try:
        manifest = predict_mod.predict_files(
            args.model, [Path(args.volume)], args.child_out, device="cpu", **_medseg_options(args)
        )
    finally:
        predict_mod.load_bundle = original
    st.mark("total")
    if manifest["failures"]:
        raise SystemExit(f"medseg predict failed: {manifest['failures']}")
    case = manifest["cases"][0]
    sec = case.get("seconds")
    if isinstance(sec, dict):  # per-stage seconds of the case (read / predict / write / total)
        st.times = {"load model": st.total - sec["total"], **{k: v for k, v in sec.items() if k != "total"}}
    return {"output": case["outputs"][0], "case": {k: v for k, v in case.items() if k != "outputs"}}


def _medseg_options(args: argparse.Namespace) -> dict[str, Any]:
    """``predict_files`` keyword arguments: overlap and batch size (plus ``--engine KEY=VALUE``), no TTA,
    overwrite, no progress bar."""
    import dataclasses

    import yaml

    extra = {}
    for item in args.engine:
        key, _, value = item.partition("=")
        extra[key] = yaml.safe_load(value)
    try:
        from medseg.inference.engine import EngineOptions
        from medseg.inference.predict import BatchOptions
    except ImportError:  # the first predict API (before the slab-wise engine)
        return {"overlap": args.overlap, "batch_size": args.batch_size, "overwrite": True, "progress": False}
    names = {f.name for f in dataclasses.fields(EngineOptions)}
    unknown = sorted(set(extra) - names)
    if unknown:
        raise SystemExit(f"--engine: unknown EngineOptions fields {unknown}; known: {sorted(names)}")
    opts = {"overlap": args.overlap, "batch_size": args.batch_size, "tta": False, **extra}
    opts.update(MEDSEG_VARIANTS.get(args.child, {}))
    return {"engine": EngineOptions(**opts), "batch": BatchOptions(overwrite=True, progress=False)}


def _read_and_preprocess(args: argparse.Namespace, meter: ForwardMeter, st: Stages) -> tuple[Any, ...]:
    from medseg.data.preprocess import preprocess_volume
    from medseg.io import load_volume
    from medseg.runtime.bundle import load_bundle

    bundle = load_bundle(args.model, device="cpu")
    _check_plan(bundle.plan)
    meter.attach(bundle.model)
    st.mark("load model")
    vol = load_volume(args.volume)
    st.mark("read")
    arr, props = preprocess_volume(vol, bundle.plan)
    st.mark("preprocess")
    return bundle, vol, arr, props


def _write(labels: Any, vol: Any, args: argparse.Namespace, st: Stages) -> str:
    from medseg.io import save_label_map
    from medseg.types import Volume

    path = Path(args.child_out) / f"{CASE}.nii.gz"
    save_label_map(Volume(labels, vol.affine.copy(), {}), path)
    st.mark("write")
    return str(path)


def _child_monai(args: argparse.Namespace, meter: ForwardMeter, st: Stages) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from monai.inferers import sliding_window_inference

    bundle, vol, arr, props = _read_and_preprocess(args, meter, st)
    with torch.inference_mode():
        x = torch.from_numpy(arr)[None]
        logits = sliding_window_inference(
            x,
            roi_size=tuple(bundle.plan.patch_size),
            sw_batch_size=args.batch_size,
            predictor=bundle.model,
            overlap=args.overlap,
            mode=args.monai_blend,
        )[0]
        st.mark("sliding window")
        probs = torch.softmax(logits, 0)
        del logits
        up = F.interpolate(probs[None], size=_crop_shape(props), mode="trilinear", align_corners=False)[0]
        del probs
        idx = up.argmax(0).numpy()
        del up
    labels = _back_to_original(idx, props, bundle.plan)
    st.mark("restore")
    return {"output": _write(labels, vol, args, st)}


def _child_nnunet(args: argparse.Namespace, meter: ForwardMeter, st: Stages) -> dict[str, Any]:
    from types import SimpleNamespace

    import numpy as np
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    bundle, vol, arr, props = _read_and_preprocess(args, meter, st)
    predictor = nnUNetPredictor(
        tile_step_size=1.0 - args.overlap,
        use_gaussian=True,
        use_mirroring=False,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        verbose=False,
        allow_tqdm=False,
    )
    # what predict_sliding_window_return_logits reads, set by hand instead of a plans file
    predictor.network = bundle.model
    predictor.configuration_manager = SimpleNamespace(patch_size=list(bundle.plan.patch_size))
    predictor.label_manager = SimpleNamespace(num_segmentation_heads=bundle.plan.out_channels)
    predictor.allowed_mirroring_axes = None
    logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(arr))  # float16, CPU
    st.mark("sliding window")
    # nnU-Net's export: resampling_fn_probabilities with the default planner's kwargs, then argmax
    resampled = resample_data_or_seg_to_shape(
        logits,
        _crop_shape(props),
        list(bundle.plan.target_spacing_mm),
        _canonical_spacing(props),
        is_seg=False,
        order=1,
        order_z=0,
        force_separate_z=None,
    )
    del logits
    idx = np.argmax(resampled, 0)
    del resampled
    labels = _back_to_original(idx, props, bundle.plan)
    st.mark("restore")
    return {"output": _write(labels, vol, args, st)}


def child_main(args: argparse.Namespace) -> int:
    import torch

    from medseg.inference.process import peak_rss_bytes

    torch.set_num_threads(args.threads)
    # the same imports for every contender, outside the clock (a cold `import monai` alone takes seconds)
    for mod in WARM_IMPORTS + (NNUNET_IMPORTS if args.child == "nnunet" else ()):
        try:
            importlib.import_module(mod)
        except ImportError:
            if mod.startswith("nnunetv2"):
                raise
    rss_after_imports = _rss_mb()
    Path(args.child_out).mkdir(parents=True, exist_ok=True)
    meter, st = ForwardMeter(), Stages()
    cpu0 = _cpu_seconds()
    children = {"monai": _child_monai, "nnunet": _child_nnunet}
    run = children.get(args.child, _child_medseg)
    extra = run(args, meter, st)
    result = {
        "contender": args.child,
        "seconds": st.total,
        "cpu_seconds": _cpu_seconds() - cpu0,
        "stages": st.times,
        "windows": meter.windows,
        "forward_calls": meter.calls,
        "network_seconds": meter.seconds,
        "peak_rss_mb": peak_rss_bytes() / 2**20,
        "rss_after_imports_mb": rss_after_imports,
        "threads": torch.get_num_threads(),
        "allocator_env": {k: os.environ.get(k) for k in TUNED_ALLOCATOR},
        **extra,
    }
    Path(args.result).write_text(json.dumps(result, indent=2))
    return 0


# ----------------------------------------------------------------------------------------------------
# inputs made on demand


def _phantom_patch(shape: tuple[int, int, int], spacing: float) -> Any:
    """Patch the phantom generator's grid constants: ``shape`` voxels (in-plane, in-plane, slices)."""
    from unittest import mock

    import medseg.data.synthetic as syn

    if shape[0] != shape[1]:
        raise SystemExit("--shape: the phantom's in-plane matrix is square (X == Y)")
    return mock.patch.multiple(
        syn,
        IN_PLANE_SPACING_MM=(spacing, spacing),
        SLICE_SPACING_MM=(spacing, spacing),
        MATRIX_SIZES=(shape[0],),
        NUM_SLICES=(shape[2], shape[2]),
    )


def make_volume(work: Path, shape: tuple[int, int, int], spacing: float, index: int) -> tuple[Path, Path]:
    """A held-out adult-size phantom (image + reference labels) under ``work/volume``; reused if present."""
    import numpy as np

    import medseg.data.synthetic as syn
    from medseg.io import save_label_map, save_volume

    tag = f"{'x'.join(map(str, shape))}_{spacing:g}mm_case{index}"
    img = work / "volume" / tag / f"{CASE}_0000.nii.gz"
    lab = work / "volume" / tag / f"{CASE}_labels.nii.gz"
    if img.is_file() and lab.is_file():
        return img, lab
    print(f"making the benchmark volume {img} ...", flush=True)
    with _phantom_patch(shape, spacing):
        image, label, _info = syn.make_ct_case(index, seed=0)
    save_volume(image, img, dtype=np.int16)
    save_label_map(label, lab)
    return img, lab


def make_model(work: Path, epochs: int) -> Path:
    """Train a demo model on adult-size phantoms (256x256x160 at 1.5 mm) under ``work/model``; reused."""
    import medseg.data.synthetic as syn

    run_dir = work / "model"
    if (run_dir / "checkpoints" / "last.pt").is_file():
        return run_dir
    data = work / "train_data"
    if not (data / "dataset.json").is_file():
        print(f"making 4 adult-size CT phantoms in {data} ...", flush=True)
        with _phantom_patch((256, 256, 160), 1.5):
            syn.synth_ct(data, cases=4, seed=0, dicom_cases=0)
    cmd = [
        sys.executable,
        "-c",
        "import sys; from medseg.cli.main import main; sys.exit(main())",
        "train",
        "--config",
        str(ROOT / "configs" / "demo_ct.yaml"),
        "--set",
        f"data.root={data}",
        "--set",
        "data.single_component=[]",
        "--set",
        f"train.epochs={epochs}",
        "--set",
        f"train.val_every={epochs}",
        "--set",
        f"train.cache_dir={work / 'cache'}",
        "--run-dir",
        str(run_dir),
        "--no-progress",
    ]
    print(f"training the benchmark model: {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)
    return run_dir


# ----------------------------------------------------------------------------------------------------
# parent


def nnunet_importable() -> str | None:
    """None if nnunetv2's predictor imports in a fresh interpreter, else the error."""
    code = "import nnunetv2.inference.predict_from_raw_data"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_child_env("default")
    )
    if proc.returncode == 0:
        return None
    return (proc.stderr.strip().splitlines() or ["import failed"])[-1]


def _child_env(allocator: str, threads: int | None = None, work: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for k in TUNED_ALLOCATOR:
        env.pop(k, None)
    if allocator == "tuned":
        env.update(TUNED_ALLOCATOR)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if work is not None:  # silences nnU-Net's "nnUNet_raw is not defined" warnings; not used otherwise
        for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            env.setdefault(k, str(work / "nnunet_env" / k))
    return env


def run_child(name: str, rep: int, args: argparse.Namespace, work: Path, model: Path, volume: Path) -> dict:
    out = work / "outputs" / f"{name}-{rep}"
    result = work / "outputs" / f"{name}-{rep}.json"
    log = work / "outputs" / f"{name}-{rep}.log"
    result.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        name,
        "--model",
        str(model),
        "--volume",
        str(volume),
        "--overlap",
        str(args.overlap),
        "--threads",
        str(args.threads),
        "--batch-size",
        str(args.batch_size),
        "--monai-blend",
        args.monai_blend,
        *[f"--engine={e}" for e in args.engine],
        "--child-out",
        str(out),
        "--result",
        str(result),
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        proc = subprocess.run(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=_child_env(args.allocator, args.threads, work)
        )
    if proc.returncode != 0 or not result.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"{TITLES[name]} failed (exit {proc.returncode}); log {log}:\n{tail}")
    res = json.loads(result.read_text())
    print(
        f"  {TITLES[name]} run {rep + 1}: {res['seconds']:.2f} s, {res['windows']} windows, "
        f"peak RSS {res['peak_rss_mb']:.0f} MB",
        flush=True,
    )
    return res


def dice_table(pred_path: str, ref_path: str, labels: list[int]) -> dict[int, float]:
    from medseg.io import load_volume
    from medseg.metrics import count_overlaps, dice

    pred = load_volume(pred_path).array
    ref = load_volume(ref_path).array
    return {k: dice(c) for k, c in count_overlaps(pred, ref, labels).items()}


def _mean_min(d: dict[int, float]) -> tuple[float, float]:
    vals = [v for v in d.values() if v == v]  # drop NaN (label empty in both)
    return (statistics.fmean(vals), min(vals)) if vals else (float("nan"), float("nan"))


def _stage(stages: dict[str, float], name: str) -> float | None:
    if name in stages:
        return stages[name]
    parts = ("preprocess", "sliding window", "restore")
    if name == "predict" and all(k in stages for k in parts):
        return sum(stages[k] for k in parts)
    return None


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None or x != x else format(x, spec)


def machine_line(threads: int, allocator: str) -> str:
    import torch

    try:
        import monai

        monai_v = monai.__version__
    except ImportError:
        monai_v = "?"
    try:
        from importlib.metadata import version

        nn_v = version("nnunetv2")
    except Exception:  # noqa: BLE001
        nn_v = "not installed"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    alloc = (
        "tuned (" + " ".join(f"{k}={v}" for k, v in TUNED_ALLOCATOR.items()) + ")"
        if allocator == "tuned"
        else "glibc default"
    )
    return (
        f"{cores} cores usable, load avg {load:.1f} at the start, {platform.machine()}, "
        f"torch {torch.__version__} "
        f"({threads} threads), MONAI {monai_v}, nnunetv2 {nn_v}, allocator {alloc}"
    )


def report(
    args: argparse.Namespace,
    results: dict[str, list[dict]],
    skipped: dict[str, str],
    model: Path,
    volume: Path,
    reference: Path | None,
    machine: str,
    command: str,
) -> tuple[str, dict[str, Any]]:
    from medseg.io import load_volume
    from medseg.runtime.bundle import load_bundle

    bundle = load_bundle(model, device="cpu")
    plan = bundle.plan
    labels = [int(v) for v in plan.label_values]
    vol = load_volume(volume)
    shape = "×".join(map(str, vol.spatial_shape))
    spacing = "×".join(f"{s:g}" for s in vol.spacing_mm)

    med = {n: statistics.median(r["seconds"] for r in rs) for n, rs in results.items()}
    ref_out = results["medseg"][-1]["output"]
    agree = {n: dice_table(rs[-1]["output"], ref_out, labels) for n, rs in results.items()}
    truth = (
        {n: dice_table(rs[-1]["output"], str(reference), labels) for n, rs in results.items()}
        if reference
        else {}
    )
    nn = med.get("nnunet")
    lines = [
        f"Volume: `{volume}` ({shape} voxels at {spacing} mm); model: `{model}` "
        f"({type(bundle.model).__name__}, patch {'×'.join(map(str, plan.patch_size))} at "
        f"{'×'.join(f'{s:g}' for s in plan.target_spacing_mm)} mm, {plan.out_channels} output channels, "
        f"checkpoint {bundle.checkpoint}); overlap {args.overlap} (nnU-Net tile_step_size "
        f"{1 - args.overlap:g}); batch of windows: medseg {args.batch_size}, MONAI {args.batch_size}, "
        f"nnU-Net 1; MONAI blending {args.monai_blend}; {args.repeats} run(s) per contender, each in a fresh "
        "process; seconds = median (min) wall-clock, CPU s = median process CPU seconds (user + system, all "
        "threads; less sensitive to other load on a shared machine than wall-clock).",
        "",
        "| contender | seconds | CPU s | windows | windows/s | network ms/window "
        "| peak RSS MB (after imports) | Dice vs medseg mean / min | Dice vs reference mean "
        "| speed vs nnU-Net |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in CONTENDERS:
        if n not in results:
            lines.append(f"| {TITLES[n]} | not run: {skipped.get(n, '')} | | | | | | | | |")
            continue
        rs = results[n]
        last = rs[-1]
        secs = [r["seconds"] for r in rs]
        w = last["windows"]
        ms = 1000 * statistics.median(r["network_seconds"] for r in rs) / w if w else None
        rss = max(r["peak_rss_mb"] for r in rs)
        cpu = statistics.median(r["cpu_seconds"] for r in rs)
        rss0 = statistics.median(r["rss_after_imports_mb"] for r in rs)
        dmean, dmin = _mean_min(agree[n])
        tmean = _mean_min(truth[n])[0] if truth else None
        ratio = nn / med[n] if nn else None
        lines.append(
            f"| {TITLES[n]} | {med[n]:.2f} ({min(secs):.2f}) | {cpu:.1f} | {w if w else 'n/a'} | "
            f"{_fmt(w / med[n] if w else None, '.2f')} | {_fmt(ms, '.0f')} | {rss:.0f} ({rss0:.0f}) | "
            f"{'(reference)' if n == 'medseg' else f'{dmean:.4f} / {dmin:.4f}'} | {_fmt(tmean, '.4f')} | "
            f"{_fmt(ratio, '.2f')}{'×' if ratio else ''} |"
        )
    case = results["medseg"][-1].get("case", {})
    if case.get("windows") is not None:
        lines += [
            "",
            f"medseg ran {case.get('windows_run')} of its {case.get('windows')} grid windows (windows "
            "entirely in air are skipped); the windows column counts forward passes seen by a hook on the "
            "model.",
        ]
    roi_case = results["medseg_roi"][-1].get("case", {}) if "medseg_roi" in results else {}
    if roi_case.get("coarse_windows_run") is not None:
        lines += [
            "",
            f"medseg --coarse-roi ran {roi_case['coarse_windows_run']} non-overlapping windows, then "
            f"{roi_case['windows_run']} of the {roi_case['windows']} overlapping ones.",
        ]
    # stage breakdown
    stage_names = ["load model", "read", "predict", "preprocess", "sliding window", "restore", "write"]
    lines += [
        "",
        "Stages (median seconds; *predict* = preprocess + sliding window + restore, which medseg's slab-wise "
        "engine interleaves; *network* = time inside the model's forward, part of the sliding window):",
        "",
        "| contender | " + " | ".join(stage_names) + " | network |",
        "|---|" + "---|" * (len(stage_names) + 1),
    ]
    for n, rs in results.items():
        cells = []
        for k in stage_names:
            vals = [_stage(r["stages"], k) for r in rs]
            vals = [v for v in vals if v is not None]
            cells.append(f"{statistics.median(vals):.2f}" if vals else "")
        cells.append(f"{statistics.median(r['network_seconds'] for r in rs):.2f}")
        lines.append(f"| {TITLES[n]} | " + " | ".join(cells) + " |")
    # per-label Dice
    names = dict(zip(plan.label_values, plan.structure_names, strict=True))
    lines += ["", "Per-label Dice vs medseg" + (" (and vs reference)" if truth else "") + ":", ""]
    cols = [n for n in results if n != "medseg"]
    hdr = [f"{TITLES[n]} vs medseg" for n in cols]
    if truth:
        hdr += [f"{TITLES[n]} vs ref" for n in results]
    lines += ["| label | " + " | ".join(hdr) + " |", "|---|" + "---|" * len(hdr)]
    for v in labels:
        cells = [_fmt(agree[n][v], ".4f") for n in cols]
        if truth:
            cells += [_fmt(truth[n][v], ".4f") for n in results]
        lines.append(f"| {names[v]} ({v}) | " + " | ".join(cells) + " |")
    if "monai" in results and "nnunet" in results:
        bc = _mean_min(dice_table(results["monai"][-1]["output"], results["nnunet"][-1]["output"], labels))
        lines += ["", f"MONAI vs nnU-Net Dice: mean {bc[0]:.4f}, min {bc[1]:.4f}."]
    # goal
    summary: dict[str, Any] = {"median_seconds": med}
    if nn:
        ratio = nn / med["medseg"]
        worst = _mean_min(agree["nnunet"])[1]
        summary.update(ratio=ratio, min_dice=worst)
        lines += [
            "",
            f"Goal (medseg ≥ 1.5× nnU-Net's predictor, Dice agreement with it ≥ 0.995): speed {ratio:.2f}× "
            f"({'met' if ratio >= 1.5 else 'not met'}), lowest per-label Dice agreement with nnU-Net "
            f"{worst:.4f} ({'met' if worst >= 0.995 else 'not met'}).",
        ]
        if "medseg_probabilities" in results:
            out = results["medseg_probabilities"][-1]["output"]
            lg = _mean_min(dice_table(out, results["nnunet"][-1]["output"], labels))
            rl = nn / med["medseg_probabilities"]
            summary.update(ratio_probabilities=rl, min_dice_probabilities=lg[1])
            lines.append(
                f"With `--resample probabilities`: speed {rl:.2f}×, Dice agreement with nnU-Net mean "
                f"{lg[0]:.4f}, lowest {lg[1]:.4f} ({'met' if rl >= 1.5 and lg[1] >= 0.995 else 'not met'})."
            )
    else:
        lines += ["", f"nnU-Net v2 not run ({skipped.get('nnunet', '')}): no speed ratio."]
    pp = getattr(bundle, "postprocessing", None)
    if pp is not None and pp.active:
        lines += [
            "",
            f"Note: the model's post-processing ({pp}) is active: medseg applies it, MONAI and nnU-Net "
            "do not.",
        ]
    lines += [
        "",
        f"- machine: {machine}",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        f"- command: `{command}`",
    ]
    return "\n".join(lines) + "\n", summary


def write_doc(text: str, doc: Path) -> None:
    block = f"{DOC_BEGIN}\n{text}{DOC_END}"
    old = doc.read_text() if doc.is_file() else "# Benchmarks\n"
    if DOC_BEGIN in old and DOC_END in old:
        new = re.sub(re.escape(DOC_BEGIN) + r".*?" + re.escape(DOC_END), lambda _m: block, old, flags=re.S)
    else:
        new = old.rstrip("\n") + (
            "\n\n## Inference: medseg predict vs MONAI sliding window vs nnU-Net v2's predictor\n\n"
            "Written by `scripts/bench_inference.py` (its docstring has the details); re-run the command "
            f"below to reproduce it.\n\n{block}\n"
        )
    doc.write_text(new)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="medseg run directory (default: train one under --work)")
    p.add_argument("--volume", type=Path, help="CT image (NIfTI, ...); default: a synthetic phantom")
    p.add_argument("--reference", type=Path, help="reference label map of --volume (optional)")
    p.add_argument("--shape", type=int, nargs=3, default=[256, 256, 160], metavar=("X", "Y", "Z"))
    p.add_argument("--spacing", type=float, default=1.5, help="isotropic spacing of the phantom (mm)")
    p.add_argument("--overlap", type=float, default=0.5, help="window overlap (nnU-Net step = 1 - overlap)")
    p.add_argument("--repeats", type=int, default=3, help="runs per contender, each in a fresh process")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    p.add_argument("--batch-size", type=int, default=2, help="windows per batch for medseg and MONAI")
    p.add_argument(
        "--engine",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra medseg EngineOptions, e.g. skip_air=false or accumulator_dtype=float16 (repeatable)",
    )
    p.add_argument("--monai-blend", choices=("constant", "gaussian"), default="constant")
    p.add_argument("--allocator", choices=("tuned", "default"), default="tuned")
    p.add_argument(
        "--contenders",
        nargs="+",
        choices=CONTENDERS,
        default=[c for c in CONTENDERS if c not in MEDSEG_VARIANTS],
        help="which to run (default medseg, monai, nnunet; add the variants medseg_probabilities and "
        "medseg_roi)",
    )
    p.add_argument("--skip-nnunet", action="store_true", help="leave nnU-Net out on purpose (exit 0)")
    p.add_argument("--train-epochs", type=int, default=3, help="epochs of the auto-made model")
    p.add_argument(
        "--work",
        type=Path,
        default=Path("runs/bench_inference"),
        help="scratch folder (default runs/bench_inference, git-ignored)",
    )
    p.add_argument("--out", type=Path, help="write the markdown result here (default WORK/results.md)")
    p.add_argument("--write-doc", action="store_true", help="also put the result into docs/benchmarks.md")
    p.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 0 <= args.overlap < 1:
        p.error("--overlap must be in [0, 1)")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_line(args.threads, args.allocator)  # load average before our own work

    contenders = [c for c in CONTENDERS if c in args.contenders]
    skipped: dict[str, str] = {}
    if "medseg" not in contenders:
        raise SystemExit("--contenders must include medseg (the Dice reference)")
    if "nnunet" in contenders and args.skip_nnunet:
        contenders.remove("nnunet")
        skipped["nnunet"] = "--skip-nnunet"
    nn_missing = False
    if "nnunet" in contenders:
        err = nnunet_importable()
        if err:
            nn_missing = True
            contenders.remove("nnunet")
            skipped["nnunet"] = "nnunetv2 not importable"
            print(
                f"bench_inference: nnunetv2 is not importable in {sys.executable} ({err}); running medseg "
                f"and MONAI only. Install it with: {NNUNET_INSTALL}",
                file=sys.stderr,
            )
    for c in CONTENDERS:
        if c not in contenders and c not in skipped:
            skipped[c] = "not selected (--contenders)"

    reference = args.reference
    if args.volume is None:
        volume, reference = make_volume(work, tuple(args.shape), args.spacing, index=103)
    else:
        volume = args.volume.resolve()
    model = args.model.resolve() if args.model else make_model(work, args.train_epochs)
    print(
        f"benchmark: {volume} with {model}, {args.repeats} run(s) each of {', '.join(contenders)}", flush=True
    )
    results: dict[str, list[dict]] = {c: [] for c in contenders}
    for rep in range(args.repeats):
        order = contenders[rep % len(contenders) :] + contenders[: rep % len(contenders)]
        for name in order:
            results[name].append(run_child(name, rep, args, work, model, volume))

    text, _summary = report(args, results, skipped, model, volume, reference, machine, command)
    out = args.out or work / "results.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print("\n" + text)
    print(f"written to {out}")
    if args.write_doc:
        write_doc(text, ROOT / "docs" / "benchmarks.md")
        print(f"written to {ROOT / 'docs' / 'benchmarks.md'}")
    if nn_missing:
        print(
            f"bench_inference: nnU-Net v2 was not run (nnunetv2 not importable). {NNUNET_INSTALL}",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
