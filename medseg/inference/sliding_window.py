"""MONAI sliding-window inference as medseg uses it, shared by validation and ``medseg predict``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def sliding_window_logits(
    model: Any,
    image: np.ndarray,
    patch_size: Sequence[int],
    device: Any,
    *,
    overlap: float = 0.5,
    batch_size: int = 2,
) -> Any:
    """Gaussian-blended logits ``(K, *spatial)`` (a CPU tensor) for a preprocessed ``(C, *spatial)`` image.

    The network runs on ``device`` in eval mode (its previous mode is restored); the blended output
    is accumulated on the CPU. An image smaller than the patch is padded with its minimum (air for CT),
    as training patches are: padding with 0 would mean soft tissue after normalisation and destroy
    the context the network learned.
    """
    import torch
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.array(image, dtype=np.float32))[None]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = sliding_window_inference(
                x,
                roi_size=tuple(patch_size),
                sw_batch_size=batch_size,
                predictor=model,
                overlap=overlap,
                mode="gaussian",
                padding_mode="constant",
                cval=float(x.min()),
                sw_device=device,
                device=torch.device("cpu"),
            )
    finally:
        model.train(was_training)
    return logits[0]
