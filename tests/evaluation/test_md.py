"""The NVE energy-conservation test.

EMT, a smooth analytic potential, run with the same integrator, time step and cell, sets the
floor: what velocity Verlet itself does to the total energy. An untrained conservative eSEN
must stay within a small factor of that floor; the same network with its direct (non-gradient)
force head must drift measurably more, as the eSEN paper describes.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from PIL import Image

from esen_train.cli.train import main
from esen_train.evaluation.calculator import ESENCalculator
from esen_train.evaluation.md import energy_drift, run_nve
from esen_train.plots import plot_energy_vs_time
from tests.evaluation_helpers import write_checkpoint

# One protocol for every potential: 8-atom fcc Cu, 300 K, 2 fs, 100 steps (0.2 ps).
STEPS = 100
TIMESTEP_FS = 2.0
TEMPERATURE_K = 300.0
# A conservative model may exceed EMT's drift and largest deviation by at most this factor
# (a potential's stiffness changes the O(dt^2) fluctuation of velocity Verlet, so not 1).
CONSERVATIVE_FACTOR = 3.0
# ... and the direct head must drift at least this many times more than the conservative one.
DIRECT_OVER_CONSERVATIVE = 10.0


def copper() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.61).repeat(2)  # primitive cell x 8
    atoms.rattle(0.05, seed=1)  # off the lattice, so every force is non-zero from the start
    return atoms


@pytest.fixture(scope="module")
def emt_floor() -> dict:
    return run_nve(copper(), EMT(), STEPS, TIMESTEP_FS, TEMPERATURE_K, seed=0)


def test_energy_drift_is_the_slope_of_a_line_fit():
    time_ps = np.linspace(0.0, 2.0, 401)
    num_atoms = 10
    # 3 meV/atom/ps of drift plus an oscillation with zero mean slope over whole periods.
    per_atom_mev = 3.0 * time_ps + 0.5 * np.sin(2 * np.pi * time_ps * 5)
    total_ev = -50.0 + per_atom_mev * num_atoms / 1000.0
    summary = energy_drift(time_ps, total_ev, num_atoms)
    assert summary["drift_mev_per_atom_per_ps"] == pytest.approx(3.0, rel=0.02)
    assert summary["max_deviation_mev_per_atom"] == pytest.approx(np.max(np.abs(per_atom_mev)), rel=1e-9)
    assert summary["fluctuation_mev_per_atom"] == pytest.approx(np.std(per_atom_mev), rel=1e-9)


def test_emt_sets_a_small_floor_and_is_reproducible(emt_floor):
    atoms = copper()
    before = atoms.positions.copy()
    again = run_nve(atoms, EMT(), STEPS, TIMESTEP_FS, TEMPERATURE_K, seed=0)
    np.testing.assert_array_equal(atoms.positions, before)  # the input is not moved
    np.testing.assert_array_equal(again["potential_energy_ev"], emt_floor["potential_energy_ev"])
    assert emt_floor["steps"] == STEPS and len(emt_floor["time_ps"]) == STEPS + 1
    assert emt_floor["time_ps"][-1] == pytest.approx(STEPS * TIMESTEP_FS / 1000.0)
    # Velocity Verlet with a smooth potential: no drift worth the name, sub-meV wobble.
    assert abs(emt_floor["drift_mev_per_atom_per_ps"]) < 0.1
    assert emt_floor["max_deviation_mev_per_atom"] < 0.2
    # ... while energy really moves between kinetic and potential (the dynamics is not idle).
    assert np.ptp(emt_floor["kinetic_energy_ev"]) * 1000 / len(atoms) > 5.0


def test_a_different_seed_draws_different_velocities():
    first = run_nve(copper(), EMT(), 5, TIMESTEP_FS, TEMPERATURE_K, seed=0)
    second = run_nve(copper(), EMT(), 5, TIMESTEP_FS, TEMPERATURE_K, seed=1)
    assert first["kinetic_energy_ev"][0] != second["kinetic_energy_ev"][0]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="steps"):
        run_nve(copper(), EMT(), 0, TIMESTEP_FS, TEMPERATURE_K)
    with pytest.raises(ValueError, match="timestep"):
        run_nve(copper(), EMT(), 10, -1.0, TEMPERATURE_K)
    # A one-atom cell: nothing moves once the net momentum is removed (ASE's rescaling gave NaN).
    with pytest.raises(ValueError, match="at least 2 atoms, the structure has 1"):
        run_nve(bulk("Cu", "fcc", a=3.61), EMT(), 10, TIMESTEP_FS, TEMPERATURE_K)


def test_energy_plot_is_a_png(emt_floor, tmp_path):
    out = plot_energy_vs_time(
        emt_floor["time_ps"], emt_floor["potential_energy_ev"], emt_floor["kinetic_energy_ev"],
        emt_floor["num_atoms"], tmp_path / "plots" / "energy.png",
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 300
    assert list(out.parent.iterdir()) == [out]  # no temporary file left behind


@pytest.fixture(scope="module")
def esen_runs() -> dict:
    """The same untrained tiny network (float64, with direct heads), conservative and direct forces."""
    direct = ESENCalculator.from_config("tiny", seed=0, forces="direct", dtype=torch.float64)
    conservative = ESENCalculator(direct.model, forces="conservative", dtype=torch.float64)
    return {
        "conservative": run_nve(copper(), conservative, STEPS, TIMESTEP_FS, TEMPERATURE_K, seed=0),
        "direct": run_nve(copper(), direct, STEPS, TIMESTEP_FS, TEMPERATURE_K, seed=0),
    }


def test_conservative_esen_conserves_energy_like_emt(esen_runs, emt_floor):
    run = esen_runs["conservative"]
    floor_drift = abs(emt_floor["drift_mev_per_atom_per_ps"])
    floor_deviation = emt_floor["max_deviation_mev_per_atom"]
    assert abs(run["drift_mev_per_atom_per_ps"]) <= CONSERVATIVE_FACTOR * floor_drift
    assert run["max_deviation_mev_per_atom"] <= CONSERVATIVE_FACTOR * floor_deviation


def test_direct_forces_drift_measurably_more(esen_runs, emt_floor):
    conservative, direct = esen_runs["conservative"], esen_runs["direct"]
    assert abs(direct["drift_mev_per_atom_per_ps"]) >= DIRECT_OVER_CONSERVATIVE * max(
        abs(conservative["drift_mev_per_atom_per_ps"]), abs(emt_floor["drift_mev_per_atom_per_ps"])
    )
    assert direct["max_deviation_mev_per_atom"] >= DIRECT_OVER_CONSERVATIVE * conservative["max_deviation_mev_per_atom"]


def test_md_command_writes_json_and_plot(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "run", stage="direct")
    structure = tmp_path / "cu.xyz"
    copper().write(structure)
    code = main([
        "md", str(checkpoint), "--structure", str(structure), "--steps", "10", "--timestep", "2",
        "--temperature", "300", "--forces", "conservative", "--json", "--out", str(tmp_path / "md"),
    ])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 10 and report["forces"] == "conservative" and report["num_atoms"] == 8
    for key in ("drift_mev_per_atom_per_ps", "max_deviation_mev_per_atom", "fluctuation_mev_per_atom"):
        assert np.isfinite(report[key])
    assert (tmp_path / "md" / "energy_vs_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "md" / "md.json").read_text()) == report


def test_md_command_reports_a_missing_structure(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "run", stage="direct")
    code = main(["md", str(checkpoint), "--structure", str(tmp_path / "nope.xyz"), "--steps", "5",
                 "--timestep", "1", "--temperature", "300"])
    assert code == 2
    assert "nope.xyz" in capsys.readouterr().err


def test_md_command_refuses_a_one_atom_structure_naming_the_file(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "run", stage="direct")
    structure = tmp_path / "primitive.xyz"
    bulk("Cu", "fcc", a=3.61).write(structure)
    code = main(["md", str(checkpoint), "--structure", str(structure), "--steps", "5",
                 "--timestep", "1", "--temperature", "300", "--out", str(tmp_path / "md")])
    assert code == 2
    assert f"{structure}: NVE needs at least 2 atoms, the structure has 1" in capsys.readouterr().err
    assert not (tmp_path / "md").exists()
