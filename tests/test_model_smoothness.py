"""Smoothness at the cutoff of the tiny model: an atom moving through another's cutoff sphere
(tests/model/test_conformance.py checks continuity for several configs, and
tests/model/test_radial.py the envelope itself).

The graph is rebuilt by the neighbour list at every point of the path, as in MD, so the
crossing edge really appears and disappears; energy and forces must not notice.
"""
from __future__ import annotations

import numpy as np
import torch

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
