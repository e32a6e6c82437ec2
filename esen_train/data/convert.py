"""`esen-data convert`: ASE-readable files to a dataset directory of LMDB shards.

The main process splits the inputs into chunks (`sources.plan_chunks`), worker processes
read, validate and encode one chunk each (`convert_chunk`), and the main process writes
the encoded records in input order, so the output does not depend on the worker count.
At most two chunks per worker are in flight, so memory stays bounded whatever the size
of the inputs. Once everything is written, the records are read back for energy outliers
(`outliers.py`: judging one needs the whole dataset's reference energies); they stop the
conversion, or with `skip_invalid` the dataset is rewritten without them.
"""
from __future__ import annotations

import ctypes
import math
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from esen_train.data.manifest import Manifest
from esen_train.data.outliers import find_energy_outliers
from esen_train.data.sources import InputChunk, InputError, LabelKeys, atoms_to_record, plan_chunks, read_chunk
from esen_train.data.validate import InvalidStructure, check_record
from esen_train.data.writer import DatasetWriter, EncodedChunk, check_output_free
from esen_train.progress import ConsoleProgress

CHUNK_SIZE = 1000  # structures per unit of work
STRUCTURES_PER_SHARD = 100_000  # default shard size when --shards is not given
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def convert_chunk(chunk: InputChunk, skip_invalid: bool, keys: LabelKeys) -> EncodedChunk:
    """Read, check and encode one chunk (runs in a worker process)."""
    result = EncodedChunk()
    for index, atoms in read_chunk(chunk):
        try:
            record = atoms_to_record(atoms, chunk.path, index, keys)
            check_record(record)
        except InvalidStructure as error:
            if not skip_invalid:
                raise
            result.skipped.append(str(error))
            continue
        result.add(record)
    return result


def _start_workers(workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` forked processes, started now.

    fork (rather than spawn) lets workers start in milliseconds with this process's
    imports instead of re-importing numpy, ASE and torch (vesin imports it) for seconds
    each. fork copies only the calling thread, so the workers must start before this
    process starts threads of its own (the progress bar's monitor): the warm-up task makes the pool
    launch all its processes here.
    """
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_die_with_parent, initargs=(os.getpid(),))
    pool.submit(int).result()
    return pool


def _die_with_parent(parent_pid: int) -> None:
    """Worker initializer: end this worker when the converting process ends, however it ends.

    A conversion killed outright (SIGKILL, or SIGTERM, which Python does not catch) runs no
    pool shutdown, and its workers would wait on their task queue forever. Linux's
    PR_SET_PDEATHSIG has the kernel kill them instead; elsewhere they stay as before."""
    prctl = getattr(ctypes.CDLL(None), "prctl", None)
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)


def _converted_chunks(
    chunks: list[InputChunk], pool: ProcessPoolExecutor | None, workers: int, skip_invalid: bool, keys: LabelKeys
) -> Iterator[EncodedChunk]:
    """Results of `convert_chunk` in input order, computed in `pool` (or here if None)
    with at most two chunks per worker in flight."""
    if pool is None:
        for chunk in chunks:
            yield convert_chunk(chunk, skip_invalid, keys)
        return
    waiting = iter(chunks)
    in_flight = deque(
        pool.submit(convert_chunk, chunk, skip_invalid, keys)
        for chunk in _take(waiting, 2 * workers)
    )
    try:
        while in_flight:
            result = in_flight.popleft().result()
            for chunk in _take(waiting, 1):
                in_flight.append(pool.submit(convert_chunk, chunk, skip_invalid, keys))
            yield result
    finally:
        for future in in_flight:
            future.cancel()


def _take(iterator: Iterator, count: int) -> list:
    return [item for _, item in zip(range(count), iterator)]


def convert(
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    num_shards: int | None = None,
    workers: int = 1,
    skip_invalid: bool = False,
    overwrite: bool = False,
    format: str | None = None,
    chunk_size: int = CHUNK_SIZE,
    progress: bool = True,
    keys: LabelKeys = LabelKeys(),
) -> Manifest:
    """Convert `inputs` into the dataset directory `out_dir` and return its manifest.

    `num_shards` defaults to one shard per 100,000 input structures. Invalid structures
    raise `InvalidStructure` (naming file, index and field) unless `skip_invalid`, in
    which case they are counted in the manifest's `skipped`; so are energy outliers
    (`provenance["skipped_energy_outliers"]` says how many of them). `format` forces an ase.io
    format for inputs whose name does not say it; `keys` names the labels in the inputs.
    Nothing is left at `out_dir` on error.
    """
    inputs = [str(path) for path in inputs]
    out_dir = Path(out_dir)
    check_output_free(out_dir.absolute(), overwrite)  # fail before the slow part
    chunks = [chunk for path in inputs for chunk in plan_chunks(path, chunk_size, format)]
    known_total = sum(chunk.count or 0 for chunk in chunks)
    if num_shards is None:
        num_shards = max(1, math.ceil(known_total / STRUCTURES_PER_SHARD))
    provenance = {
        "tool": "esen-data convert",
        "inputs": inputs,
        "options": {"num_shards": num_shards, "skip_invalid": skip_invalid, "format": format, "keys": keys.to_dict()},
        "skipped_energy_outliers": 0,
    }
    with ExitStack() as stack:
        pool = stack.enter_context(_start_workers(workers)) if workers > 1 else None
        writer = stack.enter_context(DatasetWriter(out_dir, num_shards, provenance, overwrite))
        console = stack.enter_context(ConsoleProgress("convert", known_total or None, "structures", enabled=progress))
        for result in _converted_chunks(chunks, pool, workers, skip_invalid, keys):
            writer.write_chunk(result)
            console.update(len(result.records) + len(result.skipped))
        if writer.num_structures == 0:
            skipped = f" ({len(writer.skipped)} skipped as invalid)" if writer.skipped else ""
            raise InputError(f"{', '.join(inputs)}: no structures to convert{skipped}")
        writer.seal()
        outliers = find_energy_outliers(writer.read_written, writer.num_structures)
        if outliers:
            writer = stack.enter_context(_without_outliers(writer, outliers, skip_invalid))
        return writer.finish()


def _without_outliers(writer: DatasetWriter, outliers: list, skip_invalid: bool) -> DatasetWriter:
    """Stop at the first energy outlier, or (`skip_invalid`) a writer of the rest."""
    errors = [InvalidStructure(o.source_file, o.source_index, "energy", o.reason()) for o in outliers]
    if not skip_invalid:
        first = errors[0]
        raise InvalidStructure(
            first.source_file, first.index, first.field,
            f"{first.reason}; {len(errors)} structure(s) of this input are such outliers "
            "(--skip-invalid leaves them out)",
        )
    writer.provenance = {**writer.provenance, "skipped_energy_outliers": len(outliers)}
    return writer.without({o.position for o in outliers}, [str(error) for error in errors])
