"""`esen-train`: fit, status, config, eval, md, quickstart, and fairchem's eSEN checkpoints in and out.

    esen-train fit CONFIG [key=value ...] [--nproc N] [--quiet]
    esen-train status RUN [--json]
    esen-train config CONFIG [key=value ...]
    esen-train eval CHECKPOINT --data DIR_OR_FILE [--json]
    esen-train md CHECKPOINT --structure FILE --steps N --timestep FS --temperature K
    esen-train quickstart [--out DIR]
    esen-train import-fairchem FAIRCHEM_CHECKPOINT --out DIR
    esen-train export-fairchem CHECKPOINT --out FILE
"""
from __future__ import annotations

import argparse

from esen_train.cli.common import add_subcommands, new_parser, run_for_a_reader, show_warnings_plainly
from esen_train.cli.train import config, evaluate, export_fairchem, fit, import_fairchem, md, quickstart, status

SUBCOMMANDS = {
    "fit": fit,
    "status": status,
    "config": config,
    "eval": evaluate,
    "md": md,
    "quickstart": quickstart,
    "import-fairchem": import_fairchem,
    "export-fairchem": export_fairchem,
}


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("esen-train", __doc__)
    add_subcommands(parser, SUBCOMMANDS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Options may come before, between or after the key=value overrides: argparse leaves
    # overrides that follow an option unparsed, so they are collected here.
    args, rest = parser.parse_known_args(argv)
    if rest and (not hasattr(args, "overrides") or any(arg.startswith("-") or "=" not in arg for arg in rest)):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    show_warnings_plainly(f"esen-train {args.command}")
    return run_for_a_reader(args.run, args)
