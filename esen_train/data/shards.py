"""LMDB shards: one single-file LMDB environment holding records 0..n-1.

Keys are the record's index in the shard as 8-byte big-endian integers (so LMDB's key
order is the index order and appends are cheap); values are `records.encode_record`
bytes. Nothing else is stored in a shard.
"""
from __future__ import annotations

import ctypes
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import lmdb

from esen_train.data.records import RecordError, StructureRecord, decode_record, encode_record

_KEY = struct.Struct(">Q")
_INITIAL_MAP_SIZE = 1 << 30  # grown by doubling when full; the file only holds used pages
# Every this many reads in a process, its shard mappings drop the pages reads have
# mapped in (see `release_mapped_pages`). The kernel maps up to 64 KiB around each page
# fault, so this keeps at most ~64 MB of shard pages resident, whatever the dataset size.
RELEASE_PAGES_EVERY = 1_000
_MADV_DONTNEED = 4  # Linux
_reads_since_release = 0


class ShardError(ValueError):
    """A shard that cannot be opened or read; the message names the file."""


def record_key(index: int) -> bytes:
    return _KEY.pack(index)


class ShardWriter:
    """Writes records to a new shard file, in index order, in batched transactions."""

    def __init__(self, path: str | Path, batch_size: int = 1024):
        self.path = Path(path)
        if self.path.exists():
            raise FileExistsError(f"{self.path} already exists")
        self._env = lmdb.open(
            str(self.path), subdir=False, lock=False, map_size=_INITIAL_MAP_SIZE, meminit=False
        )
        self._batch_size = batch_size
        self._pending: list[tuple[bytes, bytes]] = []
        self.num_records = 0

    def append(self, record: StructureRecord) -> None:
        self.append_encoded(encode_record(record))

    def append_encoded(self, value: bytes) -> None:
        self._pending.append((record_key(self.num_records), value))
        self.num_records += 1
        if len(self._pending) >= self._batch_size:
            self._flush()

    def _flush(self) -> None:
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for key, value in self._pending:
                        txn.put(key, value, append=True)
                break
            except lmdb.MapFullError:
                # The transaction was aborted; retry it with twice the address space.
                self._env.set_mapsize(self._env.info()["map_size"] * 2)
        self._pending.clear()

    def close(self) -> None:
        """Write what is pending and close; the file is complete after this returns."""
        if self._env is None:
            return
        self._flush()
        self._env.sync(True)
        self._env.close()
        self._env = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# Environments open in this process, shared by all readers of the same file (py-lmdb
# refuses to open one file twice in a process): file identity -> [environment, readers, path].
# A forked child inherits this table and reuses the parent's read-only, lock-free
# mapping; its readers' counts keep it from ever closing the parent's environment.
_OPEN_ENVIRONMENTS: dict[tuple[int, int], list] = {}


def _acquire_environment(path: Path) -> tuple[tuple[int, int], lmdb.Environment]:
    try:
        status = path.stat()
    except FileNotFoundError:
        raise ShardError(f"{path}: shard file is missing") from None
    key = (status.st_dev, status.st_ino)
    entry = _OPEN_ENVIRONMENTS.get(key)
    if entry is None:
        try:
            env = lmdb.open(
                str(path), subdir=False, readonly=True, lock=False, readahead=False, meminit=False
            )
        except lmdb.Error as error:
            raise ShardError(f"{path}: not a readable LMDB shard ({error})") from None
        entry = _OPEN_ENVIRONMENTS[key] = [env, 0, path]
    # Reading a page past the end of a truncated file would kill the interpreter with
    # SIGBUS (the file is memory-mapped), so compare the size LMDB expects first.
    env = entry[0]
    expected = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    if status.st_size < expected:
        if entry[1] == 0:
            _close_environment(key)
        raise ShardError(
            f"{path}: shard is truncated ({status.st_size} bytes, LMDB expects {expected})"
        )
    entry[1] += 1
    return key, env


def _release_environment(key: tuple[int, int]) -> None:
    entry = _OPEN_ENVIRONMENTS[key]
    entry[1] -= 1
    if entry[1] == 0:
        _close_environment(key)


def _close_environment(key: tuple[int, int]) -> None:
    _OPEN_ENVIRONMENTS.pop(key)[0].close()


def release_mapped_pages(paths: list[Path]) -> None:
    """Unmap from this process the pages of the shards `paths` that reads have mapped in (Linux).

    LMDB reads through a read-only shared memory mapping of the file, and every page
    read stays in the process's resident set until it is unmapped: one pass over a
    100 GB dataset would show 100 GB of RSS, which schedulers that police RSS (SLURM's
    jobacct_gather) count against the job. MADV_DONTNEED on a read-only shared file
    mapping only forgets the mapping; the next read of a page maps it back in from the
    page cache, so nothing can be lost (LMDB's returned values are copies).
    """
    if not sys.platform.startswith("linux"):
        return
    targets = {str(Path(path).resolve()) for path in paths}
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") in targets:
                start, end = (int(address, 16) for address in fields[0].split("-"))
                libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def _count_read() -> None:
    global _reads_since_release
    _reads_since_release += 1
    if _reads_since_release >= RELEASE_PAGES_EVERY:
        _reads_since_release = 0
        release_mapped_pages([entry[2] for entry in _OPEN_ENVIRONMENTS.values()])


class ShardReader:
    """Reads records from one shard; opens the LMDB environment lazily on first access.

    Picklable before and after opening (only the path is pickled), so DataLoader workers
    started by spawn open their own environment; see `_OPEN_ENVIRONMENTS` for fork.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._key = None
        self._txn = None
        self._pid = None

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def _open(self) -> lmdb.Transaction:
        if self._txn is not None and self._pid == os.getpid():
            return self._txn
        self._key, env = _acquire_environment(self.path)
        # The file never changes after conversion, so one read transaction serves all reads.
        self._txn = env.begin(buffers=False)
        self._pid = os.getpid()
        return self._txn

    def __len__(self) -> int:
        return self._open().stat()["entries"]

    def read_bytes(self, index: int) -> bytes:
        txn = self._open()
        try:
            value = txn.get(record_key(index))
        except lmdb.Error as error:
            raise ShardError(f"{self.path} record {index}: LMDB error ({error})") from None
        if value is None:
            raise IndexError(f"{self.path}: no record {index} (shard has {len(self)} records)")
        _count_read()
        return value

    def read(self, index: int) -> StructureRecord:
        if index < 0:
            raise IndexError(f"{self.path}: negative record index {index}")
        return decode_record(self.read_bytes(index), where=f"{self.path} record {index}")

    def __iter__(self) -> Iterator[StructureRecord]:
        """All records in index order, with a cursor (faster than `read` in a loop)."""
        txn = self._open()
        try:
            for position, (key, value) in enumerate(txn.cursor()):
                where = f"{self.path} record {position}"
                if key != record_key(position):
                    raise ShardError(f"{where}: unexpected key {key!r} (records must be 0..n-1)")
                _count_read()
                yield decode_record(value, where=where)
        except lmdb.Error as error:
            raise ShardError(f"{self.path}: LMDB error while iterating ({error})") from None

    def close(self) -> None:
        """Release this reader's environment (closed when its last reader in this process is)."""
        if self._txn is not None and self._pid == os.getpid():
            self._txn.abort()
            _release_environment(self._key)
        self._key = self._txn = self._pid = None


__all__ = ["RecordError", "ShardError", "ShardReader", "ShardWriter", "record_key"]
