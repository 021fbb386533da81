"""Which device runs the network, and in which precision.

Training (``train.device``, ``train.amp``) and prediction (``--device``) decide the same way, so a
model is run in prediction with the precision it was validated with.
"""

from __future__ import annotations

import re

import torch

from medseg.errors import ConfigError

__all__ = ["amp_dtype", "resolve_device"]


def resolve_device(name: str, *, what: str = "train.device") -> torch.device:
    """``auto`` → CUDA when available else CPU; ``cpu``; ``cuda[:i]`` must exist.

    ``what`` names the setting in error messages (``train.device``, ``--device``).

    Raises:
        ConfigError: An unknown name, or a CUDA device that this machine does not have.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ConfigError(f"{what} {name!r}: expected auto, cpu, cuda or cuda:N (e.g. cuda:0)")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{what} is {name!r} but no CUDA device is available here; use cpu or auto")
        idx = int(name.split(":")[1]) if ":" in name else 0
        if idx >= torch.cuda.device_count():
            raise ConfigError(f"{what} {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


def amp_dtype(device: torch.device | str, *, enabled: bool = True) -> torch.dtype | None:
    """The autocast dtype on ``device``: bfloat16 on CUDA devices that support it, else float16;
    ``None`` (full precision) on the CPU or when ``enabled`` is false.

    CPU autocast is left off: on the CPUs medseg targets it is slower than float32 for 3D convolutions.
    """
    device = torch.device(device)
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
