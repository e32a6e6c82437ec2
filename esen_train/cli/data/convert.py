"""Convert ASE-readable files (extxyz, ASE db, *.aselmdb, OUTCAR, ...) to a dataset of LMDB shards.

    esen-data convert INPUT... --out DIR [--shards N] [--workers N] [--skip-invalid] [--overwrite]
                      [--energy-key K] [--forces-key K] [--stress-key K] [--config-type-key K] [--weight-key K]
"""
from __future__ import annotations

import argparse

from esen_train.cli.common import add_label_key_arguments, label_keys, positive_int
from esen_train.data.convert import convert

HELP = "convert ASE-readable files to LMDB shards"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="extxyz, ASE db, *.aselmdb, OUTCAR, ...")
    parser.add_argument("--out", required=True, help="dataset directory to create")
    parser.add_argument("--shards", type=positive_int, help="number of shards (default: one per 100k structures)")
    parser.add_argument("--workers", type=positive_int, default=1, help="worker processes (default 1)")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="skip and count invalid structures and energy outliers")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    parser.add_argument("--format", help="ase.io format of the inputs, when their names do not say")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_label_key_arguments(parser)


def run(args: argparse.Namespace) -> int:
    manifest = convert(
        args.inputs, args.out, num_shards=args.shards, workers=args.workers,
        skip_invalid=args.skip_invalid, overwrite=args.overwrite, format=args.format,
        progress=not args.quiet, keys=label_keys(args),
    )
    outliers = manifest.provenance["skipped_energy_outliers"]
    print(f"wrote {manifest.num_structures} structures ({manifest.num_atoms} atoms) in "
          f"{len(manifest.shards)} shard(s) to {args.out}; skipped {manifest.skipped} invalid "
          f"({outliers} of them energy outliers)")
    for example in manifest.provenance["skipped_examples"][:5]:
        print(f"  skipped: {example}")
    return 0
