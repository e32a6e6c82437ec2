"""Dataset statistics for normalisation, and the summary `esen-data inspect` prints.

Per-element reference energies are the least-squares fit of total energy against
element counts, E_s ≈ Σ_Z n_sZ e_Z. Everything is accumulated in one streaming pass
(normal equations and running sums), so datasets of any size fit in memory; the
dataset writer feeds every record it writes through a `StatsAccumulator` and
`esen-data stats` recomputes the same numbers from the shards.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np

from esen_train.data.manifest import DatasetDirectory, DatasetError, DatasetStats, Manifest, checked_natoms
from esen_train.data.records import StructureRecord
from esen_train.data.validate import MAX_ATOMIC_NUMBER

# Eigenvalues of the element-count Gram matrix below this fraction of the largest are
# treated as zero (their directions are not determined by the data, e.g. a dataset of a
# single molecule, where only one combination of its element energies is known).
_RELATIVE_CUTOFF = 1e-12
_BATCH = 4096


class StatsAccumulator:
    """Running sums from which `result()` computes `DatasetStats`."""

    def __init__(self):
        size = MAX_ATOMIC_NUMBER + 1
        self.num_structures = 0
        self.num_atoms = 0
        self.force_square_sum = 0.0
        # Normal equations of the fit: Σ c cᵀ and Σ c E over structures (c = counts).
        self.gram = np.zeros((size, size))
        self.moment = np.zeros(size)
        # Sums needed for per-atom energy and residual moments (x = c/N, y = E/N).
        self.x_gram = np.zeros((size, size))
        self.x_y = np.zeros(size)
        self.x_sum = np.zeros(size)
        self.y_sum = 0.0
        self.y_square_sum = 0.0
        self.y_min = math.inf
        self.y_max = -math.inf
        self._counts: list[np.ndarray] = []
        self._energies: list[float] = []

    def add(self, record: StructureRecord) -> None:
        counts = np.bincount(record.atomic_numbers, minlength=MAX_ATOMIC_NUMBER + 1)
        self._counts.append(counts)
        self._energies.append(record.energy)
        self.num_atoms += record.num_atoms
        self.force_square_sum += float(np.square(record.forces, dtype=np.float64).sum())
        if len(self._counts) >= _BATCH:
            self._flush()

    def _flush(self) -> None:
        if not self._counts:
            return
        counts = np.array(self._counts, dtype=np.float64)
        energies = np.array(self._energies, dtype=np.float64)
        self._counts, self._energies = [], []
        natoms = counts.sum(axis=1)
        x, y = counts / natoms[:, None], energies / natoms
        self.num_structures += len(energies)
        self.gram += counts.T @ counts
        self.moment += counts.T @ energies
        self.x_gram += x.T @ x
        self.x_y += x.T @ y
        self.x_sum += x.sum(axis=0)
        self.y_sum += y.sum()
        self.y_square_sum += np.square(y).sum()
        self.y_min = min(self.y_min, float(y.min()))
        self.y_max = max(self.y_max, float(y.max()))

    def merge(self, other: StatsAccumulator) -> None:
        """Add the sums of `other` (e.g. from a conversion worker) to these."""
        self._flush()
        other._flush()
        self.num_structures += other.num_structures
        self.num_atoms += other.num_atoms
        self.force_square_sum += other.force_square_sum
        self.gram += other.gram
        self.moment += other.moment
        self.x_gram += other.x_gram
        self.x_y += other.x_y
        self.x_sum += other.x_sum
        self.y_sum += other.y_sum
        self.y_square_sum += other.y_square_sum
        self.y_min = min(self.y_min, other.y_min)
        self.y_max = max(self.y_max, other.y_max)

    def elements(self) -> list[int]:
        """Atomic numbers seen so far."""
        self._flush()
        return np.flatnonzero(np.diag(self.gram) > 0).tolist()

    def result(self) -> DatasetStats:
        self._flush()
        n = self.num_structures
        if n == 0:
            raise ValueError("no structures to compute statistics from")
        references = least_squares_references(self.gram, self.moment)
        present = np.flatnonzero(np.diag(self.gram) > 0)
        mean = self.y_sum / n
        # residual per atom r = y - x·e; its moments follow from the accumulated sums.
        residual_mean = mean - self.x_sum @ references / n
        residual_square_mean = (
            self.y_square_sum - 2 * references @ self.x_y + references @ self.x_gram @ references
        ) / n
        return DatasetStats(
            element_references={int(z): float(references[z]) for z in present},
            force_rms=math.sqrt(self.force_square_sum / (3 * self.num_atoms)),
            energy_per_atom_mean=float(mean),
            energy_per_atom_std=math.sqrt(max(self.y_square_sum / n - mean**2, 0.0)),
            energy_per_atom_min=self.y_min,
            energy_per_atom_max=self.y_max,
            residual_energy_per_atom_mean=float(residual_mean),
            residual_energy_per_atom_std=math.sqrt(max(residual_square_mean - residual_mean**2, 0.0)),
        )


def least_squares_references(gram: np.ndarray, moment: np.ndarray) -> np.ndarray:
    """Per-element energies e minimising Σ_s (E_s - c_s · e)² from the normal equations
    gram = Σ c cᵀ and moment = Σ c E over structures (c = element counts, indexed by Z);
    elements absent from the data get 0, undetermined directions the least-norm solution."""
    present = np.flatnonzero(np.diag(gram) > 0)
    references = np.zeros(len(moment))
    references[present] = np.linalg.lstsq(gram[np.ix_(present, present)], moment[present], rcond=_RELATIVE_CUTOFF)[0]
    return references


def compute_stats(directory: str | Path) -> DatasetStats:
    """Statistics of every record of a dataset directory (one pass over the shards)."""
    dataset = DatasetDirectory(directory)
    accumulator = StatsAccumulator()
    try:
        for reader in dataset.readers:
            for record in reader:
                accumulator.add(record)
    finally:
        dataset.close()
    return accumulator.result()


def write_stats(directory: str | Path) -> DatasetStats:
    """Recompute the statistics and store them in the manifest (atomically)."""
    stats = compute_stats(directory)
    if non_finite_fields(stats):
        raise DatasetError(f"{directory}: statistics {', '.join(non_finite_fields(stats))} are not finite: the dataset "
                           f"holds non-finite labels (`esen-data verify {directory}` names the records); nothing written")
    manifest = Manifest.load(directory)
    manifest.stats = stats
    manifest.save(directory)
    return stats


def non_finite_fields(stats: DatasetStats) -> list[str]:
    """The statistics that are NaN or infinite (a JSON manifest cannot hold them)."""
    values = {name: list(value.values()) if isinstance(value, dict) else [value] for name, value in asdict(stats).items()}
    return [name for name, numbers in values.items() if not np.all(np.isfinite(numbers))]


def atoms_histogram(natoms: np.ndarray, max_bins: int = 12) -> dict:
    """Histogram of atoms per structure with integer bin edges [edges[i], edges[i+1])."""
    low, high = int(natoms.min()), int(natoms.max())
    width = max(1, math.ceil((high - low + 1) / max_bins))
    edges = np.arange(low, high + width + 1, width)
    counts, _ = np.histogram(natoms, bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def describe_dataset(directory: str | Path) -> dict:
    """What `esen-data inspect --json` prints: the manifest plus an atom-count summary."""
    manifest = Manifest.load(directory)
    natoms = checked_natoms(directory, manifest)
    summary = manifest.to_dict()
    summary["atoms_per_structure"] = {
        "min": int(natoms.min()),
        "max": int(natoms.max()),
        "mean": float(natoms.mean()),
        "histogram": atoms_histogram(natoms),
    }
    return summary
