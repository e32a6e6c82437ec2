"""Physical sanity of the data: unit mistakes, overlapping atoms, absurd labels and energy
outliers are refused at conversion and reported by `esen-data verify` with the file, the
record and the field. Real extxyz files, real LMDB shards, EMT labels."""
from __future__ import annotations

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from esen_train.cli.data import main
from esen_train.data.convert import convert
from esen_train.data.manifest import DatasetDirectory, DatasetError, Manifest
from esen_train.data.outliers import MIN_OUTLIER_EV_PER_ATOM, fit_robust_references
from esen_train.data.sources import atoms_to_record
from esen_train.data.split import split_dataset
from esen_train.data.stats import StatsAccumulator
from esen_train.data.validate import InvalidStructure, UnphysicalGeometry, check_geometry
from esen_train.data.verify import verify_dataset
from esen_train.data.writer import DatasetWriter
from tests.evaluation_helpers import emt_labelled


def copper_cells(count: int) -> list[Atoms]:
    """Rattled Cu cells of 4 to 32 atoms, EMT-labelled."""
    cells = []
    for index in range(count):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((1 + index % 2, 1 + index % 3 // 2, 1 + index % 4 // 3))
        atoms.rattle(0.05, seed=index)
        cells.append(emt_labelled(atoms.copy()))
    return cells


def in_nanometres(atoms: Atoms) -> Atoms:
    """The same structure with every length divided by 10 (as if the file were in nm)."""
    scaled = atoms.copy()
    scaled.positions = atoms.positions / 10
    scaled.cell = atoms.cell.array / 10
    scaled.calc = SinglePointCalculator(scaled, **atoms.calc.results)
    return scaled


def with_labels(atoms: Atoms, **labels) -> Atoms:
    atoms = atoms.copy()
    atoms.calc = SinglePointCalculator(atoms, **labels)
    return atoms


def convert_error(tmp_path, structures) -> InvalidStructure:
    path = tmp_path / "in.xyz"
    ase.io.write(path, structures, format="extxyz")
    with pytest.raises(InvalidStructure) as error:
        convert([str(path)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    return error.value


# ----- unit mistakes and overlapping atoms ------------------------------------------------

def test_cell_in_nm_is_refused_with_the_suspected_cause(tmp_path):
    """4 Cu atoms in a cell given in nm: 177,608 edges at a 6 Å cutoff if let through."""
    good = copper_cells(3)
    error = convert_error(tmp_path, good + [in_nanometres(good[0])])
    assert (error.index, error.field) == (3, "cell")
    assert "cell looks like nm, not Å" in str(error)
    assert f"{tmp_path / 'in.xyz'} structure 3: field 'cell'" in str(error)


def test_cell_alone_in_nm_is_refused(tmp_path):
    atoms = copper_cells(1)[0]
    wrong = with_labels(atoms, **atoms.calc.results)
    wrong.set_cell(atoms.cell.array / 10, scale_atoms=False)  # positions stay in Å
    error = convert_error(tmp_path, [wrong])
    assert error.field == "cell" and "nm" in error.reason


def test_molecule_in_nm_is_refused_as_such(tmp_path):
    methane = emt_labelled(molecule("CH4"))
    error = convert_error(tmp_path, [methane, in_nanometres(methane)])
    assert (error.index, error.field) == (1, "positions")
    assert "positions look like nm, not Å" in error.reason


def test_fractional_positions_are_named(tmp_path):
    atoms = copper_cells(1)[0]
    fractional = with_labels(atoms, **atoms.calc.results)
    fractional.positions = atoms.get_scaled_positions() * 0.5  # all inside [0, 1] Å
    error = convert_error(tmp_path, [fractional])
    assert error.field == "positions" and "fractional coordinates" in error.reason


def test_overlapping_atoms_name_both_atoms_and_elements(tmp_path):
    atoms = copper_cells(1)[0]
    atoms.positions[2] = atoms.positions[1] + [0.3, 0, 0]
    error = convert_error(tmp_path, [with_labels(atoms, **atoms.calc.results)])
    assert error.field == "positions"
    assert "atom 1 is 0.3000 Å from atom 2 (Cu-Cu, minimum 0.528 Å): overlapping atoms" in error.reason


def test_geometry_check_passes_real_structures_and_single_atoms():
    for atoms in (bulk("Cu", "fcc", a=3.61), bulk("Si", "diamond", a=5.43, cubic=True), molecule("C6H6"),
                  Atoms("H", positions=[[0, 0, 0]]), Atoms("Cu", cell=[20, 20, 20], pbc=True)):
        check_geometry(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc)
    compressed = bulk("Cu", "fcc", a=3.61 * 0.7)  # a third of the volume: terapascals
    check_geometry(compressed.numbers, compressed.positions, compressed.cell.array, compressed.pbc)
    with pytest.raises(UnphysicalGeometry, match="field 'positions': non-finite"):
        check_geometry([1], [[np.nan, 0, 0]], np.zeros((3, 3)), np.zeros(3, bool))


# ----- labels: finite and of possible size ------------------------------------------------

@pytest.mark.parametrize("field, labels", [
    ("energy", {"energy": 1e30}),
    ("energy", {"energy": float("nan")}),
    ("forces", {"forces_at": (2, 1, np.nan)}),
    ("forces", {"forces_at": (0, 0, 1e30)}),
    ("stress", {"stress_at": (4, 1e6)}),
])
def test_absurd_labels_are_refused_naming_the_field(tmp_path, field, labels):
    good = copper_cells(3)
    results = dict(good[1].calc.results)
    results["forces"] = results["forces"].copy()
    results["stress"] = results["stress"].copy()
    if "energy" in labels:
        results["energy"] = labels["energy"]
    if "forces_at" in labels:
        atom, axis, value = labels["forces_at"]
        results["forces"][atom, axis] = value
    if "stress_at" in labels:
        component, value = labels["stress_at"]
        results["stress"][component] = value
    error = convert_error(tmp_path, [good[0], with_labels(good[1], **results), good[2]])
    assert (error.index, error.field) == (1, field)


# ----- energy outliers --------------------------------------------------------------------

def test_one_outlier_cannot_poison_the_reference_energies():
    """Least squares takes a -1e6 eV structure in whole; the median regression does not."""
    records = [atoms_to_record(atoms, "in.xyz", index) for index, atoms in enumerate(copper_cells(40))]
    clean = StatsAccumulator()
    for record in records:
        clean.add(record)
    clean_reference = clean.result().element_references[29]
    records[7].energy = -1e6
    poisoned = StatsAccumulator()
    for record in records:
        poisoned.add(record)
    assert poisoned.result().element_references[29] < -1000  # what training would have used
    robust = fit_robust_references(records)
    assert robust.references[29] == pytest.approx(clean_reference, abs=0.05)
    assert abs(robust.deviation(records[7])) > 1e4
    assert max(abs(robust.deviation(r)) for i, r in enumerate(records) if i != 7) < 1.0


def test_energy_outlier_stops_conversion_or_is_skipped_and_counted(tmp_path, capsys):
    structures = copper_cells(40)
    structures[23] = with_labels(structures[23], **{**structures[23].calc.results, "energy": -1e6})
    path = tmp_path / "in.xyz"
    ase.io.write(path, structures, format="extxyz")
    with pytest.raises(InvalidStructure) as error:
        convert([str(path)], tmp_path / "out", num_shards=3, progress=False)
    assert (error.value.source_file, error.value.index, error.value.field) == (str(path), 23, "energy")
    assert "1 structure(s)" in error.value.reason and "--skip-invalid" in error.value.reason
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.xyz"]  # nothing half-written

    assert main(["convert", str(path), "--out", str(tmp_path / "out"), "--shards", "3", "--quiet",
                 "--skip-invalid"]) == 0
    assert "skipped 1 invalid (1 of them energy outliers)" in capsys.readouterr().out
    manifest = Manifest.load(tmp_path / "out")
    assert (manifest.num_structures, manifest.skipped) == (39, 1)
    assert manifest.provenance["skipped_energy_outliers"] == 1
    assert f"{path} structure 23: field 'energy'" in manifest.provenance["skipped_examples"][0]
    assert abs(manifest.stats.element_references[29]) < 1  # EMT's Cu: near 0 eV
    # The same dataset as if structure 23 had never been in the input.
    ase.io.write(tmp_path / "clean.xyz", structures[:23] + structures[24:], format="extxyz")
    clean = convert([str(tmp_path / "clean.xyz")], tmp_path / "clean", num_shards=3, progress=False)
    assert manifest.stats.element_references[29] == pytest.approx(clean.stats.element_references[29], abs=1e-9)
    ours, theirs = DatasetDirectory(tmp_path / "out"), DatasetDirectory(tmp_path / "clean")
    assert [r.energy for r in (ours.read(i) for i in range(39))] == [r.energy for r in (theirs.read(i) for i in range(39))]
    ours.close()
    theirs.close()
    assert verify_dataset(tmp_path / "out") == []


def test_isolated_atoms_beside_one_molecule_are_not_outliers(tmp_path):
    """Isolated-atom reference energies differ from a molecule's by its binding energy, and
    one composition cannot fit both; single atoms are never called outliers."""
    rng = np.random.default_rng(0)
    atom_energy = {"H": -13.6, "C": -1026.9, "O": -2037.8}
    methanol = molecule("CH3OH")
    frames = []
    for index in range(40):
        atoms = methanol.copy()
        atoms.rattle(0.02, seed=index)
        energy = sum(atom_energy[s] for s in atoms.get_chemical_symbols()) - 22.0 + 0.05 * rng.normal()
        frames.append(with_labels(atoms, energy=energy, forces=rng.normal(size=(6, 3))))
    for symbol, energy in atom_energy.items():
        frames.append(with_labels(Atoms(symbol), energy=energy, forces=np.zeros((1, 3))))
    path = tmp_path / "in.xyz"
    ase.io.write(path, frames, format="extxyz")
    manifest = convert([str(path)], tmp_path / "out", progress=False)
    assert (manifest.num_structures, manifest.skipped) == (43, 0)


def test_small_datasets_are_not_judged_for_outliers(tmp_path):
    """Below 20 structures there is no telling an outlier from the spread."""
    structures = copper_cells(10)
    structures[3] = with_labels(structures[3], **{**structures[3].calc.results, "energy": -1e6})
    ase.io.write(tmp_path / "in.xyz", structures, format="extxyz")
    assert convert([str(tmp_path / "in.xyz")], tmp_path / "out", progress=False).skipped == 0
    assert MIN_OUTLIER_EV_PER_ATOM >= 10  # above any cohesive energy


# ----- verify decodes every record and checks its values ------------------------------------

def test_verify_finds_bad_values_behind_valid_checksums(tmp_path, capsys):
    """Records written without the conversion checks: their checksums are right, their values not."""
    records = [atoms_to_record(atoms, "in.xyz", index) for index, atoms in enumerate(copper_cells(40))]
    records[5].forces[1, 2] = np.nan
    records[9].energy = 1e30
    records[12].positions[3] = records[12].positions[0] + [0.01, 0, 0]
    records[30].energy = -1e6
    write_unchecked(tmp_path / "data", records)
    problems = verify_dataset(tmp_path / "data")
    shard0, shard1 = tmp_path / "data" / "shard_00000.lmdb", tmp_path / "data" / "shard_00001.lmdb"
    expected = [  # structure i is record i // 2 of shard i % 2
        (f"{shard0} record 6: field 'positions': ", "0.0100 Å", "in.xyz structure 12"),
        (f"{shard1} record 2: field 'forces': ", "non-finite value nan at (1, 2)", "in.xyz structure 5"),
        (f"{shard1} record 4: field 'energy': ", "1e+30 eV", "in.xyz structure 9"),
    ]
    assert len(problems) == len(expected)
    for problem, (start, detail, source) in zip(problems, expected):
        assert problem.startswith(start) and detail in problem and f"(from {source})" in problem

    # With those repaired, the outlier is found, named by shard, record and source.
    clean = [atoms_to_record(atoms, "in.xyz", index) for index, atoms in enumerate(copper_cells(40))]
    clean[30].energy = -1e6
    write_unchecked(tmp_path / "data", clean)
    problems = verify_dataset(tmp_path / "data")
    assert len(problems) == 1
    assert problems[0].startswith(f"{shard0} record 15: field 'energy': energy per atom after the per-element")
    assert "(from in.xyz structure 30)" in problems[0]
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "data")]) == 1
    assert "record 15: field 'energy'" in capsys.readouterr().err


def write_unchecked(directory, records) -> None:
    with DatasetWriter(directory, num_shards=2, provenance={}, overwrite=True) as writer:
        for record in records:
            writer.write(record)
        writer.stats.result = lambda: None  # a tool that writes no statistics (they would not be finite)
        writer.finish()


def test_split_refuses_to_copy_non_finite_labels(tmp_path):
    records = [atoms_to_record(atoms, "in.xyz", index) for index, atoms in enumerate(copper_cells(10))]
    records[5].forces[1, 2] = np.nan
    write_unchecked(tmp_path / "data", records)
    with pytest.raises(DatasetError, match="part_(train|val): statistics force_rms of the records are not finite"):
        split_dataset(tmp_path / "data", tmp_path / "part", [0.5, 0.5], seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
