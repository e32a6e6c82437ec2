"""The torch Dataset over one or several dataset directories: records in, graphs out.

Each item is a `torch_geometric.data.Data` with the fields of the batch table in
ARCHITECTURE.md; the neighbour graph is built on the fly (every neighbour within
the cutoff, periodic images included). Shards are LMDB files opened read-only,
without locking, on first read; every process (each DataLoader worker) reads
through a transaction of its own (see shards.py for how forked workers reuse
the read-only mapping).

Global index: the structures of the first directory, then those of the second,
and so on, each directory in its manifest's order; `natoms` follows that order.
"""
from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torch_geometric.data import Data

from esen_train.data.manifest import DatasetDirectory, DatasetError, Manifest
from esen_train.data.neighbors import build_neighbor_list
from esen_train.data.records import StructureRecord


# The reader's float dtypes (ARCHITECTURE.md: float32 by default, float64 for tests).
_NUMPY_FLOATS = {torch.float32: np.float32, torch.float64: np.float64}


class LMDBDataset(Dataset):
    def __init__(
        self,
        directories: str | Path | list[str | Path],
        cutoff: float,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if isinstance(directories, (str, Path)):
            directories = [directories]
        if not directories:
            raise ValueError("LMDBDataset needs at least one dataset directory")
        if not cutoff > 0:
            raise ValueError(f"cutoff must be positive, got {cutoff}")
        if dtype not in _NUMPY_FLOATS:
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.directories = [DatasetDirectory(path) for path in directories]
        self.cutoff = float(cutoff)
        self.dtype = dtype
        # Atoms per structure in global order, for the atom-balanced sampler.
        self.natoms = np.concatenate([directory.natoms() for directory in self.directories])
        # starts[k] = global index of the first structure of directory k (a list: bisect
        # on it is faster than numpy for one index at a time).
        self._starts = list(accumulate((len(directory) for directory in self.directories), initial=0))

    @property
    def manifests(self) -> list[Manifest]:
        return [directory.manifest for directory in self.directories]

    @property
    def has_stress(self) -> bool:
        """Whether any structure carries a stress label."""
        return any("stress" in manifest.properties for manifest in self.manifests)

    def __len__(self) -> int:
        return self._starts[-1]

    def read_record(self, index: int) -> StructureRecord:
        """The decoded record of global structure `index` (no graph)."""
        if not 0 <= index < len(self):
            raise IndexError(f"structure {index} out of range 0..{len(self) - 1}")
        which = bisect_right(self._starts, index) - 1
        directory = self.directories[which]
        local = index - self._starts[which]
        record = directory.read(local)
        if record.num_atoms != self.natoms[index]:
            shard, in_shard = directory.locate(local)
            raise DatasetError(
                f"{directory.path / directory.manifest.shards[shard].name} record {in_shard}: "
                f"{record.num_atoms} atoms, but natoms.npy says {self.natoms[index]}"
            )
        return record

    def __getitem__(self, index: int) -> Data:
        return record_to_graph(self.read_record(int(index)), self.cutoff, self.dtype)


def record_to_graph(record: StructureRecord, cutoff: float, dtype: torch.dtype) -> Data:
    """One structure as a graph with the fields of ARCHITECTURE.md's batch table."""
    real = _NUMPY_FLOATS[dtype]
    edge_index, cell_offsets = build_neighbor_list(record.positions, record.cell, record.pbc, cutoff, real)
    has_stress = record.stress is not None
    stress = record.stress if has_stress else np.zeros((3, 3))
    # Arrays are converted in numpy, then wrapped without a copy: several times cheaper
    # per call than torch's own conversions, which matters at thousands of items a second.
    arrays = {
        "pos": record.positions.astype(real, copy=False),
        "atomic_numbers": record.atomic_numbers.astype(np.int64, copy=False),
        "cell": record.cell.astype(real, copy=False).reshape(1, 3, 3),
        "pbc": record.pbc.reshape(1, 3),
        "natoms": np.array([record.num_atoms], dtype=np.int64),
        "edge_index": edge_index,
        "cell_offsets": cell_offsets,
        # Total energies stay float64: -17,600 eV (aspirin) in float32 is only good to ~1 meV.
        "energy": np.array([record.energy], dtype=np.float64),
        "forces": record.forces.astype(real, copy=False),
        "stress": stress.astype(real, copy=False).reshape(1, 3, 3),
        "has_stress": np.array([has_stress]),
        # Total charge and spin multiplicity, 0 where the source has none (fairchem's defaults).
        "charge": np.array([record.charge or 0.0], dtype=np.float64),
        "spin": np.array([record.spin or 0.0], dtype=np.float64),
    }
    # Data(**fields) costs about 70 µs per graph, a sixth of the whole item for 108-atom Cu:
    # each field passes through several layers of attribute handling, one raising and catching
    # an AttributeError. Filling the storage's mapping directly costs 10 µs and gives the same
    # graph (tests/data/test_data_loader.py checks it against Data(**fields)).
    graph = Data()
    graph._store._mapping.update((name, torch.from_numpy(array)) for name, array in arrays.items())
    return graph
