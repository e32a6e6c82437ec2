"""Symmetries of eSEN in float64: rotation, reflection, translation, permutation, supercells."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import make_supercell, molecule

from tests.model_helpers import (
    mixed_batch,
    random_rotation,
    rattled_alloy,
    rattled_molecule,
    relative_error,
    tiny_model,
    to_batch,
    transformed,
)

TIGHT = 1e-10


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def batch(model):
    return mixed_batch(model.config.cutoff)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_energy_invariant_forces_and_stress_equivariant_under_rotation(model, batch, seed):
    rotation = random_rotation(seed)
    out = model(batch)
    rotated = model(transformed(batch, rotation))
    assert relative_error(rotated["energy"], out["energy"]) < TIGHT
    assert relative_error(rotated["forces"], out["forces"] @ rotation.T) < TIGHT
    assert relative_error(rotated["stress"], rotation @ out["stress"] @ rotation.T) < TIGHT


def test_direct_heads_are_rotation_equivariant(batch):
    model = tiny_model(direct_forces=True)
    rotation = random_rotation(7)
    out = model(batch, forces="direct")
    rotated = model(transformed(batch, rotation), forces="direct")
    assert relative_error(rotated["energy"], out["energy"]) < TIGHT
    assert relative_error(rotated["forces"], out["forces"] @ rotation.T) < TIGHT
    assert relative_error(rotated["stress"], rotation @ out["stress"] @ rotation.T) < TIGHT
    assert torch.allclose(out["stress"], out["stress"].transpose(1, 2))


def test_grid_feed_forward_is_equivariant_up_to_its_sampling_error(batch):
    """eSEN's "grid" MLP samples features on a finite sphere grid, so rotating the input only
    approximately rotates the output. Measured here at eSEN's default resolution; the error is
    small and shrinks on a finer grid, and the energy stays smooth (it is still conservative)."""
    rotation = random_rotation(3)
    errors = []
    for resolution in (0, 16):
        model = tiny_model(feed_forward="grid", grid_resolution=resolution)
        out = model(batch)
        rotated = model(transformed(batch, rotation))
        errors.append(relative_error(rotated["forces"], out["forces"] @ rotation.T))
    assert errors[0] < 0.05
    assert errors[1] < errors[0] / 3


def test_reflection_is_not_a_symmetry_of_the_model(model):
    """The SO(2) convolutions (complex weights on the +m/-m pairs) can tell a structure from its
    mirror image: eSEN is SO(3)-, not O(3)-equivariant, like fairchem's. A chiral structure and
    its mirror image get different energies; an achiral one (water, whose mirror image in any
    plane is a rotated copy of itself) keeps its energy, through rotation invariance."""
    normal = torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64)
    normal = normal / normal.norm()
    mirror = torch.eye(3, dtype=torch.float64) - 2 * torch.outer(normal, normal)
    chiral = to_batch([rattled_molecule()], model.config.cutoff)
    energy = model(chiral, forces="none")["energy"]
    mirrored = model(transformed(chiral, mirror), forces="none")["energy"]
    assert relative_error(mirrored, energy) > 1e-8

    achiral = to_batch([molecule("H2O")], model.config.cutoff)
    energy = model(achiral, forces="none")["energy"]
    mirrored = model(transformed(achiral, mirror), forces="none")["energy"]
    assert relative_error(mirrored, energy) < TIGHT


def test_translation_invariance(model, batch):
    out = model(batch)
    shifted = batch.clone()
    shifted.pos = batch.pos + torch.tensor([1.3, -0.7, 2.1], dtype=torch.float64)
    moved = model(shifted)
    assert relative_error(moved["energy"], out["energy"]) < TIGHT
    assert relative_error(moved["forces"], out["forces"]) < TIGHT
    assert relative_error(moved["stress"], out["stress"]) < TIGHT


def test_translation_and_wrapping_into_the_cell_rebuilds_the_same_energy(model):
    atoms = rattled_alloy()
    out = model(to_batch([atoms], model.config.cutoff))
    atoms.positions += np.array([2.2, -1.4, 0.9])
    atoms.wrap()
    moved = model(to_batch([atoms], model.config.cutoff))
    assert relative_error(moved["energy"], out["energy"]) < TIGHT
    assert relative_error(moved["forces"], out["forces"]) < TIGHT
    assert relative_error(moved["stress"], out["stress"]) < TIGHT


def test_permutation_invariance(model):
    structures = [rattled_alloy(), rattled_molecule()]
    out = model(to_batch(structures, model.config.cutoff))
    orders = [np.random.default_rng(seed).permutation(len(atoms)) for seed, atoms in enumerate(structures)]
    permuted = model(to_batch([atoms[order] for atoms, order in zip(structures, orders)], model.config.cutoff))
    offsets = np.cumsum([0] + [len(atoms) for atoms in structures[:-1]])
    global_order = torch.tensor(np.concatenate([order + offset for order, offset in zip(orders, offsets)]))
    assert relative_error(permuted["energy"], out["energy"]) < TIGHT
    assert relative_error(permuted["forces"], out["forces"][global_order]) < TIGHT
    assert relative_error(permuted["stress"], out["stress"]) < TIGHT


def test_supercell_is_extensive(model):
    """2x2x2 supercell: 8x the energy (references included), same forces per atom, same stress."""
    atoms = rattled_alloy()
    supercell = make_supercell(atoms, 2 * np.eye(3))
    out = model(to_batch([atoms], model.config.cutoff))
    big = model(to_batch([supercell], model.config.cutoff))
    assert relative_error(big["energy"], 8 * out["energy"]) < TIGHT
    # make_supercell repeats the cell's atoms block by block, in the original order.
    assert relative_error(big["forces"], out["forces"].repeat(8, 1)) < TIGHT
    assert relative_error(big["stress"], out["stress"]) < TIGHT
