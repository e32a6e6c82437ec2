"""The model settings imported fairchem models need, in float64: charge and spin inputs,
fairchem's normalisation (energy mean, separate force and stress scales) and the envelope
as a setting. Symmetries and gradients are checked again with each of them on."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import molecule

from esen_train.calculator import ESENCalculator
from tests.model_helpers import (
    DTYPE,
    mixed_batch,
    random_rotation,
    rattled_molecule,
    relative_error,
    tiny_model,
    to_batch,
    to_data,
    transformed,
)

TIGHT = 1e-10


def _with_charge_spin(batch, charge, spin):
    out = batch.clone()
    out.charge = torch.tensor(charge, dtype=torch.float64)
    out.spin = torch.tensor(spin, dtype=torch.float64)
    return out


@pytest.fixture(scope="module", params=["sinusoidal", "table"])
def charged_model(request):
    return tiny_model(charge_spin=request.param)


@pytest.fixture(scope="module")
def batch():
    return mixed_batch(tiny_model().config.cutoff)


def test_charge_spin_model_is_invariant_and_equivariant(charged_model, batch):
    charged = _with_charge_spin(batch, [1.0, -2.0, 0.0], [2.0, 1.0, 3.0])
    rotation = random_rotation(4)
    out = charged_model(charged)
    rotated = charged_model(transformed(charged, rotation))
    assert relative_error(rotated["energy"], out["energy"]) < TIGHT
    assert relative_error(rotated["forces"], out["forces"] @ rotation.T) < TIGHT
    assert relative_error(rotated["stress"], rotation @ out["stress"] @ rotation.T) < TIGHT


def test_charge_and_spin_change_the_energy_of_their_own_structure_only(charged_model, batch):
    base = charged_model(_with_charge_spin(batch, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]))["energy"]
    changed = charged_model(_with_charge_spin(batch, [0.0, 1.0, 0.0], [1.0, 1.0, 3.0]))["energy"]
    assert changed[0] == base[0]
    assert (changed[1:] - base[1:]).abs().min() > 1e-6


def test_a_batch_without_charge_and_spin_means_zero(charged_model, batch):
    assert torch.equal(charged_model(batch)["energy"],
                       charged_model(_with_charge_spin(batch, [0.0] * 3, [0.0] * 3))["energy"])


def test_forces_of_a_charged_structure_are_the_energy_gradient(charged_model):
    data = _with_charge_spin(to_batch([rattled_molecule()], charged_model.config.cutoff), [-1.0], [2.0])
    forces = charged_model(data, stress=False)["forces"]
    step, atom, axis = 1e-5, 3, 1
    energies = []
    for sign in (1, -1):
        moved = data.clone()
        moved.pos = data.pos.clone()
        moved.pos[atom, axis] += sign * step
        energies.append(charged_model(moved, forces="none")["energy"])
    derivative = (energies[0] - energies[1]) / (2 * step)
    assert abs(float(-derivative) - float(forces[atom, axis])) < 1e-7


def test_the_table_refuses_charges_it_has_no_row_for(batch):
    model = tiny_model(charge_spin="table")
    with pytest.raises(ValueError, match="charge must be an integer in -100..100"):
        model(_with_charge_spin(batch, [0.5, 0.0, 0.0], [1.0, 1.0, 1.0]), forces="none")
    with pytest.raises(ValueError, match="spin must be an integer in 0..100"):
        model(_with_charge_spin(batch, [0.0, 0.0, 0.0], [1.0, 101.0, 1.0]), forces="none")


def test_sinusoidal_needs_an_even_channel_count():
    with pytest.raises(ValueError, match="even sphere_channels"):
        tiny_model(charge_spin="sinusoidal", sphere_channels=15)


def test_the_calculator_reads_charge_and_spin_from_atoms_info():
    model = tiny_model(charge_spin="sinusoidal")
    calculator = ESENCalculator(model, dtype=DTYPE)
    atoms = molecule("H2O")
    neutral = calculator.calculate_batch([atoms.copy()])[0]["energy"]
    anion = atoms.copy()
    anion.info.update(charge=-1, spin=2)
    charged = calculator.calculate_batch([anion])[0]["energy"]
    data = to_data(anion, model.config.cutoff)
    expected = model(_with_charge_spin(to_batch([anion], model.config.cutoff), [-1.0], [2.0]), forces="none")
    assert charged == pytest.approx(float(expected["energy"][0]), rel=1e-12)
    assert abs(charged - neutral) > 1e-6 and data.pos.dtype == DTYPE


# ----- normalisation ---------------------------------------------------------------------
def test_separate_scales_and_mean_act_as_fairchem_normalisers(batch):
    model = tiny_model()
    reference = model(batch)  # energy_scale = force_scale = stress_scale = 1.7, mean 0
    model.set_normalisation(energy_mean=-3.25, energy_scale=1.7, force_scale=0.85, stress_scale=3.4)
    out = model(batch)
    assert torch.allclose(out["energy"], reference["energy"] - 3.25, rtol=0, atol=1e-12)
    assert relative_error(out["forces"], reference["forces"] / 2) < TIGHT
    assert relative_error(out["stress"], reference["stress"] * 2) < TIGHT
    direct = tiny_model(direct_forces=True)
    expected = direct(batch, forces="direct")
    direct.set_normalisation(energy_mean=0.0, energy_scale=1.7, force_scale=0.85, stress_scale=3.4)
    got = direct(batch, forces="direct")
    assert relative_error(got["forces"], expected["forces"] / 2) < TIGHT
    assert relative_error(got["stress"], expected["stress"] * 2) < TIGHT


def test_normalisation_buffers_stay_float64_and_are_checked(batch):
    model = tiny_model().float()
    for name in ("energy_mean", "energy_scale", "force_scale", "stress_scale", "reference_energies"):
        assert getattr(model, name).dtype == torch.float64, name
    with pytest.raises(ValueError, match="force scale must be > 0"):
        model.set_normalisation(energy_mean=0.0, energy_scale=1.0, force_scale=0.0, stress_scale=1.0)


# ----- envelope --------------------------------------------------------------------------
def test_without_the_envelope_the_model_stays_symmetric_but_jumps_at_the_cutoff(batch):
    model = tiny_model(envelope=False)
    rotation = random_rotation(5)
    out = model(batch)
    rotated = model(transformed(batch, rotation))
    assert relative_error(rotated["energy"], out["energy"]) < TIGHT
    assert relative_error(rotated["forces"], out["forces"] @ rotation.T) < TIGHT
    # A third atom just inside and just outside the cutoff of the first: without the envelope
    # its message is cut off abruptly (with it, the energy is continuous:
    # tests/model/test_model_smoothness.py).
    cutoff = model.config.cutoff
    energies = {}
    for envelope in (True, False):
        trimer = tiny_model(envelope=envelope)
        for name, distance in (("inside", cutoff - 1e-7), ("outside", cutoff + 1e-7)):
            atoms = molecule("H2O")
            atoms.positions = np.array([[0.0, 0.0, 0.0], [1.0, 0.3, 0.2],
                                        [distance * 0.6, distance * 0.48, distance * 0.64]])
            energies[envelope, name] = float(trimer(to_batch([atoms], cutoff), forces="none")["energy"][0])
    # (the step of 2e-7 Å also moves the atom relative to the second one: a change of order 1e-8)
    assert abs(energies[True, "inside"] - energies[True, "outside"]) < 1e-7
    assert abs(energies[False, "inside"] - energies[False, "outside"]) > 1e-4
