"""YAML configuration validated into typed, frozen pydantic models.

Every section rejects unknown keys. :func:`load_config` reads the YAML, applies dotted ``--set``
overrides (``train.epochs=3``, values parsed as YAML), validates, and turns every problem pydantic
finds into *one* :class:`~medseg.errors.ConfigError` that lists each problem with its dotted path,
the file, and a "did you mean" hint for misspelt keys.

Relative paths in ``data.root`` / ``data.list_file`` are resolved against the config file's folder
if they exist there, else against the current working directory.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from medseg.errors import ConfigError
from medseg.labels import Mode
from medseg.names import check_name

__all__ = [
    "Config",
    "DataConfig",
    "ModelConfig",
    "LossConfig",
    "TrainConfig",
    "PredictConfig",
    "CRFConfig",
    "load_config",
    "parse_override",
    "apply_overrides",
    "config_to_dict",
    "config_hash",
]


class Strict(BaseModel):
    """Base model: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Strict):
    """Where the data is, how it is laid out, and what the labels mean."""

    root: Path = Field(description="Dataset folder (MSD/nnU-Net layout, SCR layout, or base of list paths).")
    layout: Literal["msd", "scr", "list"] = Field(
        "msd",
        description="msd: dataset.json + imagesTr/labelsTr/imagesTs; scr: images/ + masks/<structure>/; "
        "list: an explicit CSV/YAML list of image/label paths (data.list_file).",
    )
    list_file: Path | None = Field(None, description="CSV or YAML list of cases (layout: list).")
    spatial_dims: Literal[2, 3] = 3
    modality: Literal["ct", "mr", "xray"] = "ct"
    labels: dict[str, int] | None = Field(
        None, description="Exclusive classes (softmax): structure name -> label value; 0 is background."
    )
    structures: list[str] | None = Field(
        None, description="Overlapping structures (sigmoid): one binary mask per structure."
    )
    left_right_pairs: list[tuple[str, str]] = Field(
        default_factory=list, description="Structures swapped by left/right mirroring."
    )
    single_component: list[str] = Field(
        default_factory=list, description="Structures that are one connected object (e.g. liver)."
    )

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, v: dict[str, int] | None) -> dict[str, int] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("labels is empty; list at least one structure as name: value")
        bad = {k: i for k, i in v.items() if i <= 0}
        if bad:
            raise ValueError(f"label values must be >= 1 (0 is background), got {bad}")
        values = list(v.values())
        dup = sorted({i for i in values if values.count(i) > 1})
        if dup:
            raise ValueError(f"label values must be unique, repeated: {dup}")
        if max(values) > 65535:
            raise ValueError("label values must fit in uint16 (<= 65535)")
        for name in v:
            check_name(name)
        return v

    @field_validator("structures")
    @classmethod
    def _check_structures(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("structures is empty; list at least one structure name")
        dup = sorted({s for s in v if v.count(s) > 1})
        if dup:
            raise ValueError(f"structure names must be unique, repeated: {dup}")
        for name in v:
            check_name(name)
        return v

    @model_validator(mode="after")
    def _one_label_mode(self) -> DataConfig:
        if (self.labels is None) == (self.structures is None):
            raise ValueError(
                "give exactly one of data.labels (exclusive classes, softmax) or data.structures "
                "(overlapping structures, sigmoid)"
            )
        names = set(self.structure_names)
        for pair in self.left_right_pairs:
            unknown = [s for s in pair if s not in names]
            if unknown:
                raise ValueError(
                    f"left_right_pairs names unknown structures {unknown}; known: {sorted(names)}"
                )
        unknown = [s for s in self.single_component if s not in names]
        if unknown:
            raise ValueError(f"single_component names unknown structures {unknown}; known: {sorted(names)}")
        if self.layout == "list" and self.list_file is None:
            raise ValueError("layout 'list' needs data.list_file (a CSV or YAML list of cases)")
        if self.layout == "scr" and self.structures is None:
            raise ValueError("layout 'scr' stores one mask folder per structure: use data.structures")
        return self

    @property
    def mode(self) -> Mode:
        """``softmax`` for exclusive labels, ``sigmoid`` for overlapping structures."""
        return Mode.SOFTMAX if self.labels is not None else Mode.SIGMOID

    @property
    def structure_names(self) -> list[str]:
        """Foreground structure names in label/channel order."""
        if self.labels is not None:
            return [k for k, _ in sorted(self.labels.items(), key=lambda kv: kv[1])]
        return list(self.structures or [])


class ModelConfig(Strict):
    """Network architecture (the plan records it with its strides resolved)."""

    name: str = "unet"
    channels: list[PositiveInt] = Field(default_factory=lambda: [16, 32, 64, 128, 256])
    strides: list[PositiveInt] | None = None
    residual: bool = False
    norm: Literal["instance", "batch"] = "instance"
    upsample: Literal["deconv", "resize"] = "deconv"
    deep_supervision: bool = False
    options: dict[str, Any] = Field(default_factory=dict)
    """Further settings of the classic networks (``fcn``, ``dense_unet``, ``deeplab``, ``pspnet``);
    see :mod:`medseg.models.classic` for each network's options and defaults."""


class BorderWeightConfig(Strict):
    """U-Net border-weight map (Ronneberger et al. 2015, eq. 2; sigma in mm)."""

    enabled: bool = True
    w0: NonNegativeFloat = 10.0
    sigma_mm: PositiveFloat = 5.0


class LossConfig(Strict):
    """``dice_weight * SoftDice + ce_weight * (border-weighted CE or BCE) + focal_weight * focal``."""

    dice_weight: NonNegativeFloat = 1.0
    ce_weight: NonNegativeFloat = 1.0
    focal_weight: NonNegativeFloat = 0.0
    focal_gamma: NonNegativeFloat = 2.0
    dice_include_background: bool = False
    dice_batch: bool = True
    dice_squared: bool = False
    focal_alpha: Annotated[float, Field(ge=0.0, le=1.0)] | list[NonNegativeFloat] | None = Field(
        None,
        description="focal-loss class balance: a float gives 1 - alpha to the background and alpha to the "
        "structures (softmax) or alpha to the voxels inside a structure and 1 - alpha outside (sigmoid); a "
        "list gives one weight per output channel (softmax: background first); none: no balancing",
    )
    class_weights: Literal["none", "inverse_frequency", "median_frequency"] | list[PositiveFloat] = Field(
        "none",
        description="class weights of the CE/BCE and focal terms: inverse_frequency or median_frequency are "
        "computed from the training cases when the run is planned and stored in plan.json; a list gives them "
        "directly (softmax: one per class, background first; sigmoid: one per structure for the voxels "
        "inside it). With weights, the border-weight map keeps only its separation term",
    )
    border_weights: BorderWeightConfig = Field(default_factory=BorderWeightConfig)


class TrainConfig(Strict):
    """Training schedule and hardware."""

    epochs: PositiveInt = 100
    seed: int = Field(0, ge=0)
    device: str = "auto"
    batch_size: PositiveInt = 2
    patch_size: list[PositiveInt] | None = Field(
        None, description="training patch (voxels per axis); default: the largest that fits memory_gb"
    )
    memory_gb: PositiveFloat = Field(
        8.0,
        description="device memory (GB = 2**30 bytes) one training step may use: activations for forward "
        "and backward at batch_size, parameters, gradients, optimizer state (and on CUDA a fixed 1 GB for "
        "the context and cuDNN). The planned patch is the largest whose estimate fits; a patch_size given "
        "here wins, with a warning when its estimate exceeds this",
    )
    target_spacing_mm: list[PositiveFloat] | None = None
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: PositiveFloat = 3e-4
    weight_decay: NonNegativeFloat = 1e-5
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    iterations_per_epoch: PositiveInt = 50
    val_every: PositiveInt = 1
    foreground_fraction: float = Field(0.33, ge=0.0, le=1.0)
    num_workers: int = Field(0, ge=0)
    val_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="share of training cases held out for validation"
    )
    grad_clip: NonNegativeFloat = Field(12.0, description="max gradient norm (0 disables)")
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on CPU)")
    early_stopping: PositiveInt | None = Field(
        None, description="stop after this many validations without improvement of the mean Dice"
    )
    max_minutes: PositiveFloat | None = Field(
        None,
        description="wall-clock budget of the whole `medseg train` (planning, preprocessing, training, "
        "validation), in minutes: training stops after the last epoch that fits, or cuts the epoch in "
        "progress short after the step that spends the budget (train.epochs is then an upper bound), "
        "validates that last epoch, and the learning-rate schedule follows the time used instead of the "
        "epochs; a resumed run gets the budget afresh",
    )
    augment: bool = True
    cache_dir: Path | None = Field(
        None, description="preprocessing cache (default ~/.cache/medseg/preprocessed)"
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        ok = v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit())
        if not ok:
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v


class CRFConfig(Strict):
    """Dense CRF refinement of the probabilities on the scan's own grid before the argmax/threshold
    (:mod:`medseg.models.crf`; off by default).

    Defaults translate Krähenbühl & Koltun's (2011) natural-image settings (spatial kernel w = 3,
    sigma = 3 px; bilateral kernel w = 5-10, sigma_xy 50-80 px, sigma_rgb 13 of 255) to scans: 3 px is
    about 3 mm on CT's ~1 mm voxels; the bilateral window is truncated (``window`` voxels), so its
    width is what fits a short window, 5 mm; the intensity width is in the plan's normalised units by
    default (13/255 on a photograph is about a quarter of its standard deviation), the same for CT,
    MR and radiographs of any bit depth.
    """

    enabled: bool = False
    # bounded: a run's config.yaml may come from elsewhere, and each iteration holds rows in memory
    iterations: int = Field(5, ge=1, le=50, description="mean-field iterations (5 is near convergence)")
    spatial_sigma_mm: float = Field(3.0, gt=0, le=500, description="width of the Gaussian smoothness kernel")
    bilateral_sigma_mm: float = Field(5.0, gt=0, le=500, description="spatial width of the appearance kernel")
    bilateral_sigma_intensity: float = Field(
        0.25,
        ge=1e-3,
        le=1e6,
        description="intensity width of the appearance kernel, in the units `intensity` names (narrower "
        "than 1e-3 would overflow the kernel)",
    )
    weights: tuple[Annotated[float, Field(ge=0, le=1000)], Annotated[float, Field(ge=0, le=1000)]] = Field(
        (3.0, 5.0), description="(spatial, bilateral) kernel weights; the kernels are normalised averages"
    )
    intensity: Literal["normalised", "raw"] = Field(
        "normalised",
        description="intensities of the appearance kernel: the model's own input normalisation applied on "
        "the scan's grid (unitless, any modality), or raw image values (HU for CT, pixel values for X-ray)",
    )
    window: int = Field(
        3,
        ge=1,
        le=10,
        description="largest half-width in voxels per axis of the appearance kernel's window (cost grows "
        "as (2 * window + 1) ** spatial_dims per voxel and iteration)",
    )


class PredictConfig(Strict):
    """Sliding-window inference settings (``medseg predict`` and validation)."""

    overlap: float = Field(0.5, ge=0.0, lt=1.0)
    batch_size: PositiveInt = 2
    tta: bool = False
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    resample: Literal["logits", "probabilities"] = Field(
        "logits",
        description="what is resampled linearly to the input grid before argmax/threshold when the spacing "
        "changed: the blended logits (nnU-Net v2's rule), or probabilities (labels never are)",
    )
    min_component_mm3: NonNegativeFloat = 0.0
    fill_holes: bool = False
    crf: CRFConfig = Field(default_factory=CRFConfig)


class Config(Strict):
    """The whole configuration; mirrors the YAML file's sections."""

    name: str | None = None
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)

    @model_validator(mode="after")
    def _patch_dims(self) -> Config:
        ps = self.train.patch_size
        if ps is not None and len(ps) != self.data.spatial_dims:
            raise ValueError(
                f"train.patch_size has {len(ps)} values but data.spatial_dims is {self.data.spatial_dims}"
            )
        ts = self.train.target_spacing_mm
        if ts is not None and len(ts) != self.data.spatial_dims:
            raise ValueError(
                f"train.target_spacing_mm has {len(ts)} values but data.spatial_dims is "
                f"{self.data.spatial_dims}"
            )
        return self


# --------------------------------------------------------------------------------------------
# overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` into ``(['a', 'b', 'c'], value)``; the value is parsed as YAML.

    >>> parse_override("train.epochs=3")
    (['train', 'epochs'], 3)
    >>> parse_override("data.labels={liver: 1}")
    (['data', 'labels'], {'liver': 1})
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value (e.g. train.epochs=3)")
    key, raw = text.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"override {text!r} has an empty key; use a dotted path like train.epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with dotted overrides applied (intermediate mappings are created)."""
    out = json.loads(json.dumps(raw, default=str)) if raw else {}
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"override {text!r}: {where} is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return out


# --------------------------------------------------------------------------------------------
# loading and error formatting


def _model_at(loc: Sequence[Any]) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at ``loc`` (a pydantic error location)."""
    model: Any = Config
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        nested = None
        for cand in (ann, *getattr(ann, "__args__", ())):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                nested = cand
        model = nested
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _did_you_mean(word: str, candidates: list[str]) -> list[str]:
    """Closest candidate for a misspelt key: difflib similarity, else a shared prefix (lr_rate -> lr)."""
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    if close:
        return close
    prefixed = [c for c in candidates if word.startswith(c + "_") or c.startswith(word + "_")]
    if prefixed:
        return [max(prefixed, key=len)]
    return difflib.get_close_matches(word, candidates, n=1, cutoff=0.5)


def _describe(err: dict[str, Any]) -> str:
    loc = [p for p in err["loc"]]
    path = ".".join(str(p) for p in loc) or "<top level>"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        hint = ""
        if parent is not None:
            close = _did_you_mean(str(loc[-1]), list(parent.model_fields))
            if close:
                hint = f" (did you mean '{close[0]}'?)"
            else:
                hint = f" (known keys: {', '.join(parent.model_fields)})"
        return f"{path}: unknown key{hint}"
    if kind == "missing":
        return f"{path}: required key is missing"
    got = err.get("input")
    got_text = "" if isinstance(got, dict) else f", got {got!r}"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return f"{path}: {msg}{got_text}"


def _resolve_path(p: Path | None, base: Path | None) -> Path | None:
    if p is None or p.is_absolute():
        return p
    if base is not None and (base / p).exists():
        return (base / p).resolve()
    return p


def load_config(
    source: str | Path | dict[str, Any], overrides: Sequence[str] = (), *, resolve_paths: bool = True
) -> Config:
    """Read a YAML config (or a dict), apply ``--set`` overrides, and validate it.

    Args:
        source: Path to a YAML file, or an already-parsed mapping.
        overrides: Dotted overrides such as ``["train.epochs=3", "data.root=/data/x"]``.
        resolve_paths: Resolve relative ``data.root``/``data.list_file`` against the config's folder
            when the path exists there.

    Raises:
        ConfigError: Listing every problem (unknown keys with a did-you-mean hint, wrong types,
            missing keys) with its dotted path and the file.
    """
    where = "<dict>"
    base: Path | None = None
    if isinstance(source, dict):
        raw: Any = source
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (pass --config path/to/config.yaml)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        base = path.resolve().parent
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where}: expected a mapping with sections data/model/loss/train/predict, got {raw!r}"
        )
    raw = apply_overrides(raw, overrides)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        n = len(problems)
        lines = "\n".join(f"  {p}" for p in problems)
        raise ConfigError(f"{where} has {n} problem{'s' if n != 1 else ''}:\n{lines}") from None
    if resolve_paths:
        data = cfg.data.model_copy(
            update={
                "root": _resolve_path(cfg.data.root, base),
                "list_file": _resolve_path(cfg.data.list_file, base),
            }
        )
        cfg = cfg.model_copy(update={"data": data})
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain-Python (YAML/JSON-safe) form of a config, with every default filled in."""
    return cfg.model_dump(mode="json")


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML text (the form ``medseg config show`` prints)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_hash(cfg: Config) -> str:
    """Stable 16-hex-digit hash of the resolved config."""
    text = json.dumps(config_to_dict(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
