"""One labelled structure and its safe binary encoding (no pickle).

A record on disk is:

    bytes 0..3    magic b"ESR1" (format of this encoding, version 1)
    bytes 4..7    header length H (uint32, little-endian)
    bytes 8..11   CRC32 of everything after byte 15 (catches bit rot and torn writes)
    bytes 12..15  zero padding
    H bytes       UTF-8 JSON header: scalars, source, and for each array its
                  name, dtype, shape and byte offset into the payload
    payload       the raw little-endian arrays, each starting at an 8-byte boundary

Decoding reads only JSON and raw numbers, so a corrupted or hostile file can at worst
raise `RecordError`; it can never execute code. Arrays keep their dtype: float64 inputs
stay float64.
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np

MAGIC = b"ESR1"
_PREFIX = struct.Struct("<4sII4x")  # magic, header length, crc32, padding
_ALIGN = 8

# Arrays a record may carry, with the little-endian dtypes and the shapes allowed on
# decode ("N" is the atom count). Anything else in a header is rejected.
_FLOATS = ("<f4", "<f8")
_INTS = ("<i8", "<i4", "<i2", "|i1", "<u8", "<u4", "<u2", "|u1")
_ARRAY_FIELDS = {
    "positions": (_FLOATS, ("N", 3)),
    "atomic_numbers": (_INTS, ("N",)),
    "cell": (_FLOATS, (3, 3)),
    "pbc": (("|b1",), (3,)),
    "forces": (_FLOATS, ("N", 3)),
    "stress": (_FLOATS, (3, 3)),
}
_REQUIRED_ARRAYS = ("positions", "atomic_numbers", "cell", "pbc", "forces")


class RecordError(ValueError):
    """A record that cannot be decoded; the message names where it came from."""


@dataclass
class StructureRecord:
    """One labelled structure, in eV, Å, eV/Å and eV/Å³.

    `stress` is the full 3x3 matrix in the ASE sign convention (positive under tension)
    or None where the source has none. `charge` and `spin` are the total charge and
    spin multiplicity where the source gives them. `source_file`/`source_index` say
    where the structure was read from (index = position in `ase.io.read(file, ":")`).
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

    @property
    def num_atoms(self) -> int:
        return len(self.atomic_numbers)


def _little_endian(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array


def _plain_number(value):
    """None, or a Python int/float that JSON writes exactly (numpy scalars included)."""
    if value is None:
        return None
    return value.item() if isinstance(value, np.generic) else value


def encode_record(record: StructureRecord) -> bytes:
    """Encode a record as bytes (see the module docstring for the layout)."""
    arrays = {name: getattr(record, name) for name in _ARRAY_FIELDS}
    if arrays["stress"] is None:
        del arrays["stress"]
    arrays = {name: _little_endian(np.asarray(value)) for name, value in arrays.items()}
    where = f"record {record.source_file}:{record.source_index}"
    for name, value in arrays.items():
        if value.dtype.str not in _ARRAY_FIELDS[name][0]:
            raise RecordError(f"{where}: field {name!r} has unsupported dtype {value.dtype}")
    _check_shapes(arrays, where)
    header_arrays = []
    chunks = []
    offset = 0
    for name, value in arrays.items():
        header_arrays.append([name, value.dtype.str, list(value.shape), offset])
        padding = -value.nbytes % _ALIGN
        chunks.append(value.tobytes() + b"\0" * padding)
        offset += value.nbytes + padding
    header = {
        "energy": float(record.energy),
        "charge": _plain_number(record.charge),
        "spin": _plain_number(record.spin),
        "source_file": record.source_file,
        "source_index": int(record.source_index),
        "arrays": header_arrays,
    }
    header_bytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    header_bytes += b" " * (-len(header_bytes) % _ALIGN)
    body = header_bytes + b"".join(chunks)
    return _PREFIX.pack(MAGIC, len(header_bytes), zlib.crc32(body)) + body


def decode_record(buf: bytes | memoryview, where: str) -> StructureRecord:
    """Decode bytes written by `encode_record`.

    `where` names the record (e.g. "shard_0003.lmdb record 17") in every error.
    The arrays returned are writable and own no memory outside this record.
    """
    if len(buf) < _PREFIX.size:
        raise RecordError(f"{where}: record is {len(buf)} bytes, too short for a header")
    magic, header_length, crc = _PREFIX.unpack_from(buf)
    if magic != MAGIC:
        raise RecordError(f"{where}: not an esen-train record (magic {bytes(magic)!r})")
    # One copy into a bytearray: the arrays below are writable, aligned views into it.
    body = bytearray(memoryview(buf)[_PREFIX.size :])
    if zlib.crc32(body) != crc:
        raise RecordError(f"{where}: checksum mismatch, the record is corrupted")
    try:
        header = json.loads(body[:header_length].decode())
        payload = memoryview(body)[header_length:]
        arrays = {
            name: _array_view(payload, name, dtype, shape, offset, where)
            for name, dtype, shape, offset in header["arrays"]
        }
        _check_shapes(arrays, where)
        return StructureRecord(
            energy=float(header["energy"]),
            charge=header["charge"],
            spin=header["spin"],
            source_file=str(header["source_file"]),
            source_index=int(header["source_index"]),
            stress=arrays.pop("stress", None),
            **arrays,
        )
    except RecordError:
        raise
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        # A header that passed the checksum but is malformed: written by another tool.
        raise RecordError(f"{where}: malformed header ({type(error).__name__}: {error})") from None


def _array_view(payload, name, dtype, shape, offset, where) -> np.ndarray:
    if name not in _ARRAY_FIELDS:
        raise RecordError(f"{where}: unknown field {name!r}")
    if dtype not in _ARRAY_FIELDS[name][0]:
        raise RecordError(f"{where}: field {name!r} has unexpected dtype {dtype}")
    count = math.prod(shape)
    if offset < 0 or offset + count * int(dtype[2]) > len(payload):
        raise RecordError(f"{where}: field {name!r} runs past the end of the record")
    return np.frombuffer(payload, dtype=dtype, count=count, offset=offset).reshape(shape)


def _check_shapes(arrays: dict[str, np.ndarray], where: str) -> None:
    missing = [name for name in _REQUIRED_ARRAYS if name not in arrays]
    if missing:
        raise RecordError(f"{where}: missing field(s) {', '.join(missing)}")
    natoms = len(arrays["atomic_numbers"])
    for name, array in arrays.items():
        expected = tuple(natoms if dim == "N" else dim for dim in _ARRAY_FIELDS[name][1])
        if array.shape != expected:
            raise RecordError(f"{where}: field {name!r} has shape {array.shape}, expected {expected}")
