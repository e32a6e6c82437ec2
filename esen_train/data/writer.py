"""Writing a dataset directory so that it appears only when complete.

`DatasetWriter` builds everything in a hidden temporary directory beside the output
(`.NAME.partial-<host>-<pid>-<random suffix>`, same file system) and renames it into place in
`finish()`; on an error the temporary directory is removed, so a failed run leaves nothing
behind. A process killed outright cannot remove it: the next writer in the same directory
removes such leftovers (`remove_stale_partials`). An existing dataset is replaced by one atomic
exchange of the two directories (Linux's `renameat2(RENAME_EXCHANGE)`); where the file system
cannot exchange (NFS and some cluster file systems), the old dataset is first renamed aside to
`.NAME.old-<host>-<pid>-<suffix>/dataset`, and if the writer dies before the new one is in
place, the next writer puts the old one back. `finish_together` does this for several outputs
(the parts of a split) only after all of them are written, so they change together.
Structure i goes to shard i mod num_shards, which balances the shards without knowing
in advance how many structures will come. Between `seal` and `finish` the written records
can be read back (conversion looks for energy outliers there) and, with `without`,
rewritten leaving some out.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import socket
import tempfile
import time
import warnings
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np

from esen_train.data.manifest import (
    MANIFEST_NAME,
    DatasetError,
    Manifest,
    ShardInfo,
    file_checksum,
    save_natoms,
    with_default_permissions,
)
from esen_train.data.records import StructureRecord, encode_record
from esen_train.data.shards import ShardReader, ShardWriter
from esen_train.data.stats import StatsAccumulator, non_finite_fields

OPTIONAL_PROPERTIES = ("stress", "charge", "spin", "config_type", "weight")
# A temporary output in which nothing changed for this long is a dead process's leftover, also
# where its process cannot be looked up (written from another host).
STALE_PARTIAL_AGE_S = 24 * 3600
_LEFTOVER_NAME = re.compile(r"\.(?P<target>.+)\.(?P<kind>partial|old)-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+")
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def shard_name(number: int) -> str:
    return f"shard_{number:05d}.lmdb"


def write_order(shard_counts: list[int]) -> Iterator[tuple[int, int]]:
    """(shard, index in the shard) of each structure in the order `DatasetWriter` wrote them,
    which is the input's order. Shards not laid out round-robin (not written by it) are taken
    one after another."""
    total, num_shards = sum(shard_counts), len(shard_counts)
    if list(shard_counts) != [len(range(k, total, num_shards)) for k in range(num_shards)]:
        yield from ((shard, local) for shard, count in enumerate(shard_counts) for local in range(count))
        return
    yield from ((position % num_shards, position // num_shards) for position in range(total))


def present_properties(record: StructureRecord) -> set[str]:
    return {name for name in OPTIONAL_PROPERTIES if getattr(record, name) is not None}


@dataclass
class EncodedChunk:
    """Records encoded by a conversion worker, with what the writer needs to know of them."""

    records: list[bytes] = field(default_factory=list)
    natoms: list[int] = field(default_factory=list)
    stats: StatsAccumulator = field(default_factory=StatsAccumulator)
    properties: set[str] = field(default_factory=set)
    skipped: list[str] = field(default_factory=list)  # why each skipped structure was invalid

    def add(self, record: StructureRecord) -> None:
        self.records.append(encode_record(record))
        self.natoms.append(record.num_atoms)
        self.stats.add(record)
        self.properties |= present_properties(record)


def check_output_free(out_dir: Path, overwrite: bool) -> None:
    """Refuse to replace an existing output unless asked, and never replace a directory
    that is not a dataset (so `--overwrite` cannot delete an unrelated folder)."""
    if not out_dir.exists():
        return
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it")
    if not (out_dir / MANIFEST_NAME).is_file():
        raise FileExistsError(
            f"{out_dir} exists and is not an esen-train dataset (no {MANIFEST_NAME}); "
            "refusing to overwrite it"
        )


def remove_stale_partials(parent: Path) -> list[Path]:
    """Clear what dead writers left in `parent`: their temporary outputs (`.NAME.partial-*`),
    and the old datasets they had renamed aside (`.NAME.old-*`), which go back to NAME if
    nothing took its place. A leftover is a dead writer's when its process on this host is
    gone, or nothing in it changed for STALE_PARTIAL_AGE_S. Returns the leftovers removed
    without restoring anything."""
    removed = []
    for path in sorted([*parent.glob(".*.partial-*"), *parent.glob(".*.old-*")]):
        try:
            stale = path.is_dir() and _is_stale(path)
        except FileNotFoundError:  # its writer finished or removed it meanwhile
            continue
        if stale:
            if not _restore_set_aside(path):
                removed.append(path)
            shutil.rmtree(path, ignore_errors=True)
    return removed


def _restore_set_aside(leftover: Path) -> bool:
    """Put back the old dataset a dead writer set aside, if nothing took its place."""
    match = _LEFTOVER_NAME.fullmatch(leftover.name)
    target = leftover.parent / match["target"] if match and match["kind"] == "old" else None
    if target is None or target.exists() or not (leftover / "dataset").is_dir():
        return False
    os.replace(leftover / "dataset", target)
    warnings.warn(f"restored {target}: a writer replacing it died before the new dataset was in place", stacklevel=3)
    return True


def _is_stale(partial: Path) -> bool:
    match = _LEFTOVER_NAME.fullmatch(partial.name)
    if match and match["host"] == socket.gethostname() and not _process_alive(int(match["pid"])):
        return True
    last_change = max([partial.stat().st_mtime, *(path.stat().st_mtime for path in partial.iterdir())])
    return time.time() - last_change > STALE_PARTIAL_AGE_S


def exchange_paths(first: Path, second: Path) -> bool:
    """Swap two directories in one atomic step; False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:  # not Linux, or a C library before glibc 2.28
        return False
    status = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if status == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, f"cannot exchange {first} and {second}: {os.strerror(code)}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class DatasetWriter:
    """Use as a context manager: `with DatasetWriter(...) as w: w.write(r); w.finish()`."""

    def __init__(self, out_dir: str | Path, num_shards: int, provenance: dict, overwrite: bool = False):
        if num_shards < 1:
            raise ValueError(f"num_shards must be at least 1, got {num_shards}")
        self.out_dir = Path(out_dir).absolute()
        self.overwrite = overwrite
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        for leftover in remove_stale_partials(self.out_dir.parent):  # first: it may restore out_dir
            warnings.warn(f"removed {leftover}: left unfinished by a writer that is gone", stacklevel=2)
        check_output_free(self.out_dir, overwrite)
        self.tmp_dir = Path(
            tempfile.mkdtemp(
                dir=self.out_dir.parent, prefix=f".{self.out_dir.name}.partial-{socket.gethostname()}-{os.getpid()}-"
            )
        )
        with_default_permissions(self.tmp_dir)
        self.provenance = provenance
        self.shards = [ShardWriter(self.tmp_dir / shard_name(k)) for k in range(num_shards)]
        self.shard_natoms = [array("i") for _ in range(num_shards)]
        self.stats = StatsAccumulator()
        self.properties: set[str] = set()
        self.skipped: list[str] = []
        self.num_structures = 0
        self.manifest: Manifest | None = None  # set by `seal`
        self._readers: list[ShardReader] = []  # of the sealed shards

    def _append(self, encoded: bytes, natoms: int) -> None:
        shard = self.num_structures % len(self.shards)
        self.shards[shard].append_encoded(encoded)
        self.shard_natoms[shard].append(natoms)
        self.num_structures += 1

    def write(self, record: StructureRecord) -> None:
        self._append(encode_record(record), record.num_atoms)
        self.stats.add(record)
        self.properties |= present_properties(record)

    def write_chunk(self, chunk: EncodedChunk) -> None:
        for encoded, natoms in zip(chunk.records, chunk.natoms):
            self._append(encoded, natoms)
        self.stats.merge(chunk.stats)
        self.properties |= chunk.properties
        self.skipped.extend(chunk.skipped)

    def seal(self) -> Manifest:
        """Close the shards and write natoms.npy and the manifest into the temporary
        directory; `read_written` can then read the records back, and `finish` moves the
        dataset into place."""
        if self.num_structures == 0:
            raise ValueError(f"{self.out_dir}: no valid structures to write")
        for shard in self.shards:
            shard.close()
        infos, natoms = [], []
        for shard, shard_natoms in zip(self.shards, self.shard_natoms):
            if shard.num_records == 0:  # fewer structures than shards
                shard.path.unlink()
                continue
            infos.append(
                ShardInfo(
                    name=shard.path.name,
                    num_structures=shard.num_records,
                    num_atoms=int(sum(shard_natoms)),
                    checksum=file_checksum(shard.path),
                )
            )
            natoms.append(np.frombuffer(shard_natoms, dtype=np.int32))
        stats = self.stats.result()
        if stats is not None and non_finite_fields(stats):
            raise DatasetError(f"{self.out_dir}: statistics {', '.join(non_finite_fields(stats))} of the records are "
                               "not finite: they hold non-finite labels; nothing written")
        natoms = np.concatenate(natoms)
        save_natoms(self.tmp_dir, natoms)
        self.manifest = Manifest(
            num_structures=self.num_structures,
            num_atoms=int(natoms.sum()),
            elements=self.stats.elements(),
            properties=["energy", "forces"] + [p for p in OPTIONAL_PROPERTIES if p in self.properties],
            shards=infos,
            provenance={
                **self.provenance,
                "esen_train_version": version("esen-train"),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "skipped_examples": self.skipped[:20],
            },
            skipped=len(self.skipped),
            stats=stats,
        )
        self.manifest.save(self.tmp_dir)
        self._readers = [ShardReader(self.tmp_dir / shard.name) for shard in infos]
        return self.manifest

    def read_written(self, position: int) -> StructureRecord:
        """The record written `position`-th (0-based), after `seal`."""
        return self._readers[position % len(self.shards)].read(position // len(self.shards))

    def without(self, positions: set[int], reasons: list[str]) -> DatasetWriter:
        """A new writer for the same output holding this one's records except those written
        at `positions`, counted as skipped for `reasons`: the dataset that skipping them
        during writing would have given. Call after `seal`; unsealed, not entered."""
        kept = DatasetWriter(self.out_dir, len(self.shards), self.provenance, self.overwrite)
        kept.skipped = self.skipped + reasons
        for position in range(self.num_structures):
            if position not in positions:
                kept.write(self.read_written(position))
        return kept

    def finish(self) -> Manifest:
        """Seal (unless done) and move the dataset into place; returns its manifest."""
        return finish_together([self])[0]

    def _close_readers(self) -> None:
        for reader in self._readers:
            reader.close()
        self._readers = []

    def _move_into_place(self) -> Path | None:
        """Put the sealed dataset at `out_dir`; returns where the dataset it replaced now is."""
        if not self.out_dir.exists():
            os.replace(self.tmp_dir, self.out_dir)
            return None
        check_output_free(self.out_dir, self.overwrite)  # may have appeared meanwhile
        if exchange_paths(self.tmp_dir, self.out_dir):
            return self.tmp_dir
        prefix = f".{self.out_dir.name}.old-{socket.gethostname()}-{os.getpid()}-"
        aside = Path(tempfile.mkdtemp(dir=self.out_dir.parent, prefix=prefix))
        os.replace(self.out_dir, aside / "dataset")
        os.replace(self.tmp_dir, self.out_dir)
        return aside

    def abort(self) -> None:
        self._close_readers()
        for shard in self.shards:
            try:
                shard.close()
            except Exception:  # the run is failing anyway; removing the files is what matters
                pass
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if exc_type is not None or self.tmp_dir.exists():
            self.abort()


def finish_together(writers: list[DatasetWriter]) -> list[Manifest]:
    """Seal every writer, then move all the datasets into place one right after another, and
    only then delete the datasets they replaced: outputs that belong together (a split's
    parts) are never left half old, half new by a slow step between them."""
    manifests = [writer.manifest or writer.seal() for writer in writers]
    for writer in writers:
        writer._close_readers()
    replaced = [writer._move_into_place() for writer in writers]
    for path in replaced:
        if path is not None:
            shutil.rmtree(path)
    return manifests
