"""The resolved config: `esen-train config CONFIG [key=value ...]` prints the YAML that `fit`
would run, presets expanded and defaults filled in."""
from __future__ import annotations

import argparse

from omegaconf import OmegaConf

from esen_train.cli.common import fail
from esen_train.engine.config import ConfigError, load_train_config

HELP = "print the resolved config: presets expanded, defaults filled"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML path or a shipped config by name")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for fit")


def run(args: argparse.Namespace) -> int:
    try:
        config = load_train_config(args.config, args.overrides)
    except ConfigError as error:
        return fail("esen-train config", error)
    print(OmegaConf.to_yaml(OmegaConf.structured(config)), end="")
    return 0
