"""Real DFT files from ../shared/data convert with the counts their README documents and
every field equal to what ASE reads from the source."""
from __future__ import annotations

import ase.io
import numpy as np
import pytest
from ase.stress import voigt_6_to_full_3x3_stress

from esen_train.data.convert import convert
from esen_train.data.manifest import DatasetDirectory
from esen_train.data.verify import verify_dataset
from tests.conftest import shared_data

pytestmark = pytest.mark.shared_data

# file, frames, atoms per frame (None: varies), periodic with stress. The rMD17 test
# files are left out: same source and format as the train files, 2000 more frames.
DOCUMENTED = [
    ("rmd17/aspirin_train.xyz", 1000, 21, False),
    ("rmd17/ethanol_train.xyz", 1000, 9, False),
    ("mlearn/Si_train.xyz", 214, None, True),
    ("mlearn/Si_test.xyz", 25, None, True),
    ("mlearn/Li_train.xyz", 241, None, True),
    ("mlearn/Li_test.xyz", 29, None, True),
    ("mlearn/Cu_test.xyz", 31, None, True),
    ("acac/train_300K.xyz", 500, 15, False),
    ("acac/isolated_atoms.xyz", 3, 1, False),
]


@pytest.mark.parametrize("relative, frames, natoms, periodic", DOCUMENTED, ids=[d[0] for d in DOCUMENTED])
def test_real_file_converts_exactly(tmp_path, relative, frames, natoms, periodic):
    path = str(shared_data(relative))
    manifest = convert([path], tmp_path / "out", num_shards=2, workers=1, progress=False)
    reference = ase.io.read(path, ":")
    assert manifest.num_structures == frames == len(reference)
    assert manifest.skipped == 0
    assert manifest.num_atoms == sum(len(a) for a in reference)
    # Every file names each structure's config_type (MACE's convention), kept in the records.
    assert manifest.properties == (["energy", "forces", "stress"] if periodic else ["energy", "forces"]) + ["config_type"]

    dataset = DatasetDirectory(tmp_path / "out")
    seen = set()
    for index in range(len(dataset)):
        record = dataset.read(index)
        atoms = reference[record.source_index]
        results = atoms.calc.results  # what ase.io.read gives, without get_*()'s state checks
        seen.add(record.source_index)
        assert record.source_file == path
        if natoms is not None:
            assert record.num_atoms == natoms
        assert np.array_equal(record.positions, atoms.positions)
        assert np.array_equal(record.atomic_numbers, atoms.numbers)
        assert np.array_equal(record.cell, atoms.cell.array)
        assert np.array_equal(record.pbc, atoms.pbc)
        assert record.energy == results["energy"]
        assert record.config_type == atoms.info["config_type"]
        assert np.array_equal(record.forces, results["forces"])
        assert record.positions.dtype == record.forces.dtype == np.float64
        if periodic:
            assert atoms.pbc.all()
            assert np.array_equal(record.stress, voigt_6_to_full_3x3_stress(results["stress"]))
        else:
            assert record.stress is None
    assert seen == set(range(frames))
    dataset.close()
    assert verify_dataset(tmp_path / "out") == []


def test_molecule_with_its_isolated_atoms_converts_without_outliers(tmp_path):
    """AcAc MD frames beside the isolated-atom energies of H, C and O: no energy outliers,
    although one composition and three single atoms cannot share reference energies."""
    frames, atoms = str(shared_data("acac/train_300K.xyz")), str(shared_data("acac/isolated_atoms.xyz"))
    manifest = convert([frames, atoms], tmp_path / "out", progress=False)
    assert (manifest.num_structures, manifest.skipped) == (503, 0)
    assert verify_dataset(tmp_path / "out") == []
