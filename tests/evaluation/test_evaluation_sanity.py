"""What `md`, `eval` and the ASE calculator refuse: dynamics that blow up, structures no
physical system has, and elements the checkpoint was not trained on. Real checkpoints on
disk, real commands run in-process."""
from __future__ import annotations

import json

import ase.io
import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT

import esen_train.evaluation.calculator as calculator_module
from esen_train.cli.train import main
from esen_train.data.validate import UnphysicalGeometry
from esen_train.evaluation.calculator import ESENCalculator, UntrainedElements
from esen_train.evaluation.md import UnstableDynamics, run_nve
from esen_train.model.model_file import CheckpointError
from tests.evaluation_helpers import checkpoint_payload, fresh_model, labelled_copper_structures


def copper():
    atoms = bulk("Cu", "fcc", a=3.61).repeat(2)
    atoms.rattle(0.05, seed=1)
    return atoms


def write_checkpoint(run_dir, elements=(29, 79), energy_scale: float | None = None):
    """A conservative-stage checkpoint of a fresh tiny model trained, it says, on `elements`."""
    model = fresh_model(direct_forces=False)
    if energy_scale is not None:
        model.set_energy_scale(energy_scale)
    payload = checkpoint_payload(model, "conservative")
    if elements is not None:
        payload["elements"] = list(elements)
    directory = run_dir / "checkpoints" / "conservative" / "best"
    directory.mkdir(parents=True)
    torch.save(payload, directory / "model.pt")
    return directory


def md(checkpoint, structure, out, *extra):
    return main(["md", str(checkpoint), "--structure", str(structure), "--steps", "30", "--timestep", "2",
                 "--temperature", "300", "--out", str(out), *extra])


# ----- dynamics that blow up -----------------------------------------------------------------

def test_a_time_step_too_long_stops_the_dynamics_at_the_temperature_bound():
    """EMT copper at 50 fs: velocity Verlet is unstable and heats 300 K to billions of K."""
    with pytest.raises(UnstableDynamics) as error:
        run_nve(copper(), EMT(), steps=40, timestep_fs=50, temperature_K=300)
    message = str(error.value)
    assert "became unstable at step" in message and "above the bound of 3,000 K" in message
    result = error.value.result
    step = result["stopped_at_step"]
    assert 0 < step < 40 and len(result["time_ps"]) == step + 1
    assert result["final_temperature_K"] > 3000 and result["max_temperature_K"] == 3000
    # The same run at 2 fs stays within the bounds.
    assert run_nve(copper(), EMT(), steps=40, timestep_fs=2, temperature_K=300)["final_temperature_K"] < 3000


def test_the_energy_bound_is_the_change_of_the_total_energy():
    with pytest.raises(UnstableDynamics, match=r"total energy moved by [-+][0-9.e-]+ eV per atom, beyond the bound of ±1e-06"):
        run_nve(copper(), EMT(), steps=40, timestep_fs=10, temperature_K=300, max_energy_change_ev_per_atom=1e-6)
    with pytest.raises(ValueError, match="bounds must be positive"):
        run_nve(copper(), EMT(), steps=4, timestep_fs=2, temperature_K=300, max_temperature_K=0)


def test_md_command_exits_non_zero_and_keeps_the_trajectory_so_far(tmp_path, capsys):
    """A model whose forces are 10^4 times too large blows up at 2 fs, as a bad model does."""
    checkpoint = write_checkpoint(tmp_path / "run", energy_scale=1e4)
    structure = tmp_path / "cu.xyz"
    copper().write(structure)
    code = md(checkpoint, structure, tmp_path / "md", "--max-temperature", "2000")
    assert code == 3
    error = capsys.readouterr().err
    assert "esen-train md: the dynamics became unstable at step" in error and "bound of 2,000 K" in error
    report = json.loads((tmp_path / "md" / "md.json").read_text())
    assert report["stopped"] in error and report["max_temperature_K"] == 2000
    assert report["stopped_at_step"] < 30
    assert (tmp_path / "md" / "energy_vs_time.png").read_bytes()[:4] == b"\x89PNG"


# ----- structures no physical system has ----------------------------------------------------

def test_md_names_overlapping_atoms_in_the_structure_file(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "run")
    atoms = copper()
    atoms.positions[5] = atoms.positions[2] + [0.05, 0.0, 0.0]
    structure = tmp_path / "overlap.xyz"
    atoms.write(structure)
    assert md(checkpoint, structure, tmp_path / "md") == 2
    error = capsys.readouterr().err
    assert f"{structure}: field 'positions': atom 2 is 0.0500 Å from atom 5 (Cu-Cu" in error
    assert "overlapping atoms" in error and "finite" not in error


def test_a_cell_in_nm_is_refused_before_any_neighbour_list(tmp_path, capsys, monkeypatch):
    """4 Cu atoms in a cell given in nm would get 177,608 edges at a 6 Å cutoff."""
    def no_graph(*args, **kwargs):
        raise AssertionError("a neighbour list was built for a structure that should be refused")

    monkeypatch.setattr(calculator_module, "build_neighbor_list", no_graph)
    checkpoint = write_checkpoint(tmp_path / "run")
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.set_cell(atoms.cell / 10, scale_atoms=True)
    structure = tmp_path / "nm.xyz"
    atoms.write(structure)
    assert md(checkpoint, structure, tmp_path / "md") == 2
    assert "cell looks like nm, not Å" in capsys.readouterr().err
    calculator = ESENCalculator.from_checkpoint(checkpoint)
    with pytest.raises(UnphysicalGeometry, match="structure 1 of the batch: .*cell looks like nm"):
        calculator.calculate_batch([bulk("Cu", "fcc", a=3.61), atoms])


# ----- elements the checkpoint was not trained on -------------------------------------------

def test_the_calculator_refuses_untrained_elements_by_name(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "run", elements=(29, 79))
    calculator = ESENCalculator.from_checkpoint(checkpoint)
    platinum = bulk("Pt", "fcc", a=3.92).repeat(2)
    platinum.numbers[0] = 29
    platinum.calc = calculator
    with pytest.raises(UntrainedElements, match=r"Pt \(Z=78\) not among the elements .*model.pt was trained on \(Cu Au\)"):
        platinum.get_potential_energy()
    gold_copper = bulk("Cu", "fcc", a=3.7).repeat(2)
    gold_copper.numbers[::2] = 79
    gold_copper.calc = calculator
    assert np.isfinite(gold_copper.get_potential_energy())
    # A checkpoint that does not record its elements is used as it is; one that records
    # something else than atomic numbers is refused.
    old = ESENCalculator.from_checkpoint(write_checkpoint(tmp_path / "old", elements=None))
    assert old.elements is None and np.isfinite(old.calculate_batch([platinum])[0]["energy"])
    broken = write_checkpoint(tmp_path / "broken", elements=("Cu",))
    with pytest.raises(CheckpointError, match="field 'elements'"):
        ESENCalculator.from_checkpoint(broken)


def test_md_and_eval_refuse_untrained_elements_naming_file_and_structure(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "run", elements=(29,))
    structure = tmp_path / "pt.xyz"
    bulk("Pt", "fcc", a=3.92).repeat(2).write(structure)
    assert md(checkpoint, structure, tmp_path / "md") == 2
    assert f"{structure}: Pt (Z=78) not among the elements" in capsys.readouterr().err

    data = tmp_path / "labelled.xyz"
    ase.io.write(data, labelled_copper_structures(), format="extxyz")  # Cu, Cu-Au, then CO
    assert main(["eval", str(checkpoint), "--data", str(data), "--out", str(tmp_path / "eval")]) == 2
    assert f"{data}:1: Au (Z=79) not among the elements" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()
