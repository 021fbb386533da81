"""Label names for evaluation and reports: which value (or mask) is which structure.

``medseg evaluate``, ``medseg report`` and ``medseg predict --report`` accept ``--labels SOURCE`` where
SOURCE is any of

- a run directory (its ``plan.json``: what the model predicts),
- a medseg config (``data.labels`` or ``data.structures``),
- an MSD/nnU-Net ``dataset.json`` (``labels`` as ``{"1": "liver"}`` or ``{"liver": 1}``),
- a JSON file mapping values to names (or names to values), optionally nested, picked with
  ``FILE.json:KEY`` (e.g. TotalSegmentator's ``class_map_total.json:total``).

Without a source, structures are named ``label_<value>`` from the values present in the data.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from medseg.errors import ConfigError, DataError
from medseg.names import check_label_name, check_name, spreadsheet_safe

__all__ = [
    "LabelLayout",
    "Mode",
    "check_label_name",
    "check_name",
    "default_labels",
    "label_dtype_for",
    "load_labels",
    "spreadsheet_safe",
]


class Mode(StrEnum):
    """How a model's outputs relate to its structures (the values are what configs and ``plan.json``
    store)."""

    SOFTMAX = "softmax"
    """Exclusive classes: one label map, background + one channel per class, softmax, argmax."""
    SIGMOID = "sigmoid"
    """Overlapping structures: one binary mask and one sigmoid channel per structure, threshold."""


def label_dtype_for(max_value: int) -> np.dtype:
    """The one label dtype rule: uint8 when every value fits in 0..255, else uint16 (up to 65535).

    Raises:
        DataError: Values above 65535.
    """
    if max_value > 65535:
        raise DataError(f"label values must be in 0..65535, found {max_value}")
    return np.dtype(np.uint8 if max_value <= 255 else np.uint16)


@dataclass(frozen=True)
class LabelLayout:
    """What a model's outputs, a label map or a mask folder mean: the mode, the structure names, their
    label values and channel order, and the left/right pairs.

    ``mode`` softmax: ``values`` are the label values (background 0 excluded) and channel ``k + 1`` is
    structure ``k``; sigmoid: ``values`` are the 1-based positions and channel ``k`` is structure
    ``k``. The plan owns the model's layout (:attr:`medseg.data.plan.Plan.labels`); ``--labels``
    sources give one to evaluation and reports (:func:`load_labels`).
    """

    mode: Mode
    names: tuple[str, ...]
    values: tuple[int, ...]
    source: str = "default"
    left_right_pairs: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode(self.mode))
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "values", tuple(int(v) for v in self.values))
        object.__setattr__(self, "left_right_pairs", tuple(tuple(p) for p in self.left_right_pairs))
        if len(self.names) != len(self.values):
            raise ValueError(f"{len(self.names)} names but {len(self.values)} values")
        dup = sorted({n for n in self.names if self.names.count(n) > 1})
        if dup:
            raise ConfigError(f"{self.source}: structure names repeat: {dup}")
        if 0 in self.values and self.exclusive:
            raise ConfigError(f"{self.source}: label value 0 is background and cannot name a structure")
        for n in self.names:
            check_label_name(n, where=self.source)
        unknown = sorted({n for pair in self.left_right_pairs for n in pair} - set(self.names))
        if unknown:
            raise ConfigError(f"{self.source}: left_right_pairs name unknown structures {unknown}")

    @classmethod
    def overlapping(cls, names: Sequence[str], **kw: Any) -> LabelLayout:
        """A sigmoid layout of ``names`` (values are their 1-based positions)."""
        return cls(Mode.SIGMOID, tuple(names), tuple(range(1, len(names) + 1)), **kw)

    @property
    def exclusive(self) -> bool:
        """Exclusive classes (softmax) rather than overlapping structures (sigmoid)."""
        return self.mode is Mode.SOFTMAX

    @property
    def out_channels(self) -> int:
        """Network output channels: background + classes (softmax) or one per structure (sigmoid)."""
        return len(self.names) + (1 if self.exclusive else 0)

    @property
    def channel_names(self) -> tuple[str, ...]:
        """The name of each output channel, in channel order."""
        return ("background", *self.names) if self.exclusive else self.names

    def channel_of(self, name: str) -> int:
        """The output channel of a structure."""
        return self.names.index(name) + (1 if self.exclusive else 0)

    def lr_channel_pairs(self) -> list[tuple[int, int]]:
        """Output channels that mirroring the left-right axis swaps (``left_right_pairs``)."""
        return [(self.channel_of(a), self.channel_of(b)) for a, b in self.left_right_pairs]

    def lr_channel_permutation(self) -> list[int]:
        """Output-channel order after mirroring the left-right axis: paired structures swap."""
        perm = list(range(self.out_channels))
        for a, b in self.lr_channel_pairs():
            perm[a], perm[b] = b, a
        return perm

    @property
    def dtype(self) -> np.dtype:
        """dtype of this layout's label maps (:func:`label_dtype_for`; masks are 0/1, uint8)."""
        return label_dtype_for(max(self.values, default=0) if self.exclusive else 1)

    def name_of(self, value: int) -> str:
        """The name of a label value (``label_<value>`` when unnamed)."""
        return dict(zip(self.values, self.names, strict=True)).get(int(value), f"label_{int(value)}")

    def as_dict(self) -> dict[int, str]:
        """``{value: name}`` in label order."""
        return dict(zip(self.values, self.names, strict=True))


def default_labels(values: Iterable[int]) -> LabelLayout:
    """``label_<v>`` names for the nonzero values given (e.g. those present in a label map)."""
    vals = sorted({int(v) for v in values if int(v) != 0})
    return LabelLayout(Mode.SOFTMAX, tuple(f"label_{v}" for v in vals), tuple(vals))


def load_labels(source: str | Path) -> LabelLayout:
    """Read structure names from a run directory, config, ``dataset.json`` or JSON map (see module doc)."""
    text = str(source)
    key = None
    path = Path(text)
    if not path.exists() and ":" in text:
        head, _, key = text.rpartition(":")
        path = Path(head)
    if not path.exists():
        raise ConfigError(
            f"--labels {text}: no such file or folder; pass a run directory, a config .yaml, a dataset.json "
            "or a JSON map of label values to names (FILE.json:KEY for a nested map)"
        )
    if path.is_dir():
        if (path / "plan.json").is_file():
            return _from_plan(path / "plan.json")
        if (path / "dataset.json").is_file():
            return _from_mapping(_read_json(path / "dataset.json").get("labels"), path / "dataset.json")
        raise ConfigError(f"--labels {path}: a folder without plan.json or dataset.json")
    if path.suffix.lower() in (".yaml", ".yml"):
        return _from_config(path)
    data = _read_json(path)
    if key is not None:
        if not isinstance(data, Mapping) or key not in data:
            keys = sorted(data) if isinstance(data, Mapping) else []
            raise ConfigError(f"--labels {text}: no key {key!r} in {path} (keys: {keys})")
        data = data[key]
    elif isinstance(data, Mapping) and "labels" in data and isinstance(data["labels"], Mapping):
        data = data["labels"]  # dataset.json under another name
    elif isinstance(data, Mapping) and "structure_names" in data and "mode" in data:
        return _from_plan(path)
    return _from_mapping(data, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--labels {path}: cannot read JSON ({exc})") from exc


def _from_plan(path: Path) -> LabelLayout:
    plan = _read_json(path)
    try:
        names = tuple(check_name(n, where=str(path)) for n in plan["structure_names"])
        pairs = tuple(tuple(p) for p in plan.get("left_right_pairs", ()))
        if Mode(plan["mode"]) is Mode.SOFTMAX:
            values = tuple(int(v) for v in plan["label_values"])
            return LabelLayout(Mode.SOFTMAX, names, values, str(path), pairs)
        return LabelLayout.overlapping(names, source=str(path), left_right_pairs=pairs)
    except (KeyError, TypeError, ValueError) as exc:  # ConfigError is a ValueError
        raise ConfigError(f"--labels {path}: not a valid plan.json ({exc})") from exc


def _from_config(path: Path) -> LabelLayout:
    """The ``data.labels`` / ``data.structures`` of a config file (read as YAML: the names are all that
    is needed, and checked here as the config checks them)."""

    try:
        data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
    except (OSError, yaml.YAMLError, AttributeError) as exc:
        raise ConfigError(f"--labels {path}: cannot read the config ({exc})") from exc
    labels, structures = data.get("labels"), data.get("structures")
    if isinstance(labels, Mapping) and labels:
        if not all(_is_int(v) for v in labels.values()):
            raise ConfigError(f"--labels {path}: data.labels must map names to integer values")
        items = sorted(((check_name(n, where=str(path)), int(v)) for n, v in labels.items()), key=_by_value)
        return LabelLayout(Mode.SOFTMAX, tuple(n for n, _ in items), tuple(v for _, v in items), str(path))
    if isinstance(structures, list) and structures:
        return LabelLayout.overlapping([check_name(n, where=str(path)) for n in structures], source=str(path))
    raise ConfigError(f"--labels {path}: the config has neither data.labels nor data.structures")


def _by_value(item: tuple[str, int]) -> int:
    return item[1]


def _from_mapping(data: Any, path: Path) -> LabelLayout:
    """``{"1": "liver"}`` or ``{"liver": 1}`` (background entries dropped) -> a softmax spec."""
    if not isinstance(data, Mapping) or not data:
        raise ConfigError(
            f"--labels {path}: expected a JSON object mapping label values to names, e.g. "
            '{"1": "liver", "2": "spleen"}'
        )
    pairs: dict[int, str] = {}
    for k, v in data.items():
        if _is_int(k) and isinstance(v, str):
            value, name = int(k), v
        elif isinstance(k, str) and _is_int(v):
            value, name = int(v), k
        else:
            raise ConfigError(f"--labels {path}: entry {k!r}: {v!r} is neither value: name nor name: value")
        if value != 0:
            pairs[value] = name
    values = tuple(sorted(pairs))
    return LabelLayout(Mode.SOFTMAX, tuple(pairs[v] for v in values), values, str(path))


def _is_int(x: Any) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, int):
        return True
    return isinstance(x, str) and x.strip().lstrip("-").isdigit()
