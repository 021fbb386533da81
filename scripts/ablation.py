"""Ablation of the classic segmentation choices: each variant trained for the same wall-clock budget on
the same data and split, predicted with ``medseg predict``, scored with ``medseg evaluate``.

Usage::

    python scripts/ablation.py --dataset ct --data demo_out/ct --minutes 2 --seeds 0 1 \\
        --work /tmp/ablation_ct --doc docs/ablation.md
    python scripts/ablation.py --dataset cxr --data /path/to/jsrt_fold_a --minutes 3 --seeds 0 \\
        --work /tmp/ablation_cxr --doc docs/ablation.md

``--dataset ct``: a folder made by ``medseg data synth ct`` (MSD layout, held-out cases in
``imagesTs``/``labelsTs``), base config ``configs/demo_ct.yaml`` at a coarser spacing and patch
(``DEFAULT_SETS``) so that each network gets hundreds of steps in minutes on a CPU. ``--dataset cxr``:
an SCR-layout folder (``images/``, ``masks/<structure>/``, held-out cases in ``test.txt``), e.g. the
chest X-ray phantoms or JSRT/SCR fold A, base config ``configs/chest_xray.yaml`` (``--config``: another).

Every variant is the reference U-Net (``model.name: unet``, no residual blocks, border weights, CE +
plain soft Dice, deconvolution upsampling, no CRF) with one change; each is its own ``medseg train``
process with ``train.max_minutes`` = ``--minutes`` (the budget covers planning and preprocessing too,
into a fresh cache per run, and the learning-rate schedule is laid over it) and ``train.epochs`` large
enough never to end first. The CRF row re-predicts the reference run with ``--crf``; the threshold row
fits ``medseg baseline threshold`` on the same training cases. Predictions of the held-out cases are
scored with ``medseg evaluate --distances`` (Dice and HD95 on each case's own grid).

The table gives per structure the mean Dice over held-out cases and seeds, the mean of the structures,
its difference to the reference row with the spread over seeds, HD95 (mean over structures, mm), the
network's parameters, training seconds (wall clock of ``medseg train``) and epochs, inference seconds
(wall clock of ``medseg predict`` over all held-out cases) and its peak memory (``predict.json``). The
verdict compares the difference in mean Dice to the seed spread of the two rows (the largest minus the
smallest mean Dice over seeds): "helps"/"hurts" when it is larger than both spreads, else "within
noise" (one seed: no verdict).

``--doc`` writes the table into the file between ``<!-- ablation:<dataset>:begin -->`` and
``<!-- ablation:<dataset>:end -->`` (added at the end if absent), with the command line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Variant:
    """One row: a name, what it changes, its ``--set`` items and how it is made."""

    name: str
    what: str
    sets: tuple[str, ...] = ()
    kind: str = "train"  # "train", "crf" (re-predict the reference with --crf), "threshold"


REFERENCE = (
    "model.name=unet",
    "model.residual=false",
    "model.upsample=deconv",
    "model.deep_supervision=false",
    "loss.dice_weight=1",
    "loss.ce_weight=1",
    "loss.focal_weight=0",
    "loss.dice_squared=false",
    "loss.class_weights=none",
    "loss.border_weights.enabled=true",
    "predict.crf.enabled=false",
)
"""The reference row's settings, pinned so that another base config cannot change what a row varies."""
VARIANTS = [
    Variant("threshold", "gray-level windows + components + hole filling, no network", kind="threshold"),
    Variant("unet", "reference: U-Net, border weights, CE + soft Dice, deconvolution"),
    Variant("fcn", "FCN-8s", ("model.name=fcn",)),
    Variant("unet_residual", "U-Net with residual blocks", ("model.residual=true",)),
    Variant("dense_unet", "FC-DenseNet (Tiramisu)", ("model.name=dense_unet",)),
    Variant("deeplab", "DeepLabv3+ (ASPP)", ("model.name=deeplab",)),
    Variant("pspnet", "PSPNet (pyramid pooling)", ("model.name=pspnet",)),
    Variant("no_border_weights", "U-Net without border weights", ("loss.border_weights.enabled=false",)),
    Variant(
        "class_weights",
        "U-Net, median-frequency class weights of the training set instead of the border map's per-case ones",
        ("loss.class_weights=median_frequency",),
    ),
    Variant("focal", "U-Net, focal (γ 2) instead of CE", ("loss.ce_weight=0", "loss.focal_weight=1")),
    Variant("dice_squared", "U-Net, squared Dice denominator", ("loss.dice_squared=true",)),
    Variant("crf", "the reference U-Net + dense CRF at prediction", kind="crf"),
    Variant("resize_upsampling", "U-Net, resize + convolution upsampling", ("model.upsample=resize",)),
]
CONFIGS = {"ct": "configs/demo_ct.yaml", "cxr": "configs/chest_xray.yaml"}
DEFAULT_SETS = {
    # the demo config's spacing and patch, coarser, so that nnU-Net's U-Net (4x the cost per step of the
    # demo's MONAI UNet on a CPU, and the only one with both upsampling kinds) gets a few hundred steps in
    # minutes; given first, so --set overrides them
    "ct": ("train.target_spacing_mm=[3.2,3.2,4.0]", "train.patch_size=[32,32,24]"),
    "cxr": (),
}


@dataclass
class Result:
    variant: Variant
    seed: int
    dice: dict[str, float] = field(default_factory=dict)
    hd95: dict[str, float] = field(default_factory=dict)
    params: int | None = None
    train_s: float | None = None
    epochs: int | None = None
    infer_s: float | None = None
    peak_mb: float | None = None
    error: str | None = None


def _medseg() -> list[str]:
    exe = Path(sys.executable).with_name("medseg")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "medseg"]


def _run(cmd: list[str], log: Path) -> float:
    """Run a command with its output in ``log``; its wall-clock seconds, or RuntimeError on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if code != 0:
        raise RuntimeError(f"exit {code}: {shlex.join(cmd)} (see {log})")
    return time.perf_counter() - t0


def _test_inputs(dataset: str, data: Path) -> list[Path]:
    if dataset == "ct":
        return sorted((data / "imagesTs").glob("*.nii.gz"))
    ids = [s.strip() for s in (data / "test.txt").read_text().splitlines() if s.strip() and s[0] != "#"]
    images = {p.stem: p for p in (data / "images").iterdir()}
    return [images[i] for i in ids]


def _references(dataset: str, data: Path, work: Path) -> Path:
    """The held-out references as ``medseg evaluate`` reads them (SCR masks linked as <case>/<s>.png)."""
    if dataset == "ct":
        return data / "labelsTs"
    ref = work / "references"
    if ref.exists():
        return ref
    ids = [p.stem for p in _test_inputs(dataset, data)]
    for structure_dir in sorted(p for p in (data / "masks").iterdir() if p.is_dir()):
        for mask in structure_dir.iterdir():
            if mask.stem in ids:
                (ref / mask.stem).mkdir(parents=True, exist_ok=True)
                os.symlink(mask.resolve(), ref / mask.stem / f"{structure_dir.name}{mask.suffix}")
    return ref


def _params(run: Path) -> int:
    import torch

    ck = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    buffers = ("running_mean", "running_var", "num_batches_tracked")  # normalisation statistics
    return int(sum(v.numel() for k, v in ck["model"].items() if not k.endswith(buffers)))


def _evaluate(result: Result, run: Path, pred: Path, ref: Path, work: Path) -> None:
    out = work / "eval"
    shutil.rmtree(out, ignore_errors=True)
    _run([*_medseg(), "evaluate", "--pred", str(pred), "--ref", str(ref), "--labels", str(run),
          "--distances", "--no-plot", "--output", str(out)], work / "evaluate.log")  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    for name, stats in summary["structures"].items():  # None: no valid case (statistics skip NaN/inf)
        dice, hd95 = stats["dice"]["mean"], (stats.get("hd95_mm") or {}).get("mean")
        result.dice[name] = float("nan") if dice is None else float(dice)
        result.hd95[name] = float("nan") if hd95 is None else float(hd95)


def _predict(result: Result, run: Path, inputs: list[Path], work: Path, extra: list[str]) -> Path:
    pred = work / "pred"
    shutil.rmtree(pred, ignore_errors=True)
    cmd = [*_medseg(), "predict", "--model", str(run), "--input", *map(str, inputs), "--output", str(pred),
           "--device", "cpu", "--no-progress", *extra]  # fmt: skip
    result.infer_s = _run(cmd, work / "predict.log")
    manifest = json.loads((pred / "predict.json").read_text())
    result.peak_mb = manifest.get("peak_rss_mb")
    return pred


def run_variant(v: Variant, seed: int, args: argparse.Namespace, runs: dict[int, Path]) -> Result:
    """Train (or fit, or reuse) one variant for one seed, predict the held-out cases and score them."""
    result = Result(v, seed)
    work = args.work / f"{v.name}-s{seed}"
    work.mkdir(parents=True, exist_ok=True)
    run = work / "run"
    common = [*DEFAULT_SETS[args.dataset], f"data.root={args.data}", f"train.seed={seed}",
              f"train.cache_dir={work / 'cache'}", "train.device=cpu", *args.set]  # fmt: skip
    try:
        if v.kind == "crf":
            run = runs[seed]  # the reference run, predicted again with the CRF
        else:
            shutil.rmtree(run, ignore_errors=True)
            shutil.rmtree(work / "cache", ignore_errors=True)
            sets = [*REFERENCE, *v.sets, *common]
            if v.kind == "threshold":
                cmd = [
                    *_medseg(),
                    "baseline",
                    "threshold",
                    "--config",
                    str(args.config),
                    "--run-dir",
                    str(run),
                ]
            else:
                sets += [f"train.max_minutes={args.minutes}", "train.epochs=100000"]
                cmd = [
                    *_medseg(),
                    "train",
                    "--config",
                    str(args.config),
                    "--run-dir",
                    str(run),
                    "--no-progress",
                ]
            for s in sets if v.kind == "train" else common:
                cmd += ["--set", s]
            result.train_s = _run(cmd, work / "train.log")
            if v.kind == "train":
                with open(run / "metrics.csv", newline="") as fh:
                    result.epochs = len(list(csv.DictReader(fh)))
            if v.name == "unet":
                runs[seed] = run
        result.params = _params(run)
        pred = _predict(
            result, run, _test_inputs(args.dataset, args.data), work, ["--crf"] if v.kind == "crf" else []
        )
        _evaluate(result, run, pred, _references(args.dataset, args.data, args.work), work)
    except (RuntimeError, OSError, KeyError, ValueError) as exc:
        result.error = str(exc)
        print(f"  {v.name} seed {seed}: FAILED {exc}", file=sys.stderr)
    return result


# --------------------------------------------------------------------------------------------- table


def _mean(values: list[float]) -> float:
    ok = [x for x in values if x == x and x != float("inf")]
    return sum(ok) / len(ok) if ok else float("nan")


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or x != x else f"{x:.{digits}f}"


def table(results: list[Result], structures: list[str]) -> str:
    by: dict[str, list[Result]] = {}
    for r in results:
        by.setdefault(r.variant.name, []).append(r)

    def seed_means(rs: list[Result]) -> list[float]:
        return [_mean([r.dice.get(s, float("nan")) for s in structures]) for r in rs if not r.error]

    ref = seed_means(by.get("unet", []))
    ref_spread = max(ref) - min(ref) if len(ref) > 1 else None
    head = ["variant", *structures, "mean Dice", "Δ vs U-Net (seed spread)", "verdict", "HD95 mm", "params",
            "train s (epochs)", "predict s", "peak MB"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in VARIANTS:
        rs = by.get(v.name)
        if not rs:
            continue
        ok = [r for r in rs if not r.error]
        if not ok:
            lines.append(f"| {v.name} | failed: {rs[0].error} |")
            continue
        means = seed_means(rs)
        m = _mean(means)
        spread = max(means) - min(means) if len(means) > 1 else None
        delta, verdict = "", ""
        if v.name != "unet" and ref:
            d = m - _mean(ref)
            delta = f"{d:+.3f}" + (f" ({spread:.3f} / {ref_spread:.3f})" if spread is not None else "")
            if spread is not None and ref_spread is not None:
                noise = max(spread, ref_spread)
                verdict = "helps" if d > noise else "hurts" if d < -noise else "within noise"
        per = [_fmt(_mean([r.dice.get(s, float("nan")) for r in ok])) for s in structures]
        hd = _mean([_mean([r.hd95.get(s, float("nan")) for s in structures]) for r in ok])
        train = _mean([r.train_s for r in ok if r.train_s is not None])
        epochs = _mean([r.epochs for r in ok if r.epochs is not None])
        row = [f"`{v.name}`: {v.what}", *per, _fmt(m), delta, verdict, _fmt(hd, 1),
               f"{ok[0].params / 1e6:.2f} M" if ok[0].params is not None else "—",
               f"{_fmt(train, 0)}" + (f" ({epochs:.0f})" if epochs == epochs else ""),
               _fmt(_mean([r.infer_s for r in ok if r.infer_s is not None]), 1),
               _fmt(_mean([r.peak_mb for r in ok if r.peak_mb is not None]), 0)]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_doc(doc: Path, dataset: str, body: str) -> None:
    begin, end = f"<!-- ablation:{dataset}:begin -->", f"<!-- ablation:{dataset}:end -->"
    text = doc.read_text() if doc.exists() else "# Ablation of the classic segmentation choices\n"
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = doc.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(doc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--data", type=Path, required=True, help="the dataset folder")
    parser.add_argument("--config", type=Path, help="base config (default: the dataset's, see above)")
    parser.add_argument("--minutes", type=float, default=2.0, help="wall-clock budget of each training run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="+", choices=[v.name for v in VARIANTS], help="run these rows only")
    parser.add_argument("--set", action="append", default=[], help="extra config override for every run")
    parser.add_argument("--work", type=Path, required=True, help="folder for runs, predictions, logs")
    parser.add_argument("--doc", type=Path, help="write the table into this Markdown file")
    args = parser.parse_args(argv)
    args.data, args.work = args.data.resolve(), args.work.resolve()
    args.config = (args.config or ROOT / CONFIGS[args.dataset]).resolve()
    chosen = [v for v in VARIANTS if not args.only or v.name in args.only]
    if any(v.kind == "crf" for v in chosen) and not any(v.name == "unet" for v in chosen):
        chosen.insert(0, next(v for v in VARIANTS if v.name == "unet"))  # the CRF row re-predicts it
    results: list[Result] = []
    runs: dict[int, Path] = {}
    t0 = time.perf_counter()
    for seed in args.seeds:
        for v in sorted(chosen, key=lambda v: v.kind == "crf"):  # the reference before its CRF row
            print(f"[{time.perf_counter() - t0:6.0f} s] {v.name} seed {seed}", flush=True)
            results.append(run_variant(v, seed, args, runs))
    structures: list[str] = []
    for r in results:
        structures += [s for s in r.dice if s not in structures]
    body = table(results, structures)
    cmd = "python scripts/ablation.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    header = (
        f"Dataset `{args.dataset}` ({args.data.name}, {len(_test_inputs(args.dataset, args.data))} held-out "
        f"cases), {args.minutes:g} min of training per run, seeds {args.seeds}, {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), {time.strftime('%Y-%m-%d')}; "
        f"{(time.perf_counter() - t0) / 60:.0f} min in all:\n\n```\n{cmd}\n```\n"
    )
    print(header + "\n" + body)
    if args.doc:
        write_doc(args.doc, args.dataset, header + "\n" + body)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
