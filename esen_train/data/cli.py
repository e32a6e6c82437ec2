"""`esen-data`: build, check and describe datasets.

    esen-data convert INPUT... --out DIR [--shards N] [--workers N] [--skip-invalid] [--overwrite]
                      [--energy-key K] [--forces-key K] [--stress-key K] [--config-type-key K] [--weight-key K]
    esen-data export DIR --out FILE.extxyz [--format extxyz] [--overwrite]
    esen-data inspect DIR [--json]
    esen-data verify DIR
    esen-data split DIR --out PREFIX --fractions 0.9,0.05,0.05 --seed S
    esen-data stats DIR
    esen-data emt --out DIR --num N --seed S

Each subcommand is a thin layer over a function of `esen_train.data`; `main(argv)`
returns the exit code, so the commands can be run (and tested) in-process.
"""
from __future__ import annotations

import argparse
import json
import sys

from ase.data import chemical_symbols

from esen_train.data.convert import convert
from esen_train.data.emt import generate_emt_dataset, write_emt_extxyz
from esen_train.data.export import FORMATS, export_dataset
from esen_train.data.manifest import DatasetError, DatasetStats
from esen_train.data.records import RecordError
from esen_train.data.shards import ShardError
from esen_train.data.sources import InputError, LabelKeys
from esen_train.data.split import split_dataset, split_output_dirs
from esen_train.data.stats import describe_dataset, write_stats
from esen_train.data.validate import InvalidStructure
from esen_train.data.verify import verify_dataset

# Errors that mean "bad input or data", reported as one line and exit code 1.
USER_ERRORS = (
    DatasetError,
    FileExistsError,
    FileNotFoundError,
    InputError,
    InvalidStructure,
    RecordError,
    ShardError,
    ValueError,
)


def _fractions(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


LABEL_HELP = {
    "energy": "total energy in eV, e.g. REF_energy or free_energy",
    "forces": "forces in eV/Å, e.g. REF_forces",
    "stress": "stress in eV/Å³ (ASE's sign), e.g. REF_stress",
    "config_type": "kind of structure (config type)",
    "weight": "per-structure weight",
}


def add_label_key_arguments(parser: argparse.ArgumentParser, fields=tuple(LABEL_HELP)) -> None:
    """--energy-key and the other label names of `sources.LabelKeys` (those in `fields`)."""
    defaults = LabelKeys()
    for field in fields:
        what = LABEL_HELP[field]
        flag = "--" + field.replace("_", "-") + "-key"
        parser.add_argument(flag, dest=f"{field}_key", default=getattr(defaults, field), metavar="KEY",
                            help=f"input name of the {what} (default {getattr(defaults, field)})")


def label_keys(args: argparse.Namespace) -> LabelKeys:
    """The LabelKeys of the --*-key options a parser has (defaults for the others)."""
    given = {field: getattr(args, f"{field}_key") for field in LABEL_HELP if hasattr(args, f"{field}_key")}
    return LabelKeys(**given)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esen-data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("convert", help="convert ASE-readable files to LMDB shards")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="extxyz, ASE db, *.aselmdb, OUTCAR, ...")
    p.add_argument("--out", required=True, help="dataset directory to create")
    p.add_argument("--shards", type=int, help="number of shards (default: one per 100k structures)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip and count invalid structures and energy outliers")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    p.add_argument("--format", help="ase.io format of the inputs, when their names do not say")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_label_key_arguments(p)

    p = commands.add_parser("export", help="write a dataset back out as extended XYZ")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--out", required=True, metavar="FILE", help="file to write")
    p.add_argument("--format", choices=FORMATS, default="extxyz")
    p.add_argument("--overwrite", action="store_true", help="replace an existing FILE")

    p = commands.add_parser("inspect", help="describe a dataset")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = commands.add_parser("verify", help="decode every record, check checksums, values and manifest")
    p.add_argument("directory", metavar="DIR")

    p = commands.add_parser("split", help="random PREFIX_train / PREFIX_val / PREFIX_test datasets")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX_train, PREFIX_val, ...")
    p.add_argument("--fractions", type=_fractions, default=[0.9, 0.05, 0.05])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, help="shards per part (default: scaled from the source)")
    p.add_argument("--overwrite", action="store_true")

    p = commands.add_parser("stats", help="fit reference energies, force RMS; store in the manifest")
    p.add_argument("directory", metavar="DIR")

    p = commands.add_parser("emt", help="generate the built-in EMT dataset")
    p.add_argument("--out", required=True, help="dataset directory (or .xyz file with --extxyz)")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--extxyz", action="store_true", help="write an extended XYZ file instead")
    return parser


def _print_stats(stats: DatasetStats) -> None:
    print(f"energy per atom     mean {stats.energy_per_atom_mean:.6g}  std {stats.energy_per_atom_std:.6g}"
          f"  min {stats.energy_per_atom_min:.6g}  max {stats.energy_per_atom_max:.6g} eV")
    print(f"residual per atom   mean {stats.residual_energy_per_atom_mean:.6g}"
          f"  std {stats.residual_energy_per_atom_std:.6g} eV (after reference energies)")
    print(f"force RMS           {stats.force_rms:.6g} eV/Å")
    references = ", ".join(f"{chemical_symbols[z]} {e:.6g}" for z, e in stats.element_references.items())
    print(f"reference energies  {references} eV")


def _inspect(directory: str, as_json: bool) -> int:
    summary = describe_dataset(directory)
    if as_json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return 0
    atoms = summary["atoms_per_structure"]
    print(f"dataset             {directory}")
    print(f"structures          {summary['num_structures']}  ({summary['skipped']} skipped as invalid)")
    print(f"atoms               {summary['num_atoms']}  (per structure: min {atoms['min']}, "
          f"mean {atoms['mean']:.1f}, max {atoms['max']})")
    print(f"elements            {' '.join(chemical_symbols[z] for z in summary['elements'])}")
    print(f"properties          {' '.join(summary['properties'])}")
    print(f"shards              {len(summary['shards'])}")
    if summary["stats"] is not None:
        _print_stats(DatasetStats(**summary["stats"]))
    print("atoms per structure histogram")
    edges, counts = atoms["histogram"]["edges"], atoms["histogram"]["counts"]
    width = max(counts)
    for low, high, count in zip(edges, edges[1:], counts):
        print(f"  {low:>6}-{high - 1:<6} {count:>9}  {'#' * round(40 * count / width)}")
    return 0


def _verify(directory: str) -> int:
    problems = verify_dataset(directory)
    for problem in problems:
        print(f"esen-data verify: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"{directory}: OK")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.command == "convert":
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
    if args.command == "export":
        count = export_dataset(args.directory, args.out, args.format, args.overwrite)
        print(f"wrote {count} structures to {args.out}")
        return 0
    if args.command == "inspect":
        return _inspect(args.directory, args.json)
    if args.command == "verify":
        return _verify(args.directory)
    if args.command == "split":
        manifests = split_dataset(
            args.directory, args.out, args.fractions, args.seed, args.shards, args.overwrite
        )
        for out_dir, manifest in zip(split_output_dirs(args.out, len(manifests)), manifests.values()):
            print(f"{out_dir}: {manifest.num_structures} structures")
        return 0
    if args.command == "stats":
        _print_stats(write_stats(args.directory))
        return 0
    if args.command == "emt":
        if args.extxyz:
            write_emt_extxyz(args.out, args.num, args.seed, overwrite=args.overwrite)
            print(f"wrote {args.num} EMT structures to {args.out}")
        else:
            manifest = generate_emt_dataset(args.out, args.num, args.seed, args.shards, args.overwrite)
            print(f"wrote {manifest.num_structures} EMT structures ({manifest.num_atoms} atoms) to {args.out}")
        return 0
    raise AssertionError(f"unhandled command {args.command}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except USER_ERRORS as error:
        print(f"esen-data {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
