"""Fit a dataset's reference energies and force RMS, store them in its manifest and print them.

    esen-data stats DIR
"""
from __future__ import annotations

import argparse

from ase.data import chemical_symbols

from esen_train.data.manifest import DatasetStats
from esen_train.data.stats import write_stats

HELP = "fit reference energies, force RMS; store in the manifest"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR")


def run(args: argparse.Namespace) -> int:
    print_stats(write_stats(args.directory))
    return 0


def print_stats(stats: DatasetStats) -> None:
    print(f"energy per atom     mean {stats.energy_per_atom_mean:.6g}  std {stats.energy_per_atom_std:.6g}"
          f"  min {stats.energy_per_atom_min:.6g}  max {stats.energy_per_atom_max:.6g} eV")
    print(f"residual per atom   mean {stats.residual_energy_per_atom_mean:.6g}"
          f"  std {stats.residual_energy_per_atom_std:.6g} eV (after reference energies)")
    print(f"force RMS           {stats.force_rms:.6g} eV/Å")
    references = ", ".join(f"{chemical_symbols[z]} {e:.6g}" for z, e in stats.element_references.items())
    print(f"reference energies  {references} eV")
