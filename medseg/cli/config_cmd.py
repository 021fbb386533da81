"""``medseg config show``: print the resolved config (defaults filled in, overrides applied).

``--memory`` adds the estimated device memory of one training step (:mod:`medseg.training.memory`)
on a CUDA GPU (mixed precision as ``train.amp``) and on the CPU (float32).
"""

from __future__ import annotations

import argparse
from typing import Any

from medseg.cli._common import add_config_args, load_config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="inspect configs", description="Inspect configuration files.")
    p.set_defaults(_subparser=p)
    csub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    show = csub.add_parser(
        "show",
        help="print the resolved config",
        description="Validate a config, apply --set overrides, and print it as YAML with every default "
        "filled in. Exit code 2 with a list of problems if it is invalid.",
    )
    add_config_args(show)
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    show.add_argument(
        "--memory",
        action="store_true",
        help="also estimate the device memory of one training step at train.patch_size and "
        "train.batch_size (CPU forward+backward of a small patch, scaled: an estimate, not a GPU "
        "measurement)",
    )
    show.add_argument(
        "--in-channels",
        type=int,
        default=1,
        metavar="N",
        help="image channels assumed by --memory (default 1; the dataset decides at training time)",
    )
    show.set_defaults(func=run_show)


def run_show(args: argparse.Namespace) -> int:
    import json

    from medseg.config import config_hash, config_to_dict, config_to_yaml

    cfg = load_config_from_args(args)
    memory = _memory_report(cfg, args.in_channels) if args.memory else None
    if args.json:
        out = config_to_dict(cfg) if memory is None else {"config": config_to_dict(cfg), "memory": memory}
        print(json.dumps(out, indent=2))
    else:
        print(f"# resolved from {args.config}; config hash {config_hash(cfg)}")
        print(config_to_yaml(cfg), end="")
        if memory is not None:
            for line in memory["lines"]:
                print(f"# {line}")
    return 0


def _memory_report(cfg: Any, in_channels: int) -> dict[str, Any]:
    """Training-step memory estimates on a CUDA GPU and on the CPU, as text lines and numbers."""
    from medseg.errors import ConfigError
    from medseg.training.memory import TrainingMemory
    from medseg.units import GB

    if in_channels < 1:
        raise ConfigError(f"--in-channels must be >= 1, got {in_channels}")
    budget = cfg.train.memory_gb
    spacing = cfg.train.target_spacing_mm
    assumed = f"{in_channels} input channel(s), strides planned for " + (
        f"spacing {spacing} mm" if spacing else "isotropic spacing (train.target_spacing_mm unset)"
    )
    report: dict[str, Any] = {"budget_gb": budget, "patch_size": cfg.train.patch_size, "lines": []}
    if cfg.train.patch_size is None:
        report["lines"] = [
            f"training memory: train.patch_size is unset, so `medseg train` plans the largest patch whose "
            f"estimate fits train.memory_gb = {budget:g} GB from the data; plan.json records the estimate"
        ]
        return report
    lines = [f"training memory estimate ({assumed}; budget train.memory_gb = {budget:g} GB):"]
    for key, label, amp, cuda in (
        ("cuda", "CUDA GPU", cfg.train.amp, True),
        ("cpu", "CPU", False, False),
    ):
        est = TrainingMemory(cfg, in_channels=in_channels, spacing_mm=spacing, amp=amp, cuda=cuda).estimate(
            cfg.train.patch_size
        )
        fits = "fits" if est.total_bytes <= budget * GB else "EXCEEDS train.memory_gb"
        lines.append(f"  {label}: {est.describe()} -> {fits}")
        report[key] = {
            "total_gb": round(est.total_gb, 3),
            "activation_gb": round(est.activation_bytes / GB, 3),
            "parameter_gb": round(est.parameter_bytes / GB, 3),
            "overhead_gb": round(est.overhead_bytes / GB, 3),
            "amp": est.amp,
            "parameters": est.parameters,
            "fits": est.total_bytes <= budget * GB,
        }
    lines.append(
        "  (estimated from tensors saved for backward on a CPU-traced small patch, not measured on a GPU)"
    )
    report["lines"] = lines
    return report
