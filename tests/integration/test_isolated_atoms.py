"""Datasets with atoms that have no neighbour within the cutoff, end to end: EMT-labelled single
atoms, far dimers and atoms in big periodic boxes among small bonded cells convert, train (one
process, and two processes where one rank gets only such atoms), evaluate and run NVE; a
structure of 0 atoms is refused naming the file and structure. The same for the AcAc
isolated-atom file of the shared data (E0 references, as MACE users train with).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from esen_train.cli.train import main as train_main
from esen_train.cli.data import main as data_main
from esen_train.data.dataset import LMDBDataset
from esen_train.data.manifest import Manifest
from esen_train.data.sampler import AtomBalancedBatchSampler
from esen_train.engine.config import load_train_config
from esen_train.engine.losses import ErrorAccumulator
from esen_train.engine.fit import fit
from esen_train.engine.tracking import read_metrics
from esen_train.evaluation.calculator import ESENCalculator
from tests.conftest import shared_data
from tests.evaluation_helpers import emt_labelled, write_checkpoint

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
CUTOFF = 5.0  # the tiny preset's


def lonely_structures() -> list[Atoms]:
    """Structures without a neighbour within 5 Å: single atoms, a far dimer, atoms in boxes."""
    box = {"cell": [20.0, 20.0, 20.0], "pbc": True}
    return [emt_labelled(atoms) for atoms in (
        Atoms("Cu"),
        Atoms("Ni", positions=[[0.5, 0.0, 0.0]]),
        Atoms("CuNi", positions=[[0.0, 0.0, 0.0], [3.3, 3.3, 3.0]]),  # 5.5 Å apart
        Atoms("Cu", positions=[[3.0, 4.0, 5.0]], **box),
        Atoms("Ni", **box),
        Atoms("NiCu", positions=[[1.0, 1.0, 1.0], [1.0, 6.6, 1.0]], **box),
    )]


def bonded_structures(count: int, seed: int = 0) -> list[Atoms]:
    """Rattled 4-atom Cu/Ni fcc cells."""
    rng = np.random.default_rng(seed)
    structures = []
    for index in range(count):
        atoms = bulk("Cu", "fcc", a=3.55 + 0.05 * rng.random(), cubic=True)
        atoms.numbers[rng.random(4) < 0.5] = 28
        atoms.rattle(0.05, seed=index)
        structures.append(emt_labelled(atoms))
    return structures


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    """Bonded cells and structures without neighbours, interleaved, converted by `esen-data`."""
    root = tmp_path_factory.mktemp("isolated")
    lonely, bonded = lonely_structures(), bonded_structures(12)
    structures = [item for pair in zip(bonded, lonely + lonely) for item in pair]
    ase.io.write(root / "mixed.xyz", structures, format="extxyz")
    assert data_main(["convert", str(root / "mixed.xyz"), "--out", str(root / "data"), "--quiet"]) == 0
    return root / "data"


def fast_overrides(data: Path, run_dir: Path, max_atoms: int = 16) -> list[str]:
    return [
        f"data.train=[{data}]", f"data.val=[{data}]", f"run_dir={run_dir}", "logging.wandb.mode=disabled",
        "direct.max_steps=4", "direct.val_every=4", "direct.log_every=1", f"direct.max_atoms={max_atoms}",
        "conservative.max_steps=3", "conservative.val_every=3", "conservative.log_every=1",
        f"conservative.max_atoms={max_atoms}",
    ]


def assert_finite_metrics(run_dir: Path, stages=("direct", "conservative")) -> None:
    rows = read_metrics(run_dir)
    for stage in stages:
        for split in ("train", "val"):
            stage_rows = [row for row in rows if row["stage"] == stage and row["split"] == split]
            assert stage_rows, (stage, split)
            for row in stage_rows:
                for key in ("loss", "energy_mae_mev_per_atom", "force_mae_mev_per_A", "stress_mae_mev_per_A3"):
                    if key in row:
                        assert math.isfinite(row[key]), (stage, split, key)


def test_conversion_keeps_the_structures_without_neighbours(dataset_dir):
    manifest = Manifest.load(dataset_dir)
    assert manifest.num_structures == 24
    assert manifest.properties == ["energy", "forces", "stress"]
    dataset = LMDBDataset(dataset_dir, cutoff=CUTOFF)
    edges = [dataset[index].num_edges for index in range(len(dataset))]
    assert edges[1::2] == [0] * 12 and all(count > 0 for count in edges[0::2])


def test_train_and_evaluate_on_one_process(dataset_dir, tmp_path, capsys):
    """Both stages (every batch holds structures without edges), then `esen-train eval`; the
    trained model gives the far dimer twice the single atom's energy and no force."""
    run_dir = tmp_path / "run"
    fit(load_train_config(TINY, fast_overrides(dataset_dir, run_dir)))
    assert_finite_metrics(run_dir)

    capsys.readouterr()
    assert train_main(["eval", str(run_dir), "--data", str(dataset_dir), "--json", "--out", str(tmp_path / "eval")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_structures"] == 24 and report["num_atoms"] == 12 * 4 + 2 * 8
    for key in ("energy_mae_mev_per_atom", "force_mae_mev_per_A", "stress_mae_mev_per_A3"):
        assert math.isfinite(report[key])

    calculator = ESENCalculator.from_checkpoint(run_dir, dtype=torch.float64)
    atom, dimer = calculator.calculate_batch([Atoms("Cu"), Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 5.5]])])
    assert dimer["energy"] == pytest.approx(2 * atom["energy"], rel=1e-12)
    assert not dimer["forces"].any()


def test_md_of_a_dimer_beyond_the_cutoff_conserves_energy_exactly(dataset_dir, tmp_path, capsys):
    """No force: the atoms drift apart at constant speed and the total energy never changes."""
    run_dir = tmp_path / "run"
    fit(load_train_config(TINY, fast_overrides(dataset_dir, run_dir) + ["stages=[direct]"]))
    structure = tmp_path / "dimer.xyz"
    Atoms("CuNi", positions=[[0, 0, 0], [3.3, 3.3, 3.0]]).write(structure)
    for forces in ("direct", "conservative"):
        capsys.readouterr()
        code = train_main(["md", str(run_dir), "--structure", str(structure), "--steps", "20", "--timestep", "1",
                           "--temperature", "300", "--forces", forces, "--json", "--out", str(tmp_path / forces)])
        assert code == 0
        report = json.loads(capsys.readouterr().out)
        assert report["num_atoms"] == 2
        assert report["max_deviation_mev_per_atom"] == 0.0 and report["drift_mev_per_atom_per_ps"] == 0.0
        assert report["final_temperature_K"] > 0


def test_validation_cosine_leaves_out_atoms_without_force():
    """Zero forces have no direction: validation's force cosine counts the other atoms only
    (as `eval` does), and is absent when no atom has a force; the MAE counts every atom."""
    batch = SimpleNamespace(natoms=torch.tensor([2, 1]), energy=torch.zeros(2, dtype=torch.float64),
                            forces=torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]]),
                            has_stress=torch.tensor([False, False]), stress=torch.zeros(2, 3, 3))
    out = {"energy": torch.zeros(2, dtype=torch.float64), "forces": batch.forces.clone()}
    out["forces"][1] *= 2
    errors = ErrorAccumulator()
    errors.add(out, batch)
    result = errors.result()
    assert result["force_cosine"] == pytest.approx(1.0)  # not 2/3: the atom without force is left out
    assert result["force_mae_mev_per_A"] == pytest.approx(1000 * 2 / 9)
    lonely = ErrorAccumulator()
    lonely.add({"energy": out["energy"][1:], "forces": torch.zeros(1, 3)},
               SimpleNamespace(natoms=batch.natoms[1:], energy=batch.energy[1:], forces=torch.zeros(1, 3),
                               has_stress=batch.has_stress[1:], stress=batch.stress[1:]))
    assert "force_cosine" not in lonely.result() and lonely.result()["force_mae_mev_per_A"] == 0.0


def test_a_structure_of_0_atoms_is_refused_by_name(tmp_path, capsys):
    """At conversion (file and structure index), by `eval` on a file, and by `md`."""
    empty = Atoms()
    empty.calc = SinglePointCalculator(empty, energy=0.0, forces=np.zeros((0, 3)))
    path = tmp_path / "with_empty.xyz"
    ase.io.write(path, lonely_structures()[:2] + [empty] + lonely_structures()[2:], format="extxyz")

    capsys.readouterr()
    assert data_main(["convert", str(path), "--out", str(tmp_path / "data"), "--quiet"]) != 0
    error = capsys.readouterr().err
    assert f"{path} structure 2: field 'atomic_numbers': the structure has 0 atoms" in error
    assert not (tmp_path / "data").exists()

    checkpoint = write_checkpoint(tmp_path / "run")
    assert train_main(["eval", str(checkpoint), "--data", str(path), "--out", str(tmp_path / "eval")]) == 2
    assert f"{path}:2: the structure has 0 atoms" in capsys.readouterr().err

    ase.io.write(tmp_path / "empty.xyz", [empty], format="extxyz")
    assert train_main(["md", str(checkpoint), "--structure", str(tmp_path / "empty.xyz"), "--steps", "2",
                       "--timestep", "1", "--temperature", "300"]) == 2
    assert "empty.xyz: structure 0 has 0 atoms" in capsys.readouterr().err


def test_a_training_set_of_single_atoms_alone(tmp_path):
    """No force anywhere (force RMS 0): the energy scale is 1 eV and training runs."""
    path = tmp_path / "atoms.xyz"
    atoms = [s for s in lonely_structures() if len(s) == 1]
    ase.io.write(path, atoms, format="extxyz")
    assert data_main(["convert", str(path), "--out", str(tmp_path / "data"), "--quiet"]) == 0
    assert Manifest.load(tmp_path / "data").stats.force_rms == 0.0
    run_dir = tmp_path / "run"
    fit(load_train_config(TINY, fast_overrides(tmp_path / "data", run_dir) + ["stages=[direct]"]))
    assert_finite_metrics(run_dir, stages=("direct",))
    weights = torch.load(run_dir / "checkpoints" / "direct" / "best" / "model.pt", weights_only=True)["model"]
    assert float(weights["energy_scale"]) == 1.0


def steps_with_an_edgeless_rank(dataset_dir: Path, max_atoms: int, steps: int) -> list[int]:
    """Training steps (of one epoch) at which one of two ranks has only structures without
    edges and the other has some, from the sampler the trainer uses (seed 0)."""
    dataset = LMDBDataset(dataset_dir, cutoff=CUTOFF)
    has_edges = [dataset[index].num_edges > 0 for index in range(len(dataset))]
    ranks = [iter(AtomBalancedBatchSampler(dataset.natoms, max_atoms, rank, 2, seed=0)) for rank in range(2)]
    found = []
    for step, parts in zip(range(steps), zip(*ranks)):
        bonded = [any(has_edges[index] for index in part) for part in parts]
        if bonded.count(True) == 1:
            found.append(step)
    return found


@pytest.mark.slow
def test_two_processes_where_one_rank_gets_only_atoms_without_neighbours(dataset_dir, tmp_path):
    """`esen-train fit --nproc 2` (DDP over gloo), both stages: with 6 atoms a step, a bonded
    4-atom cell fills one rank and the other gets atoms without neighbours."""
    max_atoms = 6
    edgeless = steps_with_an_edgeless_rank(dataset_dir, max_atoms, steps=4)
    assert len(edgeless) >= 2  # in the direct stage's 4 steps (the conservative stage restarts the epoch)
    run_dir = tmp_path / "run"
    code = train_main(["fit", str(TINY), *fast_overrides(dataset_dir, run_dir, max_atoms), "--nproc", "2"])
    assert code == 0
    assert_finite_metrics(run_dir)
    for stage in ("direct", "conservative"):
        assert (run_dir / "checkpoints" / stage / "best" / "model.pt").is_file()


@pytest.mark.shared_data
def test_acac_with_its_isolated_atoms_converts_trains_and_evaluates(tmp_path, capsys):
    """The AcAc molecules plus isolated_atoms.xyz (H, C and O alone) as one dataset."""
    isolated = shared_data("acac/isolated_atoms.xyz")
    molecules = ase.io.read(shared_data("acac/train_300K.xyz"), ":40")
    ase.io.write(tmp_path / "acac40.xyz", molecules, format="extxyz")
    data = tmp_path / "data"
    assert data_main(["convert", str(isolated), str(tmp_path / "acac40.xyz"), "--out", str(data), "--quiet"]) == 0
    assert Manifest.load(data).num_structures == 43
    run_dir = tmp_path / "run"
    fit(load_train_config(TINY, fast_overrides(data, run_dir, max_atoms=48)))
    assert_finite_metrics(run_dir)
    capsys.readouterr()
    assert train_main(["eval", str(run_dir), "--data", str(isolated), "--json", "--out", str(tmp_path / "eval")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_structures"] == 3 and report["force_mae_mev_per_A"] == 0.0
    assert set(report["per_element"]) == {"H", "C", "O"}
