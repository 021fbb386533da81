"""Factories shared by the tests: plans and run directories, instead of hand-built ``Plan(...)``
fixtures in every file. Importable as ``factories`` (``pythonpath = ["tests"]`` in pyproject.toml)."""

from __future__ import annotations

from pathlib import Path


def build_plan(**changes: object):
    """A small 3D CT softmax plan (structures ``a``, ``b`` = values 1, 2; patch 16x16x8 at 1.5x1.5x3 mm);
    any field can be changed by keyword."""
    from medseg.data.plan import ChannelNorm, Plan

    fields: dict[str, object] = {
        "spatial_dims": 3,
        "modality": "ct",
        "mode": "softmax",
        "structure_names": ("a", "b"),
        "label_values": (1, 2),
        "in_channels": 1,
        "target_spacing_mm": (1.5, 1.5, 3.0),
        "patch_size": (16, 16, 8),
        "normalization": (ChannelNorm("ct", -1000, 1000, 0, 500),),
        "body_threshold": -500.0,
    }
    fields.update(changes)
    return Plan(**fields)  # type: ignore[arg-type]


def write_run(
    run: Path,
    plan,
    channels: tuple[int, ...] = (4, 8, 16),
    seed: int = 0,
    *,
    name: str = "monai_unet",
    config: dict | None = None,
) -> Path:
    """A run directory ``medseg predict`` accepts: ``plan.json`` with the network's record and a
    ``checkpoints/best.pt`` of the untrained network (seeded), plus ``config.yaml`` from ``config``
    (a config mapping) when given. Geometry does not depend on the weights."""
    import dataclasses

    import torch
    import yaml

    from medseg.config import ModelConfig
    from medseg.models import NetworkSpec, create_network
    from medseg.runtime.checkpoint import save_checkpoint

    cfg = ModelConfig(name=name, channels=list(channels))
    spec = NetworkSpec.from_config(
        cfg, spatial_dims=plan.spatial_dims, patch_size=plan.patch_size, spacing_mm=plan.target_spacing_mm
    )
    plan = dataclasses.replace(plan, network=spec)
    run.mkdir(parents=True, exist_ok=True)
    plan.save(run / "plan.json")
    torch.manual_seed(seed)
    net = create_network(spec, in_channels=plan.in_channels, out_channels=plan.out_channels)
    payload = {"model": net.state_dict(), "model_config": cfg.model_dump(mode="json"), "epoch": 1}
    save_checkpoint(run / "checkpoints" / "best.pt", payload)
    if config is not None:
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def signal_while_streaming(
    run: Path, inputs: list[Path], out: Path, tmp: Path, sig: int
) -> tuple[int, list[Path]]:
    """Run ``medseg predict`` on ``inputs`` in a subprocess (temporary files in ``tmp``), send ``sig``
    as soon as a DICOM series is being decoded into its temporary file, and wait for the process.

    Returns the exit code and the temporary files that existed when the signal was sent.
    """
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "TMPDIR": str(tmp), "MEDSEG_MALLOC": "default"}
    cmd = [sys.executable, "-m", "medseg", "predict", "--model", str(run), "--input", *map(str, inputs)]
    proc = subprocess.Popen([*cmd, "--output", str(out), "--no-progress", "--device", "cpu"], env=env)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp.glob("medseg-dicom-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        streaming = list(tmp.glob("medseg-dicom-*"))
        proc.send_signal(sig)
        return proc.wait(timeout=60), streaming
    finally:
        proc.kill()
