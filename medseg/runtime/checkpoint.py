"""Checkpoints that are data, never code: saved atomically, loaded with ``weights_only=True``.

A checkpoint holds everything ``--resume`` needs (model, optimiser, scheduler, AMP scaler, RNG states,
epoch) as tensors and plain Python values only. ``torch.load(weights_only=True)`` refuses anything
else, so a model folder received from elsewhere cannot run code when it is loaded: a pickle whose
object calls ``os.system`` on unpickling is refused with a :class:`~medseg.errors.DataError`.

Checkpoints hold the unwrapped model's ``state_dict`` (never DDP's ``module.``-prefixed one), so a
checkpoint of a multi-process run loads into a plain model. ``rng`` is rank 0's RNG state (what a
single process restores); a multi-process run also stores ``world_size`` and ``rng_ranks``, the states
of every rank in rank order.

Checkpoints written before format 2 stored numpy's RNG state as a numpy array, which
``weights_only`` loading refuses. They are not loaded; :func:`convert_checkpoint` (``medseg
convert-run``) rewrites them. It allows exactly numpy's array reconstruction besides tensors and plain
values, which rebuilds arrays of numbers and calls nothing else, so converting is safe as well.
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.errors import DataError
from medseg.io._atomic import atomic_write

__all__ = [
    "FORMAT_VERSION",
    "convert_checkpoint",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

FORMAT_VERSION = 2
"""Version of the checkpoint layout; 1 (no ``format_version`` key) stored numpy RNG state as arrays."""

_NUMPY_ARRAY_GLOBALS = {
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
}
"""What a format-1 checkpoint needs beyond tensors and plain values (a numpy array of numbers)."""


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch (and CUDA) RNG states, as tensors and plain values."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),  # (version, tuple of ints, gauss or None)
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": [int(v) for v in np_state["state"]["key"]],
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore states returned by :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    npst = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": npst["bit_generator"],
            "state": {"key": np.asarray(npst["key"], dtype=np.uint32), "pos": int(npst["pos"])},
            "has_gauss": int(npst["has_gauss"]),
            "gauss": float(npst["gauss"]),
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """``torch.save`` to a temporary sibling, fsync, then rename: a crash never leaves a torn file.

    ``format_version`` is added; the payload must hold only tensors and plain Python values (it is
    loaded back with ``weights_only=True``).
    """
    path = Path(path)
    with atomic_write(path, fsync=True) as tmp:
        torch.save({**payload, "format_version": FORMAT_VERSION}, tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint as data (``weights_only=True``).

    Raises:
        DataError: The file is missing or unreadable; it holds objects other than tensors and plain
            values (refused: unpickling them could run code); it was written by an older medseg
            (with the command that converts it) or a newer one.
    """
    path = Path(path)
    return _checked(path, _load(path, map_location))


def _load(path: Path, map_location: str | torch.device = "cpu", *, numpy_arrays: bool = False) -> Any:
    """``torch.load(weights_only=True)`` of ``path`` (allowing numpy's array reconstruction besides
    tensors and plain values when ``numpy_arrays``), with medseg's errors."""
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found (train first, or pass the run directory that has it)")
    allowed: list[Any] = []
    if numpy_arrays:
        reconstruct = np._core.multiarray._reconstruct  # numpy 1 pickles name it numpy.core.multiarray
        allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), reconstruct]
        allowed.append((reconstruct, "numpy.core.multiarray._reconstruct"))
    try:
        with torch.serialization.safe_globals(allowed):
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, exc, numpy_arrays=numpy_arrays) from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types on corrupt files
        raise DataError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or "model" not in payload:
        raise DataError(f"{path}: not a medseg checkpoint (expected a mapping with the model's weights)")
    return payload


def _checked(path: Path, payload: dict[str, Any]) -> dict[str, Any]:
    version = _checked_version(path, payload)
    if version > FORMAT_VERSION:
        raise DataError(
            f"{path}: checkpoint format {version} was written by a newer medseg (this one reads up to "
            f"{FORMAT_VERSION}); upgrade medseg"
        )
    if version < FORMAT_VERSION:
        raise DataError(_old_format_message(path))
    return payload


def _checked_version(path: Path, payload: dict[str, Any]) -> int:
    version = payload.get("format_version", 1)
    if not isinstance(version, int):
        raise DataError(f"{path}: not a medseg checkpoint (format_version {version!r} is not a number)")
    return version


def _unsafe_globals(path: Path) -> list[str]:
    """The Python objects a pickle refers to beyond what ``weights_only`` allows (read, not run)."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - a file that cannot even be scanned is reported as such
        return ["<unreadable>"]


def _refusal(path: Path, exc: Exception, *, numpy_arrays: bool = False) -> DataError:
    found = _unsafe_globals(path)
    if not numpy_arrays and found and set(found) <= _NUMPY_ARRAY_GLOBALS:
        return DataError(_old_format_message(path))
    others = [g for g in found if not (numpy_arrays and g in _NUMPY_ARRAY_GLOBALS)]
    return DataError(
        f"{path}: refused: the checkpoint holds Python objects ({', '.join(others[:5]) or exc}) besides "
        "tensors and numbers; loading them could run code, so medseg never does. Use a checkpoint "
        "written by `medseg train`, or retrain"
    )


def _old_format_message(path: Path) -> str:
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return (
        f"{path}: written by an older medseg (checkpoint format 1, numpy RNG state stored as arrays), "
        f"which is not loaded as it is; convert it once with `medseg convert-run {run}` (it rewrites "
        "the checkpoints as tensors and plain values and runs no code from them)"
    )


def _as_rng_v2(state: Any) -> Any:
    """A format-1 RNG state (numpy's legacy tuple) in the format-2 layout; others unchanged."""
    if not isinstance(state, dict) or not isinstance(state.get("numpy"), tuple):
        return state
    name, key, pos, has_gauss, gauss = state["numpy"]
    return {
        **state,
        "numpy": {
            "bit_generator": str(name),
            "key": [int(v) for v in np.asarray(key)],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
    }


def convert_checkpoint(path: str | Path) -> bool:
    """Rewrite a format-1 checkpoint in the current format, in place (atomically).

    Loads with ``weights_only=True`` allowing only numpy's array reconstruction (what format 1 needs),
    so a file with any other object is refused exactly as :func:`load_checkpoint` refuses it.

    Returns:
        True if the file was converted, False if it already had the current format.

    Raises:
        DataError: The file is unreadable or holds objects other than tensors, plain values and
            numpy arrays.
    """
    path = Path(path)
    payload = _load(path, numpy_arrays=True)
    if _checked_version(path, payload) >= FORMAT_VERSION:
        return False
    payload["rng"] = _as_rng_v2(payload.get("rng"))
    if "rng_ranks" in payload:
        payload["rng_ranks"] = [_as_rng_v2(s) for s in payload["rng_ranks"]]
    # format-1 runs validated on the resampled grid; today's validation scores what predict ships, on
    # the original grid, and its numbers are not comparable: the next validation of a resumed run
    # starts the comparison afresh (it becomes best.pt)
    if "best_metric" in payload:
        payload["best_metric"], payload["since_best"] = -1.0, 0
    save_checkpoint(path, payload)
    return True
