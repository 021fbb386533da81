"""2D/3D U-Net family and the model registry (imports torch; used by training and inference only).

Build networks with :func:`create_model` from the config's ``model`` section; see
:mod:`medseg.models.unet` for the registered models, the stride rules and the exact output
convention (logits; a list of logits, highest resolution first, with deep supervision in train mode).
"""

from medseg.models.unet import (
    MODELS,
    MonaiUNet,
    UNet,
    check_input_shape,
    create_model,
    default_strides,
    plan_strides,
    required_divisor,
    resolve_strides,
)

__all__ = [
    "MODELS",
    "MonaiUNet",
    "UNet",
    "check_input_shape",
    "create_model",
    "default_strides",
    "plan_strides",
    "required_divisor",
    "resolve_strides",
]
