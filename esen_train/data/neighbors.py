"""Radius graph of one structure, periodic images included, with vesin.

eSEN's smoothness needs *every* neighbour within the cutoff, so there is no cap
on neighbours. The edge convention matches ARCHITECTURE.md: row 0 of
`edge_index` is the source j (the neighbour), row 1 the target i (the centre),
and `r_ij = pos[j] - pos[i] + S @ cell`, with S the integer image shift.

vesin was chosen after measuring vesin, matscipy, ASE and neighborlist-rs
(benchmarks/neighbor_lists.py): it is exact for molecules, slabs (mixed
periodicity), small and skewed cells, and the fastest exact library measured.
"""
from __future__ import annotations

import numpy as np
import vesin


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
