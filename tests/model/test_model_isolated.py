"""Atoms without a neighbour within the cutoff: one atom, a dimer beyond the cutoff, one atom in
a periodic box, alone, as a whole batch without edges, and among bonded structures.

Each such structure gets the energy of its atoms alone (reference plus the network's value for
the isolated element), zero forces and zero stress, from the direct and the conservative heads,
in float32 and float64; training through a batch without edges gives every parameter a finite
gradient (zero for those that only act on edges).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from torch_geometric.data import Batch

from tests.model_helpers import mixed_batch, tiny_model, to_batch

CUTOFF = 5.0
DIRECTION = np.array([1.0, 2.0, 0.5]) / np.linalg.norm([1.0, 2.0, 0.5])
DTYPES = [torch.float32, torch.float64]
EXACT = {torch.float32: 1e-6, torch.float64: 1e-13}  # relative, energies of ~10 eV


def no_edge_structures() -> list[Atoms]:
    return [
        Atoms("Cu", positions=[[0.3, -0.2, 0.1]]),
        Atoms("CuNi", positions=[[0.0, 0.0, 0.0], 5.5 * DIRECTION]),
        Atoms("Ni", positions=[[1.0, 2.0, 3.0]], cell=[20.0, 20.0, 20.0], pbc=True),
        Atoms("CuNi", positions=[[1.0, 1.0, 1.0], [1.0, 1.0, 1.0] + 5.5 * DIRECTION], cell=[20.0, 20.0, 20.0], pbc=True),
    ]


@pytest.fixture(scope="module")
def model64():
    return tiny_model(direct_forces=True)


def model_in(dtype: torch.dtype, model64):
    return model64 if dtype == torch.float64 else tiny_model(direct_forces=True).to(dtype)


def in_dtype(batch, dtype: torch.dtype):
    batch = batch.clone()
    batch.pos, batch.cell, batch.cell_offsets = batch.pos.to(dtype), batch.cell.to(dtype), batch.cell_offsets.to(dtype)
    return batch


def isolated_energy(model, z: int, dtype: torch.dtype) -> float:
    """Reference energy of element z plus what the network gives it with no neighbour, from the
    model's parts: the backbone with no edges, then the energy head."""
    element = torch.tensor([z - 1])
    x = model.backbone(element, torch.zeros(0, 3, dtype=dtype), torch.zeros(2, 0, dtype=torch.long))
    network = float(model.energy_head(x)[0].detach()) * float(model.energy_scale)
    return network + float(model.reference_energies[z])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("forces", ["conservative", "direct"])
def test_a_batch_without_edges_gives_atoms_alone(model64, dtype, forces):
    model = model_in(dtype, model64)
    structures = no_edge_structures()
    batch = in_dtype(to_batch(structures, CUTOFF), dtype)
    assert batch.num_edges == 0
    with torch.no_grad():  # as in validation; conservative outputs switch autograd on inside
        out = model(batch, forces=forces, stress=True)
    alone = {z: isolated_energy(model, z, dtype) for z in (28, 29)}
    expected = [sum(alone[z] for z in atoms.numbers) for atoms in structures]
    assert out["energy"].dtype == torch.float64
    assert out["energy"].tolist() == pytest.approx(expected, rel=EXACT[dtype])
    assert alone[29] != pytest.approx(float(model.reference_energies[29]))  # the network does add a value
    assert out["forces"].shape == (batch.num_nodes, 3) and out["forces"].dtype == dtype
    assert torch.equal(out["forces"], torch.zeros_like(out["forces"]))
    assert torch.equal(out["stress"], torch.zeros_like(out["stress"]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("forces", ["conservative", "direct"])
def test_structures_without_edges_among_bonded_ones(model64, dtype, forces):
    """Each structure of a batch mixing both kinds equals the same structure alone."""
    model = model_in(dtype, model64)
    bonded = mixed_batch(CUTOFF).to_data_list()
    lonely = to_batch(no_edge_structures(), CUTOFF).to_data_list()
    interleaved = [bonded[0], lonely[0], lonely[1], bonded[1], lonely[2], bonded[2], lonely[3]]
    together = model(in_dtype(Batch.from_data_list(interleaved), dtype), forces=forces)
    start = 0
    for index, data in enumerate(interleaved):
        alone = model(in_dtype(Batch.from_data_list([data]), dtype), forces=forces)
        end = start + data.num_nodes
        tolerance = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(together["energy"][index], alone["energy"][0], rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(together["forces"][start:end], alone["forces"], rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(together["stress"][index], alone["stress"][0], rtol=tolerance, atol=tolerance)
        if data.num_edges == 0:
            assert torch.equal(together["forces"][start:end], torch.zeros_like(alone["forces"]))
            assert torch.equal(together["stress"][index], torch.zeros_like(alone["stress"][0]))
        start = end


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("forces", ["conservative", "direct"])
def test_a_training_step_on_a_batch_without_edges(dtype, forces):
    """Loss and double backward as the trainer does them: every parameter gets a finite
    gradient, zero for those that only act on edges, not zero for the energy head."""
    model = tiny_model(direct_forces=forces == "direct").to(dtype)  # the trainer's model of that stage
    batch = in_dtype(to_batch(no_edge_structures(), CUTOFF), dtype)
    out = model(batch, forces=forces, stress=True, create_graph=forces == "conservative")
    labels = torch.ones_like(out["forces"])
    loss = out["energy"].sum() + (out["forces"] - labels).square().sum() + (out["stress"] - 1.0).square().sum()
    loss.backward()
    edge_only = ("backbone.source_embedding", "backbone.target_embedding", "backbone.edge_degree", ".edgewise.")
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        if any(part in name for part in edge_only):
            assert torch.equal(parameter.grad, torch.zeros_like(parameter)), name
    assert model.energy_head.mlp[-1].weight.grad.abs().max() > 0
