"""Checks a structure must pass before it is written to a dataset, or handed to a model.

`check_record` raises `InvalidStructure`, which names the source file, the index of
the structure in it and the offending field, so a user can find and fix the input.
`check_geometry` is the part that needs no labels (finite positions, no overlapping
atoms, a plausible density); the ASE calculator runs it on every structure, so a unit
mistake is refused before a neighbour graph of millions of edges is built.

The bounds are far outside anything physical, so they catch broken input, not unusual
chemistry. Measured on the shared DFT data and the EMT data: no two atoms closer than 0.69
of the sum of their covalent radii, covalent spheres filling at most 0.92 of a cell.
"""
from __future__ import annotations

import numpy as np
import vesin
from ase.data import chemical_symbols, covalent_radii

# eSEN's embedding covers Z = 1..100 (fairchem's max_num_elements); nothing real lies beyond.
MAX_ATOMIC_NUMBER = 100
# Two atoms closer than this fraction of the sum of their covalent radii overlap: a
# duplicated atom, or lengths in the wrong unit (0.12 Å for H-H, 0.53 Å for Cu-Cu).
MIN_DISTANCE_FRACTION = 0.2
# Wide enough for the largest such minimum (0.2 x 2 x 2.6 Å for Cs-Cs); see _check_distances.
_SEARCH_RADIUS = 2.0  # Å
# Volume of the atoms' covalent spheres over the cell volume, for fully periodic cells.
# Close-packed metals reach 0.9; even a metal compressed at terapascals stays below 3. A
# cell written in nm instead of Å is 1000 times too dense.
MAX_PACKING = 5.0
# Smallest singular value allowed for the periodic lattice vectors (Å).
MIN_CELL_EXTENT = 1e-6
# Label magnitudes no calculation produces: all-electron total energies of the heaviest
# elements are below 1e6 eV per atom, forces between atoms that do not overlap below
# 1e3 eV/Å, and the pressure at the centre of the Earth (360 GPa) is 2.2 eV/Å³.
MAX_ENERGY_PER_ATOM = 1e7  # eV
MAX_FORCE = 1e4  # eV/Å, any component
MAX_STRESS = 1e2  # eV/Å³, any component
ANGSTROM_PER_NM = 10.0


class InvalidStructure(ValueError):
    """A structure that cannot go into a dataset."""

    def __init__(self, source_file: str, index: int, field: str, reason: str):
        # All four go to ValueError's args so the exception survives pickling between
        # conversion worker processes.
        super().__init__(source_file, index, field, reason)
        self.source_file, self.index, self.field, self.reason = source_file, index, field, reason

    def __str__(self) -> str:
        return f"{self.source_file} structure {self.index}: field '{self.field}': {self.reason}"


class UnphysicalGeometry(ValueError):
    """Positions and cell that no physical structure has; names the field and the atoms."""

    def __init__(self, field: str, reason: str):
        super().__init__(field, reason)
        self.field, self.reason = field, reason

    def __str__(self) -> str:
        return f"field '{self.field}': {self.reason}"


def check_record(record) -> None:
    """Raise `InvalidStructure` unless `record` (a `StructureRecord`) is usable."""

    def fail(field: str, reason: str):
        raise InvalidStructure(record.source_file, record.source_index, field, reason)

    numbers = np.asarray(record.atomic_numbers)
    natoms = len(numbers)
    if numbers.ndim != 1:
        fail("atomic_numbers", f"expected a 1-D array, got shape {numbers.shape}")
    if natoms == 0:
        fail("atomic_numbers", "the structure has 0 atoms (a structure needs at least one)")
    outside = np.flatnonzero((numbers < 1) | (numbers > MAX_ATOMIC_NUMBER))
    if len(outside):
        atom = outside[0]
        fail("atomic_numbers", f"Z={numbers[atom]} at atom {atom} is outside 1..{MAX_ATOMIC_NUMBER}")
    _check_array(fail, "positions", record.positions, (natoms, 3))
    _check_array(fail, "cell", record.cell, (3, 3))
    pbc = np.asarray(record.pbc)
    if pbc.shape != (3,) or pbc.dtype != bool:
        fail("pbc", f"expected 3 booleans, got {pbc!r}")
    _check_labels(fail, record, natoms)
    try:
        check_geometry(numbers, record.positions, record.cell, pbc)
    except UnphysicalGeometry as error:
        fail(error.field, error.reason)


def _check_labels(fail, record, natoms: int) -> None:
    if record.energy is None:
        fail("energy", "missing (the input has no energy for this structure)")
    if not np.isfinite(record.energy):
        fail("energy", f"not finite ({record.energy})")
    if abs(record.energy) / natoms > MAX_ENERGY_PER_ATOM:
        fail("energy", f"{record.energy:.6g} eV is {record.energy / natoms:.3g} eV per atom, beyond "
                       f"±{MAX_ENERGY_PER_ATOM:.0e} eV per atom (a corrupted value or a wrong unit)")
    if record.forces is None:
        fail("forces", "missing (the input has no forces for this structure)")
    _check_array(fail, "forces", record.forces, (natoms, 3), bound=MAX_FORCE, unit="eV/Å")
    if record.stress is not None:
        _check_array(fail, "stress", record.stress, (3, 3), bound=MAX_STRESS, unit="eV/Å³")
    for name in ("charge", "spin", "weight"):
        value = getattr(record, name)
        if value is not None and not np.isfinite(value):
            fail(name, f"not finite ({value})")
    if record.weight is not None and record.weight < 0:
        fail("weight", f"negative ({record.weight})")


def _check_array(fail, field: str, value, shape: tuple[int, ...], bound: float | None = None, unit: str = "") -> None:
    array = np.asarray(value)
    if array.shape != shape:
        fail(field, f"shape {array.shape}, expected {shape}")
    if array.dtype.kind != "f":
        fail(field, f"dtype {array.dtype}, expected floating point")
    bad = np.argwhere(~np.isfinite(array))
    if len(bad):
        fail(field, f"non-finite value {array[tuple(bad[0])]} at {tuple(int(i) for i in bad[0])}")
    if bound is not None and array.size and np.abs(array).max() > bound:
        at = np.unravel_index(np.argmax(np.abs(array)), array.shape)
        fail(field, f"{array[at]:.6g} {unit} at {tuple(int(i) for i in at)} is beyond ±{bound:g} {unit} "
                    "(a corrupted value or a wrong unit)")


def check_geometry(numbers, positions, cell, pbc) -> None:
    """Raise `UnphysicalGeometry` for non-finite positions or cell, degenerate periodic
    lattice vectors, a periodic cell far denser than any matter, or overlapping atoms.

    The density check comes first and costs nothing, so a cell in the wrong unit is refused
    before any neighbour search."""
    numbers = np.asarray(numbers)
    positions, cell, pbc = np.asarray(positions, dtype=np.float64), np.asarray(cell, dtype=np.float64), np.asarray(pbc)
    for field, array in (("positions", positions), ("cell", cell)):
        bad = np.argwhere(~np.isfinite(array))
        if len(bad):
            raise UnphysicalGeometry(field, f"non-finite value {array[tuple(bad[0])]} at {tuple(int(i) for i in bad[0])}")
    if pbc.any():
        periodic_vectors = cell[pbc]
        if np.linalg.svd(periodic_vectors, compute_uv=False).min() < MIN_CELL_EXTENT:
            raise UnphysicalGeometry("cell", f"periodic lattice vectors {periodic_vectors.tolist()} are degenerate")
    if pbc.all():
        _check_packing(numbers, cell)
    _check_distances(numbers, positions, cell, pbc)


def _check_packing(numbers: np.ndarray, cell: np.ndarray) -> None:
    volume = abs(float(np.linalg.det(cell)))
    packing = float((4 / 3 * np.pi * covalent_radii[numbers] ** 3).sum()) / volume
    if packing <= MAX_PACKING:
        return
    in_nm = packing / ANGSTROM_PER_NM**3 <= MAX_PACKING  # plausible once lengths are x10
    cause = "the cell looks like nm, not Å" if in_nm else "the cell vectors are far too short (wrong unit?)"
    raise UnphysicalGeometry(
        "cell",
        f"{len(numbers)} atoms in a cell of {volume:.4g} Å³: their covalent spheres fill {packing:.4g} times "
        f"the cell (at most {MAX_PACKING:g} in any matter): {cause}",
    )


def _check_distances(numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> None:
    if len(numbers) < 2 and not pbc.any():
        return
    # vesin's cell list uses cells of the cutoff's size, so searching at the tiny minimum
    # would build millions of empty cells; search at 2 Å (fastest on small cells) and keep
    # the close pairs.
    neighbours = vesin.NeighborList(cutoff=_SEARCH_RADIUS, full_list=False)
    i, j, distance = neighbours.compute(positions, cell, pbc.tolist(), "ijd")
    radii = covalent_radii[numbers]
    minimum = MIN_DISTANCE_FRACTION * (radii[i] + radii[j])
    close = np.flatnonzero(distance < minimum)
    if not len(close):
        return
    pair = close[np.argmin(distance[close] / minimum[close])]
    a, b = int(i[pair]), int(j[pair])
    what = "its own periodic image" if a == b else f"atom {b}"
    elements = f"{chemical_symbols[numbers[a]]}-{chemical_symbols[numbers[b]]}"
    crowded = len(np.unique(np.concatenate([i[close], j[close]]))) / len(numbers)
    raise UnphysicalGeometry(
        "positions",
        f"atom {a} is {distance[pair]:.4f} Å from {what} ({elements}, minimum {minimum[pair]:.3f} Å): "
        f"{_overlap_cause(positions, cell, crowded)}",
    )


def _overlap_cause(positions: np.ndarray, cell: np.ndarray, crowded: float) -> str:
    """The likeliest reason atoms overlap, for the message."""
    lengths = np.linalg.norm(cell, axis=1)
    if len(positions) > 2 and lengths.min() > 2.0 and positions.min() >= -0.01 and positions.max() <= 1.01:
        return "the positions look like fractional coordinates, not Cartesian Å"
    if len(positions) > 2 and crowded > 0.5:
        return "most atoms overlap: the positions look like nm, not Å"
    return "overlapping atoms (a duplicated atom?)"
