"""Record codec and LMDB shards: exact round trips, picklable lazy readers, clear errors."""
from __future__ import annotations

import multiprocessing
import pickle
import struct
import sys
import zlib

import numpy as np
import pytest

from esen_train.data.records import RecordError, StructureRecord, decode_record, encode_record
from esen_train.data.shards import ShardError, ShardReader, ShardWriter


def make_record(rng, natoms=5, float_dtype=np.float64, int_dtype=np.int64, stress=True, **extra):
    return StructureRecord(
        positions=rng.normal(size=(natoms, 3)).astype(float_dtype),
        atomic_numbers=rng.integers(1, 100, natoms).astype(int_dtype),
        cell=rng.normal(size=(3, 3)).astype(float_dtype),
        pbc=np.array([True, False, True]),
        energy=float(rng.normal() * 1e4),
        forces=rng.normal(size=(natoms, 3)).astype(float_dtype),
        stress=rng.normal(size=(3, 3)).astype(float_dtype) if stress else None,
        source_file="some/dir/input.extxyz",
        source_index=int(rng.integers(0, 10**9)),
        **extra,
    )


def assert_records_identical(a: StructureRecord, b: StructureRecord):
    for name in ("positions", "atomic_numbers", "cell", "pbc", "forces", "stress"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, name
            continue
        assert x.dtype == y.dtype, name
        assert x.shape == y.shape, name
        assert np.array_equal(x, y), name
    for name in ("energy", "charge", "spin", "source_file", "source_index", "config_type", "weight"):
        assert getattr(a, name) == getattr(b, name), name
        assert type(getattr(a, name)) is type(getattr(b, name)), name


@pytest.mark.parametrize(
    "float_dtype, int_dtype, stress, extra",
    [
        (np.float64, np.int64, True, {}),
        (np.float32, np.int32, False, {}),
        (np.float64, np.uint8, True, {"charge": -2, "spin": 3}),
        (np.float32, np.int64, True, {"charge": 0.5, "spin": None}),
        (np.float64, np.int64, True, {"config_type": "surface/(111) Ångström", "weight": 2.5}),
        (np.float32, np.int32, False, {"config_type": "md"}),
        (np.float64, np.int64, False, {"weight": 0.0, "charge": 1}),
    ],
)
def test_round_trip_keeps_every_field_and_dtype(float_dtype, int_dtype, stress, extra):
    rng = np.random.default_rng(0)
    record = make_record(rng, natoms=7, float_dtype=float_dtype, int_dtype=int_dtype, stress=stress, **extra)
    decoded = decode_record(encode_record(record), where="test")
    assert_records_identical(record, decoded)
    # Arrays come back writable and aligned (torch.from_numpy needs both).
    assert decoded.positions.flags.writeable and decoded.positions.flags.aligned
    decoded.forces[0, 0] = 1.0


# A record written before records had a config type and weight (format ESR1): CO, charge 0,
# spin 1, no stress, source co.xyz:3. It must decode the same forever.
ESR1_RECORD = bytes.fromhex(
    "4553523162c9ee6e020000001e0000000000000000802cc00000000000000000000000000000f03f0300000000000000"
    "3c66383c69383c66383c66383c6638000600000000000000636f2e78797a000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000009a9999999999f13f06000000000000000800000000000000"
    "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "000000000000e03f00000000000000000000000000000000000000000000e0bf"
)


def test_records_of_the_first_format_stay_readable_and_are_still_written():
    decoded = decode_record(ESR1_RECORD, where="old")
    assert decoded.atomic_numbers.tolist() == [6, 8] and decoded.positions[1, 2] == 1.1
    assert decoded.energy == -14.25 and decoded.forces[:, 2].tolist() == [0.5, -0.5]
    assert (decoded.charge, decoded.spin, decoded.stress) == (0, 1, None)
    assert (decoded.source_file, decoded.source_index) == ("co.xyz", 3)
    assert decoded.config_type is None and decoded.weight is None
    # Without a config type or weight a record is written exactly as before, so older
    # versions read it; with either one it is ESR2, which they refuse by its magic.
    assert encode_record(decoded) == ESR1_RECORD
    decoded.config_type = "molecule"
    assert encode_record(decoded)[:4] == b"ESR2"


def test_round_trip_of_extreme_values():
    rng = np.random.default_rng(1)
    record = make_record(rng, natoms=1)
    record.energy = -1.2345678901234567e-300
    record.positions[0] = [np.finfo(np.float64).max, -0.0, 5e-324]
    decoded = decode_record(encode_record(record), where="test")
    assert decoded.energy == record.energy
    assert np.array_equal(decoded.positions.view(np.uint64), record.positions.view(np.uint64))


def test_big_endian_input_is_stored_little_endian():
    rng = np.random.default_rng(2)
    record = make_record(rng)
    record.positions = record.positions.astype(">f8")
    decoded = decode_record(encode_record(record), where="test")
    assert decoded.positions.dtype == np.dtype("<f8")
    assert np.array_equal(decoded.positions, record.positions)


def test_encode_rejects_wrong_shapes_and_dtypes():
    rng = np.random.default_rng(3)
    record = make_record(rng)
    record.forces = record.forces[:-1]
    with pytest.raises(RecordError, match="forces"):
        encode_record(record)
    record = make_record(rng)
    record.positions = record.positions.astype(np.float16)
    with pytest.raises(RecordError, match="positions.*dtype"):
        encode_record(record)


def _patched(encoded: bytes, offset: int, value: bytes) -> bytes:
    """`encoded` with bytes replaced at `offset` and the CRC recomputed, as a tool that
    writes a wrong but self-consistent record would."""
    rest = encoded[8:offset] + value + encoded[offset + len(value) :]
    return encoded[:4] + struct.pack("<I", zlib.crc32(rest)) + rest


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[:10], "too short"),
        (lambda b: b"XXXX" + b[4:], "not an esen-train record"),
        (lambda b: b[:-3], "checksum mismatch"),
        (lambda b: b[:100] + bytes([b[100] ^ 0x01]) + b[101:], "checksum mismatch"),
        (lambda b: _patched(b, 48, b"|O8"), "'positions' has unexpected dtype"),
        (lambda b: _patched(b, 51, b"<f8"), "'atomic_numbers' has unexpected dtype"),
        (lambda b: _patched(b, 8, struct.pack("<I", 1000)), "'positions' runs past the end"),
        (lambda b: _patched(b, 8, struct.pack("<I", 1)), "unexpected bytes after the arrays"),
        (lambda b: _patched(b, 72, b"\xff\xfe"), "malformed header"),
    ],
)
def test_decode_errors_name_the_record(damage, message):
    encoded = encode_record(make_record(np.random.default_rng(4)))
    with pytest.raises(RecordError, match=message) as error:
        decode_record(damage(encoded), where="shard_00007.lmdb record 12")
    assert "shard_00007.lmdb record 12" in str(error.value)


class _WouldWriteAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_decode_never_unpickles(tmp_path):
    # A pickle where a record should be is rejected as data, never executed.
    marker = tmp_path / "unpickled"
    with pytest.raises(RecordError):
        decode_record(pickle.dumps(_WouldWriteAFile(marker)), where="x")
    assert not marker.exists()


def write_shard(path, records):
    with ShardWriter(path, batch_size=3) as writer:
        for record in records:
            writer.append(record)


@pytest.fixture
def shard(tmp_path):
    rng = np.random.default_rng(5)
    records = [make_record(rng, natoms=int(rng.integers(1, 30)), stress=i % 2 == 0) for i in range(20)]
    path = tmp_path / "shard_00000.lmdb"
    write_shard(path, records)
    return path, records


def test_shard_round_trip_and_single_file(shard):
    path, records = shard
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no -lock file
    reader = ShardReader(path)
    assert len(reader) == len(records)
    for index, record in enumerate(records):
        assert_records_identical(record, reader.read(index))
    for record, streamed in zip(records, reader, strict=True):
        assert_records_identical(record, streamed)
    with pytest.raises(IndexError):
        reader.read(len(records))
    with pytest.raises(IndexError):
        reader.read(-1)
    reader.close()


def test_shard_writer_grows_its_map(tmp_path, monkeypatch):
    import esen_train.data.shards as shards

    monkeypatch.setattr(shards, "_INITIAL_MAP_SIZE", 64 * 1024)
    rng = np.random.default_rng(6)
    records = [make_record(rng, natoms=200) for _ in range(30)]  # ~300 kB > 64 kB map
    write_shard(tmp_path / "big.lmdb", records)
    reader = ShardReader(tmp_path / "big.lmdb")
    assert len(reader) == 30
    assert_records_identical(records[-1], reader.read(29))
    reader.close()


def test_reader_is_lazy_and_picklable(shard):
    path, records = shard
    reader = ShardReader(path)
    clone = pickle.loads(pickle.dumps(reader))  # before opening
    assert clone._txn is None
    assert_records_identical(records[3], clone.read(3))
    clone_after_open = pickle.loads(pickle.dumps(clone))  # after opening: only the path travels
    assert clone_after_open._txn is None
    # Two readers of one file in one process share the environment (py-lmdb forbids
    # opening it twice); closing one leaves the other working.
    assert_records_identical(records[4], clone_after_open.read(4))
    clone.close()
    assert_records_identical(records[5], clone_after_open.read(5))
    clone_after_open.close()
    reader.close()


def _read_energies(reader: ShardReader) -> list[float]:
    return [reader.read(i).energy for i in range(len(reader))]


def test_reader_works_in_forked_child_after_parent_opened(shard):
    path, records = shard
    reader = ShardReader(path)
    reader.read(0)  # parent opens first; the child must still read correctly
    with multiprocessing.get_context("fork").Pool(1) as pool:
        energies = pool.apply(_read_energies, (reader,))
    assert energies == [r.energy for r in records]
    reader.close()


def test_truncated_shard_is_a_clear_error(shard):
    path, _ = shard
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match="truncated") as error:
        ShardReader(path).read(0)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("content", [b"", b"not an lmdb file at all" * 100])
def test_garbage_shard_is_a_clear_error(tmp_path, content):
    path = tmp_path / "shard_00000.lmdb"
    path.write_bytes(content)
    with pytest.raises(ShardError, match="shard_00000.lmdb"):
        len(ShardReader(path))


def test_missing_shard_is_a_clear_error(tmp_path):
    with pytest.raises(ShardError, match="missing"):
        ShardReader(tmp_path / "nope.lmdb").read(0)


def test_corrupted_record_names_shard_and_record(shard):
    path, records = shard
    data = bytearray(path.read_bytes())
    # Flip one bit of one stored force component of record 7.
    position = data.find(records[7].forces.tobytes())
    assert position > 0
    data[position + 5] ^= 0x01
    path.write_bytes(bytes(data))
    reader = ShardReader(path)
    with pytest.raises(RecordError, match=f"{path.name} record 7: checksum mismatch"):
        reader.read(7)
    assert_records_identical(records[6], reader.read(6))
    reader.close()


def _resident_kib_of_mapping(path) -> int:
    """Resident KiB of this process's memory mappings of `path` (/proc/self/smaps)."""
    target, resident, inside = str(path.resolve()), 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
                inside = fields[-1] == target
            elif inside and fields[0] == "Rss:":
                resident += int(fields[1])
    return resident


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux)")
def test_reader_releases_mapped_pages_as_it_goes(tmp_path, monkeypatch):
    import esen_train.data.shards as shards

    rng = np.random.default_rng(7)
    records = [make_record(rng, natoms=300) for _ in range(200)]  # ~6 MB of records
    path = tmp_path / "big.lmdb"
    write_shard(path, records)
    size_kib = path.stat().st_size // 1024

    monkeypatch.setattr(shards, "RELEASE_PAGES_EVERY", 10**9)
    reader = ShardReader(path)
    for index in range(len(records)):
        reader.read(index)
    assert _resident_kib_of_mapping(path) > size_kib // 2  # every page read is still mapped
    shards.release_mapped_pages([path])
    assert _resident_kib_of_mapping(path) < size_kib // 20
    assert_records_identical(records[17], reader.read(17))  # reads fault the pages back in
    reader.close()

    monkeypatch.setattr(shards, "RELEASE_PAGES_EVERY", 20)
    reader = ShardReader(path)
    for index in range(len(records)):
        assert_records_identical(records[index], reader.read(index))
    assert _resident_kib_of_mapping(path) < size_kib // 5  # ~20 records' pages at most
    for _ in reader:  # streaming with a cursor releases pages too
        pass
    assert _resident_kib_of_mapping(path) < size_kib // 5
    reader.close()
