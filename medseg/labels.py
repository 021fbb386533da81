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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from medseg.errors import ConfigError
from medseg.names import check_label_name, check_name, spreadsheet_safe

__all__ = [
    "LabelSpec",
    "check_label_name",
    "check_name",
    "default_label_spec",
    "load_label_spec",
    "spreadsheet_safe",
]


@dataclass(frozen=True)
class LabelSpec:
    """Structure names of a label map (``mode='softmax'``: value -> name, background 0 excluded) or of
    per-structure binary masks (``mode='sigmoid'``: names in order, ``values`` are 1-based positions)."""

    mode: Literal["softmax", "sigmoid"]
    names: tuple[str, ...]
    values: tuple[int, ...]
    source: str = "default"

    def __post_init__(self) -> None:
        if len(self.names) != len(self.values):
            raise ValueError(f"{len(self.names)} names but {len(self.values)} values")
        dup = sorted({n for n in self.names if self.names.count(n) > 1})
        if dup:
            raise ConfigError(f"{self.source}: structure names repeat: {dup}")
        if 0 in self.values and self.mode == "softmax":
            raise ConfigError(f"{self.source}: label value 0 is background and cannot name a structure")
        for n in self.names:
            check_label_name(n, where=self.source)

    def name_of(self, value: int) -> str:
        """The name of a label value (``label_<value>`` when unnamed)."""
        return dict(zip(self.values, self.names, strict=True)).get(int(value), f"label_{int(value)}")

    def as_dict(self) -> dict[int, str]:
        """``{value: name}`` in label order."""
        return dict(zip(self.values, self.names, strict=True))


def default_label_spec(values: Iterable[int]) -> LabelSpec:
    """``label_<v>`` names for the nonzero values given (e.g. those present in a label map)."""
    vals = sorted({int(v) for v in values if int(v) != 0})
    return LabelSpec("softmax", tuple(f"label_{v}" for v in vals), tuple(vals))


def load_label_spec(source: str | Path) -> LabelSpec:
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


def _from_plan(path: Path) -> LabelSpec:
    plan = _read_json(path)
    names = tuple(plan["structure_names"])
    if plan["mode"] == "softmax":
        return LabelSpec("softmax", names, tuple(int(v) for v in plan["label_values"]), str(path))
    return LabelSpec("sigmoid", names, tuple(range(1, len(names) + 1)), str(path))


def _from_config(path: Path) -> LabelSpec:
    from medseg.config import load_config

    cfg = load_config(path, resolve_paths=False)
    if cfg.data.labels is not None:
        items = sorted(cfg.data.labels.items(), key=lambda kv: kv[1])
        return LabelSpec("softmax", tuple(n for n, _ in items), tuple(v for _, v in items), str(path))
    names = tuple(cfg.data.structures or ())
    return LabelSpec("sigmoid", names, tuple(range(1, len(names) + 1)), str(path))


def _from_mapping(data: Any, path: Path) -> LabelSpec:
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
    return LabelSpec("softmax", tuple(pairs[v] for v in values), values, str(path))


def _is_int(x: Any) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, int):
        return True
    return isinstance(x, str) and x.strip().lstrip("-").isdigit()
