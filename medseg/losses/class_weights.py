"""Dataset-level class weights for the cross-entropy terms (FCN-style class balancing).

Two formulas, both from the class volumes of the training cases (physical volumes in mm³, so that cases
of different resolution count by their extent, as they do once resampled to the plan's spacing):

* ``inverse_frequency``: ``w_c = 1 / (K · f_c)`` with ``f_c = Σ_i v_ic / Σ_i V_i`` the share of all
  training voxels that belong to class ``c`` and ``K`` the number of classes. The normalisation makes the
  frequency-weighted mean weight 1 (``Σ_c f_c · w_c = 1``), so the weighted cross-entropy keeps the scale
  of the plain one. It is scikit-learn's ``class_weight="balanced"``.
* ``median_frequency`` (Eigen & Fergus, ICCV 2015, used by SegNet): ``w_c = median_c(freq_c) / freq_c``
  with ``freq_c = Σ_i v_ic / Σ_{i: v_ic > 0} V_i``, class ``c``'s voxels over the voxels of the cases
  in which it appears. A class that is small where it appears is up-weighted, one that is merely absent
  from many cases is not.

``v_ic`` is the volume of class ``c`` in case ``i`` and ``V_i = Σ_c v_ic`` the case's volume (background
included, so every row of the table sums to its case's volume).

Exclusive labels (softmax) have ``K = 1 +`` the number of structures, background first. Overlapping
structures (sigmoid) are weighted channel by channel: each channel is a two-class problem (outside,
inside the structure) balanced with the same formula, giving a ``(negative, positive)`` weight pair per
channel.

The weights are not clipped: they are what the formula gives, and the weighted loss is normalised by
the sum of its weights, so the scale of the gradient stays that of the plain loss. (The border-weight
map's own per-case balance, :mod:`medseg.losses.weight_maps`, clips at 10 because it is recomputed for
every case and must not blow up on a case where an organ is a few voxels.)

Why hand-written: MONAI and torch take class weights but do not compute them, and scikit-learn's
``compute_class_weight`` needs every voxel label as an array (billions for a CT dataset) and has no
median-frequency rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from medseg.errors import DataError

__all__ = ["ClassWeighting", "binary_class_weights", "frequency_class_weights"]

ClassWeighting = Literal["inverse_frequency", "median_frequency"]
METHODS: tuple[str, ...] = ("inverse_frequency", "median_frequency")


def frequency_class_weights(
    volumes: np.ndarray | Sequence[Sequence[float]],
    method: ClassWeighting,
    *,
    names: Sequence[str] | None = None,
) -> np.ndarray:
    """Class weights from a table of class volumes per case.

    Args:
        volumes: ``(cases, K)`` non-negative volumes (or voxel counts) of each class in each case; each
            row must cover its whole case (background included).
        method: ``"inverse_frequency"`` or ``"median_frequency"`` (see the module docstring).
        names: The ``K`` class names, for the error message.

    Returns:
        float64 array of ``K`` weights.

    Raises:
        DataError: If a class has no voxel in any case (its weight is undefined), naming the class.
        ValueError: If ``method`` is unknown or the table is not 2D with non-negative entries.

    Example:
        >>> import numpy as np
        >>> frequency_class_weights(np.array([[90.0, 10.0]]), "inverse_frequency").round(4).tolist()
        [0.5556, 5.0]
    """
    v = np.asarray(volumes, dtype=np.float64)
    if v.ndim != 2 or v.shape[0] == 0 or v.shape[1] == 0 or (v < 0).any() or not np.isfinite(v).all():
        raise ValueError(f"class volumes must be a non-negative (cases, classes) table, got shape {v.shape}")
    if method not in METHODS:
        raise ValueError(f"class weighting must be one of {METHODS}, got {method!r}")
    per_class = v.sum(axis=0)
    missing = np.flatnonzero(per_class <= 0)
    if missing.size:
        label = [names[i] if names is not None else f"class {i}" for i in missing]
        raise DataError(
            f"cannot compute {method} class weights: {', '.join(map(repr, label))} has no voxel in any "
            "training case; check the labels (`medseg data check`), or set loss.class_weights to 'none' "
            "or to a list of weights"
        )
    case_volume = v.sum(axis=1)
    k = v.shape[1]
    if method == "inverse_frequency":
        freq = per_class / case_volume.sum()
        return 1.0 / (k * freq)
    present_volume = np.array([case_volume[v[:, c] > 0].sum() for c in range(k)])
    freq = per_class / present_volume
    return np.median(freq) / freq


def binary_class_weights(
    structure_volumes: np.ndarray | Sequence[Sequence[float]],
    case_volumes: np.ndarray | Sequence[float],
    method: ClassWeighting,
    *,
    names: Sequence[str] | None = None,
) -> np.ndarray:
    """(negative, positive) weights per channel of overlapping structures (sigmoid outputs).

    Each channel ``s`` is balanced as a two-class problem with the table ``[V_i - v_is, v_is]``.

    Args:
        structure_volumes: ``(cases, S)`` volume of each structure in each case.
        case_volumes: ``(cases,)`` volume of each case.
        method: ``"inverse_frequency"`` or ``"median_frequency"``.
        names: The ``S`` structure names, for the error message.

    Returns:
        float64 array ``(S, 2)``: column 0 weights the voxels outside the structure, column 1 inside.

    Raises:
        DataError: If a structure is empty in every case, or fills every case entirely.

    Example:
        >>> binary_class_weights([[25.0]], [100.0], "inverse_frequency").round(4).tolist()
        [[0.6667, 2.0]]
    """
    sv = np.asarray(structure_volumes, dtype=np.float64)
    cv = np.asarray(case_volumes, dtype=np.float64)
    if sv.ndim != 2 or cv.shape != (sv.shape[0],) or (sv > cv[:, None] * (1 + 1e-9)).any():
        raise ValueError(
            f"structure volumes {sv.shape} must be (cases, S), no larger than the case volumes {cv.shape}"
        )
    out = np.empty((sv.shape[1], 2))
    for s in range(sv.shape[1]):
        name = names[s] if names is not None else f"structure {s}"
        table = np.stack([np.clip(cv - sv[:, s], 0, None), sv[:, s]], axis=1)
        out[s] = frequency_class_weights(table, method, names=[f"outside {name}", name])
    return out
