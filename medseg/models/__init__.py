"""2D/3D U-Net family and the model registry.

Build networks with :func:`create_network` from a plan's :class:`NetworkSpec`, or with
:func:`create_model` from the config's ``model`` section; see :mod:`medseg.models.unet` for the
registered models and the exact output convention (logits; a list of logits, highest resolution
first, with deep supervision in train mode), and :mod:`medseg.models.spec` for the stride rules.

The names are loaded on first use: :mod:`medseg.models.spec` is torch-free, so the plan can record
architectures without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "MODELS": "unet",
    "MonaiUNet": "unet",
    "UNet": "unet",
    "check_input_shape": "unet",
    "create_model": "unet",
    "create_network": "unet",
    "NetworkSpec": "spec",
    "default_strides": "spec",
    "plan_strides": "spec",
    "required_divisor": "spec",
    "resolve_strides": "spec",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"medseg.models.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'medseg.models' has no attribute {name!r}")
