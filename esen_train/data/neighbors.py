"""Radius graph of one structure, periodic images included, with vesin or pymatgen.

eSEN's smoothness needs *every* neighbour within the cutoff, so there is no cap
on neighbours. The edge convention matches ARCHITECTURE.md: row 0 of
`edge_index` is the source j (the neighbour), row 1 the target i (the centre),
and `r_ij = pos[j] - pos[i] + S @ cell`, with S the integer image shift.

Two exact libraries, each where it is fastest (benchmarks/neighbor_lists.py
measured vesin, pymatgen, matscipy, ASE and neighborlist-rs):
- vesin for molecules and for cells at least two cutoffs thick;
- pymatgen's `find_points_in_spheres` (the list matgl and CHGNet use) for
  thinner periodic cells, the common case in materials data (108-atom Cu at
  6 Å: about 4x faster than vesin, whose cell list has a single bin per axis
  there and scans every pair in all 27 images).
"""
from __future__ import annotations

import numpy as np
import vesin
from pymatgen.optimization.neighbors import find_points_in_spheres


def build_neighbor_list(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i, j, S) with |pos[j] - pos[i] + S @ cell| < cutoff, except i == j at S == 0.

    positions: [N, 3] Å; cell: [3, 3] with lattice vectors as rows (zeros for a
    molecule); pbc: [3] bool; cutoff: Å.
    Returns `edge_index` [2, E] int64 (row 0 = j, row 1 = i) and `cell_offsets`
    [E, 3] int64 (the shifts S). Both directions of each pair are present.
    """
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    cell = np.ascontiguousarray(cell, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    _check_inputs(positions, cell, pbc, cutoff)
    if _is_thin_periodic_cell(cell, pbc, cutoff):
        return _pymatgen_neighbor_list(positions, cell, pbc, cutoff)
    return _vesin_neighbor_list(positions, cell, pbc, cutoff)


def _is_thin_periodic_cell(cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> bool:
    """Whether some periodic direction is thinner than two cutoffs (with an invertible cell)."""
    if not pbc.any() or abs(np.linalg.det(cell)) < 1e-9:
        return False
    # The spacing of the lattice planes normal to axis a is 1 / |column a of cell^-1|.
    heights = 1.0 / np.linalg.norm(np.linalg.inv(cell), axis=0)
    return bool(np.any(heights[pbc] < 2.0 * cutoff))


def _pymatgen_neighbor_list(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
) -> tuple[np.ndarray, np.ndarray]:
    centres, neighbours, shifts, distances = find_points_in_spheres(
        positions, positions, r=float(cutoff), pbc=pbc.astype(np.int64), lattice=cell, tol=1e-8
    )
    # It lists each atom as its own neighbour (i == j, S == 0, distance 0 up to rounding);
    # any other image of an atom is at least a lattice vector away.
    keep = (centres != neighbours) | (distances > 1e-8)
    edge_index = np.stack([neighbours[keep], centres[keep]]).astype(np.int64, copy=False)
    return edge_index, np.rint(shifts[keep]).astype(np.int64)


def _vesin_neighbor_list(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
) -> tuple[np.ndarray, np.ndarray]:
    # One thread: parallelism comes from the dataloader workers, one structure each.
    calculator = vesin.NeighborList(cutoff=float(cutoff), full_list=True, n_threads=1)
    try:
        centres, neighbours, shifts = calculator.compute(positions, cell, pbc, "ijS")
    except RuntimeError as error:  # e.g. "the box matrix is not invertible"
        raise ValueError(f"cannot build the neighbour list: {error}") from None
    edge_index = np.empty((2, len(centres)), dtype=np.int64)
    edge_index[0], edge_index[1] = neighbours, centres
    return edge_index, shifts.astype(np.int64)


def _check_inputs(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> None:
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must have shape [N, 3], got {positions.shape}")
    if cell.shape != (3, 3):
        raise ValueError(f"cell must have shape [3, 3], got {cell.shape}")
    if pbc.shape != (3,):
        raise ValueError(f"pbc must have shape [3], got {pbc.shape}")
    if not cutoff > 0:
        raise ValueError(f"cutoff must be positive, got {cutoff}")
    if not np.isfinite(positions).all() or not np.isfinite(cell).all():
        raise ValueError("positions and cell must be finite")
    for axis in np.flatnonzero(pbc):
        if not np.any(cell[axis]):
            raise ValueError(f"pbc[{axis}] is True but lattice vector {axis} of the cell is zero")
