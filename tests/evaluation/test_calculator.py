"""ESENCalculator against the model itself, and checkpoint loading with its errors."""
from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.calculator import PropertyNotImplementedError
from ase.stress import full_3x3_to_voigt_6_stress
from torch_geometric.data import Batch, Data

from esen_train.data.dataset import LMDBDataset
from esen_train.data.emt import generate_emt_dataset
from esen_train.data.neighbors import build_neighbor_list
from esen_train.evaluation.calculator import ESENCalculator
from esen_train.model.config import load_model_config
from esen_train.model.model_file import CheckpointError, load_model, resolve_checkpoint
from tests.evaluation_helpers import checkpoint_payload, fresh_model, write_checkpoint

F64 = dict(rtol=1e-10, atol=1e-10)


def structures():
    """A periodic alloy cell, a skewed periodic cell, and a molecule."""
    alloy = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    alloy.numbers[::3] = 79
    alloy.rattle(0.1, seed=0)
    skewed = bulk("Al", "fcc", a=4.05)  # primitive cell: 1 atom, neighbours from many images
    skewed = skewed.repeat((2, 2, 1))
    skewed.rattle(0.05, seed=1)
    water = molecule("H2O")
    return [alloy, skewed, water]


def reference_batch(atoms_list, cutoff):
    """The batch of ARCHITECTURE.md built here, independently of the calculator, in float64."""
    data = []
    for atoms in atoms_list:
        cell = atoms.cell.array if atoms.pbc.any() else np.zeros((3, 3))
        edge_index, offsets = build_neighbor_list(atoms.positions, cell, atoms.pbc, cutoff)
        data.append(Data(
            pos=torch.tensor(atoms.positions), atomic_numbers=torch.tensor(atoms.numbers),
            cell=torch.tensor(cell).unsqueeze(0), pbc=torch.tensor(atoms.pbc).unsqueeze(0),
            natoms=torch.tensor([len(atoms)]), edge_index=torch.tensor(edge_index),
            cell_offsets=torch.tensor(offsets, dtype=torch.float64), num_nodes=len(atoms),
        ))
    return Batch.from_data_list(data)


@pytest.fixture(scope="module")
def model64():
    return fresh_model(direct_forces=True).double().eval()


@pytest.mark.parametrize("forces", ["conservative", "direct"])
def test_calculator_equals_the_model_single_and_batched(model64, forces):
    calculator = ESENCalculator(model64, forces=forces, dtype=torch.float64)
    atoms_list = structures()
    expected = model64(reference_batch(atoms_list, model64.config.cutoff), forces=forces, stress=True)
    energy = expected["energy"].detach().numpy()
    force_rows = np.split(expected["forces"].detach().numpy(), np.cumsum([len(a) for a in atoms_list])[:-1])

    batched = calculator.calculate_batch(atoms_list)
    for index, (atoms, result) in enumerate(zip(atoms_list, batched)):
        single = atoms.copy()
        single.calc = calculator
        assert single.get_potential_energy() == pytest.approx(energy[index], rel=1e-10)
        assert result["energy"] == pytest.approx(energy[index], rel=1e-10)
        np.testing.assert_allclose(single.get_forces(), force_rows[index], **F64)
        np.testing.assert_allclose(result["forces"], force_rows[index], **F64)
        if atoms.pbc.all():
            voigt = full_3x3_to_voigt_6_stress(expected["stress"][index].detach().numpy())
            np.testing.assert_allclose(single.get_stress(), voigt, **F64)
            np.testing.assert_allclose(result["stress"], voigt, **F64)
        else:
            assert "stress" not in result
            with pytest.raises(PropertyNotImplementedError):
                single.get_stress()
    assert np.abs(energy).max() > 0 and np.abs(expected["forces"].detach().numpy()).max() > 1e-6


def test_calculator_equals_the_model_on_the_readers_batch(model64, tmp_path):
    """Atoms given to the calculator and the same structures read by the training data path
    (LMDB dataset -> LMDBDataset -> Batch) give the same model outputs."""
    generate_emt_dataset(tmp_path / "emt", num=4, seed=0)
    dataset = LMDBDataset(tmp_path / "emt", cutoff=model64.config.cutoff, dtype=torch.float64)
    batch = Batch.from_data_list([dataset[i] for i in range(len(dataset))])
    expected = model64(batch, forces="conservative", stress=True)
    records = [dataset.read_record(i) for i in range(len(dataset))]
    atoms_list = [Atoms(r.atomic_numbers, positions=r.positions, cell=r.cell, pbc=r.pbc) for r in records]
    results = ESENCalculator(model64, dtype=torch.float64).calculate_batch(atoms_list)
    np.testing.assert_allclose([r["energy"] for r in results], expected["energy"].numpy(), **F64)
    np.testing.assert_allclose(np.concatenate([r["forces"] for r in results]), expected["forces"].numpy(), **F64)
    voigt = [full_3x3_to_voigt_6_stress(stress) for stress in expected["stress"].numpy()]
    np.testing.assert_allclose([r["stress"] for r in results], voigt, **F64)


def test_conservative_forces_and_stress_are_energy_derivatives(model64):
    calculator = ESENCalculator(model64, forces="conservative", dtype=torch.float64)
    atoms = structures()[0]
    atoms.calc = calculator
    forces, stress = atoms.get_forces(), atoms.get_stress(voigt=False)
    step = 1e-4
    for atom, axis in ((0, 0), (3, 2)):
        energies = []
        for sign in (1, -1):
            moved = atoms.copy()
            moved.positions[atom, axis] += sign * step
            moved.calc = calculator
            energies.append(moved.get_potential_energy())
        assert forces[atom, axis] == pytest.approx(-(energies[0] - energies[1]) / (2 * step), rel=1e-6, abs=1e-9)
    energies = []
    for sign in (1, -1):
        strain = np.eye(3)
        strain[0, 1] = strain[1, 0] = sign * step / 2  # symmetric xy shear
        strained = atoms.copy()
        strained.set_cell(atoms.cell.array @ strain, scale_atoms=True)
        strained.calc = calculator
        energies.append(strained.get_potential_energy())
    assert stress[0, 1] == pytest.approx((energies[0] - energies[1]) / (2 * step) / atoms.get_volume(), rel=1e-6, abs=1e-9)


def test_float32_agrees_with_float64(model64):
    atoms_list = structures()
    single = ESENCalculator(fresh_model(direct_forces=True), dtype=torch.float32).calculate_batch(atoms_list)
    double = ESENCalculator(model64, dtype=torch.float64).calculate_batch(atoms_list)
    for low, high in zip(single, double):
        assert low["energy"] == pytest.approx(high["energy"], rel=1e-5, abs=1e-5)
        np.testing.assert_allclose(low["forces"], high["forces"], rtol=1e-3, atol=1e-5)


def test_from_config_is_seeded_and_leaves_the_global_rng_alone():
    atoms = structures()[:1]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = ESENCalculator.from_config("tiny", seed=7, dtype=torch.float64).calculate_batch(atoms)[0]
    assert torch.equal(torch.get_rng_state(), state)
    again = ESENCalculator.from_config("tiny", seed=7, dtype=torch.float64).calculate_batch(atoms)[0]
    other = ESENCalculator.from_config("tiny", seed=8, dtype=torch.float64).calculate_batch(atoms)[0]
    assert first["energy"] == again["energy"] and first["energy"] != other["energy"]


def test_the_public_import_path():
    from esen_train.calculator import ESENCalculator as public

    assert public is ESENCalculator


def test_direct_forces_need_a_direct_head():
    with pytest.raises(ValueError, match="direct force heads"):
        ESENCalculator(fresh_model(direct_forces=False), forces="direct")
    with pytest.raises(ValueError, match="forces must be one of"):
        ESENCalculator(fresh_model(), forces="gradient")


def test_from_checkpoint_uses_the_ema_weights(tmp_path):
    model = fresh_model(direct_forces=False, seed=0)
    ema = fresh_model(direct_forces=False, seed=1).state_dict()
    directory = write_checkpoint(tmp_path / "run", stage="conservative", model=model, ema=ema)
    atoms = structures()[:1]
    calculator = ESENCalculator.from_checkpoint(tmp_path / "run", dtype=torch.float64)
    assert calculator.checkpoint.path == directory / "model.pt" and calculator.checkpoint.used_ema
    expected_model = fresh_model(direct_forces=False, seed=1).double()
    expected = ESENCalculator(expected_model, dtype=torch.float64).calculate_batch(atoms)[0]
    assert calculator.calculate_batch(atoms)[0]["energy"] == pytest.approx(expected["energy"], rel=1e-12)
    raw, info = load_model(directory, dtype=torch.float64, use_ema=False)
    assert not info.used_ema
    for key, tensor in model.state_dict().items():
        assert torch.equal(raw.state_dict()[key], tensor.double() if tensor.is_floating_point() else tensor)


def test_a_run_directory_means_its_last_stage_best(tmp_path):
    run = tmp_path / "run"
    direct = write_checkpoint(run, stage="direct")
    assert resolve_checkpoint(run) == direct
    conservative = write_checkpoint(run, stage="conservative")
    assert resolve_checkpoint(run) == conservative
    write_checkpoint(run, stage="conservative", name="last")
    assert resolve_checkpoint(run / "checkpoints" / "conservative" / "last").name == "last"
    (run / "config.yaml").write_text("stages: [conservative, direct]\n")  # a run that trains in this order
    assert resolve_checkpoint(run) == direct


def test_missing_paths_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint directory"):
        load_model(tmp_path / "empty")
    (tmp_path / "run" / "checkpoints" / "direct" / "last").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no best checkpoint"):
        resolve_checkpoint(tmp_path / "run")


def test_a_corrupt_file_gives_a_clear_error(tmp_path):
    directory = write_checkpoint(tmp_path / "run")
    model_file = directory / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match=r"model\.pt: not a readable checkpoint"):
        ESENCalculator.from_checkpoint(directory)
    model_file.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_model(directory)
    torch.save({"model": {}}, model_file)
    with pytest.raises(CheckpointError, match="missing field"):
        load_model(directory)
    payload = checkpoint_payload(fresh_model(), "direct")
    payload["format_version"] = 2
    torch.save(payload, model_file)
    with pytest.raises(CheckpointError, match="format_version 2"):
        load_model(directory)


def test_weights_of_another_size_give_a_clear_error(tmp_path):
    tiny = load_model_config("tiny")
    wider = replace(tiny, sphere_channels=tiny.sphere_channels + 8)
    payload = checkpoint_payload(fresh_model(wider), "direct")
    payload["model_config"] = asdict(replace(tiny, direct_forces=True))  # config says tiny, weights are wider
    directory = tmp_path / "ckpt"
    directory.mkdir()
    torch.save(payload, directory / "model.pt")
    with pytest.raises(CheckpointError, match="weights do not fit the checkpoint's model_config: .* of another shape"):
        load_model(directory)

    write_checkpoint(tmp_path / "run", stage="direct", model=fresh_model(wider))
    model, _ = load_model(tmp_path / "run", expected_config=wider)  # the size it is: fine
    assert model.config.sphere_channels == wider.sphere_channels
    with pytest.raises(CheckpointError, match=r"not of model size 'tiny': sphere_channels="):
        load_model(tmp_path / "run", expected_config="tiny")


def test_an_unknown_config_field_gives_a_clear_error(tmp_path):
    payload = checkpoint_payload(fresh_model(), "direct")
    payload["model_config"]["num_wings"] = 2
    (tmp_path / "ckpt").mkdir()
    torch.save(payload, tmp_path / "ckpt" / "model.pt")
    with pytest.raises(CheckpointError, match="num_wings"):
        load_model(tmp_path / "ckpt")


def lonely_structures():
    """No neighbour within the 5 Å cutoff: a dimer 5.5 Å apart, one atom, one atom in a
    periodic 20 Å box."""
    return [
        Atoms("Cu2", positions=[[0.0, 0.0, 0.0], [5.5, 0.0, 0.0]]),
        Atoms("Cu"),
        Atoms("Cu", cell=[20.0, 20.0, 20.0], pbc=True),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("forces", ["conservative", "direct"])
def test_atoms_without_neighbours_get_their_energy_alone(dtype, forces):
    """The `tiny` preset, as a new user calls it: an energy (twice the single atom's for the
    far dimer), zero forces and zero stress, one structure at a time and batched with a bonded
    one."""
    calculator = ESENCalculator.from_config("tiny", seed=0, forces=forces, dtype=dtype)
    atom_energy = calculator.calculate_batch([Atoms("Cu")])[0]["energy"]
    expected = [2 * atom_energy, atom_energy, atom_energy]
    bonded = bulk("Cu", "fcc", a=3.6)
    batched = calculator.calculate_batch(lonely_structures() + [bonded])
    for atoms, energy, result in zip(lonely_structures(), expected, batched):
        atoms.calc = calculator
        assert atoms.get_potential_energy() == pytest.approx(energy, rel=1e-6)
        assert result["energy"] == pytest.approx(energy, rel=1e-6)
        assert not atoms.get_forces().any() and not result["forces"].any()
        if atoms.pbc.all():
            assert not atoms.get_stress().any() and not result["stress"].any()
    assert np.abs(batched[-1]["stress"]).max() > 0  # the bonded cell does have a stress


def test_a_structure_of_0_atoms_is_refused_by_name():
    calculator = ESENCalculator.from_config("tiny", seed=0)
    empty = Atoms()
    empty.calc = calculator
    with pytest.raises(ValueError, match="structure 0 of 1 has 0 atoms"):
        empty.get_potential_energy()
    with pytest.raises(ValueError, match="structure 1 of 3 has 0 atoms"):
        calculator.calculate_batch([Atoms("Cu"), Atoms(), Atoms("Cu")])


@pytest.mark.parametrize("direct", [False, True])
def test_a_checkpoint_with_one_energy_scale_loads_with_the_same_predictions(tmp_path, direct):
    """Weights saved before the separate force and stress scales (one energy scale for all
    three, the Gaussian centres saved) load into today's model and predict what they did."""
    model = fresh_model(direct_forces=direct)
    model.set_energy_scale(0.37)
    older = {k: v for k, v in model.state_dict().items() if k not in ("energy_mean", "force_scale", "stress_scale")}
    config = model.config
    older["backbone.distance_basis.centres"] = torch.linspace(0.0, config.cutoff, config.num_radial_basis)
    directory = tmp_path / "best"
    directory.mkdir()
    torch.save({**checkpoint_payload(model, "direct" if direct else "conservative"), "model": older},
               directory / "model.pt")
    forces = "direct" if direct else "conservative"
    calculator = ESENCalculator.from_checkpoint(directory, forces=forces, dtype=torch.float64)
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=1)
    atoms.calc = calculator
    expected = model.double()(reference_batch([atoms], config.cutoff), forces=forces, stress=True)
    assert abs(atoms.get_potential_energy() - expected["energy"].item()) < 1e-10
    assert np.abs(atoms.get_forces() - expected["forces"].detach().numpy()).max() < 1e-10
