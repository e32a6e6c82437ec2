"""`esen-data export`: a dataset directory back to an extended XYZ file.

Records are streamed in the order they were converted (the input's order, whatever the shard
count), so a dataset of any size exports in constant memory, and converting the file again
with the same shard count gives the same shards. Each structure gets its energy, forces and stress (ASE's
SinglePointCalculator: `energy=`, `stress=` and the `forces` columns, which
`esen-data convert` reads back by default) and, in its comment line, its config type,
weight, charge, spin and where it was first converted from. extxyz keeps scalars exactly and
per-atom columns (positions, forces) to 8 decimals. The file is written beside its target
and renamed into place when complete.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import ase.io

from esen_train.data.manifest import DatasetDirectory, with_default_permissions
from esen_train.data.sources import record_to_atoms
from esen_train.data.writer import write_order

FORMATS = ("extxyz",)


def export_dataset(dataset_dir: str | Path, out_path: str | Path, format: str = "extxyz", overwrite: bool = False) -> int:
    """Write every structure of `dataset_dir` to `out_path`; returns how many."""
    if format not in FORMATS:
        raise ValueError(f"export format must be one of {FORMATS}, got {format!r}")
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} already exists; pass --overwrite to replace it")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    dataset = DatasetDirectory(dataset_dir)
    count = 0
    with tempfile.NamedTemporaryFile("w", dir=out_path.parent, prefix=f".{out_path.name}.", delete=False) as stream:
        try:
            for shard, local in write_order([shard.num_structures for shard in dataset.manifest.shards]):
                ase.io.write(stream, record_to_atoms(dataset.readers[shard].read(local)), format=format)
                count += 1
        except BaseException:
            Path(stream.name).unlink()
            raise
        finally:
            dataset.close()
    with_default_permissions(stream.name)
    os.replace(stream.name, out_path)
    return count
