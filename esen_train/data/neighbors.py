"""Radius graph of one structure, periodic images included: vesin or our own searches.

eSEN's smoothness needs *every* neighbour within the cutoff, so there is no cap
on neighbours. The edge convention matches ARCHITECTURE.md: row 0 of
`edge_index` is the source j (the neighbour), row 1 the target i (the centre),
and `r_ij = pos[j] - pos[i] + S @ cell`, with S the integer image shift.

Two exact lists, each where it is fastest (benchmarks/neighbor_lists.py measured
vesin, pymatgen, matscipy, ASE and neighborlist-rs):
- vesin for molecules (no invertible cell);
- for periodic cells, `periodic_neighbors.periodic_neighbor_list`: compiled searches, a
  pair search bounded per axis up to 200 atoms and a cell list with bins half a cutoff
  wide above. Every library measured bins by the cutoff, so a cell thinner than two
  cutoffs (108-atom Cu at 6 Å, the common case in materials data) got one bin per
  direction and all 27 images of every pair were tested; ours is faster than vesin in thick
  cells too (figures in benchmarks/README.md).
"""
from __future__ import annotations

import numpy as np
import vesin

from esen_train.data.periodic_neighbors import cell_volume, periodic_neighbor_list


def build_neighbor_list(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float, offsets_dtype=np.int64
) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i, j, S) with |pos[j] - pos[i] + S @ cell| < cutoff, except i == j at S == 0.

    positions: [N, 3] Å; cell: [3, 3] with lattice vectors as rows (zeros for a
    molecule); pbc: [3] bool; cutoff: Å.
    Returns `edge_index` [2, E] int64 (row 0 = j, row 1 = i) and `cell_offsets`
    [E, 3] of `offsets_dtype` (the shifts S, whole numbers). Both directions of each
    pair are present.
    """
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    cell = np.ascontiguousarray(cell, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    _check_shapes(positions, cell, pbc, cutoff)
    # Python's any() on a list: numpy's reductions cost microseconds on three values.
    if any(pbc.tolist()) and cell_volume(cell) > 1e-9:
        # The compiled search checks that every value is finite as it reads them.
        return periodic_neighbor_list(positions, cell, pbc, cutoff, offsets_dtype)
    _check_values(positions, cell, pbc)
    edge_index, shifts = _vesin_neighbor_list(positions, cell, pbc, cutoff)
    return edge_index, shifts.astype(offsets_dtype, copy=False)


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
    return edge_index, shifts


def _check_shapes(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> None:
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must have shape [N, 3], got {positions.shape}")
    if cell.shape != (3, 3):
        raise ValueError(f"cell must have shape [3, 3], got {cell.shape}")
    if pbc.shape != (3,):
        raise ValueError(f"pbc must have shape [3], got {pbc.shape}")
    if not cutoff > 0:
        raise ValueError(f"cutoff must be positive, got {cutoff}")


def _check_values(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> None:
    # One reduction instead of an elementwise test: a NaN or inf anywhere makes the sum
    # non-finite (so would overflow, which needs coordinates near 1e308).
    if not np.isfinite(positions.sum() + cell.sum()):
        raise ValueError("positions and cell must be finite")
    zero_periodic = pbc & ~cell.any(axis=1)
    if zero_periodic.any():
        axis = int(np.flatnonzero(zero_periodic)[0])
        raise ValueError(f"pbc[{axis}] is True but lattice vector {axis} of the cell is zero")
