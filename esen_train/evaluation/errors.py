"""Error tables: a calculator's energies, forces and stresses against labelled structures.

The numbers are the ones papers report: energy MAE and RMSE per atom (meV/atom), force MAE
and RMSE over Cartesian components (meV/Å), stress MAE over the 3x3 components (meV/Å³) and
the mean cosine between predicted and reference force vectors; the same again per element.
Per element, force metrics use the atoms of that element; energy and stress, which belong to
a whole structure, use the structures that contain the element.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.data import chemical_symbols
from ase.stress import voigt_6_to_full_3x3_stress

from esen_train.data.manifest import DatasetDirectory
from esen_train.data.records import StructureRecord
from esen_train.progress import ConsoleProgress

MEV = 1000.0
# Force vectors shorter than this (eV/Å) have no direction worth comparing.
COSINE_MIN_FORCE = 1e-6


@dataclass
class LabelledStructure:
    """A structure and its reference labels; `stress` is 3x3 (ASE sign) or None if unlabelled."""

    atoms: Atoms
    energy: float
    forces: np.ndarray
    stress: np.ndarray | None
    source: str  # "file:index", for messages


def read_labelled_structures(path: str | Path) -> list[LabelledStructure]:
    """Every structure of a dataset directory (LMDB shards, see esen_train.data) or of an
    ASE-readable file (extxyz, ASE db, ...), with its labels."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data not found: {path}")
    if path.is_dir():
        return _read_dataset_directory(path)
    try:
        frames = ase.io.read(path, index=":")
    except Exception as error:  # ASE raises many types for unreadable input
        raise ValueError(f"{path}: not readable by ase.io.read ({type(error).__name__}: {error})") from None
    if not frames:
        raise ValueError(f"{path}: contains no structures")
    return [_labels_of(atoms, f"{path}:{index}") for index, atoms in enumerate(frames)]


def _read_dataset_directory(path: Path) -> list[LabelledStructure]:
    dataset = DatasetDirectory(path)
    try:
        return [_from_record(dataset.read(index), f"{path}:{index}") for index in range(len(dataset))]
    finally:
        dataset.close()


def _from_record(record: StructureRecord, source: str) -> LabelledStructure:
    atoms = Atoms(record.atomic_numbers, positions=record.positions, cell=record.cell, pbc=record.pbc)
    atoms.info.update({name: value for name, value in (("charge", record.charge), ("spin", record.spin))
                       if value is not None})
    stress = None if record.stress is None else np.asarray(record.stress, dtype=float)
    return LabelledStructure(atoms, float(record.energy), np.asarray(record.forces, dtype=float), stress, source)


def _labels_of(atoms: Atoms, source: str) -> LabelledStructure:
    if len(atoms) == 0:
        raise ValueError(f"{source}: the structure has 0 atoms (a structure needs at least one)")
    results = atoms.calc.results if atoms.calc is not None else {}
    for name in ("energy", "forces"):
        if name not in results:
            raise ValueError(f"{source}: field '{name}' is missing (reference labels are needed)")
    forces = np.asarray(results["forces"], dtype=float)
    if forces.shape != (len(atoms), 3):
        raise ValueError(f"{source}: field 'forces' has shape {forces.shape}, expected ({len(atoms)}, 3)")
    stress = results.get("stress")
    if stress is not None:
        stress = _full_stress(stress)
    bare = Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    bare.info.update({name: atoms.info[name] for name in ("charge", "spin") if name in atoms.info})
    return LabelledStructure(bare, float(results["energy"]), forces, stress, source)


def predict(
    calculator: Calculator, structures: Sequence[LabelledStructure], max_atoms_per_batch: int = 512,
    progress: ConsoleProgress | None = None,
) -> list[dict]:
    """Energy, forces and (where labelled) stress for every structure, as numpy in eV units.

    A calculator with `calculate_batch` (ESENCalculator) gets batches of at most
    `max_atoms_per_batch` atoms; any other ASE calculator is called structure by structure.
    `progress` counts the structures done.
    """
    progress = progress or ConsoleProgress("predict", len(structures), "structures", enabled=False)
    predictions = []
    if hasattr(calculator, "calculate_batch"):
        for chunk in _chunks_by_atoms(structures, max_atoms_per_batch):
            predictions.extend(calculator.calculate_batch([s.atoms for s in chunk]))
            progress.update(len(chunk))
        return predictions
    for structure in structures:
        predictions.append(_predict_one(calculator, structure))
        progress.update()
    return predictions


def _predict_one(calculator: Calculator, structure: LabelledStructure) -> dict:
    atoms = structure.atoms.copy()
    atoms.calc = calculator
    result = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    if structure.stress is not None:
        result["stress"] = atoms.get_stress()
    return result


def _chunks_by_atoms(
    structures: Sequence[LabelledStructure], max_atoms: int
) -> Iterator[list[LabelledStructure]]:
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


def compute_errors(structures: Sequence[LabelledStructure], predictions: Sequence[dict]) -> dict:
    """The error metrics over all structures, plus `per_element` keyed by chemical symbol."""
    if len(structures) != len(predictions) or not structures:
        raise ValueError(f"need one prediction per structure, got {len(predictions)} for {len(structures)}")
    pairs = _Pairs.collect(structures, predictions)
    metrics = pairs.metrics(np.ones(len(structures), bool), np.ones(len(pairs.atom_numbers), bool))
    metrics["per_element"] = {
        chemical_symbols[z]: pairs.metrics(
            np.array([z in s.atoms.numbers for s in structures]), pairs.atom_numbers == z
        )
        for z in np.unique(pairs.atom_numbers)
    }
    return metrics


@dataclass
class _Pairs:
    """Reference and predicted values flattened across structures."""

    natoms: np.ndarray  # [S]
    energy_ref: np.ndarray  # [S] eV
    energy_pred: np.ndarray
    atom_numbers: np.ndarray  # [N]
    forces_ref: np.ndarray  # [N, 3] eV/Å
    forces_pred: np.ndarray
    has_stress: np.ndarray  # [S] bool
    stress_ref: np.ndarray  # [S, 3, 3] eV/Å³, zeros where unlabelled
    stress_pred: np.ndarray

    @classmethod
    def collect(cls, structures: Sequence[LabelledStructure], predictions: Sequence[dict]) -> _Pairs:
        has_stress = np.array([s.stress is not None for s in structures])
        for structure, prediction, labelled in zip(structures, predictions, has_stress):
            if np.shape(prediction["forces"]) != structure.forces.shape:
                raise ValueError(
                    f"{structure.source}: predicted forces have shape {np.shape(prediction['forces'])}, "
                    f"expected {structure.forces.shape}"
                )
            if labelled and "stress" not in prediction:
                raise ValueError(f"{structure.source}: stress is labelled but was not predicted")
        zeros = np.zeros((3, 3))
        return cls(
            natoms=np.array([len(s.atoms) for s in structures]),
            energy_ref=np.array([s.energy for s in structures]),
            energy_pred=np.array([float(p["energy"]) for p in predictions]),
            atom_numbers=np.concatenate([s.atoms.numbers for s in structures]),
            forces_ref=np.concatenate([s.forces for s in structures]),
            forces_pred=np.concatenate([np.asarray(p["forces"]) for p in predictions]),
            has_stress=has_stress,
            stress_ref=np.stack([s.stress if s.stress is not None else zeros for s in structures]),
            stress_pred=np.stack(
                [_full_stress(p["stress"]) if s.stress is not None else zeros
                 for s, p in zip(structures, predictions)]
            ),
        )

    def metrics(self, structure_mask: np.ndarray, atom_mask: np.ndarray) -> dict:
        energy_error = (self.energy_pred - self.energy_ref)[structure_mask] / self.natoms[structure_mask]
        force_error = (self.forces_pred - self.forces_ref)[atom_mask]
        result = {
            "num_structures": int(structure_mask.sum()),
            "num_atoms": int(atom_mask.sum()),
            "energy_mae_mev_per_atom": MEV * float(np.mean(np.abs(energy_error))),
            "energy_rmse_mev_per_atom": MEV * float(np.sqrt(np.mean(energy_error**2))),
            "force_mae_mev_per_A": MEV * float(np.mean(np.abs(force_error))),
            "force_rmse_mev_per_A": MEV * float(np.sqrt(np.mean(force_error**2))),
            "force_cosine": _mean_cosine(self.forces_pred[atom_mask], self.forces_ref[atom_mask]),
        }
        stress_mask = structure_mask & self.has_stress
        if stress_mask.any():
            stress_error = (self.stress_pred - self.stress_ref)[stress_mask]
            result["num_structures_with_stress"] = int(stress_mask.sum())
            result["stress_mae_mev_per_A3"] = MEV * float(np.mean(np.abs(stress_error)))
        return result


def _full_stress(stress: np.ndarray) -> np.ndarray:
    """3x3 from ASE's Voigt order [xx, yy, zz, yz, xz, xy] or from a 3x3."""
    stress = np.asarray(stress, dtype=float)
    return voigt_6_to_full_3x3_stress(stress) if stress.shape == (6,) else stress.reshape(3, 3)


def _mean_cosine(predicted: np.ndarray, reference: np.ndarray) -> float | None:
    """Mean cosine of the angle between force vectors, over atoms where both are non-zero."""
    norm_pred = np.linalg.norm(predicted, axis=1)
    norm_ref = np.linalg.norm(reference, axis=1)
    usable = (norm_pred > COSINE_MIN_FORCE) & (norm_ref > COSINE_MIN_FORCE)
    if not usable.any():
        return None
    cosine = np.sum(predicted[usable] * reference[usable], axis=1) / (norm_pred[usable] * norm_ref[usable])
    return float(np.mean(cosine))


def parity_panels(structures: Sequence[LabelledStructure], predictions: Sequence[dict]) -> list[tuple]:
    """(label, reference, predicted) for `plots.plot_parity`: energy per atom, force components,
    and stress components where labelled."""
    pairs = _Pairs.collect(structures, predictions)
    panels = [
        ("energy (eV/atom)", pairs.energy_ref / pairs.natoms, pairs.energy_pred / pairs.natoms),
        ("force components (eV/Å)", pairs.forces_ref, pairs.forces_pred),
    ]
    if pairs.has_stress.any():
        panels.append(
            ("stress components (eV/Å³)", pairs.stress_ref[pairs.has_stress], pairs.stress_pred[pairs.has_stress])
        )
    return panels


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


def format_error_table(metrics: dict) -> str:
    """A fixed-width table: one row for all structures, then one per element."""
    rows = [("all", metrics)] + list(metrics.get("per_element", {}).items())
    header = ["element"] + [title for title, _, _ in _TABLE_COLUMNS]
    body = [
        [name] + [fmt.format(row[key]) if row.get(key) is not None else "-" for _, key, fmt in _TABLE_COLUMNS]
        for name, row in rows
    ]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in [header] + body]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
