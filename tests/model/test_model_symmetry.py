"""Reflection is not a symmetry of eSEN (float64). The symmetries it has (rotation,
translation, permutation, supercells) are checked for several configs in
tests/model/test_conformance.py."""
from __future__ import annotations

import torch
from ase.build import molecule

from tests.model_helpers import (
    rattled_molecule,
    relative_error,
    tiny_model,
    to_batch,
    transformed,
)

TIGHT = 1e-10


def test_reflection_is_not_a_symmetry_of_the_model():
    """The SO(2) convolutions (complex weights on the +m/-m pairs) can tell a structure from its
    mirror image: eSEN is SO(3)-, not O(3)-equivariant, like fairchem's. A chiral structure and
    its mirror image get different energies; an achiral one (water, whose mirror image in any
    plane is a rotated copy of itself) keeps its energy, through rotation invariance."""
    model = tiny_model()
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
