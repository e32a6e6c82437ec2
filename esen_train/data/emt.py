"""The built-in dataset: fcc metals and alloys labelled by ASE's EMT calculator.

EMT (effective medium theory) is cheap, smooth and gives energy, forces and stress for
Al, Cu, Ag, Au, Ni, Pd, Pt, so it stands in for DFT wherever the project needs data
without a download: the quickstart, the tests, the benchmarks. Each structure is one
of five kinds (rattled bulk, MD snapshot, surface slab, vacancy, strained cell), pure or
an alloy, with 4 to 64 atoms and mostly small ones so training on a CPU is fast.

Structure i depends only on (seed, i), so a dataset is reproducible and can be
generated in any order.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import ase.io
import numpy as np
import vesin
from ase import Atoms, units
from ase.build import bulk, fcc100, fcc110, fcc111
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import atomic_numbers, reference_states
from ase.md.verlet import VelocityVerlet

from esen_train.data.manifest import Manifest, with_default_permissions
from esen_train.data.records import StructureRecord
from esen_train.data.sources import atoms_to_record
from esen_train.data.validate import check_record
from esen_train.data.writer import DatasetWriter

ELEMENTS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
KINDS = ("rattled", "md", "surface", "vacancy", "strained")
KIND_WEIGHTS = (0.35, 0.15, 0.15, 0.15, 0.20)
MD_TEMPERATURES_K = (300.0, 600.0, 1200.0, 2000.0)
ALLOY_FRACTION = 0.5  # share of structures with two or three elements
# Supercells: (cubic 4-atom cell?, repeats), weighted towards small cells.
SUPERCELLS = (
    (True, (1, 1, 1)),  # 4 atoms
    (False, (2, 2, 2)),  # 8
    (True, (2, 1, 1)),  # 8
    (False, (3, 2, 2)),  # 12
    (True, (2, 2, 1)),  # 16
    (False, (3, 3, 2)),  # 18
    (False, (3, 3, 3)),  # 27
    (True, (2, 2, 2)),  # 32
    (False, (4, 4, 4)),  # 64
)
SUPERCELL_WEIGHTS = np.array([6, 6, 5, 5, 4, 3, 2, 1.5, 0.5])
MAX_ATOMS = 64  # the largest structure made: the 4 x 4 x 4 supercell (slabs have at most 16)


class _VesinNeighbours:
    """The two methods of `ase.neighborlist.NeighborList` that EMT uses, answered by vesin.

    ASE's own list loops over periodic images in Python, which dominates EMT's cost on
    the small cells made here; vesin gives the same pairs (every neighbour within the
    cutoff, periodic images of the atom itself included) about three times faster.
    """

    def __init__(self, cutoff: float):
        self.cutoff = cutoff

    def update(self, atoms: Atoms) -> bool:
        neighbours = vesin.NeighborList(cutoff=self.cutoff, full_list=True, sorted=True)
        centres, self.neighbours, self.shifts = neighbours.compute(
            atoms.positions, atoms.cell.array, atoms.pbc.tolist(), "ijS"
        )
        self.first = np.searchsorted(centres, np.arange(len(atoms) + 1))
        return True

    def get_neighbors(self, atom: int) -> tuple[np.ndarray, np.ndarray]:
        pairs = slice(self.first[atom], self.first[atom + 1])
        return self.neighbours[pairs].astype(np.intp), self.shifts[pairs].astype(float)


class FastEMT(EMT):
    """ASE's EMT calculator with vesin neighbour lists (same results to ~1e-14 eV)."""

    def initialize(self, atoms: Atoms) -> None:
        super().initialize(atoms)
        self.nl = _VesinNeighbours(self.rc_list)


def _lattice_constant(symbols: list[str]) -> float:
    """Vegard's law over the reference fcc lattice constants."""
    return float(np.mean([reference_states[atomic_numbers[s]]["a"] for s in symbols]))


def _choose_alloy(rng: np.random.Generator, atoms: Atoms) -> None:
    """Turn `atoms` (pure) into a random alloy, or leave it pure."""
    if rng.random() >= ALLOY_FRACTION:
        return
    others = [atomic_numbers[s] for s in ELEMENTS if s != atoms[0].symbol]
    extra = rng.choice(others, size=int(rng.integers(1, 3)), replace=False)
    substituted = rng.random(len(atoms)) < rng.uniform(0.1, 0.5)
    atoms.numbers[substituted] = rng.choice(extra, size=int(substituted.sum()))


def _bulk(rng: np.random.Generator, symbol: str) -> Atoms:
    cubic, repeats = SUPERCELLS[rng.choice(len(SUPERCELLS), p=SUPERCELL_WEIGHTS / SUPERCELL_WEIGHTS.sum())]
    atoms = bulk(symbol, "fcc", a=_lattice_constant([symbol]), cubic=cubic).repeat(repeats)
    _choose_alloy(rng, atoms)
    # Rescale to the alloy's mean lattice constant.
    scale = _lattice_constant(atoms.get_chemical_symbols()) / _lattice_constant([symbol])
    atoms.set_cell(atoms.cell * scale, scale_atoms=True)
    return atoms


def _rattle(rng: np.random.Generator, atoms: Atoms, stdev: float) -> None:
    atoms.positions += rng.normal(scale=stdev, size=atoms.positions.shape)


def _rattled(rng, symbol) -> Atoms:
    atoms = _bulk(rng, symbol)
    _rattle(rng, atoms, rng.uniform(0.02, 0.15))
    return atoms


def _md_snapshot(rng, symbol) -> Atoms:
    """A few velocity-Verlet steps from Maxwell-Boltzmann velocities at one temperature."""
    atoms = _bulk(rng, symbol)
    _rattle(rng, atoms, 0.02)
    atoms.calc = FastEMT()
    # Maxwell-Boltzmann momenta: each component normal with variance m kB T.
    temperature = float(rng.choice(MD_TEMPERATURES_K))
    scale = np.sqrt(atoms.get_masses() * units.kB * temperature)
    atoms.set_momenta(rng.normal(size=(len(atoms), 3)) * scale[:, None])
    VelocityVerlet(atoms, timestep=2.0 * units.fs).run(int(rng.integers(3, 8)))
    return atoms


def _surface(rng, symbol) -> Atoms:
    """A slab with vacuum along z; still periodic in all directions (a 3-D cell)."""
    build = (fcc111, fcc100, fcc110)[rng.integers(3)]
    size = ((1, 1, 4), (2, 2, 3), (2, 2, 4), (2, 1, 5))[rng.integers(4)]
    atoms = build(symbol, size=size, a=_lattice_constant([symbol]), vacuum=rng.uniform(4, 7), periodic=True)
    _choose_alloy(rng, atoms)
    _rattle(rng, atoms, rng.uniform(0.01, 0.08))
    return atoms


def _vacancy(rng, symbol) -> Atoms:
    atoms = _bulk(rng, symbol)
    while len(atoms) < 8:  # a vacancy in a 4-atom cell is mostly vacancy
        atoms = atoms.repeat((2, 1, 1))
    del atoms[rng.choice(len(atoms), size=int(rng.integers(1, 3)), replace=False).tolist()]
    _rattle(rng, atoms, rng.uniform(0.01, 0.08))
    return atoms


def _strained(rng, symbol) -> Atoms:
    atoms = _bulk(rng, symbol)
    strain = rng.uniform(-0.04, 0.04, size=(3, 3))
    strain = (strain + strain.T) / 2
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
    _rattle(rng, atoms, rng.uniform(0.0, 0.05))
    return atoms


_BUILDERS = {
    "rattled": _rattled,
    "md": _md_snapshot,
    "surface": _surface,
    "vacancy": _vacancy,
    "strained": _strained,
}


def emt_structure(seed: int, index: int) -> Atoms:
    """Structure `index` of the dataset with `seed`, labelled by EMT (a SinglePointCalculator
    with energy, forces and full stress; `info["config_type"]` says the kind)."""
    rng = np.random.default_rng([seed, index])
    kind = KINDS[rng.choice(len(KINDS), p=KIND_WEIGHTS)]
    atoms = _BUILDERS[kind](rng, str(rng.choice(ELEMENTS)))
    atoms.calc = FastEMT()
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    stress = atoms.get_stress(voigt=False)
    if atoms.has("momenta"):  # MD leaves velocities; the dataset has no use for them
        del atoms.arrays["momenta"]
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces, stress=stress)
    atoms.info = {"config_type": kind}  # ase.build's slab metadata does not fit extxyz
    return atoms


def emt_records(num: int, seed: int, start: int = 0) -> Iterator[StructureRecord]:
    source = f"emt(seed={seed})"
    for index in range(start, start + num):
        record = atoms_to_record(emt_structure(seed, index), source, index)
        check_record(record)
        yield record


def generate_emt_dataset(
    out_dir: str | Path, num: int, seed: int, num_shards: int = 1, overwrite: bool = False
) -> Manifest:
    """Write `num` EMT structures as a dataset directory (manifest stats included)."""
    provenance = {"tool": "esen-data emt", "options": {"num": num, "seed": seed}}
    with DatasetWriter(out_dir, num_shards, provenance, overwrite) as writer:
        for record in emt_records(num, seed):
            writer.write(record)
        return writer.finish()


def write_emt_extxyz(
    path: str | Path, num: int, seed: int, start: int = 0, overwrite: bool = False
) -> None:
    """Write structures start..start+num-1 to an extended XYZ file (energy, forces,
    stress), atomically; an existing file is replaced only with `overwrite`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        try:
            for index in range(start, start + num):
                ase.io.write(f, emt_structure(seed, index), format="extxyz")
        except BaseException:
            Path(f.name).unlink()
            raise
    with_default_permissions(f.name)
    os.replace(f.name, path)
