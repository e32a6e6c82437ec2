"""`esen-train export-fairchem`: a checkpoint of this project as a fairchem-core 2.x checkpoint.

Everywhere: the written file reads back (with the importer's allow-list) as the same model.
Where fairchem-core's own environment exists (.venvs/fairchem, see benchmarks/model_vs_fairchem.py,
or $FAIRCHEM_PYTHON), fairchem's calculator loads the files and predicts what this model
predicts; elsewhere that test is skipped.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from esen_train.calculator import ESENCalculator
from esen_train.cli.train import main
from esen_train.fairchem.exporter import export_fairchem
from esen_train.fairchem.files import FairchemFormatError, write_inference_checkpoint
from esen_train.fairchem.importer import import_fairchem, write_imported
from tests.evaluation_helpers import write_checkpoint
from tests.fairchem_helpers import STRUCTURES, as_reference, atoms_of, fixture_file, relative_errors
from tests.model_helpers import tiny_model

REPO = Path(__file__).resolve().parents[2]
FAIRCHEM_PYTHON = Path(os.environ.get("FAIRCHEM_PYTHON", REPO / ".venvs" / "fairchem" / "bin" / "python"))
EXPORTABLE = ("escnmd_omol_conserving", "escnmd_direct", "esen_v1_conserving")


def _our_own_model(run_dir: Path) -> Path:
    """A model of this project (no charge/spin, grid feed-forward, mmax < lmax), its
    normalisation set to values fairchem's tasks have to carry, float32 like trained weights."""
    model = tiny_model(seed=5, sphere_channels=14, feed_forward="grid", mmax=1)
    model.set_normalisation(energy_mean=0.3, energy_scale=1.9, force_scale=1.1, stress_scale=2.6)
    return write_checkpoint(run_dir, model=model.float())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    found = {case: write_imported(import_fairchem(fixture_file(case)), root / case) for case in EXPORTABLE}
    found["esen_train_tiny"] = _our_own_model(root / "run")
    return found


def _predict(checkpoint: Path, stage: str, records: list[dict]) -> list[dict]:
    calculator = ESENCalculator.from_checkpoint(checkpoint, forces=stage, dtype=torch.float64)
    return as_reference([calculator.calculate_batch([atoms_of(record)])[0] for record in records])


def _stage(checkpoint: Path) -> str:
    return torch.load(checkpoint / "model.pt", weights_only=True)["stage"]


RECORDS = list(STRUCTURES.values())


@pytest.mark.parametrize("name", [*EXPORTABLE, "esen_train_tiny"])
def test_an_export_reads_back_as_the_same_model(checkpoints, tmp_path, name):
    exported = tmp_path / "exported.pt"
    write_inference_checkpoint(export_fairchem(checkpoints[name]), exported)
    again = write_imported(import_fairchem(exported), tmp_path / "again")
    stage = _stage(checkpoints[name])
    errors = relative_errors(_predict(again, stage, RECORDS), _predict(checkpoints[name], stage, RECORDS))
    assert max(errors.values()) < 1e-12, errors


def test_the_export_keeps_normalisation_references_and_dataset(checkpoints):
    exported = export_fairchem(checkpoints["esen_train_tiny"], dataset="mine")
    energy, forces, stress = exported.tasks_config
    assert energy["normalizer"] == {"_target_": "fairchem.core.modules.normalization.normalizer.Normalizer",
                                    "mean": pytest.approx(0.3), "rmsd": pytest.approx(1.9)}
    assert forces["normalizer"]["rmsd"] == pytest.approx(1.1) and stress["normalizer"]["rmsd"] == pytest.approx(2.6)
    assert energy["element_references"]["element_references"]["_target_"] == "torch.DoubleTensor"
    assert all(task["datasets"] == ["mine"] for task in exported.tasks_config)
    backbone = exported.model_config["backbone"]
    assert backbone["max_num_elements"] == 101 and backbone["chg_spin_emb_type"] == "pos_emb"
    assert not exported.model_state_dict["backbone.mix_csd.weight"].any()  # no charge/spin: adds zero
    assert exported.model_state_dict["backbone.sphere_embedding.weight"][0].abs().max() == 0  # fairchem's Z = 0 row
    imported = export_fairchem(checkpoints["escnmd_omol_conserving"])
    assert imported.tasks_config[0]["datasets"] == ["omol"]  # the imported model's own


def test_what_eSCNMD_cannot_hold_is_refused(tmp_path):
    no_envelope = write_imported(import_fairchem(fixture_file("esen_v1_direct_no_envelope")), tmp_path / "v1")
    with pytest.raises(FairchemFormatError, match="envelope = False; fairchem's eSCNMD fixes it at True"):
        export_fairchem(no_envelope)
    wide = write_checkpoint(tmp_path / "wide", model=tiny_model(gaussian_width=1.5))
    with pytest.raises(FairchemFormatError, match="gaussian_width = 1.5"):
        export_fairchem(wide)
    odd = write_checkpoint(tmp_path / "odd", model=tiny_model(sphere_channels=15))
    with pytest.raises(FairchemFormatError, match="sphere_channels = 15; eSCNMD's charge/spin embedding needs an even"):
        export_fairchem(odd)


def test_the_command_writes_once(checkpoints, tmp_path, capsys):
    out = tmp_path / "model.pt"
    assert main(["export-fairchem", str(checkpoints["escnmd_direct"]), "--out", str(out)]) == 0
    assert "eSCNMD checkpoint (direct)" in capsys.readouterr().out and out.is_file()
    assert main(["export-fairchem", str(checkpoints["escnmd_direct"]), "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not FAIRCHEM_PYTHON.exists(), reason=f"no fairchem-core environment at {FAIRCHEM_PYTHON} "
                    "(create it as benchmarks/model_vs_fairchem.py says, or set FAIRCHEM_PYTHON)")
def test_fairchem_s_calculator_predicts_what_this_model_predicts(checkpoints, tmp_path):
    files = []
    for name, checkpoint in checkpoints.items():
        files.append(tmp_path / f"{name}.pt")
        write_inference_checkpoint(export_fairchem(checkpoint, dataset="esen_train"), files[-1])
    (tmp_path / "structures.json").write_text(json.dumps(RECORDS))
    result = subprocess.run([FAIRCHEM_PYTHON, REPO / "tools" / "fairchem_fixtures.py", "evaluate", *files,
                             "--structures", tmp_path / "structures.json", "--out", tmp_path / "fairchem.json"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = json.loads((tmp_path / "fairchem.json").read_text())
    for name, checkpoint in checkpoints.items():
        errors = relative_errors(_predict(checkpoint, _stage(checkpoint), RECORDS), theirs[f"{name}.pt"])
        for quantity, error in errors.items():
            # fairchem composes direct stress in float32 (see tests/fairchem/test_fairchem_import.py)
            tolerance = 1e-6 if (name, quantity) == ("escnmd_direct", "stress") else 1e-10
            assert error < tolerance, f"{name} {quantity}: relative error {error:.3g}"
