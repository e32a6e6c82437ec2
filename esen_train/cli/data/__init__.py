"""`esen-data`: build, check and describe datasets.

    esen-data convert INPUT... --out DIR [--shards N] [--workers N] [--skip-invalid] [--overwrite]
                      [--energy-key K] [--forces-key K] [--stress-key K] [--config-type-key K] [--weight-key K]
    esen-data export DIR --out FILE.extxyz [--format extxyz] [--overwrite]
    esen-data inspect DIR [--json]
    esen-data verify DIR
    esen-data split DIR --out PREFIX --fractions 0.9,0.05,0.05 --seed S
    esen-data stats DIR
    esen-data emt --out DIR --num N --seed S

Each subcommand is a thin layer over a function of `esen_train.data`. Bad input or data ends a
command with a one-line message and exit code 2; `verify` exits with 1 when it finds problems.
"""
from __future__ import annotations

import argparse

from esen_train.cli.common import add_subcommands, fail, new_parser, run_for_a_reader, show_warnings_plainly
from esen_train.cli.data import convert, emt, export, inspect, split, stats, verify
from esen_train.data.manifest import DatasetError
from esen_train.data.records import RecordError
from esen_train.data.shards import ShardError
from esen_train.data.sources import InputError
from esen_train.data.validate import InvalidStructure

SUBCOMMANDS = {
    "convert": convert,
    "export": export,
    "inspect": inspect,
    "verify": verify,
    "split": split,
    "stats": stats,
    "emt": emt,
}

# What bad input or data raises in the functions of esen_train.data.
INPUT_ERRORS = (
    DatasetError,
    FileExistsError,
    FileNotFoundError,
    InputError,
    InvalidStructure,
    RecordError,
    ShardError,
    ValueError,
)


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("esen-data", __doc__)
    add_subcommands(parser, SUBCOMMANDS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    show_warnings_plainly(f"esen-data {args.command}")
    try:
        return run_for_a_reader(args.run, args)
    except INPUT_ERRORS as error:
        return fail(f"esen-data {args.command}", error)
