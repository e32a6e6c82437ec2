"""Radius graph of a periodic structure, exact and uncapped: two compiled searches (numba).

Why our own: the reader must build the graph of a 108-atom Cu cell at 6 Å fast enough to feed
thousands of structures a second per worker, and no exact library measured by
benchmarks/neighbor_lists.py does (figures in benchmarks/README.md). Their cell lists use bins
no smaller than the cutoff, so a cell thinner than two cutoffs, the usual case in materials
data, gets one bin per direction and every pair is tested in all 27 images.

- `pair_neighbor_list`, for cells of up to `PAIRS_UP_TO_ATOMS` atoms: every pair of atoms
  once, with only the periodic images that can lie within the cutoff. A vector shorter
  than the cutoff has fractional component a smaller than cutoff / (spacing of the lattice
  planes a), which bounds the integer shift on each axis; so nothing is binned, and a
  pair costs a few bounds and usually one or two distance tests. Its loops depend on the
  geometry only, not on how atoms fall into bins, so a stream of different structures runs
  as fast as one structure repeated; the cell list below loses there, its short loops over
  bins of a few atoms mispredicted.
- `cell_neighbor_list`, for larger cells: a cell list with bins about half a cutoff wide; the
  search reaches as many bins, across as many periodic images, as the cutoff needs.

benchmarks/neighbor_lists.py measures the crossover on fcc Cu and diamond Si, rattled, at
cutoffs of 4, 6 and 8 Å: pairs are faster up to a little over 200 atoms and slower from 500,
so cells of up to 200 atoms use them.

numba compiles the searches on first use (about 10 s per shift dtype) and keeps the machine
code beside this module in `__pycache__` (`cache=True`), as Python keeps bytecode; later
processes, dataloader workers among them, load it in well under a second.
"""
from __future__ import annotations

import math

import numba
import numpy as np

# Cells of up to this many atoms use the pair search (see the module docstring).
PAIRS_UP_TO_ATOMS = 200

# Bins about half a cutoff wide: the volume searched per atom, (5 bins)^3 of (rc/2)^3, is
# 15.6 rc^3 against 27 rc^3 with cutoff-wide bins, while a bin still holds a few atoms.
_BINS_PER_CUTOFF = 2.0


def periodic_neighbor_list(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float, offsets_dtype=np.int64
) -> tuple[np.ndarray, np.ndarray]:
    """All (j, i, S) with |pos[j] - pos[i] + S @ cell| < cutoff, except i == j at S == 0.

    positions [N, 3] float64; cell [3, 3] invertible, lattice vectors as rows; pbc [3] bool.
    Returns `edge_index` [2, E] int64 (row 0 = j, row 1 = i) and `cell_offsets` [E, 3] of
    `offsets_dtype` (whole numbers; the reader asks for its float dtype, which saves a
    conversion of the largest array of an item). Raises ValueError for non-finite input.
    """
    search = _pair_search if len(positions) <= PAIRS_UP_TO_ATOMS else _cell_search
    return _run(search, positions, cell, pbc, cutoff, offsets_dtype)


def pair_neighbor_list(positions, cell, pbc, cutoff, offsets_dtype=np.int64):
    """`periodic_neighbor_list` by the pair search, whatever the size (for tests and benchmarks)."""
    return _run(_pair_search, positions, cell, pbc, cutoff, offsets_dtype)


def cell_neighbor_list(positions, cell, pbc, cutoff, offsets_dtype=np.int64):
    """`periodic_neighbor_list` by the cell list, whatever the size (for tests and benchmarks)."""
    return _run(_cell_search, positions, cell, pbc, cutoff, offsets_dtype)


def _run(search, positions, cell, pbc, cutoff, offsets_dtype):
    if len(positions) == 0:
        return np.empty((2, 0), np.int64), np.empty((0, 3), offsets_dtype)
    volume = cell_volume(cell)
    if not math.isfinite(volume):  # the search checks the positions; the guess below needs the cell
        raise ValueError("positions and cell must be finite")
    if volume <= 1e-9:
        raise ValueError(f"a periodic search needs an invertible cell, got volume {volume:.3g}")
    capacity = _expected_edges(len(positions), volume, pbc, cutoff)
    while True:
        pairs, shifts = np.empty(2 * capacity, np.int64), np.empty((capacity, 3), offsets_dtype)
        count = search(positions, cell, pbc, float(cutoff), pairs, shifts)
        if count < 0:
            raise ValueError("positions and cell must be finite")
        if count <= capacity:  # the search moved the centres down to pairs[count:2 * count]
            return pairs[: 2 * count].reshape(2, count), shifts[:count]
        capacity = count  # rare: the guess was short; search again into arrays of the right size


def cell_volume(cell: np.ndarray) -> float:
    """|det(cell)|, as a triple product of Python floats: several times cheaper than
    np.linalg.det for one 3x3 matrix, and it runs for every structure read."""
    (a, b, c), (d, e, f), (g, h, i) = cell.tolist()
    return abs(a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g))


def _expected_edges(num_atoms: int, volume: float, pbc: np.ndarray, cutoff: float) -> int:
    """A generous guess of the number of edges, to size the output before the search; capped,
    so that a nonsensical cell (a tiny volume) costs a second search, not all the memory."""
    if all(pbc.tolist()):  # the density is known: a little more than a sphere's worth per atom
        sphere = 4.0 / 3.0 * math.pi * cutoff**3
        return int(min(1.3 * num_atoms * sphere / volume, 4096) * num_atoms) + 64
    return 64 * num_atoms + 64


# Both searches write the pairs that fit into `pairs` (neighbours j at [0, capacity), centres
# i at [capacity, 2 capacity), then the centres moved down to follow the neighbours, so that
# the first 2 * count entries are edge_index [2, count] without a copy) and `shifts`, and
# return how many there are (also past capacity, to size the next try), or -1 if an input
# is not finite.
@numba.njit(cache=True)
def _pair_search(positions, cell, pbc, cutoff, pairs, shifts):
    if not _all_finite(positions, cell):
        return -1
    num_atoms = positions.shape[0]
    inverse = _inverse_3x3(cell)
    fractional = _fractional(positions, inverse)
    # A vector shorter than the cutoff has |fractional component a| < cutoff / (plane spacing a).
    reach = np.empty(3)
    for axis in range(3):
        reach[axis] = cutoff / _plane_spacing(inverse, axis)
    capacity, count = shifts.shape[0], 0
    cutoff_squared = cutoff * cutoff
    for i in range(num_atoms):
        for j in range(i, num_atoms):
            lo0, hi0 = _shift_range(fractional[i, 0] - fractional[j, 0], reach[0], pbc[0])
            lo1, hi1 = _shift_range(fractional[i, 1] - fractional[j, 1], reach[1], pbc[1])
            lo2, hi2 = _shift_range(fractional[i, 2] - fractional[j, 2], reach[2], pbc[2])
            x = positions[j, 0] - positions[i, 0]
            y = positions[j, 1] - positions[i, 1]
            z = positions[j, 2] - positions[i, 2]
            for s0 in range(lo0, hi0 + 1):
                x0, y0, z0 = x + s0 * cell[0, 0], y + s0 * cell[0, 1], z + s0 * cell[0, 2]
                for s1 in range(lo1, hi1 + 1):
                    x1, y1, z1 = x0 + s1 * cell[1, 0], y0 + s1 * cell[1, 1], z0 + s1 * cell[1, 2]
                    for s2 in range(lo2, hi2 + 1):
                        dx, dy, dz = x1 + s2 * cell[2, 0], y1 + s2 * cell[2, 1], z1 + s2 * cell[2, 2]
                        if dx * dx + dy * dy + dz * dz >= cutoff_squared:
                            continue
                        # An atom and its own image: S and -S make one pair; S = 0 is none.
                        if j == i and (s0 < 0 or (s0 == 0 and (s1 < 0 or (s1 == 0 and s2 <= 0)))):
                            continue
                        if count + 2 <= capacity:
                            pairs[count], pairs[capacity + count] = j, i
                            pairs[count + 1], pairs[capacity + count + 1] = i, j
                            shifts[count, 0], shifts[count, 1], shifts[count, 2] = s0, s1, s2
                            shifts[count + 1, 0], shifts[count + 1, 1], shifts[count + 1, 2] = -s0, -s1, -s2
                        count += 2
    _move_centres_down(pairs, count, capacity)
    return count


@numba.njit(cache=True, inline="always")
def _shift_range(difference, reach, periodic):
    """The shifts S on one axis that can bring j within the cutoff of i: those with
    |S - difference| < reach, where difference = fractional[i] - fractional[j]; on an open
    axis only S = 0 (and an empty range when the atoms are too far apart along it)."""
    if periodic:
        return math.ceil(difference - reach), math.floor(difference + reach)
    if abs(difference) < reach:
        return 0, 0
    return 0, -1


@numba.njit(cache=True)
def _cell_search(positions, cell, pbc, cutoff, pairs, shifts):
    if not _all_finite(positions, cell):
        return -1
    whole, num_bins, reach, start, order, binned = _bin_atoms(positions, cell, pbc, cutoff)
    capacity, count = shifts.shape[0], 0
    cutoff_squared = cutoff * cutoff
    # Bin offsets d >= 0 in lexicographic order: one of each pair {d, -d}, and d = 0.
    for d0 in range(0, reach[0] + 1):
        for d1 in range(-reach[1] if d0 > 0 else 0, reach[1] + 1):
            for d2 in range(-reach[2] if d0 > 0 or d1 > 0 else 0, reach[2] + 1):
                same_bin = d0 == 0 and d1 == 0 and d2 == 0
                for a0 in range(num_bins[0]):
                    b0 = a0 + d0
                    s0 = b0 // num_bins[0]
                    if s0 != 0 and not pbc[0]:
                        continue
                    for a1 in range(num_bins[1]):
                        b1 = a1 + d1
                        s1 = b1 // num_bins[1]
                        if s1 != 0 and not pbc[1]:
                            continue
                        for a2 in range(num_bins[2]):
                            b2 = a2 + d2
                            s2 = b2 // num_bins[2]
                            if s2 != 0 and not pbc[2]:
                                continue
                            here = (a0 * num_bins[1] + a1) * num_bins[2] + a2
                            there = ((b0 - s0 * num_bins[0]) * num_bins[1] + b1 - s1 * num_bins[1]) * num_bins[2] \
                                + b2 - s2 * num_bins[2]
                            image_x = s0 * cell[0, 0] + s1 * cell[1, 0] + s2 * cell[2, 0]
                            image_y = s0 * cell[0, 1] + s1 * cell[1, 1] + s2 * cell[2, 1]
                            image_z = s0 * cell[0, 2] + s1 * cell[1, 2] + s2 * cell[2, 2]
                            for slot_i in range(start[here], start[here + 1]):
                                x, y, z = image_x - binned[slot_i, 0], image_y - binned[slot_i, 1], image_z - binned[slot_i, 2]
                                # Within one bin, each pair once: j after i in bin order.
                                for slot_j in range(slot_i + 1 if same_bin else start[there], start[there + 1]):
                                    dx, dy, dz = binned[slot_j, 0] + x, binned[slot_j, 1] + y, binned[slot_j, 2] + z
                                    if dx * dx + dy * dy + dz * dz >= cutoff_squared:
                                        continue
                                    if count + 2 <= capacity:
                                        i, j = order[slot_i], order[slot_j]
                                        # j's image s seen from i, and i's image -s seen from j; S adds
                                        # the cells wrapping removed from the centre, less the neighbour's.
                                        pairs[count], pairs[capacity + count] = j, i
                                        pairs[count + 1], pairs[capacity + count + 1] = i, j
                                        for axis, s in ((0, s0), (1, s1), (2, s2)):
                                            shift = s + whole[i, axis] - whole[j, axis]
                                            shifts[count, axis], shifts[count + 1, axis] = shift, -shift
                                    count += 2  # past capacity: still counted, to size the next try
    _move_centres_down(pairs, count, capacity)
    return count


@numba.njit(cache=True)
def _bin_atoms(positions, cell, pbc, cutoff):
    """Wraps atoms into the cell along periodic axes and sorts them into bins.

    Returns the whole cells removed from each atom [N, 3], bins per axis [3], the reach of
    the search in bins per axis [3], and the atoms by bin: bin b holds slots
    start[b]:start[b + 1], `order` gives the atom at each slot and `binned` its wrapped
    Cartesian position."""
    num_atoms = positions.shape[0]
    inverse = _inverse_3x3(cell)
    fractional = _fractional(positions, inverse)
    whole = np.zeros((num_atoms, 3), dtype=np.int64)  # cells removed by wrapping
    low, extent = np.zeros(3), np.ones(3)
    num_bins, reach = np.ones(3, dtype=np.int64), np.zeros(3, dtype=np.int64)
    for axis in range(3):
        if pbc[axis]:
            for atom in range(num_atoms):
                whole[atom, axis] = math.floor(fractional[atom, axis])
                fractional[atom, axis] -= whole[atom, axis]
        else:
            low[axis] = fractional[:, axis].min()
            extent[axis] = max(fractional[:, axis].max() - low[axis], 1e-12)
        # Spacing of the lattice planes normal to this axis, times the fraction occupied.
        width = extent[axis] * _plane_spacing(inverse, axis)
        num_bins[axis] = max(1, int(width * _BINS_PER_CUTOFF / cutoff))
        reach[axis] = math.ceil(cutoff / (width / num_bins[axis]))
        if not pbc[axis]:  # a non-periodic axis never needs more than its own bins
            reach[axis] = min(reach[axis], num_bins[axis] - 1)

    # Atoms sorted by bin (a counting sort): bin b holds slots start[b]:start[b + 1].
    flat = np.empty(num_atoms, dtype=np.int64)
    for atom in range(num_atoms):
        index = 0
        for axis in range(3):
            position = (fractional[atom, axis] - low[axis]) / extent[axis] * num_bins[axis]
            index = index * num_bins[axis] + min(int(position), num_bins[axis] - 1)
        flat[atom] = index
    total_bins = num_bins[0] * num_bins[1] * num_bins[2]
    start = np.zeros(total_bins + 1, dtype=np.int64)
    for atom in range(num_atoms):
        start[flat[atom] + 1] += 1
    for b in range(total_bins):
        start[b + 1] += start[b]
    order = np.empty(num_atoms, dtype=np.int64)  # atom at each slot
    binned = np.zeros((num_atoms, 3))  # its wrapped Cartesian position: read in sequence below
    filled = start[:-1].copy()
    for atom in range(num_atoms):
        slot = filled[flat[atom]]
        filled[flat[atom]] += 1
        order[slot] = atom
        for axis in range(3):
            for k in range(3):
                binned[slot, axis] += fractional[atom, k] * cell[k, axis]
    return whole, num_bins, reach, start, order, binned


@numba.njit(cache=True)
def _all_finite(positions, cell):
    return np.isfinite(positions).all() and np.isfinite(cell).all()


@numba.njit(cache=True)
def _fractional(positions, inverse):
    """positions @ inverse, as loops: no BLAS to compile."""
    fractional = np.empty((positions.shape[0], 3))
    for atom in range(positions.shape[0]):
        for axis in range(3):
            fractional[atom, axis] = positions[atom, 0] * inverse[0, axis] \
                + positions[atom, 1] * inverse[1, axis] + positions[atom, 2] * inverse[2, axis]
    return fractional


@numba.njit(cache=True)
def _plane_spacing(inverse, axis):
    """Distance between the lattice planes spanned by the two cell vectors other than `axis`."""
    return 1.0 / math.sqrt(inverse[0, axis] ** 2 + inverse[1, axis] ** 2 + inverse[2, axis] ** 2)


@numba.njit(cache=True)
def _move_centres_down(pairs, count, capacity):
    """Centres from pairs[capacity:] to pairs[count:], once the search fitted (see above)."""
    if count <= capacity:
        for edge in range(count):  # forward: each entry moves down, never onto one not yet read
            pairs[count + edge] = pairs[capacity + edge]


@numba.njit(cache=True)
def _inverse_3x3(matrix):
    """The inverse by cofactors: np.linalg.inv costs more to call than this costs to run."""
    inverse = np.empty((3, 3))
    for row in range(3):
        for column in range(3):
            # Cofactor of matrix[column, row], by cyclic indices (no sign bookkeeping needed).
            r1, r2 = (column + 1) % 3, (column + 2) % 3
            c1, c2 = (row + 1) % 3, (row + 2) % 3
            inverse[row, column] = matrix[r1, c1] * matrix[r2, c2] - matrix[r1, c2] * matrix[r2, c1]
    determinant = matrix[0, 0] * inverse[0, 0] + matrix[0, 1] * inverse[1, 0] + matrix[0, 2] * inverse[2, 0]
    return inverse / determinant
