"""Reading input files as `StructureRecord`s, in chunks that workers convert in parallel.

Three kinds of input, each read a chunk at a time so no big file is ever in memory:

* extended XYZ (`.xyz`, `.extxyz`): one scan finds the byte range of every chunk of
  frames; a worker reads just its byte range and parses it with ASE's extxyz reader.
  (ASE's own `iread` first builds an index of every frame of the whole file, which for
  a file of 100 million frames is itself too large.)
* ASE databases (`.db`, `.json`, and fairchem's `.aselmdb` through `ase-db-backends`):
  the row count is known up front, and a worker reads rows start..start+count.
* anything else ASE reads (VASP OUTCAR/vasprun.xml, `.traj`, compressed files, ...): one
  chunk per file, streamed with `ase.io.iread`.

The index of a structure is its position in `ase.io.read(file, ":")`. Labels are looked up
by the names in `LabelKeys` (`--energy-key REF_energy` and so on), as MACE's tools do.
"""
from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import ase.db
import ase.io
import numpy as np
from ase import Atoms
from ase.data import atomic_numbers
from ase.io.formats import filetype, get_compression, ioformats
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import full_3x3_to_voigt_6_stress, voigt_6_to_full_3x3_stress

from esen_train.data.records import StructureRecord
from esen_train.data.validate import InvalidStructure

EXTXYZ = "extxyz"
DATABASE = "database"
ASE_IO = "ase-io"
_DATABASE_SUFFIXES = {".db", ".json", ".aselmdb"}


@dataclass(frozen=True)
class LabelKeys:
    """The names a structure's labels have in an input file. Each is looked up in the ASE
    calculator's results (where ASE's readers put `energy`, `free_energy`, `forces`, `stress`),
    then in `atoms.info` (per structure: `REF_energy=` on an extxyz comment line, ASE database
    key-value pairs and data) or, for forces, `atoms.arrays` (per atom: `REF_forces` columns)."""

    energy: str = "energy"
    forces: str = "forces"
    stress: str = "stress"  # Voigt 6, 3x3 or 9 values, eV/Å³ in ASE's sign convention
    config_type: str = "config_type"
    weight: str = "config_weight"

    def to_dict(self) -> dict:
        return asdict(self)


class InputError(ValueError):
    """An input file that cannot be read; names the file (and structure where known)."""


@dataclass(frozen=True)
class InputChunk:
    """Structures start..start+count-1 of one file (count None: to the end of the file)."""

    path: str
    kind: str  # EXTXYZ, DATABASE or ASE_IO
    start: int
    count: int | None
    byte_range: tuple[int, int] | None = None  # extxyz only: [begin, end) in the file
    format: str | None = None  # ase.io format name for ASE_IO inputs


def input_kind(path: Path, format: str | None = None) -> str:
    if path.suffix in _DATABASE_SUFFIXES and format is None:
        return DATABASE
    compressed = get_compression(str(path))[1] is not None  # no byte ranges in a .gz
    if (format or _guess_format(path)) == "extxyz" and not compressed:
        return EXTXYZ
    return ASE_IO


def _guess_format(path: Path) -> str:
    try:
        return filetype(str(path), read=True)
    except Exception as error:  # ase raises several types for unknown files
        raise InputError(f"{path}: cannot tell the file format ({error}); pass --format") from None


def plan_chunks(path: str | Path, chunk_size: int, format: str | None = None) -> list[InputChunk]:
    """Split one input file into chunks of at most `chunk_size` structures."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: input file does not exist")
    if format is not None and format not in ioformats:
        raise InputError(f"{path}: unknown --format {format!r}; ase.io reads e.g. extxyz, traj, vasp-out, vasp-xml")
    kind = input_kind(path, format)
    if kind == EXTXYZ:
        return _plan_extxyz(path, chunk_size)
    if kind == DATABASE:
        with _open_database(path) as db:
            total = db.count()
        return [
            InputChunk(str(path), DATABASE, start, min(chunk_size, total - start))
            for start in range(0, total, chunk_size)
        ]
    return [InputChunk(str(path), ASE_IO, 0, None, format=format)]


def _plan_extxyz(path: Path, chunk_size: int) -> list[InputChunk]:
    """Byte ranges of chunks of frames, found by reading only the atom-count lines.

    A blank line ends the file for ASE's reader, which would silently drop every frame after
    it; so one that is followed by more text is an error, not the end."""
    chunks = []
    with open(path, "rb") as f:
        frame, chunk_start, chunk_begin, line_number, declared = 0, 0, 0, 0, None
        while True:
            position = f.tell()
            line = f.readline()
            line_number += 1
            if not line.strip():
                _check_only_blank_lines_follow(f, path, frame, line_number, bool(line))
                break
            if frame - chunk_start == chunk_size:
                chunks.append(
                    InputChunk(str(path), EXTXYZ, chunk_start, chunk_size, (chunk_begin, position))
                )
                chunk_start, chunk_begin = frame, position
            try:
                declared = int(line)
            except ValueError:
                looks_like_an_atom = len(line.split()) >= 4  # symbol and position: the count above was short
                hint = f" (is structure {frame - 1}'s atom count, {declared}, right?)" if frame and looks_like_an_atom else ""
                raise InputError(
                    f"{path} structure {frame}: line {line_number}: expected an atom count line, "
                    f"got {line[:60]!r}{hint}"
                ) from None
            for _ in range(declared + 1):  # comment line, then one line per atom
                if not f.readline():
                    raise InputError(f"{path} structure {frame}: file ends inside the frame")
            line_number += declared + 1 + _skip_vec_lines(f)
            frame += 1
        if frame > chunk_start:
            chunks.append(
                InputChunk(str(path), EXTXYZ, chunk_start, frame - chunk_start, (chunk_begin, position))
            )
    return chunks


def _check_only_blank_lines_follow(f, path: Path, frame: int, line_number: int, at_blank_line: bool) -> None:
    if not at_blank_line:  # end of file
        return
    for offset, line in enumerate(f, start=1):
        if line.strip():
            raise InputError(
                f"{path} structure {frame}: line {line_number} is blank but more structures follow "
                f"(line {line_number + offset}); remove the blank line, or every structure after it "
                "would be lost"
            )


def _skip_vec_lines(f) -> int:
    """Skip the "VEC1 ..." lattice lines old-style extxyz may put after a frame; how many."""
    skipped = 0
    while True:
        position = f.tell()
        if not f.readline().lstrip().startswith(b"VEC"):
            f.seek(position)
            return skipped
        skipped += 1


def _open_database(path: Path):
    extra = {"readonly": True} if path.suffix == ".aselmdb" else {}
    try:
        return ase.db.connect(str(path), use_lock_file=False, **extra)
    except Exception as error:
        raise InputError(f"{path}: cannot open as an ASE database ({error})") from None


def read_chunk(chunk: InputChunk) -> Iterator[tuple[int, Atoms]]:
    """(index in file, Atoms) for each structure of the chunk, with charge/spin in info."""
    index = chunk.start
    try:
        for atoms in _chunk_atoms(chunk):
            yield index, atoms
            index += 1
    except InvalidStructure:
        raise
    except Exception as error:  # parsers raise anything from ValueError to IndexError
        if _is_unknown_symbol(error):
            raise InputError(f"{chunk.path} structure {index}: field 'atomic_numbers': "
                             f"unknown element symbol {error.args[0]!r}") from error
        raise InputError(f"{chunk.path} structure {index}: cannot read ({error})") from error


def _is_unknown_symbol(error: Exception) -> bool:
    """ASE's readers raise KeyError(symbol) for a species they do not know."""
    symbol = error.args[0] if isinstance(error, KeyError) and len(error.args) == 1 else None
    return isinstance(symbol, str) and symbol not in atomic_numbers


def _chunk_atoms(chunk: InputChunk) -> Iterator[Atoms]:
    if chunk.kind == EXTXYZ:
        begin, end = chunk.byte_range
        with open(chunk.path, "rb") as f:
            f.seek(begin)
            text = f.read(end - begin).decode()
        yield from ase.io.iread(io.StringIO(text), index=":", format="extxyz")
    elif chunk.kind == DATABASE:
        yield from _database_atoms(Path(chunk.path), chunk.start, chunk.count)
    else:
        yield from ase.io.iread(chunk.path, index=":", format=chunk.format)


def _database_atoms(path: Path, start: int, count: int) -> Iterator[Atoms]:
    with _open_database(path) as db:
        if hasattr(db, "ids"):
            # aselmdb: select(offset=...) would decode every row before the offset.
            rows = (db.get(id=row_id) for row_id in db.ids[start : start + count])
        else:
            rows = db.select(offset=start, limit=count)
        for row in rows:
            atoms = row.toatoms()
            # fairchem keeps charge and spin in the row's data; other tools in key_value_pairs.
            atoms.info.update(row.key_value_pairs)
            if isinstance(row.data, dict):
                atoms.info.update(row.data)
            yield atoms


def atoms_to_record(atoms: Atoms, source_file: str, source_index: int, keys: LabelKeys = LabelKeys()) -> StructureRecord:
    """The labels of `atoms`, found under `keys`, as a record.

    Missing energy or forces raise `InvalidStructure` naming the keys the structure does
    have; everything else is checked by `validate.check_record`.
    """
    energy = _label(atoms, keys.energy, atoms.info)
    forces = _label(atoms, keys.forces, atoms.arrays, atoms.info)
    for field, key, value in (("energy", keys.energy, energy), ("forces", keys.forces, forces)):
        if value is None:
            raise InvalidStructure(source_file, source_index, field, f"missing from the input: no {key!r} "
                                   f"({_keys_present(atoms)}); name it with --{field}-key")
    return StructureRecord(
        positions=np.array(atoms.positions),
        atomic_numbers=np.array(atoms.numbers),
        cell=np.array(atoms.cell.array),
        pbc=np.array(atoms.pbc, dtype=bool),
        energy=_number(energy, "energy", source_file, source_index),
        forces=np.array(forces),
        stress=_full_stress(_label(atoms, keys.stress, atoms.info), source_file, source_index),
        charge=_optional_number(atoms.info, "charge", source_file, source_index),
        spin=_optional_number(atoms.info, "spin", source_file, source_index),
        source_file=source_file,
        source_index=source_index,
        config_type=_optional_text(atoms.info.get(keys.config_type)),
        weight=_optional_float(atoms.info, keys.weight, source_file, source_index, field="weight"),
    )


def record_to_atoms(record: StructureRecord, keys: LabelKeys = LabelKeys()) -> Atoms:
    """The inverse of `atoms_to_record`: the structure with its labels in a
    SinglePointCalculator, and config type, weight, charge, spin and source in `info`."""
    atoms = Atoms(record.atomic_numbers, positions=record.positions, cell=record.cell, pbc=record.pbc)
    labels = {"energy": record.energy, "forces": record.forces}
    if record.stress is not None:
        labels["stress"] = full_3x3_to_voigt_6_stress(record.stress)
    atoms.calc = SinglePointCalculator(atoms, **labels)
    info = {keys.config_type: record.config_type, keys.weight: record.weight, "charge": record.charge,
            "spin": record.spin, "source_file": record.source_file, "source_index": record.source_index}
    atoms.info.update({key: value for key, value in info.items() if value is not None})
    return atoms


def _label(atoms: Atoms, key: str, *places: dict):
    """The value named `key`: the calculator's result, else the first of `places` that has it."""
    results = atoms.calc.results if atoms.calc is not None else {}
    if results.get(key) is not None:
        return results[key]
    return next((place[key] for place in places if place.get(key) is not None), None)


def _keys_present(atoms: Atoms) -> str:
    results = sorted(atoms.calc.results) if atoms.calc is not None else []
    info = sorted(atoms.info)
    arrays = sorted(set(atoms.arrays) - {"numbers", "positions"})
    return (f"this structure has calculator results: {', '.join(results) or 'none'}; "
            f"info: {', '.join(info) or 'none'}; per-atom arrays: {', '.join(arrays) or 'none'}")


def _number(value, field: str, source_file: str, source_index: int) -> float:
    if isinstance(value, (bool, np.bool_)):  # extxyz reads `energy=T` as True
        raise InvalidStructure(source_file, source_index, field, f"not a number: {value!r}")
    try:
        return float(np.asarray(value).reshape(()))
    except (TypeError, ValueError):
        raise InvalidStructure(source_file, source_index, field, f"not a number: {value!r}") from None


def _optional_text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode()
    return str(value)


def _optional_number(info: dict, key: str, source_file: str, source_index: int, field: str | None = None):
    """`info[key]` as a Python number, None when absent; `field` names it in errors."""
    field = field or key
    value = info.get(key)
    if value is None:
        return None
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(())[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise InvalidStructure(source_file, source_index, field, f"not a number: {value!r}")
    return value.item() if isinstance(value, np.generic) else value


def _optional_float(info: dict, key: str, source_file: str, source_index: int, field: str) -> float | None:
    value = _optional_number(info, key, source_file, source_index, field)
    return None if value is None else float(value)


def _full_stress(stress, source_file: str, source_index: int) -> np.ndarray | None:
    if stress is None:
        return None
    stress = np.asarray(stress)
    if stress.shape == (6,):
        return voigt_6_to_full_3x3_stress(stress)
    if stress.shape in ((3, 3), (9,)):
        return stress.reshape(3, 3).copy()
    raise InvalidStructure(
        source_file, source_index, "stress", f"shape {stress.shape}, expected (6,), (9,) or (3, 3)"
    )
