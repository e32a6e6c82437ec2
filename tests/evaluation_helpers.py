"""Checkpoints and labelled structures for the evaluation tests.

`write_checkpoint` writes model.pt in exactly the format of ARCHITECTURE.md ("Checkpoints"),
the one the trainer writes, from a fresh model, so the evaluation tests need no training run.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from esen_train.model import ESEN, ModelConfig
from esen_train.model.config import load_model_config


def fresh_model(config: str | ModelConfig = "tiny", direct_forces: bool = True, seed: int = 0) -> ESEN:
    config = load_model_config(config) if isinstance(config, str) else config
    torch.manual_seed(seed)
    return ESEN(replace(config, direct_forces=direct_forces))


def checkpoint_payload(model: ESEN, stage: str, ema: dict | None = None) -> dict:
    return {
        "format_version": 1,
        "model_config": asdict(model.config),
        "model": model.state_dict(),
        "ema": ema,
        "stage": stage,
        "step": 10,
        "metrics": {"energy_mae_mev_per_atom": 1.0, "force_mae_mev_per_A": 2.0},
    }


def write_checkpoint(
    run_dir: Path, stage: str = "conservative", model: ESEN | None = None, ema: dict | None = None, name: str = "best"
) -> Path:
    """RUN/checkpoints/<stage>/<name>/model.pt from `model` (a fresh tiny one by default,
    with direct heads only for the direct stage). Returns the checkpoint directory."""
    model = model if model is not None else fresh_model(direct_forces=stage == "direct")
    directory = Path(run_dir) / "checkpoints" / stage / name
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint_payload(model, stage, ema), directory / "model.pt")
    return directory


def labelled_copper_structures(count: int = 4, seed: int = 0) -> list[Atoms]:
    """Rattled and strained Cu and Cu-Au cells labelled by EMT (energy, forces, stress), and
    one molecule (no stress)."""
    structures = []
    for index in range(count):
        atoms = bulk("Cu", "fcc", a=3.61 + 0.02 * index, cubic=True).repeat((2, 1, 1))
        if index % 2:
            atoms.numbers[::3] = 79  # gold
        atoms.rattle(0.08, seed=seed + index)
        structures.append(emt_labelled(atoms))
    structures.append(emt_labelled(molecule("CO")))
    return structures


def emt_labelled(atoms: Atoms) -> Atoms:
    """EMT's energy, forces and (periodic cells) stress, kept as stored labels."""
    atoms.calc = EMT()
    results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    if atoms.pbc.all():
        results["stress"] = atoms.get_stress()
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms
