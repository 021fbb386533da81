"""Multi-process training with PyTorch DDP, launched by ``torchrun`` (docs/training.md).

A run is distributed when the launcher sets ``WORLD_SIZE`` > 1 (with ``RANK`` and ``LOCAL_RANK``), as
``torchrun`` does; otherwise everything here is a no-op and training runs exactly as a single process
(no process group). Process groups use NCCL on CUDA (each process on ``cuda:LOCAL_RANK``) and gloo on
the CPU. Conventions the training loop follows:

* **Batch**: ``train.batch_size`` is *per process*, so the global batch is ``batch_size × world_size``
  (MONAI's and plain PyTorch DDP's convention, not nnU-Net's, which splits one global batch across
  GPUs). A config sized for one GPU's memory then fits every GPU unchanged, and no batch size has to
  be divisible by the number of GPUs. The learning rate is not rescaled.
* **Iterations**: every process runs ``train.iterations_per_epoch`` steps, so an epoch has the same
  number of optimiser steps (and the same learning-rate schedule) as a single-process run and sees
  ``world_size`` times more patches.
* **Seeds**: process ``rank`` samples patches from ``rank_seed(train.seed, rank)``; rank 0 uses the
  config seed itself, so it draws exactly the patches a single-process run draws.
* **Writes**: only rank 0 writes the run directory. Validation cases are shared round-robin between
  the processes and the per-case Dice gathered back in case order, so every process computes the same
  numbers (identical to a single-process validation) and takes the same best-model and
  early-stopping decisions.
* **Failures**: ``torchrun`` stops the other workers when one exits with an error; every collective
  also times out after ``MEDSEG_DDP_TIMEOUT_MIN`` minutes (default 30), so no process waits forever.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from medseg.errors import ConfigError

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "MEDSEG_DDP_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 30.0


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the run; ``DistContext()`` is a single-process run."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        """True when several processes train together (a process group exists)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run directory and logs."""
        return self.rank == 0

    @property
    def backend(self) -> str | None:
        """``nccl`` or ``gloo`` when distributed, else None."""
        return str(dist.get_backend()) if self.enabled else None

    def barrier(self) -> None:
        """Wait for every process (no-op in a single process)."""
        if self.enabled:
            dist.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` from rank ``src`` on every process (picklable objects)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def mean(self, value: float, device: torch.device) -> float:
        """Mean of ``value`` over the processes (``device`` must suit the backend: CUDA for NCCL)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Copy rank 0's buffers (e.g. batch-norm running statistics) to every process."""
        if self.enabled:
            for b in model.buffers():
                dist.broadcast(b, src=0)


def context_from_env(env: Mapping[str, str] | None = None) -> DistContext:
    """The process's place from ``torchrun``'s environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``);
    a single-process context when ``WORLD_SIZE`` is unset or 1."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return DistContext()
    if "RANK" not in env:
        raise ConfigError("WORLD_SIZE > 1 but RANK is not set: launch multi-process training with torchrun")
    rank = int(env["RANK"])
    return DistContext(rank=rank, local_rank=int(env.get("LOCAL_RANK", rank)), world_size=world)


def rank_seed(seed: int, rank: int) -> int:
    """Patch-sampling seed of process ``rank``: ``seed`` itself on rank 0 (so a single-process run and
    rank 0 of a distributed run draw the same patches), a distinct value derived from ``(seed, rank)``
    on the other ranks. Reproducible: the same pair always gives the same seed."""
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1, np.uint32)[0])


def ddp_device(name: str, local_rank: int) -> torch.device:
    """Device of a distributed process: ``cuda:LOCAL_RANK`` for ``auto`` (when CUDA is available) and
    ``cuda``, the CPU for ``cpu`` (or ``auto`` without CUDA)."""
    if name.startswith("cuda:"):
        raise ConfigError(
            f"train.device {name!r}: under torchrun each process uses cuda:LOCAL_RANK; use --device cuda "
            "(choose the GPUs with CUDA_VISIBLE_DEVICES)"
        )
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but no CUDA device is available; use --device cpu")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) on this node; "
            "lower torchrun's --nproc_per_node"
        )
    return torch.device(f"cuda:{local_rank}")


def timeout() -> datetime.timedelta:
    """How long a collective waits for the other processes (``MEDSEG_DDP_TIMEOUT_MIN``, default 30)."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        minutes = float(raw) if raw else DEFAULT_TIMEOUT_MIN
    except ValueError as exc:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} is not a number of minutes") from exc
    return datetime.timedelta(minutes=minutes)


@contextmanager
def distributed(device: str = "auto") -> Iterator[DistContext]:
    """Join the process group of a ``torchrun`` launch for the duration of the block.

    Initialises the group (NCCL on CUDA, gloo on the CPU, with :func:`timeout`) when the environment
    asks for several processes and no group exists yet, and destroys it on the way out, also after an
    error. Nested use (the CLI opens it, :func:`medseg.training.loop.train` again) reuses the group.
    A single-process launch yields ``DistContext()`` and touches nothing.
    """
    if dist.is_available() and dist.is_initialized():
        yield DistContext(
            rank=dist.get_rank(),
            local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
            world_size=dist.get_world_size(),
        )
        return
    ctx = context_from_env()
    if not ctx.enabled:
        yield ctx
        return
    dev = ddp_device(device, ctx.local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend=backend, timeout=timeout())
    logger.debug("rank %d/%d joined the %s process group", ctx.rank, ctx.world_size, backend)
    finished = False
    try:
        yield ctx
        finished = True
    finally:
        # DDP wrappers hold the group and sit in reference cycles: free them now, and let every
        # process finish its last collective, so the group is not torn down by the interpreter's
        # shutdown, where gloo can abort the process ("terminate called without an active exception").
        gc.collect()
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def params_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, dtypes, shapes and bytes), in state-dict order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        arr = t.detach().cpu().contiguous()
        h.update(f"{name}:{arr.dtype}:{tuple(arr.shape)}".encode())
        h.update(arr.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def params_in_sync(model: nn.Module, ctx: DistContext) -> tuple[bool, list[str]]:
    """Whether every process holds bit-identical weights; also returns each rank's digest."""
    digests = ctx.all_gather_object(params_digest(model))
    return len(set(digests)) == 1, digests
