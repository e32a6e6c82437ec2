"""`esen-data verify`: read a whole dataset back and check it against its manifest."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from esen_train.data.manifest import (
    NATOMS_NAME,
    DatasetDirectory,
    DatasetError,
    Manifest,
    ShardInfo,
    file_checksum,
    load_natoms,
)
from esen_train.data.outliers import find_energy_outliers
from esen_train.data.records import RecordError
from esen_train.data.shards import ShardError, ShardReader
from esen_train.data.validate import InvalidStructure, check_record


def verify_dataset(directory: str | Path) -> list[str]:
    """Every problem found, each naming the file (and record and field); empty when all is well.

    Checks the manifest (see `Manifest.load`), the natoms array, each shard's checksum,
    that every record decodes and passes the checks of conversion (`validate.check_record`:
    finite, plausible values, no overlapping atoms, a plausible density), that atom counts,
    elements and properties agree, and that no energy is an outlier (`outliers.py`).
    """
    directory = Path(directory)
    try:
        manifest = Manifest.load(directory)
        natoms = load_natoms(directory)
    except (DatasetError, ShardError) as error:
        return [str(error)]
    problems = []
    if natoms.shape != (manifest.num_structures,) or int(natoms.sum()) != manifest.num_atoms:
        problems.append(
            f"{directory / NATOMS_NAME}: {natoms.shape[0]} structures / {int(natoms.sum())} atoms, "
            f"manifest says {manifest.num_structures} / {manifest.num_atoms}"
        )
        natoms = None
    start = 0
    for shard in manifest.shards:
        expected = None if natoms is None else natoms[start : start + shard.num_structures]
        problems += _verify_shard(directory, shard, manifest, expected)
        start += shard.num_structures
    if not problems:  # outliers need every record readable
        problems += _energy_outliers(directory)
    return problems


def _verify_shard(
    directory: Path, shard: ShardInfo, manifest: Manifest, natoms: np.ndarray | None
) -> list[str]:
    path = directory / shard.name
    problems = []
    checksum = file_checksum(path)
    if checksum != shard.checksum:
        # Keep reading: the record checks below usually name the damaged record.
        problems.append(f"{path}: checksum {checksum} does not match the manifest's {shard.checksum}")
    elements = set(manifest.elements)
    properties = set(manifest.properties)
    reader = ShardReader(path)
    count = atoms = 0
    try:
        for index, record in enumerate(reader):
            where = f"{path} record {index}"
            count += 1
            atoms += record.num_atoms
            if natoms is not None and index < len(natoms) and natoms[index] != record.num_atoms:
                problems.append(f"{where}: {record.num_atoms} atoms, {NATOMS_NAME} says {natoms[index]}")
            unknown = set(np.unique(record.atomic_numbers).tolist()) - elements
            if unknown:
                problems.append(f"{where}: elements {sorted(unknown)} not in the manifest")
            if record.stress is not None and "stress" not in properties:
                problems.append(f"{where}: has stress, the manifest's properties do not")
            try:
                check_record(record)
            except InvalidStructure as error:
                problems.append(f"{where}: field '{error.field}': {error.reason} ({_source(record)})")
    except (RecordError, ShardError) as error:
        # A record that does not decode may mean a damaged B-tree: stop reading this shard.
        return problems + [str(error)]
    finally:
        reader.close()
    if (count, atoms) != (shard.num_structures, shard.num_atoms):
        problems.append(
            f"{path}: {count} structures / {atoms} atoms, the manifest says "
            f"{shard.num_structures} / {shard.num_atoms}"
        )
    return problems


def _energy_outliers(directory: Path) -> list[str]:
    dataset = DatasetDirectory(directory)
    try:
        problems = []
        for outlier in find_energy_outliers(dataset.read, len(dataset)):
            shard, local = dataset.locate(outlier.position)
            where = f"{directory / dataset.manifest.shards[shard].name} record {local}"
            source = f"from {outlier.source_file} structure {outlier.source_index}"
            problems.append(f"{where}: field 'energy': {outlier.reason()} ({source})")
        return problems
    finally:
        dataset.close()


def _source(record) -> str:
    return f"from {record.source_file} structure {record.source_index}"
