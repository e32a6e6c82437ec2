"""Generate the built-in EMT dataset (Al/Cu/Ag/Au/Ni/Pd/Pt and alloys, periodic, with stress),
or with --extxyz an extended XYZ file of it.

    esen-data emt --out DIR --num N --seed S [--shards N] [--overwrite] [--extxyz]
"""
from __future__ import annotations

import argparse

from esen_train.cli.common import positive_int
from esen_train.data.emt import generate_emt_dataset, write_emt_extxyz

HELP = "generate the built-in EMT dataset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="dataset directory (or .xyz file with --extxyz)")
    parser.add_argument("--num", type=positive_int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=positive_int, default=1)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--extxyz", action="store_true", help="write an extended XYZ file instead")


def run(args: argparse.Namespace) -> int:
    if args.extxyz:
        write_emt_extxyz(args.out, args.num, args.seed, overwrite=args.overwrite)
        print(f"wrote {args.num} EMT structures to {args.out}")
    else:
        manifest = generate_emt_dataset(args.out, args.num, args.seed, args.shards, args.overwrite)
        print(f"wrote {manifest.num_structures} EMT structures ({manifest.num_atoms} atoms) to {args.out}")
    return 0
