"""Decode every record of a dataset and check its checksums, values and manifest, then look for
energy outliers. Prints every problem found and exits with 1 when there is one (a directory
that does not exist is bad input: exit code 2).

    esen-data verify DIR
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from esen_train.data.verify import verify_dataset

HELP = "decode every record, check checksums, values and manifest"
PROBLEMS_FOUND_EXIT_CODE = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR")


def run(args: argparse.Namespace) -> int:
    if not Path(args.directory).is_dir():
        raise FileNotFoundError(f"{args.directory}: dataset directory does not exist")
    problems = verify_dataset(args.directory)
    for problem in problems:
        print(f"esen-data verify: {problem}", file=sys.stderr)
    if problems:
        return PROBLEMS_FOUND_EXIT_CODE
    print(f"{args.directory}: OK")
    return 0
