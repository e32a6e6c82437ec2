"""Checks a structure must pass before it is written to a dataset.

`check_record` raises `InvalidStructure`, which names the source file, the index of
the structure in it and the offending field, so a user can find and fix the input.
"""
from __future__ import annotations

import numpy as np
import vesin

# eSEN's embedding covers Z = 1..100 (fairchem's max_num_elements); nothing real lies beyond.
MAX_ATOMIC_NUMBER = 100
# Closer than this, two atoms are a duplicate or a unit error, never real chemistry.
MIN_DISTANCE = 0.1  # Å
_SEARCH_RADIUS = 2.0  # Å, see _check_distances
# Smallest singular value allowed for the periodic lattice vectors (Å).
MIN_CELL_EXTENT = 1e-6


class InvalidStructure(ValueError):
    """A structure that cannot go into a dataset."""

    def __init__(self, source_file: str, index: int, field: str, reason: str):
        # All four go to ValueError's args so the exception survives pickling between
        # conversion worker processes.
        super().__init__(source_file, index, field, reason)
        self.source_file, self.index, self.field, self.reason = source_file, index, field, reason

    def __str__(self) -> str:
        return f"{self.source_file} structure {self.index}: field '{self.field}': {self.reason}"


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
    _check_periodic_cell(fail, np.asarray(record.cell), pbc)
    if record.energy is None:
        fail("energy", "missing (the input has no energy for this structure)")
    if not np.isfinite(record.energy):
        fail("energy", f"not finite ({record.energy})")
    if record.forces is None:
        fail("forces", "missing (the input has no forces for this structure)")
    _check_array(fail, "forces", record.forces, (natoms, 3))
    if record.stress is not None:
        _check_array(fail, "stress", record.stress, (3, 3))
    for name in ("charge", "spin"):
        value = getattr(record, name)
        if value is not None and not np.isfinite(value):
            fail(name, f"not finite ({value})")
    _check_distances(fail, np.asarray(record.positions), np.asarray(record.cell), pbc)


def _check_array(fail, field: str, value, shape: tuple[int, ...]) -> None:
    array = np.asarray(value)
    if array.shape != shape:
        fail(field, f"shape {array.shape}, expected {shape}")
    if array.dtype.kind != "f":
        fail(field, f"dtype {array.dtype}, expected floating point")
    bad = np.argwhere(~np.isfinite(array))
    if len(bad):
        fail(field, f"non-finite value {array[tuple(bad[0])]} at {tuple(int(i) for i in bad[0])}")


def _check_periodic_cell(fail, cell: np.ndarray, pbc: np.ndarray) -> None:
    if not pbc.any():
        return
    periodic_vectors = cell[pbc]
    extent = np.linalg.svd(periodic_vectors, compute_uv=False).min()
    if extent < MIN_CELL_EXTENT:
        fail("cell", f"periodic lattice vectors {periodic_vectors.tolist()} are degenerate")


def _check_distances(fail, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> None:
    # vesin's cell list uses cells of the cutoff's size, so searching at 0.1 Å would
    # build millions of empty cells; search at 2 Å (fastest on small cells) and keep the
    # close pairs.
    neighbours = vesin.NeighborList(cutoff=_SEARCH_RADIUS, full_list=False)
    i, j, distance = neighbours.compute(
        positions.astype(np.float64), cell.astype(np.float64), pbc.tolist(), "ijd"
    )
    close = distance < MIN_DISTANCE
    i, j, distance = i[close], j[close], distance[close]
    if len(distance):
        pair = int(np.argmin(distance))
        what = "its own periodic image" if i[pair] == j[pair] else f"atom {j[pair]}"
        fail(
            "positions",
            f"atom {i[pair]} is {distance[pair]:.4f} Å from {what} (minimum {MIN_DISTANCE} Å)",
        )
