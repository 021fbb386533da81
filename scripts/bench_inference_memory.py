"""Peak memory of `medseg predict` on long CT scans: does it stay bounded as the scan grows?

Each measurement runs in its own child process (this script with ``--child``), started from one run
of this script with the same environment, and reports its own peak RSS (``VmHWM``, see
:func:`medseg.inference.process.peak_rss_bytes`: ``ru_maxrss`` would include this parent's peak) and time:

- ``medseg``: the real user path, :func:`medseg.inference.predict.predict_files` (read the scan block
  by block -> slab-wise engine -> write NIfTI), on 512×512×Z synthetic body phantoms (0.8×0.8×1 mm,
  int16) stored as ``--inputs``: an axial NIfTI (``nifti``), a DICOM series of Z files (``dicom``), or
  a NIfTI stored sagittally, left-right as its last axis (``sagittal``);
- ``medseg loaded`` (``--loaded``): the same with the scan loaded whole first (the reader's block
  access switched off in this script), to show what streaming saves;
- ``monai one-shot``: the same preprocessing, MONAI ``sliding_window_inference`` over the whole
  preprocessed image, softmax and full-volume restoration (what a straightforward pipeline does).

Every child first sets the allocator as ``medseg predict`` does for its process
(:func:`medseg.inference.process.tune_allocator`); with ``MEDSEG_MALLOC=default`` in the environment
all children keep glibc's defaults.

The network has random weights (memory does not depend on them) and ``--classes`` outputs. Targets (the
inference memory goal): 512×512×1000 costs ≤ 1.3× the peak of 512×512×250; a 20-class model on 512×512×600
stays under 6 GB. Writes a markdown table to ``--out``.

    python scripts/bench_inference_memory.py --slices 250 1000 --inputs nifti dicom sagittal --loaded
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_run(run: Path, classes: int, spacing: float, patch: tuple[int, int, int]) -> None:
    """A run directory with a small random-weight U-Net and a CT plan."""
    import torch

    from medseg.config import ModelConfig
    from medseg.data.plan import ChannelNorm, Plan
    from medseg.models.unet import create_model

    names = tuple(f"organ{i}" for i in range(1, classes + 1))
    plan = Plan(
        spatial_dims=3,
        modality="ct",
        mode="softmax",
        structure_names=names,
        label_values=tuple(range(1, classes + 1)),
        in_channels=1,
        target_spacing_mm=(spacing, spacing, max(spacing, 2.0)),
        patch_size=patch,
        normalization=(ChannelNorm("ct", -1000.0, 1000.0, 40.0, 300.0),),
        crop_to_body=True,
        body_threshold=-500.0,
    )
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    plan.save(run / "plan.json")
    cfg = ModelConfig(name="monai_unet", channels=[8, 16, 32])
    torch.manual_seed(0)
    net = create_model(cfg, spatial_dims=3, in_channels=1, out_channels=classes + 1, patch_size=patch)
    torch.save(
        {"model": net.state_dict(), "model_config": cfg.model_dump(mode="json")},
        run / "checkpoints" / "best.pt",
    )


def make_scan(path: Path, z: int, fmt: str) -> None:
    """512×512×z int16 phantom: an elliptic body (soft tissue + noise) with denser blobs, in air,
    written as ``fmt`` (see the module docstring)."""
    import nibabel as nib
    import numpy as np

    from medseg.io.dicom_write import write_dicom_series
    from medseg.types import Volume

    rng = np.random.default_rng(z)
    x, y = np.meshgrid(np.arange(512), np.arange(512), indexing="ij")
    body = ((x - 256) / 200.0) ** 2 + ((y - 260) / 150.0) ** 2 <= 1
    arr = np.full((512, 512, z), -1000, np.int16)
    for k in range(z):
        sl = arr[:, :, k]
        sl[body] = 40 + rng.integers(-30, 30, int(body.sum()), dtype=np.int16)
        r = 60 + 25 * np.sin(k / 40.0)
        sl[((x - 220) ** 2 + (y - 250) ** 2) < r * r] = 150
    affine = np.diag([0.8, 0.8, 1.0, 1.0])
    if fmt == "dicom":
        write_dicom_series(Volume(arr[None], affine), path)
    elif fmt == "sagittal":  # stored (A, S, R): the slab axis S is the second stored axis
        nib.save(
            nib.Nifti1Image(np.asfortranarray(arr.transpose(1, 2, 0)), affine[:, [1, 2, 0, 3]]), str(path)
        )
    else:
        nib.save(nib.Nifti1Image(arr, affine), str(path))


def child(kind: str, run: Path, scan: Path, out: Path) -> dict:
    from medseg.inference.process import peak_rss_bytes, tune_allocator

    tune_allocator()  # what `medseg predict` does for its process (MEDSEG_MALLOC=default: not)
    t0 = time.perf_counter()
    if kind.startswith("medseg"):
        import medseg.inference.predict
        from medseg.inference.predict import BatchOptions, predict_files

        if kind == "medseg loaded":
            medseg.inference.predict._open_streaming = lambda *a: None

        m = predict_files(run, [scan], out, device="cpu", batch=BatchOptions(progress=False, overwrite=True))
        if m["failures"]:
            raise SystemExit(m["failures"])
        extra = {"windows": m["cases"][0]["windows"], "windows_run": m["cases"][0]["windows_run"]}
    else:
        import numpy as np
        import torch
        from monai.inferers import sliding_window_inference

        from medseg.data.preprocess import preprocess_volume
        from medseg.inference.restore import restore_to_original
        from medseg.io import load_volume, save_label_map
        from medseg.runtime.bundle import load_bundle

        bundle = load_bundle(run, device="cpu")
        vol = load_volume(scan)
        arr, props = preprocess_volume(vol, bundle.plan)
        x = torch.from_numpy(arr)[None]
        with torch.no_grad():  # MONAI's one-shot output: the whole (K, *spatial) float tensor in memory
            logits = sliding_window_inference(
                x, tuple(bundle.plan.patch_size), 2, bundle.model, overlap=0.5, mode="gaussian"
            )[0]
        probs = torch.softmax(logits, 0).numpy()
        del logits
        lab = restore_to_original(probs, props, bundle.plan)
        save_label_map(vol.with_array(lab.astype(np.uint8)), out / "oneshot.nii")
        extra = {}
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_mb": round(peak_rss_bytes() / 2**20),
        **extra,
    }


def measure(kind: str, run: Path, scan: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(run), str(scan), str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{kind} on {scan} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=4, metavar=("KIND", "RUN", "SCAN", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--slices", type=int, nargs="+", default=[250, 600, 1000], help="scan lengths")
    ap.add_argument("--classes", type=int, default=20, help="structures of the model (+ background)")
    ap.add_argument("--spacing", type=float, default=1.5, help="in-plane target spacing of the plan (mm)")
    ap.add_argument("--patch", type=int, nargs=3, default=[96, 96, 48])
    ap.add_argument("--no-monai", action="store_true", help="skip the one-shot MONAI comparison")
    ap.add_argument(
        "--inputs", nargs="+", choices=["nifti", "dicom", "sagittal"], default=["nifti"], help="input storage"
    )
    ap.add_argument("--loaded", action="store_true", help="also run medseg with the scan loaded whole")
    ap.add_argument("--workdir", type=Path, help="where scans are written (default: a temp folder)")
    ap.add_argument("--out", type=Path, help="write the markdown table here")
    args = ap.parse_args()
    if args.child:
        kind, run, scan, out = args.child
        print(json.dumps(child(kind, Path(run), Path(scan), Path(out))))
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="medseg-bench-mem-"))
    run = work / "run"
    make_run(run, args.classes, args.spacing, tuple(args.patch))
    rows = []
    suffix = {"nifti": ".nii", "dicom": "_dicom", "sagittal": "_sagittal.nii"}
    for fmt in args.inputs:
        for z in args.slices:
            scan = work / f"ct_{z}{suffix[fmt]}"
            if not scan.exists():
                make_scan(scan, z, fmt)
            kinds = (
                ["medseg"]
                + (["medseg loaded"] if args.loaded else [])
                + ([] if args.no_monai else ["monai one-shot"])
            )
            for kind in kinds:
                r = measure(kind, run, scan, work / f"out_{kind.replace(' ', '_')}_{fmt}_{z}")
                rows.append({"kind": kind, "input": fmt, "slices": z, **r})
                print(rows[-1], flush=True)
    base = {(r["kind"], r["input"]): r["peak_rss_mb"] for r in rows if r["slices"] == min(args.slices)}
    lines = [
        f"Model: {args.classes} structures + background, monai_unet [8, 16, 32], patch {tuple(args.patch)}, "
        f"target spacing {args.spacing} mm; scans 512×512×Z int16 at 0.8×0.8×1 mm (uncompressed NIfTI or "
        f"DICOM); torch threads {os.cpu_count()} cores.",
        "",
        "| pipeline | input | slices | seconds | windows run / all | peak RSS (MB) | peak vs shortest |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        win = f"{r['windows_run']} / {r['windows']}" if "windows" in r else "all"
        ratio = r["peak_rss_mb"] / base[r["kind"], r["input"]]
        lines.append(
            f"| {r['kind']} | {r['input']} | {r['slices']} | {r['seconds']} | {win} | {r['peak_rss_mb']} | "
            f"{ratio:.2f}× |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
