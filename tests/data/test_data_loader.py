"""LMDBDataset and the resumable loader, on real LMDB dataset directories of EMT-labelled structures."""
from __future__ import annotations

import ase.build
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.emt import EMT
from torch_geometric.data import Batch, Data

from esen_train.data.dataset import LMDBDataset
from esen_train.data.loader import build_dataloader
from esen_train.data.manifest import DatasetError, save_natoms
from esen_train.data.neighbors import build_neighbor_list
from esen_train.data.records import StructureRecord
from esen_train.data.sampler import AtomBalancedBatchSampler
from esen_train.data.writer import DatasetWriter

CUTOFF = 5.0


def _record(atoms: Atoms, index: int) -> StructureRecord:
    atoms.calc = EMT()
    periodic = bool(atoms.pbc.any())
    return StructureRecord(
        positions=atoms.positions.copy(),
        atomic_numbers=atoms.numbers.astype(np.int64),
        cell=atoms.cell.array.copy(),
        pbc=atoms.pbc.copy(),
        energy=atoms.get_potential_energy(),
        forces=atoms.get_forces(),
        stress=atoms.get_stress(voigt=False) if periodic else None,
        # Every other structure carries a total charge and spin multiplicity.
        charge=index % 3 - 1 if index % 2 else None,
        spin=index % 4 if index % 2 else None,
        source_file="built-in-test",
        source_index=index,
    )


def _crystals(count: int) -> list[Atoms]:
    rng = np.random.default_rng(0)
    structures = []
    for k in range(count):
        element = ["Cu", "Al", "Ni"][k % 3]
        repeat = tuple(int(r) for r in rng.integers(1, 3, size=3))
        atoms = ase.build.bulk(element, cubic=bool(k % 2)) * repeat
        atoms.rattle(0.05, seed=k)
        structures.append(atoms)
    return structures


def _molecules() -> list[Atoms]:
    structures = []
    for k, name in enumerate(["CH4", "H2O", "C2H6", "CH3OH", "NH3", "C2H4"]):
        molecule = ase.build.molecule(name)
        molecule.rattle(0.02, seed=k)
        structures.append(molecule)
    return structures


def _write_dataset(path, structures: list[Atoms], num_shards: int) -> None:
    with DatasetWriter(path, num_shards=num_shards, provenance={"made_by": "tests"}) as writer:
        for index, atoms in enumerate(structures):
            writer.write(_record(atoms, index))
        writer.finish()


@pytest.fixture(scope="module")
def dataset_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader_data")
    _write_dataset(root / "crystals", _crystals(34), num_shards=3)
    _write_dataset(root / "molecules", _molecules(), num_shards=1)
    return [root / "crystals", root / "molecules"]


@pytest.fixture(scope="module")
def dataset(dataset_dirs):
    return LMDBDataset(dataset_dirs, cutoff=CUTOFF)


def _expected_graph_edges(record, cutoff) -> set:
    edge_index, offsets = build_neighbor_list(record.positions, record.cell, record.pbc, cutoff)
    return {(j, i, tuple(s)) for j, i, s in zip(*edge_index.tolist(), offsets.tolist())}


def test_item_has_the_batch_table_fields(dataset):
    assert len(dataset) == 40 and dataset.natoms.shape == (40,)
    assert dataset.has_stress and len(dataset.manifests) == 2
    for index in (0, 17, 33, 34, 39):  # both directories
        record = dataset.read_record(index)
        item = dataset[index]
        n, periodic = record.num_atoms, bool(record.pbc.any())
        assert dataset.natoms[index] == n
        assert item.pos.shape == (n, 3) and item.pos.dtype == torch.float32
        assert item.atomic_numbers.dtype == torch.long
        assert item.cell.shape == (1, 3, 3) and item.pbc.shape == (1, 3) and item.pbc.dtype == torch.bool
        assert item.natoms.tolist() == [n]
        assert item.energy.shape == (1,) and item.forces.shape == (n, 3)
        assert item.stress.shape == (1, 3, 3) and item.has_stress.tolist() == [periodic]
        assert item.cell_offsets.dtype == torch.float32 and item.edge_index.dtype == torch.long
        assert torch.equal(item.pos, torch.from_numpy(record.positions).float())
        assert torch.equal(item.atomic_numbers, torch.from_numpy(record.atomic_numbers).long())
        assert item.energy.dtype == torch.float64 and item.energy.item() == record.energy  # totals stay exact
        # Charge and spin per structure, 0 where the record has none.
        assert item.charge.dtype == torch.float64 and item.charge.tolist() == [record.charge or 0.0]
        assert item.spin.dtype == torch.float64 and item.spin.tolist() == [record.spin or 0.0]
        if periodic:
            assert torch.allclose(item.stress[0], torch.from_numpy(record.stress).float())
        else:
            assert not item.stress.any() and not item.cell.any()
        edges = {(j, i, tuple(s)) for j, i, s in zip(*item.edge_index.tolist(), item.cell_offsets.long().tolist())}
        assert edges == _expected_graph_edges(record, CUTOFF) and len(edges) == item.edge_index.shape[1]


def test_item_is_the_graph_data_would_build(dataset):
    """Items fill torch_geometric's storage directly (for speed): they must be the same
    graphs as Data(**fields) and collate the same way."""
    items = [dataset[index] for index in (0, 34)]
    rebuilt = [Data(**{key: value for key, value in item.items()}) for item in items]
    for item, reference in zip(items, rebuilt):
        # The same fields and tensors; the order of keys is torch_geometric's business.
        assert sorted(item.keys()) == sorted(reference.keys())
        assert (item.num_nodes, item.num_edges) == (reference.num_nodes, reference.num_edges)
        for key in reference.keys():
            assert torch.equal(item[key], reference[key]), key
    batch, reference_batch = Batch.from_data_list(items), Batch.from_data_list(rebuilt)
    assert sorted(batch.keys()) == sorted(reference_batch.keys()) and batch.num_graphs == 2
    for key in reference_batch.keys():
        assert torch.equal(batch[key], reference_batch[key]), key


def test_float64_reader_keeps_full_precision(dataset_dirs):
    dataset = LMDBDataset(dataset_dirs[0], cutoff=CUTOFF, dtype=torch.float64)
    record, item = dataset.read_record(3), dataset[3]
    assert item.pos.dtype == torch.float64 and torch.equal(item.pos, torch.from_numpy(record.positions))
    assert torch.equal(item.forces, torch.from_numpy(record.forces))
    assert item.energy.item() == record.energy


def test_natoms_that_disagree_with_a_record_name_the_shard(tmp_path):
    _write_dataset(tmp_path / "data", _crystals(4), num_shards=1)
    natoms = np.load(tmp_path / "data" / "natoms.npy")
    natoms[2] += 1  # and one less in record 3: the shard's total still agrees with the manifest
    natoms[3] -= 1
    save_natoms(tmp_path / "data", natoms)
    dataset = LMDBDataset(tmp_path / "data", cutoff=CUTOFF)
    with pytest.raises(DatasetError, match=r"shard_00000\.lmdb record 2.*natoms\.npy"):
        dataset[2]


def _energies(batch) -> list[float]:
    return batch.energy.tolist()


def _expected_energies(dataset, indices) -> list[float]:
    return [dataset.read_record(i).energy for i in indices]


def test_loader_batches_are_collated_graphs(dataset):
    loader = build_dataloader(dataset, max_atoms=60, rank=0, world_size=1, seed=0, num_workers=0)
    batch = loader.next_batch()
    count = batch.num_graphs
    assert batch.cell.shape == (count, 3, 3) and batch.pbc.shape == (count, 3)
    assert batch.natoms.shape == (count,) and batch.energy.shape == (count,)
    assert batch.stress.shape == (count, 3, 3) and batch.has_stress.shape == (count,)
    assert batch.batch.shape == (batch.natoms.sum(),)
    assert int(batch.natoms.sum()) <= 60 or count == 1
    # Each graph of the batch equals the direct neighbour-list build of its structure.
    sampler = AtomBalancedBatchSampler(dataset.natoms, 60, 0, 1, seed=0)
    indices = next(iter(sampler))
    for graph, index in zip(batch.to_data_list(), indices):
        record = dataset.read_record(index)
        assert torch.equal(graph.pos, torch.from_numpy(record.positions).float())
        edges = {(j, i, tuple(s)) for j, i, s in zip(*graph.edge_index.tolist(), graph.cell_offsets.long().tolist())}
        assert edges == _expected_graph_edges(record, CUTOFF)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_cover_an_epoch_once(dataset, num_workers):
    seen = []
    for rank in range(2):
        loader = build_dataloader(dataset, 80, rank=rank, world_size=2, seed=5, num_workers=num_workers)
        sampler = AtomBalancedBatchSampler(dataset.natoms, 80, rank, 2, seed=5)
        per_epoch = len(loader)
        batches = list(loader.epoch())
        assert len(batches) == len(sampler) == per_epoch
        for batch, indices in zip(batches, sampler):
            assert _energies(batch) == _expected_energies(dataset, indices)
            seen.extend(indices)
        assert loader.current_epoch == 1 and loader.state_dict() == {"epoch": 1, "batches_done": 0}
    assert sorted(seen) == list(range(len(dataset)))


def test_resume_through_workers_is_exact(dataset):
    """State after k consumed batches (workers have prefetched more) resumes at batch k+1."""
    reference = build_dataloader(dataset, 70, rank=1, world_size=2, seed=9, num_workers=0)
    per_epoch = len(reference)
    consumed = per_epoch - 2  # resume near the end: the rest runs into the next epoch
    expected = [_energies(reference.next_batch()) for _ in range(consumed + 6)]

    first = build_dataloader(dataset, 70, rank=1, world_size=2, seed=9, num_workers=2)
    head = [_energies(first.next_batch()) for _ in range(consumed)]
    state = first.state_dict()
    assert state == {"epoch": 0, "batches_done": consumed}

    resumed = build_dataloader(dataset, 70, rank=1, world_size=2, seed=9, num_workers=2)
    resumed.load_state_dict(state)
    tail = [_energies(resumed.next_batch()) for _ in range(6)]
    assert head + tail == expected
    assert resumed.state_dict() == {"epoch": 1, "batches_done": 6 - 2}
    # The interrupted loader, told to resume from its own state, drops its prefetched batches.
    first.load_state_dict(state)
    assert [_energies(first.next_batch()) for _ in range(6)] == tail
