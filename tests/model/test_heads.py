"""heads.py: the energy is invariant, the direct force a rotating vector, the direct stress a
symmetric matrix that rotates as R S R^T, with its parts where they belong."""
from __future__ import annotations

import torch

from esen_train.model.heads import DirectForceHead, DirectStressHead, EnergyHead, sum_per_structure
from tests.model_helpers import DTYPE, random_rotation, rotate_features, wigner_d

LMAX, CHANNELS, HIDDEN = 2, 4, 8
BATCH = torch.tensor([0, 0, 0, 1, 1])  # two structures: three atoms and two
NATOMS = torch.tensor([3, 2])
BULK = torch.ones(5, dtype=torch.float64)  # every atom has neighbours (ESEN.neighbour_weight 1)


def features(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(len(BATCH), (LMAX + 1) ** 2, CHANNELS, generator=generator, dtype=DTYPE)


def seeded(head: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    return head.to(DTYPE)


def test_energy_head_reads_only_scalars_and_is_invariant():
    head = seeded(EnergyHead(CHANNELS, HIDDEN))
    x = features()
    per_atom_rotations = torch.stack([wigner_d(LMAX, random_rotation(seed)) for seed in range(len(BATCH))])
    energy = head(x)
    assert energy.shape == (len(BATCH),)
    assert (head(rotate_features(x, per_atom_rotations)) - energy).abs().max() < 1e-14
    changed = x.clone()
    changed[:, 1:] = torch.randn(changed[:, 1:].shape, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    assert torch.equal(head(changed), energy)


def test_direct_force_is_a_vector_that_rotates_with_the_structure():
    head = seeded(DirectForceHead(CHANNELS))
    x = features()
    forces = head(x)
    assert forces.shape == (len(BATCH), 3)
    # In e3nn's basis the l = 1 coefficients are (x, y, z) components: D^1(R) = R.
    for seed in range(3):
        rotation = random_rotation(seed)
        rotated = head(rotate_features(x, wigner_d(LMAX, rotation)))
        assert (rotated - forces @ rotation.T).abs().max() < 1e-14 * forces.abs().max()


def test_direct_stress_is_symmetric_and_rotates_as_a_rank_two_tensor():
    head = seeded(DirectStressHead(CHANNELS, HIDDEN))
    x = features()
    stress = head(x, BULK, BATCH, NATOMS)
    assert stress.shape == (2, 3, 3)
    assert torch.equal(stress, stress.transpose(1, 2))
    for seed in range(3):
        rotation = random_rotation(seed)
        rotated = head(rotate_features(x, wigner_d(LMAX, rotation)), BULK, BATCH, NATOMS)
        assert (rotated - rotation @ stress @ rotation.T).abs().max() < 1e-14 * stress.abs().max()


def test_direct_stress_isotropic_part_from_scalars_traceless_part_from_degree_two():
    head = seeded(DirectStressHead(CHANNELS, HIDDEN))
    x = features()
    scalars_only = x.clone()
    scalars_only[:, 1:] = 0
    isotropic = head(scalars_only, BULK, BATCH, NATOMS)
    trace = torch.diagonal(isotropic, dim1=1, dim2=2).sum(-1)
    assert (isotropic - trace.view(-1, 1, 1) / 3 * torch.eye(3, dtype=DTYPE)).abs().max() < 1e-15
    assert trace.abs().min() > 1e-3
    # The degree-two part adds a traceless matrix and leaves the trace alone.
    full = head(x, BULK, BATCH, NATOMS)
    assert (torch.diagonal(full, dim1=1, dim2=2).sum(-1) - trace).abs().max() < 1e-14
    assert (full - isotropic).abs().max() > 1e-3


def test_direct_stress_is_an_average_over_each_structures_atoms():
    """Stress is intensive: a structure's stress is the mean of per-atom parts, so a copy of
    every atom (a supercell) leaves it unchanged, and structures do not mix."""
    head = seeded(DirectStressHead(CHANNELS, HIDDEN))
    x = features()
    stress = head(x, BULK, BATCH, NATOMS)
    doubled = head(torch.cat([x, x]), torch.cat([BULK, BULK]), torch.cat([BATCH, BATCH]), 2 * NATOMS)
    assert (doubled - stress).abs().max() < 1e-14
    alone = head(x[3:], BULK[3:], torch.zeros(2, dtype=torch.long), NATOMS[1:])
    assert (alone[0] - stress[1]).abs().max() < 1e-14


def test_sum_per_structure():
    values = torch.arange(10, dtype=DTYPE).view(5, 2)
    assert sum_per_structure(values, BATCH, 2).tolist() == [[6.0, 9.0], [14.0, 16.0]]
