"""Smoothness at the cutoff of the tiny model: an atom moving through another's cutoff sphere,
and a dimer whose last neighbour leaves (the atoms end up without any edge).
tests/model/test_conformance.py checks continuity for several configs, and
tests/model/test_radial.py the envelope itself.

The graph is rebuilt by the neighbour list at every point of the path, as in MD, so the
crossing edge really appears and disappears; energy and forces must not notice.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms

from tests.model_helpers import crossing_cluster, crossing_x, tiny_model, to_batch

CUTOFF = 5.0


def distance_to_first(x: float) -> float:
    positions = crossing_cluster(x).positions
    return float(np.linalg.norm(positions[2] - positions[0]))


def test_energy_along_a_path_through_the_cutoff_has_no_step():
    """Energies on a fine path across the crossing: every step's change matches the force
    (the energy's slope) to the path's resolution, so no step hides at the crossing."""
    model = tiny_model()
    x_cross = crossing_x(CUTOFF)
    step = 2e-3
    xs = x_cross + step * (np.arange(21) - 10.5)  # the crossing lies between two points
    energies, slopes = [], []
    for x in xs:
        out = model(to_batch([crossing_cluster(x)], CUTOFF))
        energies.append(float(out["energy"][0]))
        slopes.append(-float(out["forces"][2, 0]))  # dE/dx of the moving atom
    energies, slopes = np.array(energies), np.array(slopes)
    predicted = 0.5 * (slopes[1:] + slopes[:-1]) * step  # trapezoid: error ~ step^3 E'''
    actual = np.diff(energies)
    assert np.abs(actual - predicted).max() < 1e-6 * max(np.abs(actual).max(), 1e-12) + 1e-9
    assert distance_to_first(xs[10]) < CUTOFF < distance_to_first(xs[11])


def test_an_edge_at_the_cutoff_contributes_nothing():
    """Adding the pair at exactly r = cutoff to the graph changes neither energy nor forces."""
    model = tiny_model()
    batch = to_batch([crossing_cluster(crossing_x(CUTOFF))], CUTOFF)
    out = model(batch)
    pair = torch.tensor([[2, 0], [0, 2]])
    present = {tuple(edge) for edge in batch.edge_index.T.tolist()}
    assert (2, 0) not in present  # the neighbour list excludes r == cutoff
    extended = batch.clone()
    extended.edge_index = torch.cat([batch.edge_index, pair], dim=1)
    extended.cell_offsets = torch.cat([batch.cell_offsets, torch.zeros(2, 3, dtype=torch.float64)])
    with_pair = model(extended)
    assert float((with_pair["energy"] - out["energy"]).abs().max()) < 1e-14  # round-off of the summation order only
    assert float((with_pair["forces"] - out["forces"]).abs().max()) < 1e-15


def dimer_scan(model, distances: np.ndarray, periodic: bool, forces: str) -> dict[str, np.ndarray]:
    """Edges, energy, the second atom's force and the stress of a Cu-Ni dimer at each distance
    (along a direction off every axis), its graph rebuilt by the neighbour list each time."""
    direction = np.array([1.0, 2.0, 0.5]) / np.linalg.norm([1.0, 2.0, 0.5])
    box = {"cell": [20.0, 20.0, 20.0], "pbc": True} if periodic else {}
    rows = {"edges": [], "energy": [], "force": [], "stress": []}
    for distance in distances:
        atoms = Atoms("CuNi", positions=[[1.0, 1.0, 1.0], [1.0, 1.0, 1.0] + distance * direction], **box)
        batch = to_batch([atoms], CUTOFF)
        out = {name: value.detach() for name, value in model(batch, forces=forces, stress=periodic).items()}
        rows["edges"].append(batch.num_edges)
        rows["energy"].append(float(out["energy"][0]))
        rows["force"].append(out["forces"][1].numpy() @ direction)  # along the bond
        rows["stress"].append(float(out["stress"].abs().max()) if periodic else 0.0)
    return {name: np.array(values) for name, values in rows.items()}


SCAN_STEP = 1e-3  # Å
SCAN = CUTOFF + SCAN_STEP * (np.arange(-50, 50) + 0.5)  # the cutoff lies half-way between two points


def test_a_dimer_scanned_through_the_cutoff_has_no_jump():
    """The last neighbour leaves: the energy steps by far less than 1e-6 eV, every step is the
    force's work (no hidden jump), beyond the cutoff the dimer is two atoms alone, and the force
    goes to zero like (cutoff - r)^2 (the envelope's double zero)."""
    model = tiny_model()
    scan = dimer_scan(model, SCAN, periodic=False, forces="conservative")
    inside = SCAN < CUTOFF
    assert (scan["edges"][inside] == 2).all() and (scan["edges"][~inside] == 0).all()
    steps = np.diff(scan["energy"])
    assert np.abs(steps).max() < 1e-6
    work = -0.5 * (scan["force"][1:] + scan["force"][:-1]) * SCAN_STEP  # dE = -F dr, trapezoid
    assert np.abs(steps - work).max() < 1e-11
    alone = sum(float(model(to_batch([Atoms(symbol)], CUTOFF))["energy"][0]) for symbol in ("Cu", "Ni"))
    assert scan["energy"][~inside] == pytest.approx(alone, abs=1e-12)
    assert (scan["force"][~inside] == 0).all()
    force = np.abs(scan["force"][inside])
    assert (np.diff(force) < 0).all()  # shrinks monotonically towards the cutoff
    assert force[0] > 0
    ratio = force / (CUTOFF - SCAN[inside]) ** 2
    assert ratio.max() < 1.5 * ratio.min()


def test_direct_heads_and_stress_fade_out_with_the_last_neighbour():
    """A dimer in a periodic box through the cutoff: the conservative stress, the direct force
    and the direct stress shrink steadily to exactly zero, with no jump at the crossing."""
    model = tiny_model(direct_forces=True)
    distances = SCAN[30:70]  # the 40 points nearest the cutoff: the gap shrinks 40-fold inside
    inside = distances < CUTOFF
    for forces in ("conservative", "direct"):
        scan = dimer_scan(model, distances, periodic=True, forces=forces)
        assert np.abs(np.diff(scan["energy"])).max() < 1e-6
        for name in ("force", "stress"):
            values = np.abs(scan[name])
            assert (values[~inside] == 0).all(), (forces, name)
            assert (np.diff(values[inside]) < 0).all(), (forces, name)
            assert values[inside][-1] < 1e-2 * values[inside][0], (forces, name)  # (1/40)^2 or less
