"""``medseg config show``: print the resolved config (defaults filled in, overrides applied)."""

from __future__ import annotations

import argparse

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
    show.set_defaults(func=run_show)


def run_show(args: argparse.Namespace) -> int:
    import json

    from medseg.config import config_hash, config_to_dict, config_to_yaml

    cfg = load_config_from_args(args)
    if args.json:
        print(json.dumps(config_to_dict(cfg), indent=2))
    else:
        print(f"# resolved from {args.config}; config hash {config_hash(cfg)}")
        print(config_to_yaml(cfg), end="")
    return 0
