"""`esen-train eval --predictions FILE.extxyz`: each structure with its reference and predicted labels.

One frame per structure, in the order evaluated, with MACE's naming: `REF_energy`,
`ESEN_energy` (eV) and, where labelled, `REF_stress`, `ESEN_stress` (3x3, eV/Å³, ASE's sign)
on the comment line beside `config_type`, `dataset` and `source` (file:index of the input);
`REF_forces` and `ESEN_forces` (eV/Å) as per-atom columns. There is no calculator, so
nothing is mistaken for a label: `esen-data convert FILE --energy-key REF_energy
--forces-key REF_forces --stress-key REF_stress` gives back the reference data.

The file is written beside its target and renamed into place when the evaluation ends
without error, one frame at a time, so its size does not bound the test set.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import ase.io
import numpy as np

from esen_train.data.manifest import with_default_permissions
from esen_train.evaluation.errors import LabelledStructure, full_stress


class PredictionWriter:
    """`with PredictionWriter(path) as writer: writer.write(structure, prediction)`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stream = tempfile.NamedTemporaryFile("w", dir=self.path.parent, prefix=f".{self.path.name}.", delete=False)

    def write(self, structure: LabelledStructure, prediction: dict) -> None:
        atoms = structure.atoms.copy()
        atoms.info.update(REF_energy=structure.energy, ESEN_energy=float(prediction["energy"]),
                          dataset=structure.dataset, source=structure.source)
        if structure.config_type is not None:
            atoms.info["config_type"] = structure.config_type
        if structure.stress is not None:
            atoms.info["REF_stress"] = structure.stress
            atoms.info["ESEN_stress"] = full_stress(prediction["stress"])
        atoms.arrays["REF_forces"] = structure.forces
        atoms.arrays["ESEN_forces"] = np.asarray(prediction["forces"], dtype=float)
        ase.io.write(self.stream, atoms, format="extxyz")

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        self.stream.close()
        if exc_type is not None:
            os.unlink(self.stream.name)
            return
        with_default_permissions(self.stream.name)
        os.replace(self.stream.name, self.path)
