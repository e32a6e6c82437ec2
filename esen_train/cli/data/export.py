"""Write a dataset back out as extended XYZ (streamed, atomic).

    esen-data export DIR --out FILE.extxyz [--format extxyz] [--overwrite]
"""
from __future__ import annotations

import argparse

from esen_train.data.export import FORMATS, export_dataset

HELP = "write a dataset back out as extended XYZ"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR")
    parser.add_argument("--out", required=True, metavar="FILE", help="file to write")
    parser.add_argument("--format", choices=FORMATS, default="extxyz")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing FILE")


def run(args: argparse.Namespace) -> int:
    count = export_dataset(args.directory, args.out, args.format, args.overwrite)
    print(f"wrote {count} structures to {args.out}")
    return 0
