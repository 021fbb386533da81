"""Device memory of one training step, estimated from the real network (for patch planning).

:class:`TrainingMemory` answers "how many bytes does one training step at this patch size take?" for
the network the model registry builds from a config, so that :func:`medseg.data.plan.make_plan` can
pick the largest patch that fits ``train.memory_gb`` (nnU-Net plans its patch against a VRAM target
the same way) and ``medseg config show --memory`` can print the figure.

How the estimate is made (all on the CPU, in well under a second for the shipped configs):

1. The network is built through :data:`medseg.models.MODELS` with the strides the *target* patch would
   get (:func:`medseg.models.resolve_strides`: the architecture depends on the patch), and the config's
   loss through :func:`medseg.losses.create_loss`.
2. One forward + loss + backward runs on a small probe patch (twice the network's input divisor on
   every axis, batch 1). Every tensor autograd keeps for the backward pass is seen through
   :func:`torch.autograd.graph.saved_tensors_hooks` and counted once per storage (in-place
   activations and views share storage); tensors that are parameters or buffers are excluded (they
   are counted below). The input batch (image float32, labels int64 as the training loop sends them,
   border weights float32) and the logits are added when not already counted (under AMP, also the
   float32 copy of the logits the loop hands to the loss).
3. Activations of a fully convolutional network are linear in the number of voxels (every feature
   map is ``voxels / prod(strides)`` times its channels; ``tests/training/test_memory.py`` checks two
   probe sizes agree), so the probe's bytes per voxel are scaled to the patch and multiplied by
   ``train.batch_size``. The backward pass's working set (the gradient flowing into and out of the
   largest layer while the saved tensors are still alive) is approximated by twice the largest
   single saved tensor.
4. With mixed precision (``train.amp`` on a CUDA device, exactly as :mod:`medseg.training.loop`
   decides: bf16 where supported, else fp16) the network's saved activations are halved; the loss
   runs on float32 logits in the loop, so its tensors and the input batch are not.
5. Parameters cost ``4 bytes x (weights + gradients + optimizer state)``: 2 extra copies for AdamW
   (``exp_avg``, ``exp_avg_sq``), 1 for SGD with momentum; with AMP another 2 bytes per parameter
   for autocast's low-precision weight copies.
6. On CUDA a fixed :data:`CUDA_OVERHEAD_BYTES` (1 GiB) is added: the CUDA context (about 0.3-0.6 GiB
   with lazy module loading), cuDNN's convolution workspaces (``cudnn.benchmark`` may pick algorithms
   that need a few hundred MiB for 3D convolutions) and slack of the caching allocator. It is a
   round figure, not a measurement.

It is an estimate from tensors traced on the CPU, not a GPU measurement: cuDNN may keep other
tensors than the CPU kernels, the caching allocator fragments, and transient forward buffers are
only approximated. Treat it as good to tens of percent and keep a margin in ``train.memory_gb``.

Why this is written by hand: no maintained library estimates the training memory of an arbitrary
torch module (``torch.cuda.max_memory_allocated`` needs the GPU itself; ``torchinfo``/``ptflops``
report forward sizes of a given input, not what autograd keeps for backward, nor optimizer state),
and nnU-Net's planner uses a static heuristic fitted to its own architecture (a "VRAM estimate" from
feature-map sizes times a constant), which does not carry over to other registered models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medseg.config import Config
from medseg.labels import Mode
from medseg.losses.compound import create_loss
from medseg.models.spec import NetworkSpec, check_patch_dims, required_divisor, resolve_strides
from medseg.models.unet import create_network
from medseg.units import GB

__all__ = [
    "CUDA_OVERHEAD_BYTES",
    "MemoryEstimate",
    "ProbeResult",
    "TrainingMemory",
    "estimate_training_memory",
    "memory_estimator",
    "training_uses_amp",
    "trains_on_cuda",
]

CUDA_OVERHEAD_BYTES = 1 << 30
"""Fixed device memory on CUDA besides tensors: context, cuDNN workspaces, allocator slack (1 GiB)."""


def trains_on_cuda(device: str) -> bool:
    """Whether ``train.device`` resolves to a CUDA device here (``auto``: when CUDA is available)."""
    if device == "auto":
        return torch.cuda.is_available()
    return device.startswith("cuda")


def training_uses_amp(cfg: Config) -> bool:
    """The training loop's rule: mixed precision when ``train.amp`` is set and training runs on CUDA."""
    return bool(cfg.train.amp and trains_on_cuda(cfg.train.device))


@dataclass(frozen=True)
class ProbeResult:
    """Bytes per voxel (batch 1, float32) measured on one probe run of one architecture."""

    probe_shape: tuple[int, ...]
    network_per_voxel: float  # tensors saved by the network's forward (halved under AMP)
    other_per_voxel: float  # loss tensors and the input batch (float32 / int64 in the loop)
    output_per_voxel: float  # the logits (under AMP the loop adds a float32 copy for the loss)
    largest_per_voxel: float  # the largest single saved tensor (backward working set)
    parameters: int
    divisor: tuple[int, ...]


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated device memory of one training step (bytes)."""

    patch_size: tuple[int, ...]
    batch_size: int
    amp: bool
    cuda: bool
    activation_bytes: int  # saved tensors + batch + backward working set, at batch_size
    parameter_bytes: int  # weights + gradients + optimizer state (+ AMP weight copies)
    overhead_bytes: int  # CUDA_OVERHEAD_BYTES on CUDA, else 0
    parameters: int

    @property
    def total_bytes(self) -> int:
        return self.activation_bytes + self.parameter_bytes + self.overhead_bytes

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GB

    def describe(self) -> str:
        """One line: total and its parts, in GB (2**30 bytes)."""
        where = "CUDA" if self.cuda else "CPU"
        prec = "AMP" if self.amp else "float32"
        return (
            f"{self.total_gb:.2f} GB for patch {list(self.patch_size)} x batch {self.batch_size} "
            f"on {where}, {prec} (activations {self.activation_bytes / GB:.2f}, "
            f"parameters+gradients+optimizer {self.parameter_bytes / GB:.2f} for "
            f"{self.parameters / 1e6:.1f} M parameters, fixed {self.overhead_bytes / GB:.2f})"
        )


def _out_channels(cfg: Config) -> int:
    n = len(cfg.data.structure_names)
    return n + 1 if cfg.data.mode == Mode.SOFTMAX else n


class TrainingMemory:
    """Training-step memory estimates for one config, for many candidate patch sizes.

    One probe (forward + backward) runs per distinct architecture (the strides depend on the patch
    size); later patches with the same strides only rescale it.

    Args:
        cfg: The validated config (``model``, ``loss``, ``data`` label mode, ``train.batch_size``,
            ``train.optimizer``, ``train.amp``/``train.device``).
        in_channels: Image channels.
        spacing_mm: Target spacing, used with the patch to plan the strides (``None``: isotropic).
        amp: Assume mixed precision; ``None`` decides as the training loop does
            (:func:`training_uses_amp`).
        cuda: Add :data:`CUDA_OVERHEAD_BYTES`; ``None``: when ``train.device`` resolves to CUDA here,
            or when ``amp`` is given as true (AMP only runs on CUDA).
    """

    def __init__(
        self,
        cfg: Config,
        *,
        in_channels: int = 1,
        spacing_mm: Sequence[float] | None = None,
        amp: bool | None = None,
        cuda: bool | None = None,
    ) -> None:
        self.cfg = cfg
        self.in_channels = int(in_channels)
        self.spacing_mm = tuple(float(s) for s in spacing_mm) if spacing_mm is not None else None
        self.amp = training_uses_amp(cfg) if amp is None else bool(amp)
        self.cuda = (trains_on_cuda(cfg.train.device) or self.amp) if cuda is None else bool(cuda)
        self._probes: dict[tuple[tuple[int, ...], ...], ProbeResult] = {}

    def strides(self, patch_size: Sequence[int]) -> list[tuple[int, ...]]:
        """Per-level strides of the network trained on ``patch_size`` (raises ConfigError if too small)."""
        return resolve_strides(
            self.cfg.model,
            spatial_dims=self.cfg.data.spatial_dims,
            patch_size=[int(p) for p in patch_size],
            spacing_mm=self.spacing_mm,
        )

    def probe(self, strides: Sequence[Sequence[int]], *, scale: int = 2) -> ProbeResult:
        """Run one forward + loss + backward at ``scale`` x the input divisor; bytes per voxel."""
        key = tuple(tuple(int(v) for v in s) for s in strides)
        if scale == 2 and key in self._probes:
            return self._probes[key]
        result = _probe(self.cfg, self.in_channels, key, scale=scale)
        if scale == 2:
            self._probes[key] = result
        return result

    def estimate(self, patch_size: Sequence[int], *, batch_size: int | None = None) -> MemoryEstimate:
        """Estimated bytes of one training step at ``patch_size`` (and ``train.batch_size``)."""
        patch = check_patch_dims(patch_size, self.cfg.data.spatial_dims)
        batch = int(batch_size if batch_size is not None else self.cfg.train.batch_size)
        p = self.probe(self.strides(patch))
        voxels = math.prod(patch)
        f = 0.5 if self.amp else 1.0
        per_voxel = f * p.network_per_voxel + p.other_per_voxel + 2 * f * p.largest_per_voxel
        if self.amp:  # the loop's `_float(out)`: float32 copies of the half-precision logits
            per_voxel += p.output_per_voxel
        activation = int(math.ceil(per_voxel * voxels * batch))
        states = 2 if self.cfg.train.optimizer == "adamw" else 1
        param_bytes = p.parameters * 4 * (2 + states) + (p.parameters * 2 if self.amp else 0)
        return MemoryEstimate(
            patch_size=patch,
            batch_size=batch,
            amp=self.amp,
            cuda=self.cuda,
            activation_bytes=activation,
            parameter_bytes=param_bytes,
            overhead_bytes=CUDA_OVERHEAD_BYTES if self.cuda else 0,
            parameters=p.parameters,
        )


def estimate_training_memory(
    cfg: Config,
    patch_size: Sequence[int],
    *,
    in_channels: int = 1,
    spacing_mm: Sequence[float] | None = None,
    amp: bool | None = None,
    cuda: bool | None = None,
) -> MemoryEstimate:
    """Estimated device memory of one training step of ``cfg`` at ``patch_size``.

    See the module docstring for what is counted; arguments as :class:`TrainingMemory`.

    Example:
        >>> from medseg.config import load_config
        >>> cfg = load_config({"data": {"root": ".", "labels": {"a": 1}}, "model": {"channels": [4, 8, 16]}})
        >>> est = estimate_training_memory(cfg, (32, 32, 32), amp=False, cuda=False)
        >>> est.activation_bytes > 0 and est.overhead_bytes == 0
        True
    """
    return TrainingMemory(cfg, in_channels=in_channels, spacing_mm=spacing_mm, amp=amp, cuda=cuda).estimate(
        patch_size
    )


def memory_estimator(cfg: Config) -> Callable[[Sequence[float], int], TrainingMemory]:
    """The estimator factory :func:`medseg.data.plan.make_plan` takes: ``(target spacing,
    in_channels) ->`` :class:`TrainingMemory` for ``cfg``, deciding AMP and CUDA as training does."""
    return lambda spacing, in_channels: TrainingMemory(cfg, in_channels=in_channels, spacing_mm=spacing)


def _probe(cfg: Config, in_channels: int, strides: tuple[tuple[int, ...], ...], *, scale: int) -> ProbeResult:
    dims = cfg.data.spatial_dims
    out_channels = _out_channels(cfg)
    divisor = required_divisor(strides)
    shape = tuple(scale * k for k in divisor)
    # fork the RNG: building a network draws initial weights, and planning must not change the
    # weights the seeded training run starts from
    with torch.random.fork_rng(devices=[]):
        spec = NetworkSpec.from_config(cfg.model, spatial_dims=dims, strides=strides)
        model: nn.Module = create_network(spec, in_channels=in_channels, out_channels=out_channels)
        loss_fn = create_loss(cfg.loss, cfg.data.mode, out_channels)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster and steadier than several
    try:
        return _run_probe(model, loss_fn, cfg, in_channels, out_channels, shape, divisor)
    finally:
        torch.set_num_threads(threads)


def _run_probe(
    model: nn.Module,
    loss_fn: nn.Module,
    cfg: Config,
    in_channels: int,
    out_channels: int,
    shape: tuple[int, ...],
    divisor: Sequence[int],
) -> ProbeResult:
    voxels = math.prod(shape)
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    own |= {t.untyped_storage().data_ptr() for t in (*loss_fn.parameters(), *loss_fn.buffers())}
    params = sum(p.numel() for p in model.parameters())

    seen: dict[int, tuple[str, int, Any]] = {}  # data_ptr -> (phase, bytes, storage kept alive)
    phase = ["network"]

    def add(t: torch.Tensor, where: str) -> None:
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr == 0 or ptr in own or ptr in seen:
            return
        seen[ptr] = (where, s.nbytes(), s)

    def pack(t: torch.Tensor) -> torch.Tensor:
        add(t, phase[0])
        return t

    x = torch.zeros((1, in_channels, *shape))
    if cfg.data.mode == Mode.SOFTMAX:
        y = torch.zeros((1, 1, *shape), dtype=torch.int64)
    else:
        y = torch.zeros((1, out_channels, *shape), dtype=torch.int64)
    w = torch.ones((1, 1, *shape)) if cfg.loss.border_weights.enabled else None
    for t in (x, y, w):
        if t is not None:
            add(t, "other")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
        outs = out if isinstance(out, (list, tuple)) else [out]
        for o in outs:
            add(o, "network")
        output = sum(o.untyped_storage().nbytes() for o in outs)
        phase[0] = "other"
        loss = loss_fn([o.float() for o in outs] if isinstance(out, (list, tuple)) else out.float(), y, w)
    if loss.requires_grad:  # a network without trainable weights (the threshold baseline) has no backward
        loss.backward()
    network = sum(b for ph, b, _ in seen.values() if ph == "network")
    other = sum(b for ph, b, _ in seen.values() if ph == "other")
    largest = max((b for _, b, _ in seen.values()), default=0)
    return ProbeResult(
        probe_shape=shape,
        network_per_voxel=network / voxels,
        other_per_voxel=other / voxels,
        output_per_voxel=output / voxels,
        largest_per_voxel=largest / voxels,
        parameters=params,
        divisor=tuple(divisor),
    )
