"""The command line every script shares: `--config PATH` and repeatable `--set dotted.key=value`."""

from __future__ import annotations

import os
import sys

from glmkit.config.load import load_config
from glmkit.config.schema import KIT_ROOT, Config, ConfigError

DEFAULT_CONFIG = os.path.join(KIT_ROOT, "training_config.yaml")


def add_config_arguments(parser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default: training_config.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set training.max_steps=100 (repeatable)")


def config_from_args(args) -> Config:
    """Load the config named on the command line, or exit 2 with one line per problem."""
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        raise SystemExit(2) from None
    if os.environ.get("RANK", "0") == "0":  # once per run, not once per process
        for notice in cfg.notices:
            print(notice, file=sys.stderr)
    return cfg
