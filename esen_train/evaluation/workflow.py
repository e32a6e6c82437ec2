"""What `esen-train eval` and `esen-train md` do with a checkpoint (esen_train/cli/train/
evaluate.py and md.py parse their arguments and print their results).

A checkpoint is a checkpoint directory or a run directory (its last stage's best checkpoint).
Without a force mode a checkpoint is used the way its stage trained it: direct forces for a
direct-stage checkpoint, conservative otherwise. Errors in the input (a structure with
overlapping atoms, a cell in the wrong unit, an element the checkpoint was not trained on, ...)
raise one of `INPUT_ERRORS`, with the file and structure in the message.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import ase.io
import torch
from ase import Atoms

from esen_train.data.manifest import DatasetError
from esen_train.data.shards import ShardError
from esen_train.data.sources import LabelKeys
from esen_train.data.validate import UnphysicalGeometry
from esen_train.engine.tracking import log_to_existing_run
from esen_train.evaluation.calculator import ESENCalculator, UntrainedElements
from esen_train.evaluation.errors import (
    ErrorTables,
    LabelledStructure,
    ParityReservoir,
    count_structures,
    iter_labelled_structures,
    predict_stream,
)
from esen_train.evaluation.md import UnstableDynamics, check_can_move, run_nve
from esen_train.evaluation.predictions import PredictionWriter
from esen_train.model.model_file import CheckpointError, load_model
from esen_train.progress import ConsoleProgress

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# What a bad input raises (the commands report it as one line and exit code 2).
INPUT_ERRORS = (CheckpointError, DatasetError, ShardError, FileNotFoundError, ValueError)


def load_calculator(checkpoint: str, forces: str | None, device: str, dtype: str, use_ema: bool) -> ESENCalculator:
    """The checkpoint's calculator; without `forces`, the force head its stage trained."""
    model, info = load_model(checkpoint, device=device, dtype=DTYPES[dtype], use_ema=use_ema)
    forces = forces or ("direct" if info.stage == "direct" else "conservative")
    return ESENCalculator(model, forces=forces, device=device, dtype=DTYPES[dtype], checkpoint=info)


def evaluate(calculator: ESENCalculator, paths: list[str], keys: LabelKeys, max_atoms: int,
             predictions: str | None, progress: bool) -> tuple[dict, ParityReservoir]:
    """Stream every structure of `paths` (read, checked, predicted and tallied a batch at a
    time): the error tables' numbers and the parity plot's sample. With `predictions`, each
    structure is written there with its reference and predicted labels."""
    tables, reservoir = ErrorTables(), ParityReservoir()
    total = _total_structures(paths)
    with (PredictionWriter(predictions) if predictions else nullcontext()) as writer, \
            ConsoleProgress("eval", total, "structures", every=None if total else 1000, enabled=progress) as bar:
        for path, name in zip(paths, _dataset_names(paths)):
            structures = _checked(calculator, iter_labelled_structures(path, keys, dataset=name))
            for structure, prediction in predict_stream(calculator, structures, max_atoms):
                reservoir.add(tables.add(structure, prediction))
                if writer is not None:
                    writer.write(structure, prediction)
                bar.update()
    return tables.result(), reservoir


def run_md(calculator: ESENCalculator, structure: str, steps: int, timestep_fs: float, temperature_K: float,
           seed: int, max_temperature_K: float | None, max_energy_change_ev_per_atom: float,
           progress: bool) -> tuple[dict, str | None]:
    """NVE from the first structure of the file: the result of `run_nve`, and why the dynamics
    stopped early (None when they ran every step)."""
    atoms = _read_structure(structure)
    _check_structure(calculator, atoms, structure)
    try:
        check_can_move(atoms)
    except ValueError as error:
        raise ValueError(f"{structure}: {error}") from None
    try:
        with ConsoleProgress("md", steps, "steps", enabled=progress) as bar:
            result = run_nve(atoms, calculator, steps, timestep_fs, temperature_K, seed=seed,
                             max_temperature_K=max_temperature_K,
                             max_energy_change_ev_per_atom=max_energy_change_ev_per_atom, progress=bar)
    except UnstableDynamics as error:
        return error.result, str(error)
    return result, None


def _total_structures(paths: list[str]) -> int | None:
    """The structures of all inputs, for the progress line; None when one input cannot say."""
    counts = [count_structures(path) for path in paths]
    return None if None in counts else sum(counts)


def _checked(calculator: ESENCalculator, structures: Iterator[LabelledStructure]) -> Iterator[LabelledStructure]:
    for structure in structures:
        _check_structure(calculator, structure.atoms, structure.source)
        yield structure


def _dataset_names(paths: list[str]) -> list[str]:
    """Each input's name in the tables: its file or directory name, or its path where two share a name."""
    names = [Path(path).name for path in paths]
    return [name if names.count(name) == 1 else str(path) for name, path in zip(names, paths)]


def _check_structure(calculator: ESENCalculator, atoms: Atoms, source: str) -> None:
    """The calculator's checks (elements, geometry), with the file and structure in the message."""
    try:
        calculator.check_structure(atoms)
    except (UntrainedElements, UnphysicalGeometry) as error:
        raise ValueError(f"{source}: {error}") from None


def log_to_wandb(command: str, calculator: ESENCalculator, images: dict, tables: dict, summary: dict) -> None:
    """Add the results to the wandb run of the run directory the checkpoint belongs to
    (RUN/checkpoints/<stage>/<name>/model.pt), at the checkpoint's step."""
    info = calculator.checkpoint
    parents = info.path.parents
    run_dir = parents[3] if len(parents) > 3 else parents[0]
    if not log_to_existing_run(run_dir, info.stage, info.step, images, tables, summary):
        print(f"esen-train {command}: --wandb: {run_dir} has no wandb run (trained with wandb disabled, "
              "or the checkpoint is not inside its run directory); nothing logged", file=sys.stderr)


def _read_structure(path: str) -> Atoms:
    if not Path(path).is_file():
        raise FileNotFoundError(f"structure file not found: {path}")
    try:
        atoms = ase.io.read(path, index=0)
    except Exception as error:  # ASE raises many types for unreadable input
        raise ValueError(f"{path}: not readable by ase.io.read ({type(error).__name__}: {error})") from None
    if len(atoms) == 0:
        raise ValueError(f"{path}: structure 0 has 0 atoms (a structure needs at least one)")
    return atoms


def describe(calculator: ESENCalculator, dtype: str) -> dict:
    """The checkpoint and settings a report was made with."""
    info = calculator.checkpoint
    return {
        "checkpoint": str(info.path.parent),
        "stage": info.stage,
        "step": info.step,
        "forces": calculator.forces_mode,
        "dtype": dtype,
        "ema": info.used_ema,
    }


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(report, indent=2) + "\n")
    temporary.replace(path)
