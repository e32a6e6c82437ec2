"""The neighbour list equals ASE's (same set of (i, j, S)) on every kind of structure."""
from __future__ import annotations

import ase.build
import numpy as np
import pytest
from ase import Atoms
from ase.neighborlist import primitive_neighbor_list

from esen_train.data.neighbors import build_neighbor_list
from esen_train.data.periodic_neighbors import PAIRS_UP_TO_ATOMS, cell_neighbor_list, pair_neighbor_list

# Each periodic search on its own (build_neighbor_list picks one by the number of atoms).
PERIODIC_SEARCHES = [pair_neighbor_list, cell_neighbor_list]


def _ase_pairs(atoms: Atoms, cutoff: float) -> set[tuple]:
    i, j, shifts = primitive_neighbor_list(
        "ijS", atoms.pbc, atoms.cell.array, atoms.positions, cutoff, self_interaction=False
    )
    return {(a, b, tuple(s)) for a, b, s in zip(i.tolist(), j.tolist(), shifts.tolist())}


def _our_pairs(atoms: Atoms, cutoff: float, search=build_neighbor_list) -> set[tuple]:
    edge_index, offsets = search(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
    assert edge_index.dtype == np.int64 and edge_index.shape[0] == 2
    assert offsets.shape == (edge_index.shape[1], 3)
    centres, neighbours = edge_index[1].tolist(), edge_index[0].tolist()
    pairs = {(i, j, tuple(s)) for i, j, s in zip(centres, neighbours, offsets.tolist())}
    assert len(pairs) == edge_index.shape[1], "duplicate edges"
    return pairs


def _rattled_cu_108() -> Atoms:
    atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True) * (3, 3, 3)
    atoms.rattle(0.1, seed=1)
    return atoms


def _skewed_cell() -> Atoms:
    rng = np.random.default_rng(1)
    cell = [[3.0, 0.0, 0.0], [2.8, 1.0, 0.0], [0.5, 0.3, 3.0]]
    return Atoms("Cu4", positions=rng.random((4, 3)) * 3.0, cell=cell, pbc=True)


def _atoms_outside_cell() -> Atoms:
    atoms = _rattled_cu_108()
    atoms.positions += [7.0, -13.0, 25.0]
    return atoms


def _slab(size: tuple[int, int, int] = (2, 2, 3)) -> Atoms:
    slab = ase.build.fcc111("Cu", size, vacuum=5.0)
    slab.rattle(0.05, seed=2)
    return slab


def _molecule() -> Atoms:
    molecule = ase.build.molecule("CH3CH2OCH3")
    assert not molecule.pbc.any() and not molecule.cell.array.any()
    return molecule


@pytest.mark.parametrize(
    ("make", "cutoff"),
    [
        (_rattled_cu_108, 6.0),  # cutoff above half the box: several images of the same atom
        (_rattled_cu_108, 4.0),  # box thicker than two cutoffs
        (lambda: ase.build.bulk("Cu"), 6.0),  # 1-atom cell: only self-images
        (_skewed_cell, 5.0),
        (_atoms_outside_cell, 5.0),
        (_slab, 6.0),  # periodic in x, y only
        (lambda: _slab(size=(4, 4, 3)), 3.0),  # slab at least two cutoffs wide
        (_molecule, 2.5),
        (_molecule, 100.0),  # everything connected
    ],
)
def test_neighbor_list_equals_ase(make, cutoff):
    atoms = make()
    expected = _ase_pairs(atoms, cutoff)
    assert len(expected) > 0
    assert _our_pairs(atoms, cutoff) == expected
    if atoms.pbc.any():
        for search in PERIODIC_SEARCHES:
            assert _our_pairs(atoms, cutoff, search) == expected, search.__name__


def test_large_cell_uses_the_cell_list_and_equals_ase():
    atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True) * (4, 4, 4)  # 256 atoms
    atoms.rattle(0.1, seed=4)
    assert len(atoms) > PAIRS_UP_TO_ATOMS
    assert _our_pairs(atoms, 6.0) == _ase_pairs(atoms, 6.0)


@pytest.mark.parametrize("search", PERIODIC_SEARCHES, ids=lambda search: search.__name__)
@pytest.mark.parametrize("seed", range(40))
def test_neighbor_list_equals_ase_on_random_cells(seed, search):
    """Skewed cells, any mix of periodic axes (none included), atoms outside the cell,
    cutoffs from a fraction of the cell to several times it (many images of each atom)."""
    rng = np.random.default_rng(seed)
    cell = np.diag(rng.uniform(2.0, 9.0, size=3)) + rng.uniform(-1.5, 1.5, size=(3, 3))
    pbc = rng.random(3) < 0.7
    num_atoms = int(rng.integers(1, 40))
    positions = rng.uniform(-0.3, 1.3, size=(num_atoms, 3)) @ cell
    atoms = Atoms(numbers=[29] * num_atoms, positions=positions, cell=cell, pbc=pbc)
    cutoff = float(rng.uniform(1.0, 9.0))
    assert _our_pairs(atoms, cutoff, search) == _ase_pairs(atoms, cutoff)


@pytest.mark.parametrize("search", PERIODIC_SEARCHES, ids=lambda search: search.__name__)
def test_clustered_atoms_in_a_large_cell(search):
    """Far more pairs than the cell's mean density suggests: the list is sized again, not cut."""
    rng = np.random.default_rng(3)
    atoms = Atoms("Cu60", positions=rng.random((60, 3)) * 2.0, cell=np.eye(3) * 30.0, pbc=True)
    pairs = _our_pairs(atoms, 4.0, search)
    assert len(pairs) == 60 * 59 and pairs == _ase_pairs(atoms, 4.0)


def test_edge_vectors_follow_the_documented_convention():
    atoms = _rattled_cu_108()
    edge_index, offsets = build_neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, 6.0)
    source, target = edge_index
    vectors = atoms.positions[source] - atoms.positions[target] + offsets @ atoms.cell.array
    distances = np.linalg.norm(vectors, axis=1)
    assert distances.max() < 6.0 and distances.min() > 0.5
    # Ordered pairs come in both directions: (j -> i, S) and (i -> j, -S).
    forward = {(j, i, tuple(s)) for j, i, s in zip(source.tolist(), target.tolist(), offsets.tolist())}
    backward = {(i, j, tuple(-np.asarray(s))) for j, i, s in forward}
    assert forward == backward


def test_isolated_atom_and_empty_cell_have_no_edges():
    edge_index, offsets = build_neighbor_list(np.zeros((1, 3)), np.zeros((3, 3)), [False] * 3, 6.0)
    assert edge_index.shape == (2, 0) and offsets.shape == (0, 3)
    edge_index, offsets = build_neighbor_list(np.zeros((0, 3)), 5.0 * np.eye(3), [True, True, False], 6.0)
    assert edge_index.shape == (2, 0) and offsets.shape == (0, 3)


def test_periodic_direction_without_lattice_vector_is_rejected():
    with pytest.raises(ValueError, match="lattice vector 2"):
        build_neighbor_list(np.zeros((2, 3)), np.diag([3.0, 3.0, 0.0]), [True, True, True], 5.0)
    with pytest.raises(ValueError, match="shape"):
        build_neighbor_list(np.zeros((2, 2)), np.eye(3), [True] * 3, 5.0)
    for search in [build_neighbor_list, *PERIODIC_SEARCHES]:
        with pytest.raises(ValueError, match="finite"):
            search(np.array([[0.0, 0.0, 0.0], [np.nan, 0.0, 0.0]]), np.eye(3), np.array([True] * 3), 5.0)
        with pytest.raises(ValueError, match="finite"):
            search(np.zeros((2, 3)), np.diag([3.0, np.inf, 3.0]), np.array([True] * 3), 5.0)
    flat_cell = [[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [3.0, 3.0, 0.0]]  # three vectors in one plane
    with pytest.raises(ValueError, match="neighbour list"):
        build_neighbor_list(np.zeros((2, 3)), flat_cell, [True] * 3, 5.0)
