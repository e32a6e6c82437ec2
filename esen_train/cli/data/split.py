"""Split a dataset at random into PREFIX_train, PREFIX_val and PREFIX_test (one part per fraction).

    esen-data split DIR --out PREFIX --fractions 0.9,0.05,0.05 --seed S [--shards N] [--overwrite]
"""
from __future__ import annotations

import argparse

from esen_train.cli.common import positive_int
from esen_train.data.split import split_dataset, split_output_dirs

HELP = "random PREFIX_train / PREFIX_val / PREFIX_test datasets"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR")
    parser.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX_train, PREFIX_val, ...")
    parser.add_argument("--fractions", type=_fractions, default=[0.9, 0.05, 0.05])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=positive_int, help="shards per part (default: scaled from the source)")
    parser.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    manifests = split_dataset(args.directory, args.out, args.fractions, args.seed, args.shards, args.overwrite)
    for out_dir, manifest in zip(split_output_dirs(args.out, len(manifests)), manifests.values()):
        print(f"{out_dir}: {manifest.num_structures} structures")
    return 0


def _fractions(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
