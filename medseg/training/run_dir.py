"""Run directory = model bundle: ``config.yaml``, ``plan.json``, ``env.json``, ``metrics.csv``,
``checkpoints/{last,best}.pt``, TensorBoard events and ``curves.png``."""

from __future__ import annotations

import csv
import json
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import monai
import numpy
import torch
from matplotlib.figure import Figure

from medseg._version import __version__
from medseg.config import Config, config_hash, config_to_yaml
from medseg.io._atomic import atomic_write, write_text_atomic


def new_run_dir(cfg: Config, base: str | Path = "runs") -> Path:
    """``runs/<config name>-<YYYYmmdd-HHMMSS>/`` (a suffix is added if it exists)."""
    name = cfg.name or "run"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(base) / f"{name}-{stamp}"
    k = 1
    while path.exists():
        path = Path(base) / f"{name}-{stamp}-{k}"
        k += 1
    return path


def git_commit() -> str | None:
    """Git commit of the medseg source tree, if it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str, cfg: Config, world_size: int = 1) -> dict[str, Any]:
    """Versions, hardware and settings of a run (``env.json``); ``device`` is rank 0's device and
    ``world_size`` the number of training processes (1 without torchrun)."""

    env = {
        "medseg": __version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": numpy.__version__,
        "device": device,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "threads": torch.get_num_threads(),
        "world_size": world_size,
        "config_hash": config_hash(cfg),
    }
    return env


def write_bundle_files(run_dir: Path, cfg: Config, device: str, world_size: int = 1) -> None:
    """Create ``run_dir`` with ``checkpoints/``, ``config.yaml`` and ``env.json`` (rank 0 only)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", config_to_yaml(cfg))
    write_text_atomic(run_dir / "env.json", json.dumps(environment(device, cfg, world_size), indent=2))


class MetricsCSV:
    """``metrics.csv``: one row per epoch; empty cells where no validation ran.

    On resume, rows after the checkpoint's epoch (from an epoch that was killed before its checkpoint
    was written) are dropped, so every epoch ends up with exactly one row.
    """

    def __init__(self, path: Path, structures: Sequence[str]) -> None:
        self.path = path
        self.columns = [
            "epoch",
            "train_loss",
            "val_mean_dice",
            *[f"val_dice_{s}" for s in structures],
            "lr",
            "seconds",
        ]

    def truncate_after(self, epoch: int) -> None:
        if not self.path.exists():
            return
        with open(self.path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if int(r["epoch"]) <= epoch]
        self._write(rows)

    def rows(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as fh:
            return list(csv.DictReader(fh))

    def append(self, row: dict[str, Any]) -> None:
        rows = self.rows()
        rows.append({k: "" if row.get(k) is None else row[k] for k in self.columns})
        self._write(rows)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        with atomic_write(self.path) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow(r)


def plot_curves(metrics: MetricsCSV, path: Path, structures: Sequence[str]) -> None:
    """``curves.png``: training loss and validation Dice per structure against the epoch."""

    rows = metrics.rows()
    if not rows:
        return
    ep = [int(r["epoch"]) for r in rows]
    loss = [float(r["train_loss"]) for r in rows]
    fig = Figure(figsize=(11, 4))
    a1, a2 = fig.subplots(1, 2)
    a1.plot(ep, loss, marker="o", ms=3)
    a1.set_xlabel("epoch")
    a1.set_ylabel("training loss")
    a1.set_title("Training loss")
    a1.grid(alpha=0.3)
    for s in ["mean", *structures]:
        key = f"val_dice_{s}" if s != "mean" else "val_mean_dice"
        pts = [(e, float(r[key])) for e, r in zip(ep, rows, strict=True) if r.get(key) not in ("", None)]
        if pts:
            xs, ys = zip(*pts, strict=True)
            a2.plot(xs, ys, marker="o", ms=3, lw=2.5 if s == "mean" else 1.2, label=s)
    a2.set_ylim(0, 1)
    a2.set_xlabel("epoch")
    a2.set_ylabel("Dice")
    a2.set_title("Validation Dice")
    a2.grid(alpha=0.3)
    if a2.get_lines():
        a2.legend(fontsize=7, loc="lower right")
    else:
        a2.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=a2.transAxes)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100)
