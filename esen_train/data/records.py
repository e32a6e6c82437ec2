"""One labelled structure and its safe binary encoding (no pickle).

A record is a fixed little-endian header, the source file name, the config type and weight
where the record has them, then the raw arrays:

    offset  size  field
         0     4  magic: b"ESR2" when the record has a config type or a weight, else b"ESR1"
         4     4  CRC32 of every byte after offset 8 (catches bit rot and torn writes)
         8     4  N, the number of atoms (uint32)
        12     4  flags: 1 stress present, 2 charge present, 4 spin present,
                  8 charge is an integer, 16 spin is an integer, 32 weight present
        16     8  energy (float64)
        24     8  charge (float64; 0 when absent)
        32     8  spin (float64; 0 when absent)
        40     8  source index (int64)
        48    15  numpy dtype strings of positions, atomic_numbers, cell, forces, stress
                  (3 characters each, e.g. "<f8"; stress repeats forces' when absent)
        64     4  L, length of the UTF-8 source file name (uint32)
        68     4  M, length of the UTF-8 config type (uint32; 0 when absent)
        72     L  source file name, zero-padded to a multiple of 8
             M  config type, zero-padded to a multiple of 8
             8  weight (float64) if present
             then positions [N,3], atomic_numbers [N], cell [3,3], pbc [3] (bool),
                  forces [N,3], stress [3,3] if present; each zero-padded to 8 bytes

An ESR1 record is an ESR2 record without config type and weight (M = 0, flag 32 unset): the
bytes at 68 are zero in both, so every ESR1 record ever written decodes unchanged, and a
record without the two fields is still written as ESR1, readable by older versions. Older
versions refuse an ESR2 record by its magic instead of misreading it.

Decoding reads only numbers and text, so a corrupted or hostile file can at worst raise
`RecordError`; it can never execute code. Arrays keep their dtype (float64 stays float64)
and the fixed layout makes decoding cheap (no per-record parsing of a text header).
"""
from __future__ import annotations

import functools
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np

MAGIC, MAGIC_WITH_LABELS = b"ESR1", b"ESR2"
_HEADER = struct.Struct("<4sIIIdddq15sxII")
_WEIGHT = struct.Struct("<d")
_ALIGN = 8
_FLOATS = ("<f4", "<f8")
_INTS = ("<i8", "<i4", "<i2", "|i1", "<u8", "<u4", "<u2", "|u1")
_STRESS, _CHARGE, _SPIN, _CHARGE_INT, _SPIN_INT, _WEIGHT_PRESENT = 1, 2, 4, 8, 16, 32


class RecordError(ValueError):
    """A record that cannot be decoded; the message names where it came from."""


@dataclass
class StructureRecord:
    """One labelled structure, in eV, Å, eV/Å and eV/Å³.

    `stress` is the full 3x3 matrix in the ASE sign convention (positive under tension)
    or None where the source has none. `charge` and `spin` are the total charge and
    spin multiplicity where the source gives them. `source_file`/`source_index` say
    where the structure was read from (index = position in `ase.io.read(file, ":")`).
    `config_type` names the kind of structure (MACE's `config_type`: "bulk", "surface",
    ...) and `weight` is a per-structure weight, where the source gives them.
    """

    positions: np.ndarray  # [N, 3] float
    atomic_numbers: np.ndarray  # [N] int
    cell: np.ndarray  # [3, 3] float, rows are lattice vectors; zeros for molecules
    pbc: np.ndarray  # [3] bool
    energy: float
    forces: np.ndarray  # [N, 3] float
    stress: np.ndarray | None = None  # [3, 3] float
    charge: float | None = None
    spin: float | None = None
    source_file: str = ""
    source_index: int = -1
    config_type: str | None = None
    weight: float | None = None

    @property
    def num_atoms(self) -> int:
        return len(self.atomic_numbers)


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % _ALIGN)


def _array(value, allowed: tuple[str, ...], shape: tuple[int, ...], name: str, where: str):
    array = np.ascontiguousarray(value)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    if array.dtype.str not in allowed:
        raise RecordError(f"{where}: field {name!r} has unsupported dtype {array.dtype}")
    if array.shape != shape:
        raise RecordError(f"{where}: field {name!r} has shape {array.shape}, expected {shape}")
    return array


def _scalar_flags(value, present: int, integer: int) -> tuple[float, int]:
    if value is None:
        return 0.0, 0
    is_integer = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    return float(value), present | (integer if is_integer else 0)


def encode_record(record: StructureRecord) -> bytes:
    """Encode a record as bytes (see the module docstring for the layout)."""
    where = f"record {record.source_file}:{record.source_index}"
    natoms = len(record.atomic_numbers)
    arrays = [
        _array(record.positions, _FLOATS, (natoms, 3), "positions", where),
        _array(record.atomic_numbers, _INTS, (natoms,), "atomic_numbers", where),
        _array(record.cell, _FLOATS, (3, 3), "cell", where),
        _array(record.pbc, ("|b1",), (3,), "pbc", where),
        _array(record.forces, _FLOATS, (natoms, 3), "forces", where),
    ]
    flags = 0
    if record.stress is not None:
        arrays.append(_array(record.stress, _FLOATS, (3, 3), "stress", where))
        flags |= _STRESS
    charge, charge_flags = _scalar_flags(record.charge, _CHARGE, _CHARGE_INT)
    spin, spin_flags = _scalar_flags(record.spin, _SPIN, _SPIN_INT)
    dtypes = [a.dtype.str for a in arrays[:3]] + [arrays[4].dtype.str, arrays[-1].dtype.str]
    source = record.source_file.encode()
    config_type = (record.config_type or "").encode()
    weight = b"" if record.weight is None else _WEIGHT.pack(float(record.weight))
    flags |= _WEIGHT_PRESENT if weight else 0
    magic = MAGIC_WITH_LABELS if config_type or weight else MAGIC
    rest = _HEADER.pack(
        magic, 0, natoms, flags | charge_flags | spin_flags, float(record.energy), charge, spin,
        int(record.source_index), "".join(dtypes).encode(), len(source), len(config_type),
    )[8:] + _padded(source) + _padded(config_type) + weight + b"".join(_padded(a.tobytes()) for a in arrays)
    return magic + struct.pack("<I", zlib.crc32(rest)) + rest


def decode_record(buf: bytes | memoryview, where: str) -> StructureRecord:
    """Decode bytes written by `encode_record`.

    `where` names the record (e.g. "shard_00003.lmdb record 17") in every error.
    The arrays returned are writable, aligned, and share memory only with each other.
    """
    if len(buf) < _HEADER.size:
        raise RecordError(f"{where}: record is {len(buf)} bytes, too short for a header")
    magic, crc, natoms, flags, energy, charge, spin, source_index, dtypes, source_length, config_length = (
        _HEADER.unpack_from(buf)
    )
    if magic not in (MAGIC, MAGIC_WITH_LABELS):
        raise RecordError(f"{where}: not an esen-train record (magic {bytes(magic)!r})")
    # One copy into a bytearray: the arrays below are writable, aligned views into it.
    data = bytearray(buf)
    if zlib.crc32(memoryview(data)[8:]) != crc:
        raise RecordError(f"{where}: checksum mismatch, the record is corrupted")
    config_start = _HEADER.size + source_length + (-source_length % _ALIGN)
    position = config_start + config_length + (-config_length % _ALIGN)
    weight = None
    if flags & _WEIGHT_PRESENT:
        if position + _WEIGHT.size > len(data):
            raise RecordError(f"{where}: field 'weight' runs past the end of the record")
        (weight,) = _WEIGHT.unpack_from(data, position)
        position += _WEIGHT.size
    try:
        source_file = data[_HEADER.size : _HEADER.size + source_length].decode()
        config_type = data[config_start : config_start + config_length].decode() or None
        layout = _array_layout(dtypes, bool(flags & _STRESS))
    except UnicodeDecodeError as error:
        raise RecordError(f"{where}: malformed header ({error})") from None
    except RecordError as error:
        raise RecordError(f"{where}: {error}") from None
    arrays = {}
    for name, dtype, per_atom, shape, elements in layout:
        if per_atom:
            shape, elements = (natoms, *shape), natoms * elements
        size = dtype.itemsize * elements
        if position + size > len(data):
            raise RecordError(f"{where}: field {name!r} runs past the end of the record")
        arrays[name] = np.ndarray(shape, dtype, buffer=data, offset=position)
        position += size + (-size % _ALIGN)
    if position != len(data):
        raise RecordError(f"{where}: {len(data) - position} unexpected bytes after the arrays")
    return StructureRecord(
        energy=energy,
        charge=None if not flags & _CHARGE else int(charge) if flags & _CHARGE_INT else charge,
        spin=None if not flags & _SPIN else int(spin) if flags & _SPIN_INT else spin,
        source_file=source_file,
        source_index=source_index,
        config_type=config_type,
        weight=weight,
        stress=arrays.pop("stress", None),
        **arrays,
    )


@functools.lru_cache(maxsize=256)
def _array_layout(dtypes: bytes, has_stress: bool) -> tuple:
    """The arrays of a record in order: (field, dtype, per atom?, shape per atom or whole,
    elements in that shape). Checked once per distinct header, not once per record: a
    dataset has one or a few, and rebuilding them cost a third of the decode time."""
    text = dtypes.decode()
    fields = [
        ("positions", text[0:3], True, (3,), _FLOATS),
        ("atomic_numbers", text[3:6], True, (), _INTS),
        ("cell", text[6:9], False, (3, 3), _FLOATS),
        ("pbc", "|b1", False, (3,), ("|b1",)),
        ("forces", text[9:12], True, (3,), _FLOATS),
    ]
    if has_stress:
        fields.append(("stress", text[12:15], False, (3, 3), _FLOATS))
    layout = []
    for name, dtype, per_atom, shape, allowed in fields:
        if dtype not in allowed:
            raise RecordError(f"field {name!r} has unexpected dtype {dtype!r}")
        layout.append((name, np.dtype(dtype), per_atom, shape, math.prod(shape)))
    return tuple(layout)
