"""fairchem's own eSEN models and their predictions (tests/fixtures/fairchem, made by
tools/fairchem_fixtures.py in fairchem-core's environment), for the import and export tests.

The tests compare a quantity over all structures of a case, relative to its largest value
in the case: one structure whose forces nearly cancel (rattled NaCl) would otherwise turn
float32's rounding into a large "relative" error.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.stress import voigt_6_to_full_3x3_stress

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "fairchem"
MANIFEST = json.loads((FIXTURES / "references.json").read_text())
STRUCTURES = {record["name"]: record for record in MANIFEST["structures"]}
CASES = MANIFEST["cases"]


def fixture_file(case: str) -> Path:
    return FIXTURES / CASES[case]["file"]


def atoms_of(record: dict) -> Atoms:
    atoms = Atoms(record["numbers"], positions=record["positions"], cell=record["cell"], pbc=record["pbc"])
    atoms.info.update(charge=record["charge"], spin=record["spin"])
    return atoms


def case_structures(case: str) -> list[Atoms]:
    return [atoms_of(STRUCTURES[name]) for name in CASES[case]["structures"]]


def as_reference(results: list[dict]) -> list[dict]:
    """ESENCalculator results in the fixtures' layout (3x3 stress)."""
    out = []
    for result in results:
        entry = {"energy": result["energy"], "forces": np.asarray(result["forces"])}
        if "stress" in result:
            entry["stress"] = voigt_6_to_full_3x3_stress(result["stress"])
        out.append(entry)
    return out


def relative_errors(ours: list[dict], theirs: list[dict]) -> dict[str, float]:
    """Per quantity: max |ours - theirs| over the case / max |theirs| over the case."""
    differences, sizes = {}, {}
    for mine, reference in zip(ours, theirs, strict=True):
        for key, value in reference.items():
            value = np.asarray(value, dtype=float)
            differences[key] = max(differences.get(key, 0.0), float(np.abs(np.asarray(mine[key]) - value).max()))
            sizes[key] = max(sizes.get(key, 0.0), float(np.abs(value).max()))
    return {key: differences[key] / sizes[key] for key in differences}
