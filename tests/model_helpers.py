"""Small structures, batches and a seeded float64 model for the model tests.

Graphs come from the project's own neighbour list (vesin), in the batch format of
ARCHITECTURE.md, so the tests exercise the model the way the data loader feeds it.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk, molecule
from e3nn import o3
from torch_geometric.data import Batch, Data

from esen_train.data.neighbors import build_neighbor_list
from esen_train.model import ESEN, ModelConfig, load_model_config

DTYPE = torch.float64


def tiny_config(**changes) -> ModelConfig:
    return replace(load_model_config("tiny"), **changes)


def tiny_model(seed: int = 0, **changes) -> ESEN:
    """The tiny preset in float64 with seeded weights; reference energies and scale not 0/1
    so that the tests also cover how they are applied."""
    torch.manual_seed(seed)
    model = ESEN(tiny_config(**changes)).to(DTYPE)
    references = torch.zeros(model.config.max_num_elements + 1, dtype=DTYPE)
    references[1:] = -torch.linspace(0.5, 3.0, model.config.max_num_elements, dtype=DTYPE)
    model.set_reference_energies(references)
    model.set_energy_scale(1.7)
    return model


def to_data(atoms: Atoms, cutoff: float) -> Data:
    pbc = np.asarray(atoms.pbc, dtype=bool)
    cell = atoms.cell.array if pbc.any() else np.zeros((3, 3))
    edge_index, cell_offsets = build_neighbor_list(atoms.positions, cell, pbc, cutoff)
    return Data(
        pos=torch.tensor(atoms.positions, dtype=DTYPE),
        atomic_numbers=torch.tensor(atoms.numbers, dtype=torch.long),
        cell=torch.tensor(cell, dtype=DTYPE).unsqueeze(0),
        pbc=torch.tensor(pbc).unsqueeze(0),
        natoms=torch.tensor([len(atoms)]),
        edge_index=torch.tensor(edge_index, dtype=torch.long),
        cell_offsets=torch.tensor(cell_offsets, dtype=DTYPE),
    )


def to_batch(structures: list[Atoms], cutoff: float) -> Batch:
    return Batch.from_data_list([to_data(atoms, cutoff) for atoms in structures])


# ----- structures ------------------------------------------------------------------
def rattled_alloy() -> Atoms:
    """A triclinic two-element crystal with displaced atoms: no symmetry left to hide errors."""
    atoms = bulk("Cu", "fcc", a=3.6).repeat((2, 1, 1))
    atoms.numbers[1] = 28
    atoms.set_cell(atoms.cell.array + np.array([[0.0, 0.1, 0.2], [0.3, 0.0, -0.1], [0.1, -0.2, 0.0]]),
                   scale_atoms=True)
    atoms.rattle(0.1, seed=1)
    return atoms


def rattled_molecule() -> Atoms:
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=2)
    return atoms


def rattled_slab() -> Atoms:
    """Periodic in x and y only (mixed periodicity)."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.pbc = (True, True, False)
    atoms.numbers[2] = 13  # an Al atom
    atoms.rattle(0.1, seed=3)
    return atoms


def crossing_cluster(x: float) -> Atoms:
    """Three atoms; the third moves along x and crosses the first atom's cutoff sphere at
    x = crossing_x(cutoff), while it stays within the second atom's (for cutoffs of 4-6 Å),
    so only one edge pair switches."""
    return Atoms("CON", positions=[[0.0, 0.0, 0.0], [2.5, 0.8, 0.0], [x, 0.3, 0.2]])


def crossing_x(cutoff: float) -> float:
    """x where the moving atom of `crossing_cluster` is exactly `cutoff` away from the first."""
    return float(np.sqrt(cutoff**2 - 0.3**2 - 0.2**2))


def mixed_batch(cutoff: float) -> Batch:
    return to_batch([rattled_alloy(), rattled_molecule(), rattled_slab()], cutoff)


def random_rotation(seed: int) -> torch.Tensor:
    """A proper rotation matrix (det +1), float64."""
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=DTYPE))
    q = q * torch.sign(torch.diagonal(r))
    return q * torch.det(q)


def wigner_d(lmax: int, rotation: torch.Tensor) -> torch.Tensor:
    """e3nn's block-diagonal D(R) for degrees 0..lmax in node-feature order [(lmax+1)^2, (lmax+1)^2]:
    the independent reference the model's own Wigner-D matrices are checked against.
    e3nn builds its generators in the default dtype: float64 here, or D is only good to 1e-7."""
    irreps = o3.Irreps([(1, (l, (-1) ** l)) for l in range(lmax + 1)])
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        return irreps.D_from_matrix(rotation.to(DTYPE))
    finally:
        torch.set_default_dtype(default)


def rotate_features(x: torch.Tensor, wigner: torch.Tensor) -> torch.Tensor:
    """Node features [N, (lmax+1)^2, C] rotated by D ([n, n], or one [N, n, n] per node)."""
    if wigner.dim() == 2:
        return torch.einsum("ij,njc->nic", wigner, x)
    return torch.einsum("nij,njc->nic", wigner, x)


def transformed(batch: Batch, matrix: torch.Tensor) -> Batch:
    """The same graph with positions and cells mapped by x -> matrix @ x (rows: x @ matrix.T)."""
    out = batch.clone()
    out.pos = batch.pos @ matrix.T
    out.cell = batch.cell @ matrix.T
    return out


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).abs().max() / reference.abs().max().clamp_min(1e-300))
