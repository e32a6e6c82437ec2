"""Conversion to dataset directories: exact contents, bad input, atomic output, manifest
checks, statistics, splits and the EMT generator. Real files, real LMDB, real ASE."""
from __future__ import annotations

import json
import math
import os
import re
import stat

import ase.db
import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import voigt_6_to_full_3x3_stress

from esen_train.data.convert import convert
from esen_train.data.emt import KINDS, FastEMT, emt_records, emt_structure, generate_emt_dataset
from esen_train.data.manifest import (
    DatasetDirectory,
    DatasetError,
    Manifest,
    file_checksum,
    load_natoms,
)
from esen_train.data.records import StructureRecord
from esen_train.data.export import export_dataset
from esen_train.data.sources import InputError, LabelKeys, atoms_to_record
from esen_train.data.split import split_dataset, split_indices
from esen_train.data.stats import StatsAccumulator, compute_stats, describe_dataset, write_stats
from esen_train.data.validate import InvalidStructure
from esen_train.data.verify import verify_dataset
from esen_train.data.writer import DatasetWriter


def labelled(atoms: Atoms, rng, stress=True, energy=None, forces=None) -> Atoms:
    atoms = atoms.copy()
    atoms.calc = SinglePointCalculator(
        atoms,
        energy=float(rng.normal() * 100) if energy is None else energy,
        forces=rng.normal(size=(len(atoms), 3)) if forces is None else forces,
        **({"stress": rng.normal(size=6)} if stress else {}),
    )
    return atoms


def sample_structures(count: int, seed: int = 0) -> list[Atoms]:
    """A mix of periodic solids (with stress) and molecules (without), varied sizes."""
    rng = np.random.default_rng(seed)
    structures = []
    for i in range(count):
        if i % 3 == 0:
            atoms = molecule(("H2O", "CH4", "C6H6")[i % 9 // 3])
            atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
            structures.append(labelled(atoms, rng, stress=False))
        else:
            atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((1 + i % 2, 1, 1))
            atoms.rattle(0.05, seed=i)
            structures.append(labelled(atoms, rng))
    return structures


def write_extxyz(path, structures):
    ase.io.write(path, structures, format="extxyz")
    return path


def assert_matches_ase(dataset_dir, inputs: dict[str, list[Atoms]]):
    """Every record equals what ase.io.read gives for its source file and index."""
    dataset = DatasetDirectory(dataset_dir)
    seen = set()
    for index in range(len(dataset)):
        record = dataset.read(index)
        atoms = inputs[record.source_file][record.source_index]
        seen.add((record.source_file, record.source_index))
        assert np.array_equal(record.positions, atoms.positions)
        assert record.positions.dtype == np.float64
        assert np.array_equal(record.atomic_numbers, atoms.numbers)
        assert np.array_equal(record.cell, atoms.cell.array)
        assert np.array_equal(record.pbc, atoms.pbc)
        assert record.energy == atoms.get_potential_energy()
        assert np.array_equal(record.forces, atoms.get_forces())
        if "stress" in atoms.calc.results:
            assert np.array_equal(record.stress, atoms.get_stress(voigt=False))
        else:
            assert record.stress is None
    assert seen == {(path, i) for path, frames in inputs.items() for i in range(len(frames))}
    dataset.close()


def test_extxyz_converts_exactly(tmp_path):
    path = str(write_extxyz(tmp_path / "in.extxyz", sample_structures(25)))
    manifest = convert([path], tmp_path / "out", num_shards=3, chunk_size=4, progress=False)
    assert manifest.num_structures == 25
    assert manifest.properties == ["energy", "forces", "stress"]
    assert manifest.elements == [1, 6, 8, 29]
    assert_matches_ase(tmp_path / "out", {path: ase.io.read(path, ":")})
    assert verify_dataset(tmp_path / "out") == []


def test_manifest_agrees_with_shards(tmp_path):
    path = str(write_extxyz(tmp_path / "in.xyz", sample_structures(17)))
    manifest = convert([path], tmp_path / "out", num_shards=4, chunk_size=5, progress=False)
    loaded = Manifest.load(tmp_path / "out")
    assert loaded == manifest
    natoms = load_natoms(tmp_path / "out")
    dataset = DatasetDirectory(tmp_path / "out")
    assert [dataset.read(i).num_atoms for i in range(len(dataset))] == natoms.tolist()
    assert natoms.dtype == np.int32 and natoms.sum() == manifest.num_atoms
    for shard, reader in zip(manifest.shards, dataset.readers):
        assert len(reader) == shard.num_structures
        assert sum(r.num_atoms for r in reader) == shard.num_atoms
        assert file_checksum(tmp_path / "out" / shard.name) == shard.checksum
    assert [s.num_structures for s in manifest.shards] == [5, 4, 4, 4]
    assert dataset.locate(4) == (0, 4) and dataset.locate(5) == (1, 0) and dataset.locate(16) == (3, 3)
    dataset.close()


def test_output_does_not_depend_on_chunking_or_workers(tmp_path):
    path = str(write_extxyz(tmp_path / "in.xyz", sample_structures(12)))
    convert([path], tmp_path / "a", num_shards=2, chunk_size=100, progress=False)
    convert([path], tmp_path / "b", num_shards=2, chunk_size=5, workers=2, progress=False)
    a, b = DatasetDirectory(tmp_path / "a"), DatasetDirectory(tmp_path / "b")
    for reader_a, reader_b in zip(a.readers, b.readers, strict=True):
        assert [r.energy for r in reader_a] == [r.energy for r in reader_b]
        assert [r.source_index for r in reader_a] == [r.source_index for r in reader_b]
    a.close()
    b.close()
    assert np.array_equal(load_natoms(tmp_path / "a"), load_natoms(tmp_path / "b"))


def test_aselmdb_converts_with_nothing_lost(tmp_path):
    """fairchem's *.aselmdb (read through ase-db-backends), charge/spin in row data."""
    rng = np.random.default_rng(7)
    structures = sample_structures(9, seed=3)
    path = str(tmp_path / "data0000.aselmdb")
    with ase.db.connect(path) as db:
        for i, atoms in enumerate(structures):
            db.write(atoms, data={"charge": i - 4, "spin": 1 + i % 3}, sid=int(rng.integers(1000)))
    convert([path], tmp_path / "out", chunk_size=4, progress=False)
    assert_matches_ase(tmp_path / "out", {path: structures})
    manifest = Manifest.load(tmp_path / "out")
    assert manifest.properties == ["energy", "forces", "stress", "charge", "spin"]
    dataset = DatasetDirectory(tmp_path / "out")
    records = sorted((dataset.read(i) for i in range(len(dataset))), key=lambda r: r.source_index)
    assert [r.charge for r in records] == [i - 4 for i in range(9)]
    assert [r.spin for r in records] == [1 + i % 3 for i in range(9)]
    dataset.close()


def test_sqlite_ase_db_converts_in_chunks(tmp_path):
    structures = sample_structures(11, seed=4)
    path = str(tmp_path / "in.db")
    with ase.db.connect(path) as db:
        for atoms in structures:
            db.write(atoms)
    convert([path], tmp_path / "out", chunk_size=3, progress=False)
    assert_matches_ase(tmp_path / "out", {path: structures})


def test_generic_ase_format_and_several_inputs(tmp_path):
    traj = str(tmp_path / "in.traj")
    ase.io.write(traj, sample_structures(5, seed=5))
    xyz = str(write_extxyz(tmp_path / "in.xyz", sample_structures(4, seed=6)))
    gz = str(write_extxyz(tmp_path / "in.xyz.gz", sample_structures(3, seed=7)))
    manifest = convert([traj, xyz, gz], tmp_path / "out", progress=False)
    assert manifest.num_structures == 12
    assert_matches_ase(tmp_path / "out", {p: ase.io.read(p, ":") for p in (traj, xyz, gz)})


def _bad_structures() -> list[tuple[str, Atoms]]:
    """(field the error must name, structure) for each kind of bad input."""
    rng = np.random.default_rng(8)
    good = sample_structures(1, seed=9)[0]  # a water molecule
    no_energy = good.copy()
    no_energy.calc = SinglePointCalculator(no_energy, forces=np.zeros((len(good), 3)))
    no_forces = good.copy()
    no_forces.calc = SinglePointCalculator(no_forces, energy=1.0)
    nan_forces = rng.normal(size=(len(good), 3))
    nan_forces[1, 2] = np.nan
    close = good.copy()
    close.positions[2] = close.positions[0] + [0.05, 0, 0]
    image = bulk("Cu", "fcc", a=3.6, cubic=True)
    image.positions[1] = image.positions[0] + [3.6 - 0.04, 0, 0]  # 0.04 Å from atom 0's image
    heavy = good.copy()
    heavy.numbers[0] = 101
    dummy = good.copy()
    dummy.numbers[1] = 0
    nan_position = good.copy()
    nan_position.positions[0, 0] = np.nan
    return [
        ("energy", no_energy),
        ("forces", no_forces),
        ("energy", labelled(good, rng, stress=False, energy=float("nan"))),
        ("energy", labelled(good, rng, stress=False, energy=float("inf"))),
        ("forces", labelled(good, rng, stress=False, forces=nan_forces)),
        ("forces", labelled(good, rng, stress=False, forces=np.zeros((len(good) - 1, 3)))),
        ("positions", labelled(close, rng, stress=False)),
        ("positions", labelled(image, rng)),
        ("positions", labelled(nan_position, rng, stress=False)),
        ("atomic_numbers", labelled(heavy, rng, stress=False)),
        ("atomic_numbers", labelled(dummy, rng, stress=False)),
    ]


def write_input(directory, structures) -> str:
    """extxyz, or an ASE database where a structure's forces have the wrong shape (only a
    database keeps those)."""
    if any(a.calc.results.get("forces", np.zeros((len(a), 3))).shape != (len(a), 3) for a in structures):
        path = directory / "in.db"
        with ase.db.connect(str(path)) as db:
            for atoms in structures:
                db.write(atoms)
        return str(path)
    return str(write_extxyz(directory / "in.xyz", structures))


@pytest.mark.parametrize("case", range(len(_bad_structures())))
def test_bad_input_stops_with_file_index_and_field(tmp_path, case):
    field, bad = _bad_structures()[case]
    good = sample_structures(6, seed=10)
    path = write_input(tmp_path, good[:4] + [bad] + good[4:])
    with pytest.raises(InvalidStructure) as error:
        convert([path], tmp_path / "out", chunk_size=2, progress=False)
    assert (error.value.source_file, error.value.index, error.value.field) == (path, 4, field)
    assert f"{path} structure 4: field '{field}'" in str(error.value)
    assert [str(p) for p in tmp_path.iterdir()] == [path]  # nothing half-written


def test_skip_invalid_skips_and_counts(tmp_path):
    bad = [atoms for _, atoms in _bad_structures()]
    good = sample_structures(5, seed=11)
    path = write_input(tmp_path, bad[:3] + good + bad[3:])
    manifest = convert([path], tmp_path / "out", chunk_size=4, skip_invalid=True, progress=False)
    assert manifest.num_structures == len(good)
    assert manifest.skipped == len(bad)
    assert Manifest.load(tmp_path / "out").skipped == len(bad)
    assert f"{path} structure 0: field 'energy'" in manifest.provenance["skipped_examples"][0]
    dataset = DatasetDirectory(tmp_path / "out")
    assert sorted(dataset.read(i).source_index for i in range(len(dataset))) == list(range(3, 8))
    dataset.close()


def test_a_structure_of_0_atoms_is_refused_or_skipped(tmp_path):
    """extxyz only: an ASE database cannot even store one with forces."""
    empty = labelled(Atoms(), np.random.default_rng(0), stress=False)
    good = sample_structures(4, seed=12)
    path = str(write_extxyz(tmp_path / "in.xyz", good[:3] + [empty] + good[3:]))
    with pytest.raises(InvalidStructure, match=f"{path} structure 3: field 'atomic_numbers': the structure has 0 atoms"):
        convert([path], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    manifest = convert([path], tmp_path / "out", skip_invalid=True, progress=False)
    assert (manifest.num_structures, manifest.skipped) == (4, 1)


def mace_style(structures: list[Atoms]) -> list[Atoms]:
    """The structures labelled the way MACE's data files are: REF_energy, REF_stress (3x3),
    config_type and config_weight on the comment line, REF_forces columns, no calculator."""
    relabelled = []
    for index, atoms in enumerate(structures):
        results = atoms.calc.results
        copy = Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        copy.info.update(REF_energy=results["energy"], config_type=("bulk", "md")[index % 2], config_weight=0.5 * index)
        if "stress" in results:
            copy.info["REF_stress"] = voigt_6_to_full_3x3_stress(results["stress"])
        copy.arrays["REF_forces"] = results["forces"]
        relabelled.append(copy)
    return relabelled


def test_labels_under_other_names_convert_with_their_keys(tmp_path):
    originals = sample_structures(6, seed=12)
    path = str(write_extxyz(tmp_path / "mace.xyz", mace_style(originals)))
    keys = LabelKeys(energy="REF_energy", forces="REF_forces", stress="REF_stress")
    manifest = convert([path], tmp_path / "out", keys=keys, progress=False)
    assert manifest.properties == ["energy", "forces", "stress", "config_type", "weight"]
    assert manifest.provenance["options"]["keys"]["energy"] == "REF_energy"
    dataset = DatasetDirectory(tmp_path / "out")
    for index in range(len(dataset)):
        record = dataset.read(index)
        original = originals[record.source_index].calc.results
        assert record.energy == original["energy"]
        np.testing.assert_allclose(record.forces, original["forces"], atol=1e-8)  # extxyz: 8 decimals
        if "stress" in original:
            np.testing.assert_array_equal(record.stress, voigt_6_to_full_3x3_stress(original["stress"]))
        else:
            assert record.stress is None
        assert record.config_type == ("bulk", "md")[record.source_index % 2]
        assert record.weight == 0.5 * record.source_index
    dataset.close()


def test_missing_energy_names_the_keys_the_structure_has(tmp_path):
    path = str(write_extxyz(tmp_path / "mace.xyz", mace_style(sample_structures(2))))
    with pytest.raises(InvalidStructure) as error:
        convert([path], tmp_path / "out", progress=False)
    message = str(error.value)
    assert f"{path} structure 0: field 'energy': missing from the input: no 'energy'" in message
    assert "info: REF_energy, config_type, config_weight" in message and "per-atom arrays: REF_forces" in message
    assert "--energy-key" in message
    with pytest.raises(InvalidStructure, match="field 'forces': missing from the input: no 'forces'"):
        convert([path], tmp_path / "out", keys=LabelKeys(energy="REF_energy"), progress=False)


def test_free_energy_is_taken_when_asked(tmp_path):
    rng = np.random.default_rng(13)
    structures = sample_structures(3, seed=13)
    for atoms in structures:
        atoms.calc.results["free_energy"] = atoms.calc.results["energy"] + rng.uniform(0.1, 1.0)
    path = str(write_extxyz(tmp_path / "smeared.xyz", structures))
    convert([path], tmp_path / "out", keys=LabelKeys(energy="free_energy"), progress=False)
    dataset = DatasetDirectory(tmp_path / "out")
    assert [dataset.read(i).energy for i in range(3)] == [a.calc.results["free_energy"] for a in structures]
    dataset.close()


def test_negative_weight_is_refused(tmp_path):
    structures = sample_structures(2)
    structures[1].info["config_weight"] = -1.0
    path = str(write_extxyz(tmp_path / "in.xyz", structures))
    with pytest.raises(InvalidStructure, match="structure 1: field 'weight': negative"):
        convert([path], tmp_path / "out", progress=False)


def test_export_then_convert_gives_the_same_dataset(tmp_path):
    originals = sample_structures(7, seed=14)
    for index, atoms in enumerate(originals):
        atoms.info.update(config_type=f"kind{index % 3}", config_weight=1.0 + index, charge=index % 2 - 1, spin=1)
    first = tmp_path / "first"
    convert([str(write_extxyz(tmp_path / "in.xyz", originals))], first, num_shards=3, progress=False)
    assert export_dataset(first, tmp_path / "exported.xyz") == 7
    exported = ase.io.read(tmp_path / "exported.xyz", ":")
    assert [atoms.info["source_index"] for atoms in exported] == list(range(7))  # the input's order
    second = tmp_path / "second"
    convert([str(tmp_path / "exported.xyz")], second, num_shards=3, progress=False)
    before, after = DatasetDirectory(first), DatasetDirectory(second)
    assert len(before) == len(after) == 7
    assert [s.num_structures for s in after.manifest.shards] == [s.num_structures for s in before.manifest.shards]
    for index in range(7):
        a, b = before.read(index), after.read(index)  # the same shards, record by record
        np.testing.assert_allclose(b.positions, a.positions, atol=1e-8)  # extxyz: 8 decimals
        np.testing.assert_allclose(b.forces, a.forces, atol=1e-8)
        np.testing.assert_array_equal(b.atomic_numbers, a.atomic_numbers)
        np.testing.assert_array_equal(b.cell, a.cell)
        np.testing.assert_array_equal(b.pbc, a.pbc)
        assert (b.stress is None) == (a.stress is None)
        if a.stress is not None:
            np.testing.assert_array_equal(b.stress, a.stress)
        assert (b.energy, b.config_type, b.weight, b.charge, b.spin) == (a.energy, a.config_type, a.weight, a.charge, a.spin)
    before.close()
    after.close()
    with pytest.raises(FileExistsError, match="exported.xyz already exists"):
        export_dataset(first, tmp_path / "exported.xyz")


def test_bad_input_in_a_worker_process_is_reported(tmp_path):
    field, bad = _bad_structures()[0]
    path = write_input(tmp_path, sample_structures(3) + [bad])
    with pytest.raises(InvalidStructure, match=f"structure 3: field '{field}'"):
        convert([path], tmp_path / "out", chunk_size=1, workers=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.xyz"]


def test_unreadable_input_names_file_and_structure(tmp_path):
    path = write_extxyz(tmp_path / "in.xyz", sample_structures(3))
    text = path.read_text().splitlines()
    natoms_line = [i for i, line in enumerate(text) if line.strip().isdigit()][2]
    text[natoms_line] = "three"
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(InputError, match=r"in.xyz structure 2: line 16: expected an atom count line, got b'three\\n'$"):
        convert([str(path)], tmp_path / "out", progress=False)
    with pytest.raises(InputError, match="does not exist"):
        convert([str(tmp_path / "absent.xyz")], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_blank_line_between_structures_is_refused_not_the_end_of_the_file(tmp_path):
    """ASE's reader stops at a blank line: the structures after it would be lost silently."""
    lines = write_extxyz(tmp_path / "in.xyz", sample_structures(5)).read_text().splitlines()
    second_frame = 2 + int(lines[0])  # 0-based line of structure 1's atom count
    for name, blank_at in (("middle.xyz", second_frame), ("leading.xyz", 0)):
        path = tmp_path / name
        path.write_text("\n".join(lines[:blank_at] + [""] + lines[blank_at:]) + "\n\n")
        structure = 1 if blank_at else 0
        with pytest.raises(InputError, match=f"{name} structure {structure}: line {blank_at + 1} is blank but more "
                                             f"structures follow \\(line {blank_at + 2}\\)"):
            convert([str(path)], tmp_path / "out", progress=False)
    (tmp_path / "trailing.xyz").write_text("\n".join(lines) + "\n\n\n")
    assert convert([str(tmp_path / "trailing.xyz")], tmp_path / "out", progress=False).num_structures == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.xyz", "leading.xyz", "middle.xyz", "out", "trailing.xyz"]


def test_an_atom_count_too_small_names_the_structure_that_declares_it(tmp_path):
    lines = write_extxyz(tmp_path / "in.xyz", sample_structures(4)).read_text().splitlines()
    second_frame = 2 + int(lines[0])
    declared = int(lines[second_frame])
    lines[second_frame] = str(declared - 1)
    (tmp_path / "in.xyz").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=f"structure 2: .*expected an atom count line.*"
                                         f"is structure 1's atom count, {declared - 1}, right"):
        convert([str(tmp_path / "in.xyz")], tmp_path / "out", progress=False)


def test_odd_input_is_named(tmp_path):
    path = write_extxyz(tmp_path / "in.xyz", sample_structures(2))
    text = path.read_text()
    unknown = tmp_path / "unknown.xyz"
    unknown.write_text(text.replace("\nCu ", "\nXx ", 1))
    with pytest.raises(InputError, match="unknown.xyz structure 1: field 'atomic_numbers': unknown element symbol 'Xx'"):
        convert([str(unknown)], tmp_path / "out", progress=False)
    flag = tmp_path / "flag.xyz"
    flag.write_text(re.sub(r"energy=[-0-9.e]+", "energy=T", text, count=1))
    with pytest.raises(InvalidStructure, match="flag.xyz structure 0: field 'energy': not a number: True"):
        convert([str(flag)], tmp_path / "out", progress=False)
    with pytest.raises(InputError, match="in.xyz: unknown --format 'nonsense'"):
        convert([str(path)], tmp_path / "out", format="nonsense", progress=False)
    (tmp_path / "blank.xyz").write_text("\n\n")
    with pytest.raises(InputError, match="blank.xyz: no structures to convert"):
        convert([str(tmp_path / "blank.xyz")], tmp_path / "out", format="extxyz", progress=False)
    assert not (tmp_path / "out").exists()


def test_never_overwrites_without_permission(tmp_path):
    first = str(write_extxyz(tmp_path / "a.xyz", sample_structures(3, seed=1)))
    second = str(write_extxyz(tmp_path / "b.xyz", sample_structures(5, seed=2)))
    convert([first], tmp_path / "out", progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert([second], tmp_path / "out", progress=False)
    assert Manifest.load(tmp_path / "out").num_structures == 3
    convert([second], tmp_path / "out", overwrite=True, progress=False)
    assert Manifest.load(tmp_path / "out").num_structures == 5
    (tmp_path / "not_a_dataset").mkdir()
    (tmp_path / "not_a_dataset" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an esen-train dataset"):
        convert([first], tmp_path / "not_a_dataset", overwrite=True, progress=False)
    assert (tmp_path / "not_a_dataset" / "precious.txt").read_text() == "keep me"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.fixture
def dataset_dir(tmp_path):
    path = str(write_extxyz(tmp_path / "in.xyz", sample_structures(10)))
    convert([path], tmp_path / "data", num_shards=2, progress=False)
    return tmp_path / "data"


def test_manifest_load_errors_name_the_file(tmp_path, dataset_dir):
    with pytest.raises(DatasetError, match="does not exist"):
        Manifest.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        Manifest.load(tmp_path / "empty")
    manifest_path = dataset_dir / "manifest.json"
    original = json.loads(manifest_path.read_text())

    def load_with(change):
        data = json.loads(json.dumps(original))
        change(data)
        manifest_path.write_text(json.dumps(data))
        return pytest.raises(DatasetError)

    with load_with(lambda d: d.update(format_version=99)) as error:
        Manifest.load(dataset_dir)
    assert "format_version 99" in str(error.value) and str(manifest_path) in str(error.value)
    with load_with(lambda d: d.update(num_structures=11)) as error:
        Manifest.load(dataset_dir)
    assert "manifest says 11" in str(error.value)
    with load_with(lambda d: (d["shards"][1].update(num_structures=4), d.update(num_structures=9))) as error:
        Manifest.load(dataset_dir)
    assert "shard_00001.lmdb: holds 5 records" in str(error.value)
    with load_with(lambda d: d["shards"][0].update(name="shard_00009.lmdb")) as error:
        Manifest.load(dataset_dir)
    assert "shard_00009.lmdb: shard listed in manifest.json is missing" in str(error.value)
    with load_with(lambda d: d.pop("shards")) as error:
        Manifest.load(dataset_dir)
    assert "malformed manifest" in str(error.value)
    for elements in ([999], ["Si"], [True]):
        with load_with(lambda d: d.update(elements=elements)) as error:
            Manifest.load(dataset_dir)
        assert f"field 'elements': {elements!r} are not all atomic numbers" in str(error.value)
    with load_with(lambda d: d["shards"][0].update(name="../elsewhere/shard_00000.lmdb")) as error:
        Manifest.load(dataset_dir)
    assert "'../elsewhere/shard_00000.lmdb' is not a file name in the dataset directory" in str(error.value)
    manifest_path.write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        Manifest.load(dataset_dir)
    manifest_path.unlink()
    with pytest.raises(DatasetError, match="manifest.json: missing"):
        Manifest.load(dataset_dir)


def test_natoms_that_disagree_with_the_manifest_are_refused(dataset_dir):
    natoms = load_natoms(dataset_dir)
    changed = natoms.copy()
    changed[7] += 1  # structure 7 is in shard 1 (5 structures a shard)
    np.save(dataset_dir / "natoms.npy", changed)
    with pytest.raises(DatasetError, match="the counts of shard_00001.lmdb add up to"):
        describe_dataset(dataset_dir)
    np.save(dataset_dir / "natoms.npy", np.stack([natoms[:5], natoms[5:]]))
    with pytest.raises(DatasetError, match=r"natoms.npy: shape \(2, 5\), expected \(10,\)"):
        DatasetDirectory(dataset_dir).natoms()


def test_truncated_shard_and_bad_natoms_are_reported(dataset_dir):
    (dataset_dir / "natoms.npy").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="natoms.npy: unreadable"):
        load_natoms(dataset_dir)
    shard = dataset_dir / "shard_00001.lmdb"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(DatasetError, match="shard_00001.lmdb: shard is truncated"):
        DatasetDirectory(dataset_dir)
    problems = verify_dataset(dataset_dir)
    assert len(problems) == 1 and "shard_00001.lmdb: shard is truncated" in problems[0]


def test_verify_names_the_corrupted_record(dataset_dir):
    dataset = DatasetDirectory(dataset_dir)
    target = dataset.readers[1].read(2)
    dataset.close()
    shard = dataset_dir / "shard_00001.lmdb"
    data = bytearray(shard.read_bytes())
    needle = target.forces[0].tobytes()
    data[data.find(needle) + 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify_dataset(dataset_dir)
    assert any("shard_00001.lmdb: checksum" in p for p in problems)
    assert any("shard_00001.lmdb record 2: checksum mismatch" in p for p in problems)


def test_stats_recover_reference_energies_exactly():
    rng = np.random.default_rng(12)
    references = {1: -13.6, 8: -432.1, 29: -1.7, 78: -6.05}
    elements = np.array(list(references))
    accumulator, merged = StatsAccumulator(), StatsAccumulator()
    part = StatsAccumulator()
    records, forces = [], []
    for i in range(300):
        numbers = rng.choice(elements, size=int(rng.integers(1, 12)))
        record = StructureRecord(
            positions=np.zeros((len(numbers), 3)), atomic_numbers=numbers, cell=np.zeros((3, 3)),
            pbc=np.zeros(3, bool), energy=sum(references[z] for z in numbers),
            forces=rng.normal(size=(len(numbers), 3)),
        )
        records.append(record)
        forces.append(record.forces)
        accumulator.add(record)
        (part if i < 170 else merged).add(record)
    merged.merge(part)
    for stats in (accumulator.result(), merged.result()):
        assert stats.element_references.keys() == references.keys()
        for z, energy in references.items():
            assert stats.element_references[z] == pytest.approx(energy, abs=1e-9)
        assert stats.force_rms == pytest.approx(np.sqrt(np.mean(np.concatenate(forces) ** 2)), rel=1e-12)
        per_atom = np.array([r.energy / r.num_atoms for r in records])
        assert stats.energy_per_atom_mean == pytest.approx(per_atom.mean(), rel=1e-12)
        assert stats.energy_per_atom_std == pytest.approx(per_atom.std(), rel=1e-9)
        # One-pass moments: the variance is exact to ~1e-12 eV², so its root to ~1e-5 eV.
        assert stats.residual_energy_per_atom_mean == pytest.approx(0.0, abs=1e-9)
        assert stats.residual_energy_per_atom_std == pytest.approx(0.0, abs=1e-5)


def test_stats_of_a_single_molecule_dataset_are_finite():
    """Collinear counts (one composition): only the total is determined; no blow-up."""
    rng = np.random.default_rng(13)
    accumulator = StatsAccumulator()
    numbers = molecule("C6H6").numbers
    for _ in range(50):
        accumulator.add(StructureRecord(
            positions=np.zeros((12, 3)), atomic_numbers=numbers, cell=np.zeros((3, 3)),
            pbc=np.zeros(3, bool), energy=-6300 + rng.normal(), forces=np.zeros((12, 3)),
        ))
    stats = accumulator.result()
    total = 6 * stats.element_references[1] + 6 * stats.element_references[6]
    assert all(math.isfinite(e) for e in stats.element_references.values())
    assert total == pytest.approx(-6300, abs=0.5)
    assert abs(stats.residual_energy_per_atom_mean) < 0.05


def test_non_finite_statistics_are_refused_and_the_manifest_kept(tmp_path):
    structures = sample_structures(3)
    structures[1].calc.results["forces"][0, 0] = np.inf
    path = write_extxyz(tmp_path / "in.xyz", structures)
    shards = tmp_path / "data"
    with DatasetWriter(shards, 1, {"tool": "another tool"}) as writer:  # past conversion's checks
        for index, atoms in enumerate(ase.io.read(path, ":")):
            writer.write(atoms_to_record(atoms, str(path), index))
        writer.stats.result = lambda: None  # a tool that writes no statistics
        writer.finish()
    before = (shards / "manifest.json").read_text()
    with pytest.raises(DatasetError, match="statistics force_rms are not finite"):
        write_stats(shards)
    assert (shards / "manifest.json").read_text() == before


def test_stats_stored_at_conversion_match_recomputation(dataset_dir):
    stored = Manifest.load(dataset_dir).stats
    recomputed = compute_stats(dataset_dir)
    for name, value in vars(stored).items():
        if name == "element_references":
            assert value.keys() == recomputed.element_references.keys()
            for z in value:
                assert value[z] == pytest.approx(recomputed.element_references[z], rel=1e-9, abs=1e-9)
        else:
            assert value == pytest.approx(getattr(recomputed, name), rel=1e-9, abs=1e-12)


def test_split_is_disjoint_complete_and_deterministic(tmp_path, dataset_dir):
    parts = split_indices(1000, [0.9, 0.05, 0.05], seed=3)
    assert [len(p) for p in parts] == [900, 50, 50]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1000))
    again = split_indices(1000, [0.9, 0.05, 0.05], seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not np.array_equal(parts[1], split_indices(1000, [0.9, 0.05, 0.05], seed=4)[1])
    for bad in ([0.5, 0.4], [1.0], [0.5, 0.5, 0.0], [0.2, 0.2, 0.2, 0.4]):
        with pytest.raises(ValueError):
            split_indices(100, bad, seed=0)

    manifests = split_dataset(dataset_dir, tmp_path / "part", [0.6, 0.2, 0.2], seed=5)
    assert {name: m.num_structures for name, m in manifests.items()} == {"train": 6, "val": 2, "test": 2}
    sources = []
    for name in ("train", "val", "test"):
        part = DatasetDirectory(tmp_path / f"part_{name}")
        sources += [part.read(i).source_index for i in range(len(part))]
        assert verify_dataset(tmp_path / f"part_{name}") == []
        part.close()
    assert sorted(sources) == list(range(10))
    with pytest.raises(FileExistsError):
        split_dataset(dataset_dir, tmp_path / "part", [0.6, 0.2, 0.2], seed=5)


def test_emt_dataset_is_deterministic_and_varied(tmp_path):
    manifest = generate_emt_dataset(tmp_path / "emt", num=40, seed=4, num_shards=2)
    assert manifest.num_structures == 40
    assert manifest.properties == ["energy", "forces", "stress", "config_type"]
    assert set(manifest.elements) <= {13, 28, 29, 46, 47, 78, 79} and len(manifest.elements) >= 5
    natoms = load_natoms(tmp_path / "emt")
    assert 4 <= natoms.min() and natoms.max() <= 64 and np.median(natoms) <= 16
    dataset = DatasetDirectory(tmp_path / "emt")
    written = {r.source_index: r for r in (dataset.read(i) for i in range(len(dataset)))}
    dataset.close()
    assert all(r.pbc.all() and r.stress is not None for r in written.values())
    kinds = set()
    for index in range(40):  # regenerated from (seed, index) alone: identical
        atoms = emt_structure(4, index)
        kinds.add(atoms.info["config_type"])
        assert np.array_equal(atoms.positions, written[index].positions)
        assert atoms.get_potential_energy() == written[index].energy
        assert written[index].config_type == atoms.info["config_type"]
        assert np.array_equal(atoms.get_stress(voigt=False), written[index].stress)
    assert kinds == set(KINDS)
    assert next(emt_records(1, seed=5)).energy != written[0].energy


def test_fast_emt_equals_ase_emt():
    for index in range(6):
        atoms = emt_structure(7, index)
        reference = atoms.copy()
        reference.calc = EMT()
        fast = atoms.copy()
        fast.calc = FastEMT()
        assert fast.get_potential_energy() == pytest.approx(reference.get_potential_energy(), abs=1e-10)
        np.testing.assert_allclose(fast.get_forces(), reference.get_forces(), atol=1e-10)
        np.testing.assert_allclose(fast.get_stress(), reference.get_stress(), atol=1e-12)


def test_output_has_ordinary_permissions(tmp_path, dataset_dir):
    """Built with tempfile (owner-only), the dataset still ends up readable like any file."""
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(dataset_dir.stat().st_mode) == 0o777 & ~umask
    for name in ("manifest.json", "natoms.npy"):
        assert stat.S_IMODE((dataset_dir / name).stat().st_mode) == 0o666 & ~umask
