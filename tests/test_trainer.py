"""The trainer end to end on built-in EMT data, in one process: both stages, metrics,
checkpoints, wandb offline files, the stage hand-over check, non-finite steps."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from esen_train.evaluation.checkpoint import read_model_file as read_model_pt
from esen_train.engine.config import load_train_config
from esen_train.engine.fit import fit
from esen_train.engine.tracking import read_metrics
from esen_train.engine.trainer import StageMismatch, TrainingDiverged
from esen_train.engine.wandb_offline import find_run_files, read_offline_run
from esen_train.model import ESEN

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def read_model_file(checkpoint_dir):
    return read_model_pt(checkpoint_dir / "model.pt")


def halve_ema_weights(model_pt: Path) -> None:
    """Corrupt a checkpoint the way a lost hand-over would: its weights no longer give its metrics."""
    payload = torch.load(model_pt, weights_only=True)
    payload["ema"] = {k: v * 0.5 if v.is_floating_point() else v for k, v in payload["ema"].items()}
    torch.save(payload, model_pt)


FAST = [
    "data.emt_structures=40",
    "direct.max_steps=6", "direct.val_every=3", "direct.checkpoint_every=3", "direct.log_every=1",
    "conservative.max_steps=4", "conservative.val_every=2", "conservative.checkpoint_every=2",
    "conservative.log_every=1", "direct.max_atoms=64", "conservative.max_atoms=64",
]


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    fit(load_train_config(TINY, FAST + [f"run_dir={run_dir}"]))
    return run_dir


def test_run_directory_layout(two_stage_run):
    run = two_stage_run
    assert (run / "config.yaml").is_file()
    assert load_train_config(run / "config.yaml").run_dir == str(run)
    for stage in ("direct", "conservative"):
        for name in ("last", "best"):
            assert (run / "checkpoints" / stage / name / "model.pt").is_file()
    assert (run / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_jsonl_has_required_fields(two_stage_run):
    rows = read_metrics(two_stage_run)
    required = {"step", "stage", "split", "loss", "energy_mae_mev_per_atom", "force_mae_mev_per_A"}
    for stage in ("direct", "conservative"):
        train = [r for r in rows if r["stage"] == stage and r["split"] == "train"]
        val = [r for r in rows if r["stage"] == stage and r["split"] == "val" and "loaded_from" not in r]
        assert train and val
        assert required <= set(train[0])
        assert {"step", "stage", "split", "energy_mae_mev_per_atom", "force_mae_mev_per_A", "force_cosine"} <= set(val[0])
        assert all(math.isfinite(r["loss"]) for r in train)
        assert [r["step"] for r in train] == list(range(1, len(train) + 1))


def test_conservative_stage_starts_from_direct_best(two_stage_run):
    rows = read_metrics(two_stage_run)
    handover = [r for r in rows if r["stage"] == "conservative" and "loaded_from" in r]
    assert len(handover) == 1 and handover[0]["step"] == 0
    direct_best = read_model_file(two_stage_run / "checkpoints" / "direct" / "best")
    assert handover[0]["energy_mae_mev_per_atom"] == pytest.approx(direct_best["metrics"]["energy_mae_mev_per_atom"], rel=1e-4)
    # Where the conservative learning curve starts: the gradient of the direct stage's energy.
    assert math.isfinite(handover[0]["force_mae_mev_per_A"]) and "force_cosine" in handover[0]
    conservative = read_model_file(two_stage_run / "checkpoints" / "conservative" / "last")
    assert not any(k.startswith("direct_heads.") for k in conservative["model"])
    assert conservative["model_config"]["direct_forces"] is False


def test_checkpoint_loads_into_inference_model(two_stage_run):
    from esen_train.evaluation.checkpoint import load_model

    model, info = load_model(two_stage_run)
    assert isinstance(model, ESEN)
    assert info.stage == "conservative"


def test_wandb_offline_run_is_written_and_read_back(two_stage_run):
    files = find_run_files(two_stage_run)
    assert files, "no offline wandb run file"
    run = read_offline_run(files[-1])
    assert run["run_id"] == (two_stage_run / "wandb_run_id").read_text().strip()
    assert run["config"]["model"]["num_layers"] >= 1
    keys = set().union(*run["history"])
    assert "direct/train/loss" in keys and "conservative/val/force_mae_mev_per_A" in keys


def test_lost_weights_between_stages_are_caught(two_stage_run, tmp_path):
    """If the direct best checkpoint's recorded energy error does not match what its
    weights give, the conservative stage refuses to start."""
    run = tmp_path / "run"
    shutil.copytree(two_stage_run / "data", run / "data")
    shutil.copytree(two_stage_run / "checkpoints" / "direct", run / "checkpoints" / "direct", symlinks=True)
    best = (run / "checkpoints" / "direct" / "best").resolve() / "model.pt"
    halve_ema_weights(best)
    config = load_train_config(TINY, FAST + [f"run_dir={run}", "stages=[conservative]"])
    with pytest.raises(StageMismatch, match="weights were lost"):
        fit(config)


def test_fine_tuning_from_another_runs_checkpoint_on_other_data(two_stage_run, tmp_path):
    """`init_from` names a checkpoint trained on other data: its recorded validation error does
    not apply to this run's validation set, so the stage starts and logs what it measures."""
    best = two_stage_run / "checkpoints" / "direct" / "best"
    run = tmp_path / "run"
    overrides = FAST + [f"run_dir={run}", "stages=[conservative]", f"conservative.init_from={best}",
                        "data.emt_seed=7", "conservative.max_steps=2"]
    fit(load_train_config(TINY, overrides))
    start = next(row for row in read_metrics(run) if row["stage"] == "conservative" and row["step"] == 0)
    assert start["loaded_from"] == str(best)
    recorded = read_model_file(best)["metrics"]["energy_mae_mev_per_atom"]
    assert not math.isclose(start["energy_mae_mev_per_atom"], recorded, rel_tol=1e-4)
    assert (run / "checkpoints" / "conservative" / "last").exists()


def test_init_from_another_run_on_the_same_data_is_checked(two_stage_run, tmp_path):
    """The conservative stage alone, from a checkpoint whose run validated on the same data:
    lost weights are caught as in the hand-over inside one run."""
    source = tmp_path / "source"
    shutil.copytree(two_stage_run, source, symlinks=True)
    best = (source / "checkpoints" / "direct" / "best").resolve() / "model.pt"
    halve_ema_weights(best)
    overrides = FAST + [f"run_dir={tmp_path / 'run'}", "stages=[conservative]",
                        f"conservative.init_from={source / 'checkpoints' / 'direct' / 'best'}"]
    with pytest.raises(StageMismatch, match="weights were lost"):
        fit(load_train_config(TINY, overrides))


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = ESEN.forward

    def poisoned(self, batch, **kwargs):
        out = original(self, batch, **kwargs)
        calls["n"] += 1
        if calls["n"] in (2, 3) or calls["n"] > 6:
            out["energy"] = out["energy"] * float("nan")
        return out

    run = tmp_path / "run"
    overrides = FAST + [f"run_dir={run}", "stages=[direct]", "direct.max_steps=20", "direct.val_every=100",
                        "direct.checkpoint_every=5", "direct.max_nonfinite_in_row=3"]
    monkeypatch.setattr(ESEN, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="3 steps in a row"):
        fit(load_train_config(TINY, overrides))
    rows = [r for r in read_metrics(run) if r["split"] == "train"]
    assert rows[-1]["nonfinite_steps"] >= 2
    last = read_model_file(run / "checkpoints" / "direct" / "last")
    assert last["step"] == 5
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_compile_setting_compiles_the_model_of_that_stage_only(tmp_path, monkeypatch):
    """The wiring of `<stage>.compile`; that a compiled model computes what the eager one
    does, double backward included, is tests/test_model_compile.py's (compiling a whole
    run takes minutes on a CPU)."""
    import esen_train.engine.trainer as trainer

    compiled = []
    monkeypatch.setattr(trainer, "compile_model", lambda model: compiled.append(model.config.direct_forces) or model)
    fit(load_train_config(TINY, FAST + [f"run_dir={tmp_path}", "direct.max_steps=1", "conservative.max_steps=1",
                                        "conservative.compile=true"]))
    assert compiled == [False]  # once, for the conservative stage (the one without a direct head)


def test_compile_with_a_sharding_strategy_is_rejected():
    with pytest.raises(ValueError, match="direct.compile is supported with the single and ddp"):
        load_train_config(TINY, ["strategy.name=fsdp", "direct.compile=true"])


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_time_limit_ends_each_stage_validated_and_a_rerun_adds_no_steps(tmp_path, clock):
    """max_minutes shorter than any step: each stage stops after its first step, validates and
    checkpoints there; the same command again resumes both stages and finds their time used up."""
    run = tmp_path / "run"
    overrides = FAST + [f"run_dir={run}", "direct.max_minutes=1e-6", "conservative.max_minutes=1e-6",
                        "direct.max_steps=50", "conservative.max_steps=50", f"direct.clock={clock}",
                        f"conservative.clock={clock}"]
    fit(load_train_config(TINY, overrides))
    fit(load_train_config(TINY, overrides))
    rows = read_metrics(run)
    for stage in ("direct", "conservative"):
        assert [r["step"] for r in rows if r["stage"] == stage and r["split"] == "train"] == [1]
        val = [r for r in rows if r["stage"] == stage and r["split"] == "val" and "loaded_from" not in r]
        assert [r["step"] for r in val] == [1]
        assert read_model_file(run / "checkpoints" / stage / "best")["step"] == 1


def test_conservative_stage_from_fresh_weights(two_stage_run, tmp_path):
    """init_from=none: a conservative model from scratch, although the run directory could
    offer a direct checkpoint; nothing is loaded, so there is no hand-over row."""
    run = tmp_path / "run"
    shutil.copytree(two_stage_run / "checkpoints" / "direct", run / "checkpoints" / "direct", symlinks=True)
    shutil.copytree(two_stage_run / "data", run / "data")
    overrides = FAST + [f"run_dir={run}", "stages=[conservative]", "conservative.init_from=none"]
    fit(load_train_config(TINY, overrides))
    rows = [r for r in read_metrics(run) if r["stage"] == "conservative"]
    assert not any("loaded_from" in r for r in rows)
    fresh = read_model_file(run / "checkpoints" / "conservative" / "last")
    handed_over = read_model_file(two_stage_run / "checkpoints" / "conservative" / "last")
    assert fresh["step"] == handed_over["step"] == 4
    assert not torch.equal(fresh["ema"]["energy_head.mlp.0.weight"], handed_over["ema"]["energy_head.mlp.0.weight"])
