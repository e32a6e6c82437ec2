"""Smoothness at the cutoff: the envelope, an atom crossing another's cutoff sphere, and a
dimer whose last neighbour leaves (the atoms end up without any edge).

The graph is rebuilt by the neighbour list at every point of the path, as in MD, so the
crossing edge really appears and disappears; energy and forces must not notice.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms

from esen_train.model.radial import PolynomialEnvelope
from tests.model_helpers import tiny_model, to_batch

CUTOFF = 5.0


def test_envelope_value_and_two_derivatives_vanish_at_the_cutoff():
    envelope = PolynomialEnvelope(CUTOFF, exponent=5)
    distance = torch.tensor([0.0, CUTOFF * (1 - 1e-7), CUTOFF, CUTOFF * 1.2], dtype=torch.float64, requires_grad=True)
    value = envelope(distance)
    (first,) = torch.autograd.grad(value.sum(), distance, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), distance)
    assert value[0] == 1.0 and first[0] == 0.0
    assert abs(value[1]) < 1e-18 and abs(first[1]) < 1e-12 and abs(second[1]) < 1e-5
    assert value[2] == 0.0 and first[2] == 0.0 and second[2] == 0.0
    assert value[3] == 0.0 and first[3] == 0.0


def cluster(x: float) -> Atoms:
    """Three atoms; the third moves along x and crosses the first atom's cutoff at x = CUTOFF
    while it stays within the second atom's cutoff, so only one edge pair switches."""
    return Atoms("CON", positions=[[0.0, 0.0, 0.0], [2.5, 0.8, 0.0], [x, 0.3, 0.2]])


def distance_to_first(x: float) -> float:
    return float(np.linalg.norm(cluster(x).positions[2] - cluster(x).positions[0]))


def crossing_x() -> float:
    """x where atom 2 is exactly CUTOFF away from atom 0."""
    return float(np.sqrt(CUTOFF**2 - 0.3**2 - 0.2**2))


def test_energy_and_forces_are_continuous_when_an_atom_crosses_the_cutoff():
    model = tiny_model()
    x_cross = crossing_x()

    def outputs(x: float):
        batch = to_batch([cluster(x)], CUTOFF)
        out = model(batch)
        return batch.num_edges, float(out["energy"][0]), out["forces"]

    edges = {}
    # Approach the crossing from both sides: the jump must shrink with the gap (it is the
    # smooth change over the gap), where a discontinuity would leave a constant jump.
    energy_jumps, force_jumps = [], []
    for gap in (1e-2, 1e-3, 1e-4):
        edges_in, energy_in, forces_in = outputs(x_cross - gap)
        edges_out, energy_out, forces_out = outputs(x_cross + gap)
        edges[gap] = (edges_in, edges_out)
        energy_jumps.append(abs(energy_in - energy_out))
        force_jumps.append(float((forces_in - forces_out).abs().max()))
    assert all(inside == outside + 2 for inside, outside in edges.values())  # the pair j<->i switches
    for larger, smaller in zip(energy_jumps, energy_jumps[1:]):
        assert smaller < larger / 5
    for larger, smaller in zip(force_jumps, force_jumps[1:]):
        assert smaller < larger / 5


def test_energy_along_a_path_through_the_cutoff_has_no_step():
    """Energies on a fine path across the crossing: every step's change matches the force
    (the energy's slope) to the path's resolution, so no step hides at the crossing."""
    model = tiny_model()
    x_cross = crossing_x()
    step = 2e-3
    xs = x_cross + step * (np.arange(21) - 10.5)  # the crossing lies between two points
    energies, slopes = [], []
    for x in xs:
        out = model(to_batch([cluster(x)], CUTOFF))
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
    batch = to_batch([cluster(crossing_x())], CUTOFF)
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
