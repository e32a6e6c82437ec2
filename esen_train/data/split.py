"""`esen-data split`: random train/val/test datasets from one dataset directory.

`split_dataset(DIR, PREFIX, [0.9, 0.05, 0.05], seed)` writes the dataset directories
PREFIX_train, PREFIX_val and PREFIX_test (two fractions: PREFIX_train and PREFIX_val).
The assignment is a permutation of the global indices drawn from `seed`, so the same
arguments give the same split; each part keeps the source's storage order.
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from esen_train.data.manifest import DatasetDirectory, Manifest
from esen_train.data.writer import DatasetWriter, check_output_free, finish_together

SPLIT_NAMES = ("train", "val", "test")


def split_output_dirs(prefix: str | Path, num_parts: int) -> list[Path]:
    return [Path(f"{prefix}_{name}") for name in SPLIT_NAMES[:num_parts]]


def split_indices(num_structures: int, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Disjoint sorted index arrays covering 0..num_structures-1, sized by `fractions`."""
    if not 2 <= len(fractions) <= len(SPLIT_NAMES):
        raise ValueError(f"give 2 or 3 fractions (train, val[, test]), got {fractions}")
    if min(fractions) <= 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must be positive and sum to 1, got {fractions}")
    boundaries = np.rint(np.cumsum(fractions)[:-1] * num_structures).astype(int)
    permutation = np.random.default_rng(seed).permutation(num_structures)
    parts = [np.sort(part) for part in np.split(permutation, boundaries)]
    for name, part, fraction in zip(SPLIT_NAMES, parts, fractions):
        if len(part) == 0:
            raise ValueError(f"fraction {fraction} of {num_structures} structures leaves '{name}' empty")
    return parts


def split_dataset(
    directory: str | Path,
    out_prefix: str | Path,
    fractions: list[float],
    seed: int,
    num_shards: int | None = None,
    overwrite: bool = False,
) -> dict[str, Manifest]:
    """Write the parts as dataset directories; returns their manifests by part name.

    Each part gets `num_shards` shards, by default the source's shard count scaled by
    its fraction (at least one).
    """
    source = DatasetDirectory(directory)
    parts = split_indices(len(source), fractions, seed)
    out_dirs = split_output_dirs(out_prefix, len(parts))
    for out_dir in out_dirs:  # refuse before writing anything
        check_output_free(out_dir.absolute(), overwrite)
    with ExitStack() as stack:
        stack.callback(source.close)
        writers = []
        for name, out_dir, fraction in zip(SPLIT_NAMES, out_dirs, fractions):
            shards = num_shards or max(1, round(len(source.readers) * fraction))
            provenance = {
                "tool": "esen-data split",
                "source": str(Path(directory).absolute()),
                "options": {"fractions": list(fractions), "seed": seed, "part": name},
            }
            writers.append(stack.enter_context(DatasetWriter(out_dir, shards, provenance, overwrite)))
        for writer, part in zip(writers, parts):
            for index in part:
                writer.write(source.read(int(index)))
        return dict(zip(SPLIT_NAMES, finish_together(writers)))
