"""Fine-tuning an imported fairchem model (random weights, tests/fixtures/fairchem) on the
built-in EMT data, both stages: references refit and given, frozen embeddings and first
block, a smaller learning rate for the backbone."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ase.data import atomic_numbers

from esen_train.engine.config import ConfigError, load_train_config
from esen_train.engine.fit import fit
from esen_train.engine.optim import lr_at
from esen_train.engine.tracking import read_metrics
from esen_train.evaluation.calculator import ESENCalculator
from esen_train.evaluation.errors import compute_errors, predict, read_labelled_structures
from esen_train.fairchem.importer import import_fairchem, write_imported
from esen_train.model.model_file import read_model_file
from tests.fairchem_helpers import fixture_file

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
FROZEN = ("backbone.element_embedding.", "backbone.source_embedding.", "backbone.target_embedding.",
          "backbone.edge_degree.", "backbone.charge_spin.", "backbone.blocks.0.")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    imported = write_imported(import_fairchem(fixture_file("escnmd_periodic_grid")), root / "imported")
    run_dir = root / "run"
    settings = ["references=refit", "freeze_embeddings=true", "freeze_blocks=1", "backbone_lr_scale=0.1",
                "max_atoms=64", "log_every=1"]
    overrides = [
        f"model={imported}", f"run_dir={run_dir}", "data.emt_structures=24",
        f"direct.init_from={imported}", "direct.max_steps=3", "direct.val_every=3", "direct.checkpoint_every=3",
        "conservative.max_steps=2", "conservative.val_every=2", "conservative.checkpoint_every=2",
        "conservative.references=given", "conservative.given_references={Cu: -3.25}",
        *[f"{stage}.{setting}" for stage in ("direct", "conservative") for setting in settings
          if not (stage == "conservative" and setting.startswith("references"))],
    ]
    fit(load_train_config(TINY, overrides))
    return imported, run_dir


def _weights(checkpoint: Path) -> dict:
    payload = read_model_file(checkpoint / "model.pt")
    return payload["ema"] or payload["model"]


def test_both_stages_train_from_the_import_and_frozen_weights_stay(run):
    imported, run_dir = run
    start = _weights(imported)
    for stage in ("direct", "conservative"):
        trained = _weights(run_dir / "checkpoints" / stage / "last")
        frozen = [name for name in start if name.startswith(FROZEN)]
        assert frozen and all(torch.equal(trained[name], start[name]) for name in frozen), stage
        for name in ("backbone.blocks.1.edgewise.conv1.m0.weight", "energy_head.mlp.4.weight"):
            assert not torch.equal(trained[name], start[name]), f"{stage}: {name} did not train"
    direct = read_model_file(run_dir / "checkpoints" / "direct" / "last" / "model.pt")
    assert direct["model_config"]["charge_spin"] == "table" and direct["model_config"]["cutoff"] == 4.0
    assert any(name.startswith("direct_heads.forces") for name in direct["model"])  # fresh direct heads


def test_refit_references_bring_the_import_close_to_the_new_data(run):
    """The import's references (random, -10 to -1500 eV per element) are far from EMT's energies;
    refit adds the per-element correction, so the loaded model starts close to the data."""
    imported, run_dir = run
    validation = read_labelled_structures(run_dir / "data" / "val")
    calculator = ESENCalculator.from_checkpoint(imported)
    kept = compute_errors(validation, predict(calculator, validation))["energy_mae_mev_per_atom"]
    loaded = [row for row in read_metrics(run_dir) if row["stage"] == "direct" and "loaded_from" in row]
    assert len(loaded) == 1
    assert kept > 1e5 and loaded[0]["energy_mae_mev_per_atom"] < kept / 100
    before = read_model_file(imported / "model.pt")["model"]["reference_energies"]
    after = read_model_file(run_dir / "checkpoints" / "direct" / "last" / "model.pt")["model"]["reference_energies"]
    emt = [atomic_numbers[symbol] for symbol in ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")]
    assert all(after[z] != before[z] for z in emt if after[z] != 0.0 or before[z] != 0.0)
    others = [z for z in range(len(before)) if z not in emt]
    assert torch.equal(after[others], before[others])


def test_given_references_replace_only_the_elements_named(run):
    _, run_dir = run
    direct = read_model_file(run_dir / "checkpoints" / "direct" / "last" / "model.pt")["model"]["reference_energies"]
    conservative = read_model_file(run_dir / "checkpoints" / "conservative" / "last" / "model.pt")["model"]["reference_energies"]
    copper = atomic_numbers["Cu"]
    assert conservative[copper] == -3.25
    assert torch.equal(torch.cat([conservative[:copper], conservative[copper + 1:]]),
                       torch.cat([direct[:copper], direct[copper + 1:]]))


def test_the_logged_learning_rate_is_the_schedule_s_not_the_backbone_s(run):
    _, run_dir = run
    config = load_train_config(run_dir / "config.yaml").direct
    rows = [row for row in read_metrics(run_dir) if row["split"] == "train" and row["stage"] == "direct"]
    expected = [lr_at(row["step"] - 1, config.lr, config.warmup_steps, config.max_steps, config.min_lr_ratio) for row in rows]
    assert [row["lr"] for row in rows] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("override", "message"), [
    ("direct.references=refit", "direct.references=refit needs direct.init_from"),
    ("direct.references=sometimes", "direct.references must be one of"),
    ("conservative.references=given", "conservative.references=given needs conservative.given_references"),
    ("conservative.given_references={Xx: 1.0}", "given_references is set but conservative.references is 'keep'"),
    ("direct.freeze_blocks=9", "direct.freeze_blocks must be in 0..2"),
    ("direct.backbone_lr_scale=0", "direct.backbone_lr_scale must be > 0"),
])
def test_fine_tuning_settings_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(TINY, [override])


def test_a_model_named_by_a_missing_checkpoint_directory_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither a checkpoint directory"):
        load_train_config(TINY, [f"model={tmp_path / 'empty'}"])
