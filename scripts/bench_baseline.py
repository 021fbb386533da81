"""Chest X-ray benchmark: the medseg recipe vs a plain MONAI baseline, trained for the same wall-clock
budget on the same SCR-layout data folder, evaluated on the same held-out cases.

Both contenders run one after the other in this one invocation (medseg first), on the same device
(``--device``, default CPU), with fixed seeds. The script prints per-structure Dice side by side (mean over
the dataset's test split, ``test.txt``), each contender's training seconds and epochs/iterations, and the
command line; ``--write-doc`` puts the same into ``docs/benchmarks.md`` between the
``<!-- bench_baseline:begin -->`` / ``<!-- bench_baseline:end -->`` markers.

Contender A: medseg
    ``medseg train --config CONFIG --set data.root=DATA ... --run-dir OUT/medseg_run`` runs *unchanged*
    in a child process (its own process group), and is sent SIGTERM when the budget is spent (SIGKILL 30 s
    later if it is still alive). The clock starts just before the child is spawned, so the budget covers
    everything a user waits for: interpreter start and imports, dataset discovery, the fingerprint and
    plan, preprocessing every training case into a *fresh* cache (``train.cache_dir`` is forced to
    ``OUT/medseg_cache``, so an earlier run's cache never saves time), training, the per-epoch validation
    and checkpoint writing. Checkpoints are written atomically at the end of every epoch, so killing the
    child at any moment leaves the last finished epoch intact; the work of the epoch in flight is lost, and
    that loss is part of the recipe's cost. ``checkpoints/best.pt`` (``last.pt`` if there is no best; see
    ``--checkpoint``) is evaluated, i.e. the model ``medseg predict`` would use. If the configured
    ``train.epochs`` finish inside the budget the child simply exits and its shorter time is reported.
    Killing was chosen over computing ``train.epochs`` from a calibration run because it needs no model of
    epoch cost (validation, first-epoch overheads, a shared machine) and enforces the budget exactly.
    Caveat: the poly learning-rate schedule is laid out over ``train.epochs``; when the budget stops the run
    long before that, the rate has not decayed. Pass ``--set train.epochs=N`` (N about the number of epochs
    that fit the budget, printed after a run) to let the schedule finish inside the budget.
    medseg trains on its own train/validation split of the training cases (``train.val_fraction``);
    validation picks ``best.pt``.

Contender B: the plain baseline (the issue's "MONAI ``UNet`` + ``DiceCELoss(sigmoid=True)`` + Adam in a
bare loop, same resolution, same budget")
    ``monai.networks.nets.UNet(spatial_dims=2, in_channels=1, out_channels=S, channels=(16, 32, 64, 128,
    256), strides=(2, 2, 2, 2), num_res_units=2)``, Adam (lr 1e-3), ``DiceCELoss(sigmoid=True)``, batches
    of 8 whole images from a shuffled ``DataLoader``, no augmentation, no validation, all training cases,
    the final weights evaluated. Images are resized to ``size x size`` (bilinear, ``align_corners=False``,
    the interpolation medseg's preprocessing uses) and z-scored per image; masks are resized bilinearly and
    thresholded at 0.5 (as medseg resamples masks). The clock starts before the training cases are read
    (data loading counts) and the loop stops after the first iteration that ends past the budget (it may
    overrun by one iteration; the actual seconds are reported). Note: MONAI's ``DiceCELoss`` applies
    *softmax* cross-entropy whenever there is more than one channel, ``sigmoid=True`` notwithstanding, which
    suits exclusive classes, not overlapping structures; ``--baseline-loss dice+bce`` replaces the CE term
    by ``BCEWithLogitsLoss`` for a stronger baseline (the default follows the issue).

Resolution
    ``--size S`` trains both at ``S x S``: medseg gets ``--set train.patch_size=[S,S]``, and its plan
    downsamples 2D images so the whole image fits the patch. Without ``--size`` the baseline uses the
    patch size of medseg's ``plan.json`` (the config's ``train.patch_size``).

Evaluation (not timed, identical for both)
    Every held-out case is read with ``medseg.data.datasets.load_case`` (masks stored at a lower
    resolution are resampled onto the image grid). Each model predicts at its training resolution, the
    per-structure sigmoid probabilities are upsampled bilinearly (``align_corners=False``) to the original
    image size, thresholded at 0.5 and scored with Dice per structure against the original masks (NaN when
    both are empty; means skip NaN). For medseg the image goes through its own plan
    (``preprocess_volume``: orientation, resampling, normalisation) and a Gaussian-weighted sliding window
    over the plan's patch size (``predict.overlap``, MONAI's ``sliding_window_inference``). A 2D
    PNG's geometry is its pixel frame and 2D preprocessing neither reorients nor crops; the script checks
    that (``props['crop']`` covers the whole image) and raises otherwise. No post-processing for either.

Examples::

    medseg data synth chest_xray --out /tmp/bb/cxr --cases 20
    python scripts/bench_baseline.py --data /tmp/bb/cxr --config configs/demo_chest_xray.yaml \\
        --budget-s 60 --size 128                                            # a quick smoke run
    python scripts/bench_baseline.py --data data/scr --size 256 --write-doc   # the 20-minute benchmark
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Chest X-ray: medseg recipe vs plain MONAI baseline"
BEGIN, END = "<!-- bench_baseline:begin -->", "<!-- bench_baseline:end -->"
INTRO = """\
The medseg recipe (`medseg train` with `configs/chest_xray.yaml`: planned resolution, DynUNet with
instance norm, Dice + border-weighted BCE, foreground-oversampled augmented batches, poly schedule,
validation picks `best.pt`) against the plain peer the issue names: MONAI `UNet((16, 32, 64, 128, 256),
num_res_units=2)` + `DiceCELoss(sigmoid=True)` + Adam (lr 1e-3) on whole z-scored images (batch 8, no
augmentation) in a bare loop. Both train at the same resolution for the same wall-clock budget on the
same machine, one after the other. medseg's budget includes its start-up, planning and preprocessing (into
a fresh cache); it runs as `medseg train` in a child process that is stopped when the budget is spent, and
its last checkpoint from a finished epoch is evaluated. The baseline's budget includes reading and
resizing the images. Both are scored on the held-out cases (`test.txt`) at the original image
resolution: probabilities upsampled bilinearly, threshold 0.5, Dice per structure, mean over cases.
Written by `scripts/bench_baseline.py` (its docstring has the details); re-run the command below to
reproduce it."""

BASELINE_CHANNELS = (16, 32, 64, 128, 256)
BASELINE_STRIDES = (2, 2, 2, 2)
BASELINE_LR = 1e-3
BASELINE_BATCH = 8
KILL_GRACE_S = 30.0


@dataclass
class Result:
    """One contender's training summary and per-case Dice (``cases x structures``)."""

    name: str
    seconds: float = float("nan")
    work: str = ""
    notes: list[str] = field(default_factory=list)
    dice: list[list[float]] = field(default_factory=list)

    def mean_dice(self, n_structures: int) -> np.ndarray:
        if not self.dice:
            return np.full(n_structures, np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column
            return np.nanmean(np.asarray(self.dice, dtype=float), axis=0)


# --------------------------------------------------------------------------------------------
# arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench_baseline.py",
        description="Train medseg (`medseg train`, stopped when the budget is spent) and a plain MONAI "
        "UNet + DiceCELoss(sigmoid=True) + Adam baseline for the same wall-clock budget on the same "
        "SCR-layout chest X-ray folder, at the same resolution, then print per-structure Dice on the "
        "held-out cases (test.txt) side by side. See the module docstring for the protocol.",
        epilog="example: python scripts/bench_baseline.py --data /tmp/bb/cxr --config "
        "configs/demo_chest_xray.yaml --budget-s 60 --size 128",
    )
    p.add_argument("--data", type=Path, required=True, metavar="DIR", help="SCR-layout data folder")
    p.add_argument(
        "--budget-s",
        type=float,
        default=1200.0,
        metavar="S",
        help="wall-clock training budget per contender in seconds (default 1200 = 20 min)",
    )
    p.add_argument(
        "--size",
        type=int,
        metavar="S",
        help="train both at S x S (medseg: --set train.patch_size=[S,S]; a multiple of 16); "
        "default: the config's patch size",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=REPO / "configs" / "chest_xray.yaml",
        metavar="FILE",
        help="medseg config (default configs/chest_xray.yaml); data.root is set to --data",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="medseg config override as in `medseg train --set` (repeatable), e.g. --set train.epochs=12",
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="work folder (medseg run dir, its cache, logs); default: a temporary folder, removed at the end",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of both contenders (default 0)")
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch threads for both (torch.set_num_threads; OMP/MKL_NUM_THREADS for the medseg "
        "process); default: torch's own choice",
    )
    p.add_argument("--device", default="cpu", help="device of both contenders: cpu or cuda[:N] (default cpu)")
    p.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default="best",
        help="medseg checkpoint to evaluate (default best, falling back to last)",
    )
    p.add_argument(
        "--baseline-loss",
        choices=("dicece", "dice+bce"),
        default="dicece",
        help="dicece: MONAI DiceCELoss(sigmoid=True) as the issue specifies (its CE term is softmax CE "
        "for more than one channel); dice+bce: DiceLoss(sigmoid=True) + BCEWithLogitsLoss",
    )
    p.add_argument(
        "--write-doc",
        action="store_true",
        help=f"write the result into {DOC.relative_to(REPO)} (section {SECTION!r})",
    )
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error("--budget-s must be positive")
    if args.size is not None and (args.size < 16 or args.size % 16):
        p.error("--size must be a positive multiple of 16 (both U-Nets downsample 4 times)")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    return args


def medseg_overrides(args: argparse.Namespace, work: Path) -> list[str]:
    """The user's ``--set`` overrides, then the ones the benchmark needs (these win)."""
    ov = list(args.overrides)
    ov += [
        f"data.root={args.data.resolve()}",
        f"train.cache_dir={(work / 'medseg_cache').resolve()}",
        f"train.seed={args.seed}",
        f"train.device={args.device}",
    ]
    if args.size is not None:
        ov.append(f"train.patch_size=[{args.size},{args.size}]")
    return ov


# --------------------------------------------------------------------------------------------
# contender A: medseg in a child process, stopped by the budget


def run_medseg(args: argparse.Namespace, overrides: list[str], work: Path) -> tuple[Result, Path]:
    run_dir = work / "medseg_run"
    log_path = work / "medseg_train.log"
    cmd = [sys.executable, "-c", "from medseg.cli.main import main; raise SystemExit(main())"]
    cmd += ["train", "--config", str(args.config), "--run-dir", str(run_dir), "--no-progress"]
    for ov in overrides:
        cmd += ["--set", ov]
    env = dict(os.environ)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    log(f"medseg: training for {args.budget_s:.0f} s (log: {log_path})")
    with open(log_path, "w") as fh:
        t0 = time.perf_counter()
        wall0 = time.time()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        killed = False
        try:
            proc.wait(timeout=args.budget_s)
        except subprocess.TimeoutExpired:
            killed = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        seconds = time.perf_counter() - t0
    if not killed and proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-25:])
        raise SystemExit(f"medseg train failed (exit {proc.returncode}); end of {log_path}:\n{tail}")
    res = Result("medseg", seconds=seconds)
    res.notes.append(
        f"stopped by the budget (SIGTERM at {seconds:.0f} s)"
        if killed
        else f"finished by itself at {seconds:.0f} s"
    )
    describe_medseg_run(res, run_dir, wall0)
    return res, run_dir


def describe_medseg_run(res: Result, run_dir: Path, wall0: float) -> None:
    """Epochs done and what the evaluated checkpoint is, from metrics.csv and the checkpoints."""
    from medseg.config import load_config

    metrics = run_dir / "metrics.csv"
    rows = list(csv.DictReader(metrics.open())) if metrics.exists() else []
    cfg_path = run_dir / "config.yaml"
    if not rows or not cfg_path.exists():
        res.work = "0 epochs"
        res.notes.append("no epoch finished within the budget")
        return
    tc = load_config(cfg_path, resolve_paths=False).train
    n = len(rows)
    train_s = sum(float(r["seconds"]) for r in rows)
    res.work = (
        f"{n} of {tc.epochs} epochs × {tc.iterations_per_epoch} it × batch {tc.batch_size} "
        f"({n * tc.iterations_per_epoch} iterations, {n * tc.iterations_per_epoch * tc.batch_size} patches)"
    )
    res.notes.append(
        f"{train_s:.0f} s in finished epochs (incl. validation), {train_s / n:.1f} s/epoch; "
        f"the rest is start-up, planning, preprocessing and the unfinished epoch"
    )
    last = run_dir / "checkpoints" / "last.pt"
    if last.exists():
        res.notes.append(f"last checkpoint written at {last.stat().st_mtime - wall0:.0f} s")


def load_medseg_model(run_dir: Path, which: str, device: torch.device) -> tuple[Any, Any, Any, str]:
    """Model (eval mode), plan and config of a run; ``which`` is ``best`` or ``last``."""
    from medseg.config import load_config
    from medseg.runtime.bundle import load_bundle

    bundle = load_bundle(run_dir, device=str(device), checkpoint=which)
    cfg = load_config(run_dir / "config.yaml", resolve_paths=False)
    val = bundle.meta.get("val_mean_dice")
    val = float("nan") if val is None else float(val)
    desc = f"{bundle.checkpoint} from epoch {bundle.meta.get('epoch')} (validation mean Dice {val:.3f})"
    return bundle.model, bundle.plan, cfg, desc


@torch.no_grad()
def medseg_probabilities(model: Any, image: Any, plan: Any, cfg: Any, device: torch.device) -> np.ndarray:
    """Sigmoid probabilities ``(S, *original_shape)`` of a medseg model for a 2D image ``Volume``."""
    from monai.inferers import sliding_window_inference

    from medseg.data.preprocess import preprocess_volume

    arr, props = preprocess_volume(image, plan)
    canonical = tuple(props["canonical_shape"])
    if tuple(props["original_shape"]) != canonical or [list(c) for c in props["crop"]] != [
        [0, s] for s in canonical
    ]:
        raise RuntimeError(
            f"preprocessing reoriented or cropped the image (original {props['original_shape']}, canonical "
            f"{canonical}, crop {props['crop']}); this script only handles 2D images on their pixel grid"
        )
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None]
    logits = sliding_window_inference(
        x,
        roi_size=plan.patch_size,
        sw_batch_size=cfg.predict.batch_size,
        predictor=model,
        overlap=cfg.predict.overlap,
        mode="gaussian",
        sw_device=device,
        device=torch.device("cpu"),
    )
    return upsample_probabilities(torch.sigmoid(logits), canonical)


def upsample_probabilities(prob: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """``(1, S, *grid)`` probabilities → ``(S, *shape)`` by bilinear interpolation (same field of view)."""
    if tuple(prob.shape[2:]) != tuple(shape):
        prob = F.interpolate(prob.float(), size=tuple(shape), mode="bilinear", align_corners=False)
    return prob[0].cpu().numpy()


# --------------------------------------------------------------------------------------------
# contender B: the plain MONAI baseline


def resize_image(image: np.ndarray, size: int) -> torch.Tensor:
    """``(1, X, Y)`` image → ``(1, size, size)`` float32, bilinear, then z-scored."""
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0]
    return (t - t.mean()) / t.std().clamp_min(1e-8)


def resize_masks(masks: np.ndarray, size: int) -> torch.Tensor:
    """``(S, X, Y)`` 0/1 masks → ``(S, size, size)`` uint8, bilinear then threshold 0.5."""
    t = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))[None]
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0]
    return (t >= 0.5).to(torch.uint8)


def baseline_model(n_out: int) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=n_out,
        channels=BASELINE_CHANNELS,
        strides=BASELINE_STRIDES,
        num_res_units=2,
    )


def baseline_loss(kind: str) -> torch.nn.Module:
    from monai.losses import DiceCELoss, DiceLoss

    if kind == "dicece":
        return DiceCELoss(sigmoid=True)

    class DiceBCE(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dice, self.bce = DiceLoss(sigmoid=True), torch.nn.BCEWithLogitsLoss()

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.dice(x, y) + self.bce(x, y)

    return DiceBCE()


def run_baseline(
    args: argparse.Namespace, cfg: Any, train_cases: list[Any], size: int, device: torch.device
) -> tuple[Result, torch.nn.Module]:
    from medseg.data.datasets import load_case

    n_out = len(cfg.data.structure_names)
    log(f"baseline: training for {args.budget_s:.0f} s at {size}x{size} on {len(train_cases)} cases")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    images, masks = [], []
    for case in train_cases:
        image, label = load_case(case, cfg.data)
        images.append(resize_image(image.array, size))
        masks.append(resize_masks(label.array, size))
    data = torch.utils.data.TensorDataset(torch.stack(images), torch.stack(masks))
    load_s = time.perf_counter() - t0
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=BASELINE_BATCH,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    model = baseline_model(n_out).to(device)
    loss_fn = baseline_loss(args.baseline_loss)
    opt = torch.optim.Adam(model.parameters(), lr=BASELINE_LR)
    model.train()
    iters, done = 0, False
    losses: list[float] = []
    while not done:
        for x, y in loader:
            x, y = x.to(device), y.to(device).float()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            iters += 1
            losses.append(float(loss.detach()))
            if time.perf_counter() - t0 >= args.budget_s:
                done = True
                break
    seconds = time.perf_counter() - t0
    model.eval()
    res = Result("baseline", seconds=seconds)
    res.work = (
        f"{iters} iterations × batch {BASELINE_BATCH}: {iters // len(loader)} full passes over the "
        f"{len(train_cases)} images + {iters % len(loader)} of {len(loader)} batches"
    )
    res.notes.append(
        f"{load_s:.1f} s reading/resizing the images, {(seconds - load_s) / max(iters, 1):.2f} s/iteration; "
        f"loss {args.baseline_loss}, final training loss (mean of last 10) {np.mean(losses[-10:]):.4f}"
    )
    return res, model


@torch.no_grad()
def baseline_probabilities(
    model: torch.nn.Module, image: np.ndarray, size: int, device: torch.device
) -> np.ndarray:
    x = resize_image(image, size)[None].to(device)
    return upsample_probabilities(torch.sigmoid(model(x)), tuple(image.shape[1:]))


# --------------------------------------------------------------------------------------------
# evaluation, report


def dice(pred: np.ndarray, ref: np.ndarray) -> list[float]:
    """Dice per structure of ``(S, *spatial)`` masks; NaN when both are empty."""
    out = []
    for p, g in zip(pred.astype(bool), ref.astype(bool), strict=True):
        denom = int(p.sum()) + int(g.sum())
        out.append(float("nan") if denom == 0 else 2.0 * int((p & g).sum()) / denom)
    return out


def evaluate(
    test_cases: list[Any],
    cfg: Any,
    medseg: tuple[Any, Any, Any] | None,
    baseline: torch.nn.Module,
    size: int,
    device: torch.device,
    results: tuple[Result, Result],
) -> None:
    from medseg.data.datasets import load_case

    log(f"evaluating on {len(test_cases)} held-out cases")
    for case in test_cases:
        image, label = load_case(case, cfg.data)
        if label is None:
            raise SystemExit(f"held-out case {case.case_id} has no masks; the benchmark needs them")
        if image.spatial_dims != 2 or image.num_channels != 1:
            raise SystemExit(f"case {case.case_id}: expected a one-channel 2D image, got {image.array.shape}")
        ref = label.array
        if medseg is not None:
            prob = medseg_probabilities(medseg[0], image, medseg[1], medseg[2], device)
            results[0].dice.append(dice(prob >= 0.5, ref))
        prob = baseline_probabilities(baseline, image.array, size, device)
        results[1].dice.append(dice(prob >= 0.5, ref))


def machine() -> str:
    import monai

    cores = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cores
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{usable} cores usable ({cores} online), load avg {load:.1f} at the start, {platform.machine()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), MONAI {monai.__version__}"
    )


def report(
    names: list[str],
    results: tuple[Result, Result],
    *,
    n_test: int,
    size: int,
    budget_s: float,
    machine_text: str,
    command: str,
    extra: list[str],
) -> str:
    a, b = results[0].mean_dice(len(names)), results[1].mean_dice(len(names))

    def fmt(v: float) -> str:
        return "–" if np.isnan(v) else f"{v:.4f}"

    lines = [
        f"Dice on {n_test} held-out cases at the original resolution (trained at {size}×{size}, "
        f"budget {budget_s:.0f} s each)",
        "",
        "| structure | medseg Dice | baseline Dice |",
        "|---|---|---|",
    ]
    lines += [f"| {n} | {fmt(x)} | {fmt(y)} |" for n, x, y in zip(names, a, b, strict=True)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lines.append(f"| **mean** | **{fmt(float(np.nanmean(a)))}** | **{fmt(float(np.nanmean(b)))}** |")
    lines.append("")
    for r in results:
        lines.append(f"- {r.name}: {r.seconds:.0f} s training; {r.work}")
        lines += [f"  - {n}" for n in r.notes]
    lines += [f"- {e}" for e in extra]
    lines += [
        f"- machine: {machine_text}",
        f"- date: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- command: `{command}`",
    ]
    return "\n".join(lines)


def write_doc(text: str) -> None:
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        doc = head + block + rest.split(END, 1)[1]
    elif SECTION in doc:
        raise SystemExit(f"{DOC}: section {SECTION!r} exists without the {BEGIN}/{END} markers")
    else:
        doc = doc.rstrip("\n") + f"\n\n{SECTION}\n\n{INTRO}\n\n{block}\n"
    DOC.write_text(doc)
    log(f"wrote {DOC}")


def log(msg: str) -> None:
    print(f"[bench_baseline] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "scripts/bench_baseline.py", *(sys.argv[1:] if argv is None else argv)])
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from medseg.config import load_config
    from medseg.data.datasets import load_dataset

    machine_text = machine()  # before training: the load average of the machine as found
    work = Path(tempfile.mkdtemp(prefix="bench_baseline-")) if args.out is None else args.out
    if (work / "medseg_run").exists():
        raise SystemExit(f"{work}/medseg_run exists; give an empty or new --out")
    work.mkdir(parents=True, exist_ok=True)
    overrides = medseg_overrides(args, work)
    cfg = load_config(args.config, overrides)
    if cfg.data.spatial_dims != 2 or cfg.data.mode != "sigmoid":
        raise SystemExit(f"{args.config}: this benchmark needs a 2D config with data.structures (sigmoid)")
    dataset = load_dataset(cfg.data)
    train_cases, test_cases = dataset.train_cases, dataset.test_cases
    if not test_cases:
        raise SystemExit(f"{args.data}: no held-out cases (test.txt); the benchmark evaluates on them")
    device = torch.device(args.device)

    res_a, run_dir = run_medseg(args, overrides, work)
    medseg = None
    extra = []
    if (run_dir / "checkpoints" / "last.pt").exists():
        model, plan, run_cfg, desc = load_medseg_model(run_dir, args.checkpoint, device)
        medseg = (model, plan, run_cfg)
        res_a.notes.append(f"evaluated {desc}")
        size = args.size or int(plan.patch_size[0])
        if len(set(plan.patch_size)) != 1 or any(
            m > p for m, p in zip(plan.median_shape, plan.patch_size, strict=False)
        ):
            extra.append(
                f"note: medseg's plan has patch {plan.patch_size} and median image {plan.median_shape}; "
                f"the baseline trains on whole images resized to {size}×{size}"
            )
    else:
        size = args.size or int((cfg.train.patch_size or [0])[0])
        if not size:
            raise SystemExit("medseg finished no epoch and the config has no patch size: give --size")

    res_b, baseline = run_baseline(args, cfg, train_cases, size, device)
    evaluate(test_cases, cfg, medseg, baseline, size, device, (res_a, res_b))
    text = report(
        list(cfg.data.structure_names),
        (res_a, res_b),
        n_test=len(test_cases),
        size=size,
        budget_s=args.budget_s,
        machine_text=machine_text,
        command=command,
        extra=[f"data: {args.data} ({len(train_cases)} training, {len(test_cases)} held-out cases)", *extra],
    )
    print(text)
    if args.write_doc:
        write_doc(text)
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
