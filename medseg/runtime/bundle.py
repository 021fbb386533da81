"""A trained model, loaded: :func:`load_bundle` is the one way prediction, evaluation, reports and the
scripts read a model folder.

A :class:`Bundle` holds what prediction needs: the plan (preprocessing, label layout and the network's
record), the network built from the plan with its weights, the device, the default inference settings
and the post-processing. Folder formats are registered in :data:`BUNDLE_FORMATS`; the first whose
``detect`` accepts a folder loads it. medseg's own run directory (``plan.json``, ``config.yaml``,
``checkpoints/{best,last}.pt``) is :class:`MedsegRun`; a model folder written by another framework is
added as another :class:`BundleFormat` that translates its files into the same :class:`Bundle`.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from medseg.config import Config, ModelConfig, PredictConfig, load_config
from medseg.data.plan import Plan
from medseg.errors import ConfigError, DataError
from medseg.models.spec import NetworkSpec
from medseg.models.unet import create_network
from medseg.registry import Registry
from medseg.runtime.checkpoint import convert_checkpoint, load_checkpoint
from medseg.runtime.device import resolve_device

__all__ = [
    "BUNDLE_FORMATS",
    "Bundle",
    "BundleFormat",
    "MedsegRun",
    "PostProcessing",
    "convert_run",
    "load_bundle",
    "network_of",
    "run_settings",
]

logger = logging.getLogger(__name__)

CHECKPOINTS = ("best", "last")


@dataclass(frozen=True)
class PostProcessing:
    """Post-processing of a model's label maps; ``single`` holds the names of structures that are one
    connected object (their largest component is kept)."""

    single: frozenset[str] = frozenset()
    min_component_mm3: float = 0.0
    fill_holes: bool = False

    @property
    def active(self) -> bool:
        return bool(self.single) or self.min_component_mm3 > 0 or self.fill_holes

    @classmethod
    def from_config(cls, cfg: Config) -> PostProcessing:
        """A config's post-processing: ``data.single_component`` and the ``predict`` section."""
        return cls(
            single=frozenset(cfg.data.single_component),
            min_component_mm3=cfg.predict.min_component_mm3,
            fill_holes=cfg.predict.fill_holes,
        )


@dataclass
class Bundle:
    """A trained model ready to predict.

    Attributes:
        path: The model folder (a run directory).
        format: Name of the :class:`BundleFormat` that loaded it.
        plan: Preprocessing, labels and the network's record.
        model: The network in eval mode, on ``device``.
        device: Where the network runs.
        checkpoint: File name of the weights that were loaded.
        predict: Default inference settings (the run config's ``predict`` section).
        postprocessing: What is done to the label maps after the decision.
        meta: Provenance: ``epoch``, ``config_hash``, ``val_mean_dice`` (the best validation score).
    """

    path: Path
    format: str
    plan: Plan
    model: nn.Module
    device: torch.device
    checkpoint: str
    predict: PredictConfig = field(default_factory=PredictConfig)
    postprocessing: PostProcessing = field(default_factory=PostProcessing)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return int(sum(p.numel() for p in self.model.parameters()))

    def provenance(self) -> dict[str, Any]:
        """What a report or manifest records about the model."""
        return {
            "model": str(self.path),
            "format": self.format,
            "checkpoint": self.checkpoint,
            "config_hash": self.meta.get("config_hash"),
            "epoch": self.meta.get("epoch"),
        }


class BundleFormat(Protocol):
    """A kind of model folder :func:`load_bundle` can read."""

    name: str

    def detect(self, path: Path) -> bool:
        """Whether ``path`` is a folder of this format (cheap: file names only)."""
        ...

    def load(self, path: Path, *, device: torch.device, checkpoint: str) -> Bundle:
        """Load the folder; :class:`DataError` naming what is missing or wrong."""
        ...


BUNDLE_FORMATS: Registry[BundleFormat] = Registry("model folder format")
"""Format name -> reader, tried in registration order by :func:`load_bundle`."""


def load_bundle(path: str | Path, *, device: str = "auto", checkpoint: str = "best") -> Bundle:
    """Load a model folder of any registered format.

    Args:
        path: The folder (for medseg, the run directory ``medseg train`` wrote).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` for the network.
        checkpoint: ``best`` (falls back to ``last`` with a warning when no validation has run) or
            ``last``.

    Raises:
        DataError: Not a model folder of a known format, missing files, an unsafe or old checkpoint.
        ConfigError: An unknown device or checkpoint name.
    """

    path = Path(path)
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"checkpoint {checkpoint!r}: expected one of {', '.join(CHECKPOINTS)}")
    dev = resolve_device(device, what="--device")
    for name in BUNDLE_FORMATS.names_in_order():
        fmt = BUNDLE_FORMATS.get(name)
        if fmt.detect(path):
            return fmt.load(path, device=dev, checkpoint=checkpoint)
    raise DataError(
        f"{path}: not a model folder medseg can read (no plan.json: pass the run directory `medseg train` "
        f"wrote; known formats: {', '.join(BUNDLE_FORMATS.names_in_order())})"
    )


def run_settings(run_dir: Path, *, warn: bool = True) -> tuple[PostProcessing, PredictConfig]:
    """Post-processing and inference defaults from a run's ``config.yaml`` (built-in defaults and no
    post-processing, with a warning unless ``warn`` is false, when it is missing)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        if warn:
            logger.warning(
                "%s: no config.yaml; predicting with built-in defaults and no post-processing (the run's "
                "predict settings, single-component structures and blob removal live there)",
                run_dir,
            )
        return PostProcessing(), PredictConfig()
    cfg = load_config(path, resolve_paths=False)
    return PostProcessing.from_config(cfg), cfg.predict


def network_of(
    plan: Plan, checkpoint: dict[str, Any] | None, *, where: Path, warn: bool = True
) -> NetworkSpec:
    """The plan's network record; for a plan written before networks were recorded, derived once
    from the checkpoint's model settings with the plan's patch and spacing (with a warning unless
    ``warn`` is false)."""
    if plan.network is not None:
        return plan.network
    saved = (checkpoint or {}).get("model_config")
    if not isinstance(saved, dict):
        raise DataError(
            f"{where}: plan.json has no network record and the checkpoint no model settings; retrain, or "
            "pass a run directory written by `medseg train`"
        )
    spec = NetworkSpec.from_config(
        ModelConfig(**saved),
        spatial_dims=plan.spatial_dims,
        patch_size=plan.patch_size,
        spacing_mm=plan.target_spacing_mm,
    )
    message = (
        f"{where}: plan.json predates network records; the network's strides were derived from the patch "
        f"and spacing ({[list(s) for s in spec.strides]}). `medseg convert-run {where}` records them"
    )
    if warn:
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        logger.warning("%s", message)
    return spec


class MedsegRun:
    """medseg's run directory: ``plan.json``, ``config.yaml``, ``checkpoints/{best,last}.pt``."""

    name = "medseg-run"

    def detect(self, path: Path) -> bool:
        return (path / "plan.json").is_file()

    def checkpoint_path(self, path: Path, checkpoint: str) -> Path:
        """``checkpoints/<checkpoint>.pt``; ``best`` falls back to ``last`` with a warning."""
        chosen = path / "checkpoints" / f"{checkpoint}.pt"
        if chosen.is_file():
            return chosen
        last = path / "checkpoints" / "last.pt"
        if checkpoint == "best" and last.is_file():
            logger.warning("%s: no checkpoints/best.pt (no validation yet?); using checkpoints/last.pt", path)
            return last
        looked = "checkpoints/best.pt, then checkpoints/last.pt" if checkpoint == "best" else chosen.name
        raise DataError(
            f"{path}: no checkpoint (looked for {looked}); train the run first (`medseg train`), or pass "
            "the run directory that has them"
        )

    def load(self, path: Path, *, device: torch.device, checkpoint: str) -> Bundle:
        plan = Plan.load(path / "plan.json")
        ck_path = self.checkpoint_path(path, checkpoint)
        ck = load_checkpoint(ck_path, map_location="cpu")
        spec = network_of(plan, ck, where=path)
        model = create_network(spec, in_channels=plan.in_channels, out_channels=plan.out_channels)
        try:
            model.load_state_dict(ck["model"])
        except RuntimeError as exc:
            raise DataError(
                f"{ck_path}: the weights do not fit the network plan.json records ({exc}); the checkpoint "
                "and plan.json must come from the same run"
            ) from None
        model.to(device).eval()
        post, predict = run_settings(path)
        meta = {
            "epoch": ck.get("epoch"),
            "config_hash": ck.get("config_hash"),
            "val_mean_dice": ck.get("best_metric"),
        }
        return Bundle(path, self.name, plan, model, device, ck_path.name, predict, post, meta)


BUNDLE_FORMATS.register(MedsegRun.name)(MedsegRun())


def convert_run(run_dir: str | Path) -> list[str]:
    """Bring a run directory written by an older medseg up to date, in place; returns what was done.

    Checkpoints in format 1 are rewritten as tensors and plain values
    (:func:`~medseg.runtime.checkpoint.convert_checkpoint`: safe, nothing in them is run), and a
    ``plan.json`` without a network record gets the one derived from the checkpoint's model settings.

    Raises:
        DataError: Not a run directory, or a checkpoint that holds other objects (refused).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "plan.json").is_file():
        raise DataError(
            f"{run_dir}: not a medseg run directory (no plan.json); pass the folder `medseg train` made"
        )
    plan = Plan.load(run_dir / "plan.json")  # a plan that cannot be used stops it before any rewrite
    done = []
    checkpoints = sorted((run_dir / "checkpoints").glob("*.pt"))
    for path in checkpoints:
        if convert_checkpoint(path):
            done.append(f"{path}: converted to checkpoint format 2 (best validation score reset)")
    if plan.network is None and checkpoints:
        ck = load_checkpoint(checkpoints[0])
        spec = network_of(plan, ck, where=run_dir, warn=False)
        replace(plan, network=spec).save(run_dir / "plan.json")
        done.append(f"{run_dir / 'plan.json'}: network recorded (strides {[list(s) for s in spec.strides]})")
    return done
