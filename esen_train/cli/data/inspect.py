"""Describe a dataset: structures, atoms, elements, properties, shards, statistics and a
histogram of atoms per structure (one JSON object with --json).

    esen-data inspect DIR [--json]
"""
from __future__ import annotations

import argparse
import json

from ase.data import chemical_symbols

from esen_train.cli.data.stats import print_stats
from esen_train.data.manifest import DatasetStats
from esen_train.data.stats import describe_dataset

HELP = "describe a dataset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    summary = describe_dataset(args.directory)
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return 0
    atoms = summary["atoms_per_structure"]
    print(f"dataset             {args.directory}")
    print(f"structures          {summary['num_structures']}  ({summary['skipped']} skipped as invalid)")
    print(f"atoms               {summary['num_atoms']}  (per structure: min {atoms['min']}, "
          f"mean {atoms['mean']:.1f}, max {atoms['max']})")
    print(f"elements            {' '.join(chemical_symbols[z] for z in summary['elements'])}")
    print(f"properties          {' '.join(summary['properties'])}")
    print(f"shards              {len(summary['shards'])}")
    if summary["stats"] is not None:
        print_stats(DatasetStats(**summary["stats"]))
    print("atoms per structure histogram")
    edges, counts = atoms["histogram"]["edges"], atoms["histogram"]["counts"]
    width = max(counts)
    for low, high, count in zip(edges, edges[1:], counts):
        print(f"  {low:>6}-{high - 1:<6} {count:>9}  {'#' * round(40 * count / width)}")
    return 0
