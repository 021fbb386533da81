"""The run-bundle layer, below training and inference: device and precision, checkpoints that are data,
and :func:`load_bundle`, the one way a trained model is loaded.

Training writes checkpoints through :mod:`medseg.runtime.checkpoint`; prediction, evaluation, reports
and the scripts read model folders only through :func:`load_bundle` (:mod:`medseg.runtime.bundle`).
"""

from medseg.runtime.bundle import (
    BUNDLE_FORMATS,
    Bundle,
    BundleFormat,
    PostProcessing,
    load_bundle,
    run_settings,
)
from medseg.runtime.checkpoint import load_checkpoint, save_checkpoint
from medseg.runtime.device import amp_dtype, resolve_device

__all__ = [
    "BUNDLE_FORMATS",
    "Bundle",
    "BundleFormat",
    "PostProcessing",
    "amp_dtype",
    "load_bundle",
    "load_checkpoint",
    "resolve_device",
    "run_settings",
    "save_checkpoint",
]
