"""A dataset directory: `manifest.json`, `natoms.npy` and the shards it lists.

    DIR/
      manifest.json      what the dataset holds (this module's `Manifest`)
      natoms.npy         int32 [num_structures]: atoms per structure, in global order
      shard_00000.lmdb   records (see `shards.py`); more shards follow the same pattern

The global index of a structure counts through shard 0, then shard 1, and so on, in the
order the manifest lists them; `natoms.npy` follows the same order.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from itertools import accumulate
from pathlib import Path

import numpy as np

from esen_train.data.records import StructureRecord
from esen_train.data.shards import ShardError, ShardReader

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
NATOMS_NAME = "natoms.npy"
UNITS = {"positions": "Å", "energy": "eV", "forces": "eV/Å", "stress": "eV/Å^3"}


class DatasetError(ValueError):
    """A dataset directory that is missing, incomplete or inconsistent; names the file."""


@dataclass
class ShardInfo:
    name: str  # file name inside the dataset directory
    num_structures: int
    num_atoms: int
    checksum: str  # "sha256:<hex digest of the file>"


@dataclass
class DatasetStats:
    """Normalisation statistics, written by `esen-data stats`."""

    # Per-element reference energies (eV) from least squares of E against element counts.
    element_references: dict[int, float]
    # Root mean square of all force components (eV/Å).
    force_rms: float
    # Total energy per atom (eV/atom), raw and after subtracting the references.
    energy_per_atom_mean: float
    energy_per_atom_std: float
    energy_per_atom_min: float
    energy_per_atom_max: float
    residual_energy_per_atom_mean: float
    residual_energy_per_atom_std: float


@dataclass
class Manifest:
    num_structures: int
    num_atoms: int
    elements: list[int]  # sorted atomic numbers present
    # Labels carried: always energy and forces; stress, charge, spin where at least one
    # record has them (a record without stress has `stress is None`).
    properties: list[str]
    shards: list[ShardInfo]
    provenance: dict = field(default_factory=dict)  # tool, inputs, options, time
    skipped: int = 0  # invalid input structures left out by --skip-invalid
    stats: DatasetStats | None = None
    units: dict[str, str] = field(default_factory=lambda: dict(UNITS))
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> Manifest:
        try:
            data = dict(data)
            data["shards"] = [ShardInfo(**shard) for shard in data["shards"]]
            if data.get("stats") is not None:
                stats = dict(data["stats"])
                stats["element_references"] = {
                    int(z): float(e) for z, e in stats["element_references"].items()
                }
                data["stats"] = DatasetStats(**stats)
            return cls(**data)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise DatasetError(f"{where}: malformed manifest ({error})") from None

    def save(self, directory: str | Path) -> None:
        """Write DIR/manifest.json atomically (temporary file, then rename)."""
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        atomic_write_bytes(Path(directory) / MANIFEST_NAME, text.encode())

    @classmethod
    def load(cls, directory: str | Path, check_shards: bool = True) -> Manifest:
        """Read and validate DIR/manifest.json.

        Checks the format version, that the totals add up, and (with `check_shards`)
        that every shard file exists, is not truncated and holds the number of records
        the manifest says. Errors name the file at fault.
        """
        directory = Path(directory)
        path = directory / MANIFEST_NAME
        if not directory.is_dir():
            raise DatasetError(f"{directory}: dataset directory does not exist{_set_aside_hint(directory)}")
        if not path.is_file():
            if not any(directory.iterdir()):
                raise DatasetError(f"{directory}: directory is empty, not a dataset")
            raise DatasetError(f"{path}: missing (is {directory} an esen-train dataset?)")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DatasetError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            version = data.get("format_version") if isinstance(data, dict) else None
            raise DatasetError(
                f"{path}: format_version {version!r}, this esen-train reads {FORMAT_VERSION}"
            )
        manifest = cls.from_dict(data, where=str(path))
        manifest._check_fields(path)
        manifest._check_totals(path)
        if check_shards:
            for shard in manifest.shards:
                _check_shard_file(directory, shard)
        return manifest

    def _check_fields(self, path: Path) -> None:
        """The values other code indexes with: atomic numbers, and shard names that stay
        inside the dataset directory."""
        if not all(isinstance(z, int) and not isinstance(z, bool) and 1 <= z <= 118 for z in self.elements):
            raise DatasetError(f"{path}: field 'elements': {self.elements!r} are not all atomic numbers")
        for shard in self.shards:
            if not isinstance(shard.name, str) or Path(shard.name).name != shard.name or shard.name.startswith("."):
                raise DatasetError(f"{path}: shard name {shard.name!r} is not a file name in the dataset directory")

    def _check_totals(self, path: Path) -> None:
        structures = sum(shard.num_structures for shard in self.shards)
        atoms = sum(shard.num_atoms for shard in self.shards)
        if structures != self.num_structures or atoms != self.num_atoms:
            raise DatasetError(
                f"{path}: shards hold {structures} structures / {atoms} atoms but the manifest "
                f"says {self.num_structures} / {self.num_atoms}"
            )


def _set_aside_hint(directory: Path) -> str:
    """Where a writer that died while replacing `directory` left the dataset it replaced."""
    for aside in sorted(directory.parent.glob(f".{directory.name}.old-*/dataset")):
        if (aside / MANIFEST_NAME).is_file():
            return (f" (a writer replacing it died halfway and left the previous dataset in {aside}: "
                    "move it back, or run the command again, which restores it first)")
    return ""


def _check_shard_file(directory: Path, shard: ShardInfo) -> None:
    path = directory / shard.name
    if not path.is_file():
        raise DatasetError(f"{path}: shard listed in {MANIFEST_NAME} is missing")
    reader = ShardReader(path)
    try:
        count = len(reader)
    except ShardError as error:
        raise DatasetError(str(error)) from None
    finally:
        reader.close()
    if count != shard.num_structures:
        raise DatasetError(
            f"{path}: holds {count} records but {MANIFEST_NAME} says {shard.num_structures}"
        )


def with_default_permissions(path: str | Path) -> None:
    """Give a file or directory made by `tempfile` (owner-only) the permissions an
    ordinary `open`/`mkdir` would have given it under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old or the complete new content."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    with_default_permissions(f.name)
    os.replace(f.name, path)


def save_natoms(directory: str | Path, natoms: np.ndarray) -> None:
    path = Path(directory) / NATOMS_NAME
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        np.save(f, np.asarray(natoms, dtype=np.int32), allow_pickle=False)
    with_default_permissions(f.name)
    os.replace(f.name, path)


def load_natoms(directory: str | Path, mmap: bool = False) -> np.ndarray:
    """Atoms per structure (int32 [num_structures]) in global order; never unpickles."""
    path = Path(directory) / NATOMS_NAME
    if not path.is_file():
        raise DatasetError(f"{path}: missing (atoms-per-structure array of the dataset)")
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except ValueError as error:
        raise DatasetError(f"{path}: unreadable ({error})") from None


def checked_natoms(directory: str | Path, manifest: Manifest, mmap: bool = False) -> np.ndarray:
    """`load_natoms`, checked against the manifest: one count per structure, and each
    shard's counts adding up to its atoms."""
    natoms = load_natoms(directory, mmap=mmap)
    path = Path(directory) / NATOMS_NAME
    if natoms.shape != (manifest.num_structures,):
        raise DatasetError(f"{path}: shape {natoms.shape}, expected ({manifest.num_structures},) from {MANIFEST_NAME}")
    starts = list(accumulate((shard.num_structures for shard in manifest.shards), initial=0))
    for shard, start, end in zip(manifest.shards, starts, starts[1:]):
        atoms = int(natoms[start:end].sum(dtype=np.int64))
        if atoms != shard.num_atoms:
            raise DatasetError(f"{path}: the counts of {shard.name} add up to {atoms} atoms, "
                               f"{MANIFEST_NAME} says {shard.num_atoms}")
    return natoms


def file_checksum(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


class DatasetDirectory:
    """An opened dataset directory: its manifest, one lazy reader per shard, and the
    mapping from global structure index to (shard, local index).

    Picklable; shards open on first read in each process.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = Manifest.load(self.path)
        self.readers = [ShardReader(self.path / shard.name) for shard in self.manifest.shards]
        counts = [shard.num_structures for shard in self.manifest.shards]
        # starts[k] = global index of the first record of shard k (a list: bisect on it
        # costs a tenth of numpy's searchsorted for one index, and it runs for every read)
        self.starts = list(accumulate(counts, initial=0))

    def __len__(self) -> int:
        return self.manifest.num_structures

    def natoms(self, mmap: bool = False) -> np.ndarray:
        return checked_natoms(self.path, self.manifest, mmap=mmap)

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, index inside that shard) of global structure `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path}: structure {index} out of range 0..{len(self) - 1}")
        shard = bisect_right(self.starts, index) - 1
        return shard, index - self.starts[shard]

    def read(self, index: int) -> StructureRecord:
        shard, local = self.locate(index)
        return self.readers[shard].read(local)

    def close(self) -> None:
        for reader in self.readers:
            reader.close()
