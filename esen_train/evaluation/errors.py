"""Error tables: a calculator's energies, forces and stresses against labelled structures.

The numbers are the ones papers report: energy MAE and RMSE per atom (meV/atom), force MAE
and RMSE over Cartesian components (meV/Å), stress MAE over the 3x3 components (meV/Å³) and
the mean cosine between predicted and reference force vectors; the same again per element,
per config type and per dataset. Per element, force metrics use the atoms of that element;
energy and stress, which belong to a whole structure, use the structures that contain it.

Everything streams: structures are read one at a time (`iter_labelled_structures`),
predicted in batches (`predict_stream`), and added to running sums (`ErrorTables`), so a
test set of any size is evaluated in constant memory. `ParityReservoir` keeps a bounded
random sample of structures for the parity plot.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.data import chemical_symbols
from ase.stress import voigt_6_to_full_3x3_stress

from esen_train.data.manifest import DatasetDirectory, Manifest
from esen_train.data.records import StructureRecord
from esen_train.data.sources import InputError, LabelKeys, atoms_to_record, plan_chunks

MEV = 1000.0
# Force vectors shorter than this (eV/Å) have no direction worth comparing.
COSINE_MIN_FORCE = 1e-6
# The group of structures whose input names no config type.
NO_CONFIG_TYPE = "(unset)"


@dataclass
class LabelledStructure:
    """A structure and its reference labels; `stress` is 3x3 (ASE sign) or None if unlabelled."""

    atoms: Atoms
    energy: float
    forces: np.ndarray
    stress: np.ndarray | None
    source: str  # "file:index", for messages
    config_type: str | None = None
    dataset: str = ""  # which of the evaluated inputs it came from


def iter_labelled_structures(path: str | Path, keys: LabelKeys = LabelKeys(), dataset: str = "") -> Iterator[LabelledStructure]:
    """Every structure of a dataset directory (LMDB shards, see esen_train.data) or of an
    ASE-readable file (extxyz, ASE db, ...; labels found under `keys`), one at a time."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data not found: {path}")
    if path.is_dir():
        yield from _dataset_directory_structures(path, dataset)
        return
    count = 0
    for index, atoms in enumerate(_read_frames(path)):
        if len(atoms) == 0:
            raise ValueError(f"{path}:{index}: the structure has 0 atoms (a structure needs at least one)")
        record = atoms_to_record(atoms, str(path), index, keys)
        yield _from_record(record, f"{path}:{index}", dataset)
        count += 1
    if count == 0:
        raise ValueError(f"{path}: contains no structures")


def count_structures(path: str | Path) -> int | None:
    """How many structures `iter_labelled_structures` will yield, where that is cheap to know
    (a dataset's manifest, an extended XYZ file's atom-count lines, an ASE database); else None."""
    path = Path(path)
    if path.is_dir():
        return Manifest.load(path, check_shards=False).num_structures
    try:
        chunks = plan_chunks(path, chunk_size=1_000_000)
    except InputError:
        return None
    counts = [chunk.count for chunk in chunks]
    return sum(counts) if None not in counts else None


def read_labelled_structures(path: str | Path, keys: LabelKeys = LabelKeys()) -> list[LabelledStructure]:
    """`iter_labelled_structures` as a list, for sets small enough to hold."""
    return list(iter_labelled_structures(path, keys))


def _read_frames(path: Path) -> Iterator[Atoms]:
    frames = ase.io.iread(path, index=":")
    while True:
        try:
            atoms = next(frames)
        except StopIteration:
            return
        except Exception as error:  # ASE raises many types for unreadable input
            raise ValueError(f"{path}: not readable by ase.io.read ({type(error).__name__}: {error})") from None
        yield atoms


def _dataset_directory_structures(path: Path, dataset: str) -> Iterator[LabelledStructure]:
    directory = DatasetDirectory(path)
    try:
        index = 0
        for reader in directory.readers:  # shard order is the global order
            for record in reader:
                yield _from_record(record, f"{path}:{index}", dataset)
                index += 1
    finally:
        directory.close()


def _from_record(record: StructureRecord, source: str, dataset: str) -> LabelledStructure:
    atoms = Atoms(record.atomic_numbers, positions=record.positions, cell=record.cell, pbc=record.pbc)
    atoms.info.update({name: value for name, value in (("charge", record.charge), ("spin", record.spin))
                       if value is not None})
    stress = None if record.stress is None else np.asarray(record.stress, dtype=float)
    return LabelledStructure(atoms, float(record.energy), np.asarray(record.forces, dtype=float), stress, source,
                             record.config_type, dataset)


def predict_stream(
    calculator: Calculator, structures: Iterable[LabelledStructure], max_atoms_per_batch: int = 512
) -> Iterator[tuple[LabelledStructure, dict]]:
    """(structure, prediction) pairs: energy, forces and (where labelled) stress as numpy in
    eV units. A calculator with `calculate_batch` (ESENCalculator) gets batches of at most
    `max_atoms_per_batch` atoms, read only as they are needed; any other ASE calculator is
    called structure by structure."""
    if not hasattr(calculator, "calculate_batch"):
        for structure in structures:
            yield structure, _predict_one(calculator, structure)
        return
    for chunk in _chunks_by_atoms(structures, max_atoms_per_batch):
        yield from zip(chunk, calculator.calculate_batch([s.atoms for s in chunk]))


def predict(calculator: Calculator, structures: Sequence[LabelledStructure], max_atoms_per_batch: int = 512) -> list[dict]:
    """The predictions of `predict_stream` as a list."""
    return [prediction for _, prediction in predict_stream(calculator, structures, max_atoms_per_batch)]


def _predict_one(calculator: Calculator, structure: LabelledStructure) -> dict:
    atoms = structure.atoms.copy()
    atoms.calc = calculator
    result = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    if structure.stress is not None:
        result["stress"] = atoms.get_stress()
    return result


def _chunks_by_atoms(structures: Iterable[LabelledStructure], max_atoms: int) -> Iterator[list[LabelledStructure]]:
    chunk: list[LabelledStructure] = []
    atoms_in_chunk = 0
    for structure in structures:
        if chunk and atoms_in_chunk + len(structure.atoms) > max_atoms:
            yield chunk
            chunk, atoms_in_chunk = [], 0
        chunk.append(structure)
        atoms_in_chunk += len(structure.atoms)
    if chunk:
        yield chunk


@dataclass
class Comparison:
    """One structure's reference and predicted values, checked and in plain arrays."""

    structure: LabelledStructure
    energy_error_per_atom: float  # eV/atom
    forces_reference: np.ndarray  # [N, 3] eV/Å
    forces_predicted: np.ndarray
    stress_reference: np.ndarray | None  # [3, 3] eV/Å³, None where unlabelled
    stress_predicted: np.ndarray | None

    @classmethod
    def of(cls, structure: LabelledStructure, prediction: dict) -> Comparison:
        forces = np.asarray(prediction["forces"], dtype=float)
        if forces.shape != structure.forces.shape:
            raise ValueError(f"{structure.source}: predicted forces have shape {forces.shape}, "
                             f"expected {structure.forces.shape}")
        stress = None
        if structure.stress is not None:
            if prediction.get("stress") is None:
                raise ValueError(f"{structure.source}: stress is labelled but was not predicted")
            stress = full_stress(prediction["stress"])
        energy_error = (float(prediction["energy"]) - structure.energy) / len(structure.atoms)
        return cls(structure, energy_error, structure.forces, forces, structure.stress, stress)


class ErrorTally:
    """Running sums of the error metrics over a group of structures (and of their atoms)."""

    def __init__(self) -> None:
        self.structures = self.atoms = self.stressed = self.cosines = 0
        self.energy_abs = self.energy_sq = self.force_abs = self.force_sq = self.cosine_sum = self.stress_abs = 0.0

    def add(self, comparison: Comparison, atom_mask: np.ndarray | None = None) -> None:
        """The structure's energy and stress errors, and the force errors of the atoms in
        `atom_mask` (all atoms when None)."""
        self.structures += 1
        self.energy_abs += abs(comparison.energy_error_per_atom)
        self.energy_sq += comparison.energy_error_per_atom**2
        reference, predicted = comparison.forces_reference, comparison.forces_predicted
        if atom_mask is not None:
            reference, predicted = reference[atom_mask], predicted[atom_mask]
        error = predicted - reference
        self.atoms += len(reference)
        self.force_abs += float(np.abs(error).sum())
        self.force_sq += float((error**2).sum())
        cosines = _cosines(predicted, reference)
        self.cosine_sum += float(cosines.sum())
        self.cosines += len(cosines)
        if comparison.stress_reference is not None:
            self.stressed += 1
            self.stress_abs += float(np.abs(comparison.stress_predicted - comparison.stress_reference).sum())

    def metrics(self) -> dict:
        result = {
            "num_structures": self.structures,
            "num_atoms": self.atoms,
            "energy_mae_mev_per_atom": MEV * self.energy_abs / self.structures,
            "energy_rmse_mev_per_atom": MEV * np.sqrt(self.energy_sq / self.structures),
            "force_mae_mev_per_A": MEV * self.force_abs / (3 * self.atoms),
            "force_rmse_mev_per_A": MEV * np.sqrt(self.force_sq / (3 * self.atoms)),
            "force_cosine": self.cosine_sum / self.cosines if self.cosines else None,
        }
        if self.stressed:
            result["num_structures_with_stress"] = self.stressed
            result["stress_mae_mev_per_A3"] = MEV * self.stress_abs / (9 * self.stressed)
        return {key: float(value) if isinstance(value, np.floating) else value for key, value in result.items()}


class ErrorTables:
    """Error metrics over all structures, per element, per config type and per dataset, from
    structures and predictions added one at a time."""

    def __init__(self) -> None:
        self.all = ErrorTally()
        self.per_element: dict[int, ErrorTally] = {}
        self.per_config_type: dict[str, ErrorTally] = {}
        self.per_dataset: dict[str, ErrorTally] = {}

    def add(self, structure: LabelledStructure, prediction: dict) -> Comparison:
        comparison = Comparison.of(structure, prediction)
        self.all.add(comparison)
        numbers = structure.atoms.numbers
        for element in np.unique(numbers):
            self.per_element.setdefault(int(element), ErrorTally()).add(comparison, numbers == element)
        self.per_config_type.setdefault(structure.config_type or NO_CONFIG_TYPE, ErrorTally()).add(comparison)
        self.per_dataset.setdefault(structure.dataset, ErrorTally()).add(comparison)
        return comparison

    def result(self) -> dict:
        """The metrics of all structures, with `per_element` (by chemical symbol, in order of
        atomic number), `per_config_type` and `per_dataset`."""
        if not self.all.structures:
            raise ValueError("no structures to compute errors on")
        return {
            **self.all.metrics(),
            "per_element": {chemical_symbols[z]: self.per_element[z].metrics() for z in sorted(self.per_element)},
            "per_config_type": {name: tally.metrics() for name, tally in sorted(self.per_config_type.items())},
            "per_dataset": {name: tally.metrics() for name, tally in self.per_dataset.items()},
        }


def compute_errors(structures: Sequence[LabelledStructure], predictions: Sequence[dict]) -> dict:
    """`ErrorTables.result()` of structures and their predictions in two lists."""
    if len(structures) != len(predictions) or not structures:
        raise ValueError(f"need one prediction per structure, got {len(predictions)} for {len(structures)}")
    tables = ErrorTables()
    for structure, prediction in zip(structures, predictions):
        tables.add(structure, prediction)
    return tables.result()


def full_stress(stress: np.ndarray) -> np.ndarray:
    """3x3 from ASE's Voigt order [xx, yy, zz, yz, xz, xy] or from a 3x3."""
    stress = np.asarray(stress, dtype=float)
    return voigt_6_to_full_3x3_stress(stress) if stress.shape == (6,) else stress.reshape(3, 3)


def _cosines(predicted: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine of the angle between force vectors, for atoms where both are non-zero."""
    norm_pred = np.linalg.norm(predicted, axis=1)
    norm_ref = np.linalg.norm(reference, axis=1)
    usable = (norm_pred > COSINE_MIN_FORCE) & (norm_ref > COSINE_MIN_FORCE)
    return np.sum(predicted[usable] * reference[usable], axis=1) / (norm_pred[usable] * norm_ref[usable])


class ParityReservoir:
    """A uniform random sample of at most `capacity` structures' comparisons (reservoir
    sampling with a fixed seed), for the parity plot of a test set of any size."""

    def __init__(self, capacity: int = 2000, seed: int = 0) -> None:
        self.capacity = capacity
        self.seen = 0
        self.kept: list[Comparison] = []
        self.rng = np.random.default_rng(seed)

    def add(self, comparison: Comparison) -> None:
        self.seen += 1
        if len(self.kept) < self.capacity:
            self.kept.append(comparison)
            return
        slot = int(self.rng.integers(self.seen))
        if slot < self.capacity:
            self.kept[slot] = comparison

    def panels(self) -> list[tuple]:
        """(label, reference, predicted) for `plots.plot_parity`: energy per atom, force
        components, and stress components where labelled."""
        kept = self.kept
        energy_reference = np.array([c.structure.energy / len(c.structure.atoms) for c in kept])
        panels = [
            ("energy (eV/atom)", energy_reference, energy_reference + np.array([c.energy_error_per_atom for c in kept])),
            ("force components (eV/Å)", np.concatenate([c.forces_reference for c in kept]),
             np.concatenate([c.forces_predicted for c in kept])),
        ]
        stressed = [c for c in kept if c.stress_reference is not None]
        if stressed:
            panels.append(("stress components (eV/Å³)", np.stack([c.stress_reference for c in stressed]),
                           np.stack([c.stress_predicted for c in stressed])))
        return panels


def parity_panels(structures: Sequence[LabelledStructure], predictions: Sequence[dict]) -> list[tuple]:
    """The parity panels of every structure (sets small enough to plot whole)."""
    reservoir = ParityReservoir(capacity=len(structures))
    for structure, prediction in zip(structures, predictions):
        reservoir.add(Comparison.of(structure, prediction))
    return reservoir.panels()


_TABLE_COLUMNS = (
    ("structures", "num_structures", "{:d}"),
    ("atoms", "num_atoms", "{:d}"),
    ("E MAE meV/at", "energy_mae_mev_per_atom", "{:.3f}"),
    ("E RMSE meV/at", "energy_rmse_mev_per_atom", "{:.3f}"),
    ("F MAE meV/Å", "force_mae_mev_per_A", "{:.3f}"),
    ("F RMSE meV/Å", "force_rmse_mev_per_A", "{:.3f}"),
    ("F cos", "force_cosine", "{:.4f}"),
    ("S MAE meV/Å³", "stress_mae_mev_per_A3", "{:.3f}"),
)
# The groups of a report after its "all" row: (key in the metrics, table heading).
_GROUPS = (("per_element", "element"), ("per_config_type", "config_type"), ("per_dataset", "dataset"))


def format_error_table(metrics: dict) -> str:
    """Fixed-width tables: all structures and one row per element; then, where there is more
    than one, one row per config type and one per dataset."""
    tables = []
    for key, heading in _GROUPS:
        groups = metrics.get(key, {})
        if key == "per_element":
            rows = [("all", metrics)] + list(groups.items())
        elif len(groups) > 1:
            rows = list(groups.items())
        else:
            continue
        tables.append(_fixed_width(heading, rows))
    return "\n\n".join(tables)


def _fixed_width(heading: str, rows: list[tuple[str, dict]]) -> str:
    header = [heading] + [title for title, _, _ in _TABLE_COLUMNS]
    body = [
        [name] + [fmt.format(row[key]) if row.get(key) is not None else "-" for _, key, fmt in _TABLE_COLUMNS]
        for name, row in rows
    ]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in [header] + body]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def error_table_rows(metrics: dict) -> tuple[list[str], list[list]]:
    """Columns and rows of every group (all, each element, config type and dataset), as a
    wandb table: `group`, `name`, then the metrics."""
    columns = ["group", "name"] + [key for _, key, _ in _TABLE_COLUMNS]
    rows = [["all", "all"] + [metrics.get(key) for _, key, _ in _TABLE_COLUMNS]]
    for group_key, heading in _GROUPS:
        for name, row in metrics.get(group_key, {}).items():
            rows.append([heading, name] + [row.get(key) for _, key, _ in _TABLE_COLUMNS])
    return columns, rows
