"""`esen-data convert`: ASE-readable files to a dataset directory of LMDB shards.

The main process splits the inputs into chunks (`sources.plan_chunks`), worker processes
read, validate and encode one chunk each (`convert_chunk`), and the main process writes
the encoded records in input order, so the output does not depend on the worker count.
At most two chunks per worker are in flight, so memory stays bounded whatever the size
of the inputs.
"""
from __future__ import annotations

import math
import multiprocessing
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from esen_train.data.manifest import Manifest
from esen_train.data.sources import InputChunk, atoms_to_record, plan_chunks, read_chunk
from esen_train.data.validate import InvalidStructure, check_record
from esen_train.data.writer import DatasetWriter, EncodedChunk, check_output_free

CHUNK_SIZE = 1000  # structures per unit of work
STRUCTURES_PER_SHARD = 100_000  # default shard size when --shards is not given


def convert_chunk(chunk: InputChunk, skip_invalid: bool) -> EncodedChunk:
    """Read, check and encode one chunk (runs in a worker process)."""
    result = EncodedChunk()
    for index, atoms in read_chunk(chunk):
        try:
            record = atoms_to_record(atoms, chunk.path, index)
            check_record(record)
        except InvalidStructure as error:
            if not skip_invalid:
                raise
            result.skipped.append(str(error))
            continue
        result.add(record)
    return result


def _converted_chunks(
    chunks: list[InputChunk], workers: int, skip_invalid: bool
) -> Iterator[EncodedChunk]:
    """Results of `convert_chunk` in input order, computed by `workers` processes."""
    if workers <= 1:
        for chunk in chunks:
            yield convert_chunk(chunk, skip_invalid)
        return
    # spawn, not fork: the caller may hold threads (torch, tqdm) that fork would copy badly.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        waiting = iter(chunks)
        in_flight = deque()
        try:
            for chunk in _take(waiting, 2 * workers):
                in_flight.append(pool.submit(convert_chunk, chunk, skip_invalid))
            while in_flight:
                result = in_flight.popleft().result()
                for chunk in _take(waiting, 1):
                    in_flight.append(pool.submit(convert_chunk, chunk, skip_invalid))
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
) -> Manifest:
    """Convert `inputs` into the dataset directory `out_dir` and return its manifest.

    `num_shards` defaults to one shard per 100,000 input structures. Invalid structures
    raise `InvalidStructure` (naming file, index and field) unless `skip_invalid`, in
    which case they are counted in the manifest's `skipped`. `format` forces an ase.io
    format for inputs whose name does not say it. Nothing is left at `out_dir` on error.
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
        "options": {"num_shards": num_shards, "skip_invalid": skip_invalid, "format": format},
    }
    with (
        DatasetWriter(out_dir, num_shards, provenance, overwrite) as writer,
        tqdm(total=known_total or None, unit=" structures", disable=not progress) as bar,
    ):
        for result in _converted_chunks(chunks, workers, skip_invalid):
            writer.write_chunk(result)
            bar.update(len(result.records) + len(result.skipped))
        return writer.finish()
