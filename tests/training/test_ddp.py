"""Multi-process (DDP) training: real ``torchrun`` launches with 2 gloo processes on the CPU.

The end-to-end test trains tiny CT phantoms with ``torchrun -m medseg train`` and checks that rank 0
alone wrote a complete run directory, that the checkpoint is a plain model's, that the processes ended
with identical weights, that distributed validation equals a single-process one, and that the run
resumes in a single process. The collectives, the weight-sync check and the process-group lifetime are
tested on their own with a small script under ``torchrun``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medseg.cli.main import main
from medseg.data.synthetic import synth_ct
from medseg.errors import ConfigError
from medseg.training.distributed import (
    DistContext,
    context_from_env,
    ddp_device,
    params_digest,
    rank_seed,
    timeout,
)

TINY_CT = [
    "model.channels=[4,8,16]",
    "train.patch_size=[32,32,16]",
    "train.target_spacing_mm=[3.0,3.0,4.0]",
    "train.batch_size=2",
    "train.iterations_per_epoch=3",
    "train.val_every=1",
    "train.val_fraction=0.4",  # 2 validation cases: one per process
    "loss.border_weights.sigma_mm=6",
]


def _torchrun(args: list[str], timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node=2 ARGS`` with this venv's python;
    collectives give up after a minute so a hang fails the test instead of stalling it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDSEG_DDP_TIMEOUT_MIN": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    return {"data": synth_ct(root / "ct", cases=6, seed=3, dicom_cases=0), "cache": root / "cache"}


def test_rank_seeds_differ_and_are_reproducible() -> None:
    assert rank_seed(7, 0) == 7  # rank 0 draws what a single process draws
    for seed in (0, 1, 7, 12345):
        seeds = [rank_seed(seed, r) for r in range(8)]
        assert len(set(seeds)) == 8, seeds
        assert seeds == [rank_seed(seed, r) for r in range(8)]
        assert all(0 <= s < 2**32 for s in seeds)
    assert rank_seed(0, 1) != rank_seed(1, 1)
    # the patch generators built from them (PatchDataset keys them by (seed, epoch, index)) differ too
    draws = [np.random.default_rng([rank_seed(0, r), 0, 0]).integers(1 << 30, size=4) for r in (0, 1)]
    assert not np.array_equal(*draws)


def test_launch_environment_and_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert context_from_env({}) == DistContext() and not DistContext().enabled
    assert context_from_env({"WORLD_SIZE": "1", "RANK": "0"}) == DistContext()
    ctx = context_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (ctx.rank, ctx.local_rank, ctx.world_size, ctx.enabled, ctx.is_main) == (3, 1, 4, True, False)
    with pytest.raises(ConfigError, match="RANK"):
        context_from_env({"WORLD_SIZE": "2"})
    assert ddp_device("cpu", 1) == torch.device("cpu")
    with pytest.raises(ConfigError, match="LOCAL_RANK"):
        ddp_device("cuda:1", 0)
    monkeypatch.setenv("MEDSEG_DDP_TIMEOUT_MIN", "2.5")
    assert timeout().total_seconds() == 150
    monkeypatch.setenv("MEDSEG_DDP_TIMEOUT_MIN", "soon")
    with pytest.raises(ConfigError, match="MEDSEG_DDP_TIMEOUT_MIN"):
        timeout()


HELPER_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
from medseg.training.distributed import distributed, params_in_sync

with distributed("cpu") as ctx:
    torch.manual_seed(ctx.rank)  # different initial weights on each process
    net = torch.nn.Linear(3, 2)
    before, _ = params_in_sync(net, ctx)
    ddp = torch.nn.parallel.DistributedDataParallel(net)  # copies rank 0's weights everywhere
    ddp(torch.randn(8, 3) * (ctx.rank + 1)).square().mean().backward()  # different data per process
    torch.optim.SGD(net.parameters(), lr=0.5).step()
    after, digests = params_in_sync(net, ctx)
    res = {
        "rank": ctx.rank, "world": ctx.world_size, "backend": ctx.backend, "before": before,
        "after": after, "digests": digests, "mean": ctx.mean(float(ctx.rank + 1), torch.device("cpu")),
        "gathered": ctx.all_gather_object(10 * ctx.rank), "bcast": ctx.broadcast_object(f"from {ctx.rank}"),
        "inside": dist.is_initialized(),
    }
    del ddp  # as the training loop's DDP model is gone when its function returns
res["after_exit"] = dist.is_initialized()
with open(f"{sys.argv[1]}/rank{res['rank']}.json", "w") as fh:
    json.dump(res, fh)
"""


def test_collectives_and_weight_sync_check_under_torchrun(tmp_path: Path) -> None:
    script = tmp_path / "helpers.py"
    script.write_text(HELPER_SCRIPT)
    out = _torchrun([str(script), str(tmp_path)], timeout_s=120)
    assert out.returncode == 0, out.stderr[-3000:]
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, d in enumerate(res):
        assert (d["rank"], d["world"], d["backend"]) == (r, 2, "gloo")
        assert d["before"] is False  # the check sees weights that differ ...
        assert d["after"] is True  # ... and DDP's averaged steps that keep them identical
        assert d["mean"] == pytest.approx(1.5)
        assert d["gathered"] == [0, 10] and d["bcast"] == "from 0"
        assert d["inside"] is True and d["after_exit"] is False  # the group is destroyed on exit
    assert res[0]["digests"] == res[1]["digests"]


def test_torchrun_two_processes_write_one_bundle_and_resume_in_one(
    ct: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, train_args: Any, metrics_rows: Any
) -> None:
    from medseg.config import load_config
    from medseg.data.cache import cache_original
    from medseg.data.datasets import load_dataset
    from medseg.data.patches import split_validation
    from medseg.data.plan import Plan
    from medseg.inference.engine import EngineOptions
    from medseg.models import create_network
    from medseg.training.validation import validate, validation_bundle

    run = tmp_path / "run"
    out = _torchrun(
        ["-m", "medseg", *train_args("demo_ct.yaml", ct["data"], ct["cache"], run, TINY_CT, epochs=2)]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stderr
    assert "DDP: 2 processes (gloo), batch 2 per process = 4 in all" in log
    assert log.count("epoch 2/2") == 1  # only rank 0 logs progress
    assert out.stdout.strip().splitlines()[-1] == str(run)  # printed once, by rank 0

    for name in ("config.yaml", "plan.json", "env.json", "curves.png", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "best.pt").is_file()
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1  # one writer
    text = (run / "metrics.csv").read_text()
    assert sum(line.startswith("epoch,") for line in text.splitlines()) == 1
    rows = metrics_rows(run)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    assert not list(run.rglob(".*tmp-*"))  # no temporary files left behind

    # the checkpoint is a plain model's state_dict (no DDP "module." prefix) and loads strictly
    cfg = load_config(run / "config.yaml")
    plan = Plan.load(run / "plan.json")
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["epoch"] == 2 and ck["world_size"] == 2 and len(ck["rng_ranks"]) == 2
    assert not any(k.startswith("module.") for k in ck["model"])
    net = create_network(plan.network, in_channels=plan.in_channels, out_channels=plan.out_channels)
    net.load_state_dict(ck["model"])
    # both processes ended with exactly these weights
    assert f"DDP: model weights identical on all 2 processes ({params_digest(net)[:12]})" in log

    # distributed validation (one case per process, gathered) equals validating in one process
    by_id = {c.case_id: c for c in load_dataset(cfg.data).train_cases}
    _, val = split_validation(list(by_id), cfg.train.val_fraction, cfg.train.seed)
    assert len(val) == 2
    cases = [cache_original(by_id[v], cfg.data, ct["cache"]) for v in val]
    bundle = validation_bundle(net, plan, cfg, torch.device("cpu"), run)
    per = validate(bundle, cases, EngineOptions.from_config(cfg.predict))
    assert float(rows[-1]["val_mean_dice"]) == pytest.approx(float(np.nanmean(per)), abs=1e-6)

    # a checkpoint of the 2-process run resumes in a single process, saying the world size changed
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run), "--resume", "--no-progress", "--set", "train.epochs=3"]) == 0
    err = capsys.readouterr().err
    assert "written by 2 process(es) with 1" in err
    assert [r["epoch"] for r in metrics_rows(run)] == ["1", "2", "3"]
    assert json.loads((run / "env.json").read_text())["world_size"] == 1
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["epoch"] == 3 and ck["world_size"] == 1 and "rng_ranks" not in ck


@pytest.mark.slow
def test_single_process_run_resumes_under_torchrun(
    ct: dict[str, Path], tmp_path: Path, train_args: Any, metrics_rows: Any
) -> None:
    run = tmp_path / "run"
    assert main(train_args("demo_ct.yaml", ct["data"], ct["cache"], run, TINY_CT, epochs=1)) == 0
    exe = str(Path(sys.executable).parent / "medseg")  # the console script works under torchrun too
    out = _torchrun(
        [exe, "train", "--run-dir", str(run), "--resume", "--no-progress", "--set", "train.epochs=2"]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "written by 1 process(es) with 2" in out.stderr
    assert "DDP: model weights identical on all 2 processes" in out.stderr
    assert [r["epoch"] for r in metrics_rows(run)] == ["1", "2"]
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["epoch"] == 2 and ck["world_size"] == 2
