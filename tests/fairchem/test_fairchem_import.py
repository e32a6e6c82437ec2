"""`esen-train import-fairchem`: fairchem's own eSEN models (eSEN v1 and eSCNMD, random
weights, several settings; tests/fixtures/fairchem) give the same energies, forces and
stresses here as in fairchem, and what cannot be represented is refused by name.

fairchem need not be installed: the fixtures hold its checkpoints and its predictions
(tools/fairchem_fixtures.py made them in fairchem-core 2.24's environment).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.singlepoint import SinglePointCalculator

from esen_train.calculator import ESENCalculator
from esen_train.cli.train import main
from esen_train.fairchem.files import (
    FairchemFormatError,
    InferenceCheckpoint,
    plain,
    read_fairchem_file,
    write_inference_checkpoint,
)
from esen_train.fairchem.importer import import_fairchem, write_imported
from tests.fairchem_helpers import CASES, as_reference, case_structures, fixture_file, relative_errors

TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
# fairchem's MLP_Stress_Head composes the direct stress in float32 whatever the model's
# dtype (compose_tensor allocates in the default dtype): its float64 stress is float32-exact only.
DIRECT_STRESS_FLOAT64 = 1e-6


def float32_tolerance(case: str, quantity: str) -> float:
    """1e-5, or twice fairchem's own float32 rounding error on the quantity (its float32
    result against its float64 one), where that is larger: a virial of rattled, nearly
    cancelling pair terms loses more digits in float32 than 1e-5 (fairchem: up to 5.7e-5 here)."""
    own = relative_errors(CASES[case]["float32"], CASES[case]["float64"])[quantity]
    return max(TOLERANCE["float32"], 2 * own)


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("imported")
    return {case: write_imported(import_fairchem(fixture_file(case)), root / case) for case in CASES}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_imported_model_predicts_what_fairchem_predicts(imported, case, dtype):
    stage = json.loads((imported[case] / "import.json").read_text())["stage"]
    calculator = ESENCalculator.from_checkpoint(imported[case], forces=stage, dtype=getattr(torch, dtype))
    ours = as_reference([calculator.calculate_batch([atoms])[0] for atoms in case_structures(case)])
    errors = relative_errors(ours, CASES[case][dtype])
    for quantity, error in errors.items():
        tolerance = TOLERANCE[dtype] if dtype == "float64" else float32_tolerance(case, quantity)
        if case == "escnmd_direct" and quantity == "stress" and dtype == "float64":
            tolerance = DIRECT_STRESS_FLOAT64
        assert error < tolerance, f"{case} {dtype} {quantity}: relative error {error:.3g}"


def test_a_batch_of_charge_states_equals_one_at_a_time(imported):
    """The OMol-style molecule at three charges and spins in one batch: each structure gets
    its own charge/spin embedding."""
    calculator = ESENCalculator.from_checkpoint(imported["escnmd_omol_conserving"], dtype=torch.float64)
    structures = case_structures("escnmd_omol_conserving")
    batched = calculator.calculate_batch(structures)
    energies = [r["energy"] for r in batched]
    assert len(set(energies[2:5])) == 3  # the same geometry at three charge states
    for atoms, result in zip(structures, batched):
        alone = calculator.calculate_batch([atoms])[0]
        assert result["energy"] == pytest.approx(alone["energy"], rel=1e-13)
        np.testing.assert_allclose(result["forces"], alone["forces"], rtol=0, atol=1e-12)


def test_the_checkpoint_records_what_was_imported(imported):
    summary = json.loads((imported["esen_v1_direct_no_envelope"] / "import.json").read_text())
    assert summary["format"] == "eSEN v1 (fairchem-core 1.x)" and summary["stage"] == "direct"
    assert summary["model_config"]["envelope"] is False and summary["model_config"]["feed_forward"] == "spectral"
    assert summary["model_config"]["max_num_elements"] == 79  # fairchem's 80 rows include Z = 0
    assert summary["normalisation"] == {"energy_mean": 0.0, "energy_scale": pytest.approx(1.4),
                                        "force_scale": pytest.approx(0.8), "stress_scale": 1.0}
    assert any("max_neighbors=300" in note for note in summary["notes"])
    payload = torch.load(imported["escnmd_omol_conserving"] / "model.pt", weights_only=True)
    assert payload["stage"] == "conservative" and payload["step"] == 0 and payload["metrics"] == {}
    assert payload["imported_from"]["datasets"] == ["omol"]
    assert payload["imported_from"]["sha256"].startswith("sha256:")
    assert payload["model_config"]["charge_spin"] == "sinusoidal"
    assert payload["model"]["reference_energies"].dtype == torch.float64


def test_the_ema_weights_are_the_ones_used(imported):
    """fairchem predicts with the EMA weights; the raw ones are in the checkpoint too."""
    ema = ESENCalculator.from_checkpoint(imported["esen_v1_conserving"], dtype=torch.float64)
    raw = ESENCalculator.from_checkpoint(imported["esen_v1_conserving"], dtype=torch.float64, use_ema=False)
    atoms = case_structures("esen_v1_conserving")[0]
    assert ema.checkpoint.used_ema
    assert ema.calculate_batch([atoms])[0]["energy"] == pytest.approx(CASES["esen_v1_conserving"]["float64"][0]["energy"],
                                                                      rel=1e-12)
    assert abs(raw.calculate_batch([atoms])[0]["energy"] - ema.calculate_batch([atoms])[0]["energy"]) > 1e-6


def test_the_commands_import_evaluate_and_run_md(tmp_path, capsys):
    """import-fairchem writes a checkpoint that eval and md take: eval on structures labelled by
    fairchem itself finds no error."""
    out = tmp_path / "omol"
    assert main(["import-fairchem", str(fixture_file("escnmd_omol_conserving")), "--out", str(out)]) == 0
    assert "imported eSCNMD (fairchem-core 2.x) (conservative" in capsys.readouterr().out
    labelled = []
    for atoms, reference in zip(case_structures("escnmd_omol_conserving"), CASES["escnmd_omol_conserving"]["float64"]):
        atoms.calc = SinglePointCalculator(atoms, energy=reference["energy"], forces=np.array(reference["forces"]))
        labelled.append(atoms)
    ase.io.write(tmp_path / "labelled.traj", labelled)
    assert main(["eval", str(out), "--data", str(tmp_path / "labelled.traj"), "--dtype", "float64", "--json",
                 "--out", str(tmp_path / "eval")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["energy_mae_mev_per_atom"] < 1e-8 and report["force_mae_mev_per_A"] < 1e-8
    ase.io.write(tmp_path / "molecule.xyz", case_structures("escnmd_omol_conserving")[0])
    assert main(["md", str(out), "--structure", str(tmp_path / "molecule.xyz"), "--steps", "5", "--timestep", "0.5",
                 "--temperature", "100", "--json", "--out", str(tmp_path / "md")]) == 0
    assert json.loads(capsys.readouterr().out)["num_atoms"] == 9
    assert main(["import-fairchem", str(fixture_file("escnmd_omol_conserving")), "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err


# ----- what is refused --------------------------------------------------------------------------
def _v1_with(tmp_path: Path, change) -> Path:
    checkpoint = torch.load(fixture_file("esen_v1_direct_no_envelope"), weights_only=True)
    change(checkpoint)
    path = tmp_path / "changed_v1.pt"
    torch.save(checkpoint, path)
    return path


def _escnmd_with(tmp_path: Path, change, case: str = "escnmd_omol_conserving") -> Path:
    raw = read_fairchem_file(fixture_file(case))
    checkpoint = InferenceCheckpoint(plain(raw.model_config, "model_config"), dict(raw.model_state_dict),
                                     dict(raw.ema_state_dict), plain(raw.tasks_config, "tasks_config"))
    change(checkpoint)
    path = tmp_path / "changed_escnmd.pt"
    write_inference_checkpoint(checkpoint, path)
    return path


def _set_backbone(key, value):
    def change(checkpoint):
        if isinstance(checkpoint, dict):
            checkpoint["config"]["model"]["backbone"][key] = value
        else:
            checkpoint.model_config["backbone"][key] = value
    return change


@pytest.mark.parametrize(("change", "message"), [
    (_set_backbone("act_type", "s2"), "act_type = 's2': the S2 grid activation"),
    (_set_backbone("norm_type", "layer_norm_sh"), "norm_type = 'layer_norm_sh'"),
    (_set_backbone("distance_function", "bessel"), "distance_function = 'bessel'"),
    (_set_backbone("use_denoising", True), "settings ['use_denoising'] are not known"),
    (lambda c: c["config"]["model"]["heads"].update(stress={"module": "rank2_symmetric_head"}),
     "head 'rank2_symmetric_head' cannot be represented"),
    (lambda c: c["state_dict"].update({"module.backbone.extra.weight": torch.zeros(2)}),
     "tensor backbone.extra.weight is not part of an eSEN model"),
    (lambda c: c["state_dict"]["module.backbone.distance_expansion.offset"].mul_(1.1),
     "constant buffer backbone.distance_expansion.offset: differs"),
    (lambda c: c["normalizers"]["forces"].update(mean=torch.tensor(0.5)), "the forces normaliser has mean 0.5"),
    (lambda c: c["state_dict"].pop("module.backbone.norm.affine_weight"), "weights missing for these settings"),
])
def test_v1_settings_this_model_cannot_represent_are_refused(tmp_path, change, message):
    with pytest.raises(FairchemFormatError, match=message.replace("[", r"\[").replace("]", r"\]")):
        import_fairchem(_v1_with(tmp_path, change))


@pytest.mark.parametrize(("change", "message"), [
    (_set_backbone("num_experts", 8), "num_experts = 8: a mixture of experts"),
    (_set_backbone("use_dataset_embedding", True), "use_dataset_embedding = True: a per-dataset embedding"),
    (_set_backbone("chg_spin_emb_type", "lin_emb"), "chg_spin_emb_type = 'lin_emb'"),
    (_set_backbone("charge_balanced_channels", [0]), "charge_balanced_channels"),
    (lambda c: c.tasks_config.append({**c.tasks_config[0], "name": "omat_energy"}), "2 energy tasks"),
    (lambda c: c.model_config["heads"]["energyandforcehead"].update(reduce="mean"), "reduce = 'mean': not supported"),
])
def test_escnmd_settings_this_model_cannot_represent_are_refused(tmp_path, change, message):
    with pytest.raises(FairchemFormatError, match=message):
        import_fairchem(_escnmd_with(tmp_path, change))


def test_a_file_holding_any_other_class_is_refused_with_its_name_and_nothing_runs(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()

    class Payload:
        def __reduce__(self):
            return shutil.rmtree, (str(victim),)

    torch.save({"state_dict": {}, "config": {}, "trap": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(FairchemFormatError, match="holds the class shutil.rmtree, which fairchem's eSEN checkpoints"):
        import_fairchem(tmp_path / "evil.pt")
    assert victim.is_dir()
    torch.save({"state_dict": {}, "config": {}, "options": argparse.Namespace(x=1)}, tmp_path / "namespace.pt")
    with pytest.raises(FairchemFormatError, match="holds the class argparse.Namespace"):
        import_fairchem(tmp_path / "namespace.pt")


def test_the_writer_keeps_fairchem_s_class_name_and_the_reader_allows_only_the_list(tmp_path):
    path = tmp_path / "written.pt"
    write_inference_checkpoint(InferenceCheckpoint({"a": 1}, {"w": torch.ones(2)}, None, []), path)
    assert isinstance(read_fairchem_file(path), InferenceCheckpoint)
    assert not os.path.exists(tmp_path / ".written.pt.tmp")
    with pytest.raises(pickle.UnpicklingError, match="MLIPInferenceCheckpoint"):
        torch.load(path, weights_only=True)  # torch alone does not know the class: our allow-list does
