"""Energy outliers: structures whose energy per atom, after the per-element reference
energies, lies far from every other structure's.

A wrong label (a unit slip, a crashed calculation that wrote -1e6 eV) passes every check of
one record, and the least-squares fit of the references in stats.py takes it in whole: one
structure of 24 Cu atoms at -1e6 eV makes the Cu reference -41,667 eV. The references used
here come from a median (L1) regression of the energy per atom on the composition
fractions, which a few outliers cannot move (iteratively reweighted least squares). A
structure is an outlier when its residual lies more than `OUTLIER_SCALES` robust standard
deviations (1.4826 x the median absolute deviation) *and* more than
`MIN_OUTLIER_EV_PER_ATOM` from the median residual. The shared DFT data sets and the EMT
data have none beyond 15 robust standard deviations or 1.3 eV per atom.

Structures of one atom are left out of the fit and never flagged: they are often
isolated-atom reference calculations, whose energy differs from a condensed structure's by
the cohesive energy, and beside a single molecule's composition the linear model cannot fit
both. With fewer than `MIN_STRUCTURES` structures of several atoms (or 5 per element) there
is not enough data to call anything an outlier, and nothing is flagged.

The fit reads a random sample of at most `SAMPLE_SIZE` structures; the check then reads
every record once more, so memory stays bounded whatever the size of the dataset.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from esen_train.data.records import StructureRecord
from esen_train.data.validate import MAX_ATOMIC_NUMBER

OUTLIER_SCALES = 50.0
MIN_OUTLIER_EV_PER_ATOM = 20.0
MIN_STRUCTURES = 20
SAMPLE_SIZE = 20_000
_ITERATIONS = 50
_TOLERANCE = 1e-7  # eV: the fit has converged when no reference moves by more
# Residuals below this count as this in the L1 weights 1/|r| (an exact fit would divide by 0).
_SMALLEST_RESIDUAL = 1e-6  # eV per atom
_RELATIVE_CUTOFF = 1e-12  # as in stats.py: directions the compositions do not determine


@dataclass
class RobustReferences:
    """Per-element energies of the median regression, and its residuals' centre and spread."""

    references: dict[int, float]  # eV per atom of each element
    median: float  # eV per atom, of the residuals
    scale: float  # eV per atom, 1.4826 x the residuals' median absolute deviation

    @property
    def bound(self) -> float:
        """How far from the median a residual may lie (eV per atom)."""
        return max(OUTLIER_SCALES * self.scale, MIN_OUTLIER_EV_PER_ATOM)

    def deviation(self, record: StructureRecord) -> float | None:
        """Residual minus the median (eV per atom); None for what is not judged: one atom,
        or an element the fit has not seen."""
        elements, counts = np.unique(record.atomic_numbers, return_counts=True)
        if record.num_atoms < 2 or any(int(z) not in self.references for z in elements):
            return None
        reference = sum(self.references[int(z)] * int(n) for z, n in zip(elements, counts))
        return (record.energy - reference) / record.num_atoms - self.median


@dataclass
class EnergyOutlier:
    position: int  # in the order of the `read` function given to `find_energy_outliers`
    source_file: str
    source_index: int
    deviation: float  # eV per atom from the median residual
    bound: float

    def reason(self) -> str:
        return (
            f"energy per atom after the per-element reference energies is {self.deviation:+.6g} eV from the "
            f"dataset's median, beyond ±{self.bound:.3g} eV ({OUTLIER_SCALES:g} robust standard deviations, "
            f"at least {MIN_OUTLIER_EV_PER_ATOM:g} eV): a wrong label or unit"
        )


def fit_robust_references(records: Iterable[StructureRecord]) -> RobustReferences | None:
    """The median regression over the records of several atoms; None with too few of them."""
    counts, energies = [], []
    for record in records:
        if record.num_atoms > 1:
            counts.append(np.bincount(record.atomic_numbers, minlength=MAX_ATOMIC_NUMBER + 1))
            energies.append(record.energy)
    if not counts:
        return None
    counts = np.array(counts, dtype=np.float64)
    present = np.flatnonzero(counts.sum(axis=0))
    if len(counts) < max(MIN_STRUCTURES, 5 * len(present)):
        return None
    natoms = counts.sum(axis=1)
    fractions = counts[:, present] / natoms[:, None]
    per_atom = np.array(energies) / natoms
    references = _median_regression(fractions, per_atom)
    residuals = per_atom - fractions @ references
    median = float(np.median(residuals))
    scale = 1.4826 * float(np.median(np.abs(residuals - median)))
    return RobustReferences({int(z): float(e) for z, e in zip(present, references)}, median, scale)


def _median_regression(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin_e sum |y - x e| by iteratively reweighted least squares, from least squares."""
    weights = np.ones_like(y)
    solution = None
    for _ in range(_ITERATIONS):
        weighted = x * weights[:, None]
        new = np.linalg.lstsq(weighted.T @ x, weighted.T @ y, rcond=_RELATIVE_CUTOFF)[0]
        if solution is not None and np.abs(new - solution).max() < _TOLERANCE:
            return new
        solution = new
        weights = 1.0 / np.maximum(np.abs(y - x @ solution), _SMALLEST_RESIDUAL)
    return solution


def find_energy_outliers(read: Callable[[int], StructureRecord], count: int, seed: int = 0) -> list[EnergyOutlier]:
    """The outliers among `read(0)`, ..., `read(count - 1)`, in that order."""
    if count > SAMPLE_SIZE:
        sample = np.sort(np.random.default_rng(seed).choice(count, SAMPLE_SIZE, replace=False)).tolist()
    else:
        sample = range(count)
    fit = fit_robust_references(read(position) for position in sample)
    if fit is None:
        return []
    outliers = []
    for position in range(count):
        record = read(position)
        deviation = fit.deviation(record)
        if deviation is not None and abs(deviation) > fit.bound:
            outliers.append(EnergyOutlier(position, record.source_file, record.source_index, deviation, fit.bound))
    return outliers
