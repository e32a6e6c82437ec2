"""Model conformance: every model config obeys the physics an interatomic potential must.

One class of checks (after NequIP's model conformance suite), run over several small float64
configs with all weights moved off their initial values (so zero-initialised biases and unit
norm scales hide nothing): the spectral and the grid feed-forward, mmax < lmax, lmax 3, the
direct heads (with and without the neighbour weight of the direct stress), and a charge/spin
embedding. The conservative outputs (and the direct ones, where the model has them)
are checked for
- invariance of the energy and equivariance of forces and stress under rotation, translation
  (also with the atoms wrapped back into the cell and the graph rebuilt) and permutation;
- forces and stress equal to finite differences of the energy in positions and strain;
- continuity of energy and forces when an atom crosses the cutoff;
- supercell consistency: a 2x1x1 supercell has twice the energy, the same forces on each
  copy of an atom and the same stress.

The grid feed-forward is equivariant only up to its grid's sampling error: its config uses a
fine grid, on which the error is far below 1e-9 (tests/model/test_layers.py shows how it falls
with the resolution); everything else is exact to round-off.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import make_supercell

from esen_train.model import ESEN
from tests.model_helpers import (
    DTYPE,
    crossing_cluster,
    crossing_x,
    mixed_batch,
    random_rotation,
    rattled_alloy,
    rattled_molecule,
    relative_error,
    tiny_model,
    to_batch,
    transformed,
)

SMALL = dict(num_layers=2, sphere_channels=8, hidden_channels=16, edge_channels=8, num_radial_basis=8)
CONFIGS = {
    "spectral": dict(),
    "grid": dict(feed_forward="grid", grid_resolution=24),
    "mmax-below-lmax": dict(lmax=2, mmax=1),
    "lmax-3": dict(lmax=3, mmax=3),
    "direct-heads": dict(direct_forces=True),
    # What imported fairchem models use: a charge/spin embedding (the batches carry no charge
    # or spin: 0), and direct stress without the neighbour weight.
    "charge-spin": dict(charge_spin="table"),
    "direct-heads-unweighted-stress": dict(direct_forces=True, direct_stress_neighbour_weight=False),
}
TIGHT = 1e-10  # exact symmetries: round-off only
GRID_ROTATION = 1e-9  # the grid's sampling error at grid_resolution=24 (measured: 3e-12)
STEP = 1e-5  # central differences: truncation ~ STEP^2, round-off ~ 1e-16 / STEP
VECTORS, MATRICES = ("forces", "direct_forces"), ("stress", "direct_stress")


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request) -> ESEN:
    model = tiny_model(seed=0, **SMALL, **CONFIGS[request.param])
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module")
def batch(model):
    return mixed_batch(model.config.cutoff)


def predict(model: ESEN, batch) -> dict[str, torch.Tensor]:
    """Conservative energy, forces and stress, and the direct forces and stress if the model has them."""
    out = model(batch)
    if model.direct_heads is not None:
        direct = model(batch, forces="direct")
        out["direct_forces"], out["direct_stress"] = direct["forces"].detach(), direct["stress"].detach()
    return out


def energies(model: ESEN, batch) -> torch.Tensor:
    return model(batch, forces="none")["energy"].detach()


def assert_all_close(outputs: dict, expected: dict, tolerance: float = TIGHT) -> None:
    for key, value in expected.items():
        assert relative_error(outputs[key], value) < tolerance, key


def strained(batch, structure: int, strain: torch.Tensor):
    """Positions and cell of one structure deformed by (I + strain), rows as vectors."""
    out = batch.clone()
    deformation = torch.eye(3, dtype=DTYPE) + strain
    in_structure = batch.batch == structure
    out.pos = batch.pos.clone()
    out.pos[in_structure] = batch.pos[in_structure] @ deformation
    out.cell = batch.cell.clone()
    out.cell[structure] = batch.cell[structure] @ deformation
    return out


class TestModelConformance:
    @pytest.mark.parametrize("seed", [0, 1])
    def test_energy_invariant_forces_and_stress_equivariant_under_rotation(self, model, batch, seed):
        rotation = random_rotation(seed)
        out = predict(model, batch)
        expected = {key: value @ rotation.T if key in VECTORS else
                    rotation @ value @ rotation.T if key in MATRICES else value for key, value in out.items()}
        tolerance = GRID_ROTATION if model.config.feed_forward == "grid" else TIGHT
        assert_all_close(predict(model, transformed(batch, rotation)), expected, tolerance)
        assert torch.equal(out["stress"], out["stress"].transpose(1, 2))

    def test_translation_invariance(self, model, batch):
        out = predict(model, batch)
        shifted = batch.clone()
        shifted.pos = batch.pos + torch.tensor([1.3, -0.7, 2.1], dtype=DTYPE)
        assert_all_close(predict(model, shifted), out)
        # Wrapped back into the cell, the graph is rebuilt with other image shifts.
        atoms = rattled_alloy()
        alone = predict(model, to_batch([atoms], model.config.cutoff))
        atoms.positions += np.array([2.2, -1.4, 0.9])
        atoms.wrap()
        assert_all_close(predict(model, to_batch([atoms], model.config.cutoff)), alone)

    def test_permutation_invariance(self, model):
        structures = [rattled_alloy(), rattled_molecule()]
        out = predict(model, to_batch(structures, model.config.cutoff))
        orders = [np.random.default_rng(seed).permutation(len(atoms)) for seed, atoms in enumerate(structures)]
        permuted = predict(model, to_batch([atoms[order] for atoms, order in zip(structures, orders)],
                                           model.config.cutoff))
        offsets = np.cumsum([0] + [len(atoms) for atoms in structures[:-1]])
        global_order = torch.tensor(np.concatenate([order + offset for order, offset in zip(orders, offsets)]))
        assert_all_close(permuted, {key: value[global_order] if key in VECTORS else value
                                    for key, value in out.items()})

    def test_forces_are_minus_the_energy_gradient(self, model, batch):
        forces = model(batch)["forces"]
        atoms = np.random.default_rng(0).choice(batch.num_nodes, size=4, replace=False)
        numerical, analytic = [], []
        for atom in atoms:
            for axis in range(3):
                moved = [batch.clone(), batch.clone()]
                for sign, copy in zip((1, -1), moved):
                    copy.pos = batch.pos.clone()
                    copy.pos[atom, axis] += sign * STEP
                difference = energies(model, moved[0]).sum() - energies(model, moved[1]).sum()
                numerical.append(-difference / (2 * STEP))
                analytic.append(forces[atom, axis])
        assert relative_error(torch.stack(analytic), torch.stack(numerical)) < 1e-6

    def test_stress_is_the_strain_derivative_over_volume(self, model, batch):
        """sigma_ab = (1/V) dE/d eps_ab for a symmetric strain; zero for the molecule (no volume)."""
        stress = model(batch)["stress"]
        for structure in range(batch.num_graphs):
            volume = torch.linalg.det(batch.cell[structure]).abs()
            if volume == 0:
                assert torch.equal(stress[structure], torch.zeros(3, 3, dtype=DTYPE))
                continue
            numerical = torch.zeros(3, 3, dtype=DTYPE)
            for a in range(3):
                for b in range(a, 3):
                    strain = torch.zeros(3, 3, dtype=DTYPE)
                    strain[a, b] = strain[b, a] = STEP
                    # dE/d eps_ab for the symmetric pair counts both entries: halve off-diagonals.
                    difference = (energies(model, strained(batch, structure, strain))
                                  - energies(model, strained(batch, structure, -strain)))[structure]
                    numerical[a, b] = numerical[b, a] = difference / (2 * STEP) / (1 if a == b else 2) / volume
            assert relative_error(stress[structure], numerical) < 1e-6

    def test_energy_and_forces_are_continuous_when_an_atom_crosses_the_cutoff(self, model):
        """The graph is rebuilt on each side, as in MD, so the crossing pair really appears and
        disappears. The jump across a gap shrinks with the gap (it is the smooth change over
        the gap), where a discontinuity would leave a constant jump."""
        cutoff = model.config.cutoff
        jumps = {key: [] for key in ("energy", "forces", "direct_forces")}
        for gap in (1e-2, 1e-3, 1e-4):
            inside, outside = (to_batch([crossing_cluster(crossing_x(cutoff) + sign * gap)], cutoff) for sign in (-1, 1))
            assert inside.num_edges == outside.num_edges + 2  # the pair i<->j switches
            out_inside, out_outside = predict(model, inside), predict(model, outside)
            for key in out_inside.keys() & jumps.keys():
                jumps[key].append(float((out_inside[key] - out_outside[key]).abs().max()))
        for key, values in jumps.items():
            assert all(smaller < larger / 5 for larger, smaller in zip(values, values[1:])), (key, values)

    def test_a_2x1x1_supercell_has_twice_the_energy_and_the_same_forces_and_stress(self, model):
        atoms = rattled_alloy()
        out = predict(model, to_batch([atoms], model.config.cutoff))
        supercell = predict(model, to_batch([make_supercell(atoms, np.diag([2, 1, 1]))], model.config.cutoff))
        # make_supercell repeats the cell's atoms block by block, in the original order.
        expected = {key: 2 * value if key == "energy" else value.repeat(2, 1) if key in VECTORS else value
                    for key, value in out.items()}
        assert_all_close(supercell, expected)
