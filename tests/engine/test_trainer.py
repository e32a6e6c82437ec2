"""The trainer end to end on built-in EMT data, in one process: both stages, metrics,
checkpoints, wandb offline files, the stage hand-over check, non-finite steps."""
import json
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from esen_train.engine.config import load_train_config
from esen_train.engine.fit import fit
from esen_train.engine.status import read_status
from esen_train.engine.tracking import read_metrics
from esen_train.engine.trainer import StageMismatch, TrainingDiverged
from esen_train.model import ESEN
from esen_train.model.model_file import read_model_file as read_model_pt
from tests.wandb_offline import find_run_files, read_offline_run

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


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
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_DATA_DIR", str(tmp_path_factory.mktemp("wandb-data")))  # wandb's staging of tables
        fit(load_train_config(TINY, FAST + [f"run_dir={run_dir}", "logging.wandb.log_checkpoints=all"]))
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


def test_status_and_end_rows_of_a_finished_run(two_stage_run):
    status = read_status(two_stage_run)
    assert status["state"] == "finished" and status["stage"] == "conservative"
    ends = [row for row in read_metrics(two_stage_run) if row["split"] == "end"]
    assert [(row["stage"], row["step"], row["reason"]) for row in ends] == [("direct", 6, "max_steps"),
                                                                          ("conservative", 4, "max_steps")]
    for stage, steps, end in zip(("direct", "conservative"), (6, 4), ends):
        entry = status["stages"][stage]
        assert (entry["state"], entry["end_reason"], entry["step"], entry["max_steps"]) == ("ended", "max_steps", steps, steps)
        best = two_stage_run / "checkpoints" / stage / "best"
        assert entry["best"]["checkpoint"] == str(best.resolve())
        assert entry["best"]["value"] == read_model_file(best)["metrics"]["force_mae_mev_per_A"] == end["best_value"]
        assert entry["val"]["step"] == steps and entry["train"]["step"] == steps
    assert status["last_checkpoint"] == str((two_stage_run / "checkpoints" / "conservative" / "last").resolve())


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
    from esen_train.model.model_file import load_model

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


def wandb_run(run_dir: Path) -> dict:
    (run_file,) = find_run_files(run_dir)
    return read_offline_run(run_file)


def rows_with(run: dict, key: str) -> list[dict]:
    return [row for row in run["history"] if key in row]


def test_wandb_charts_use_global_step_with_one_section_per_stage(two_stage_run):
    run = wandb_run(two_stage_run)
    assert {"name": "global_step", "glob_name": "", "step_metric": ""} in run["metrics"]
    assert {"name": "", "glob_name": "*", "step_metric": "global_step"} in run["metrics"]
    assert all("global_step" in row for row in run["history"])
    sections = {key.split("/")[0] for row in run["history"] for key in row if key != "global_step" and not key.startswith("_")}
    assert sections == {"direct", "conservative", "fit"}
    # The conservative stage's steps follow the direct stage's 6 on the one x axis.
    assert [row["global_step"] for row in rows_with(run, "direct/train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [row["global_step"] for row in rows_with(run, "conservative/train/loss")] == [7, 8, 9, 10]
    assert run["group"] == "" and run["job_type"] == "direct+conservative"


def test_wandb_has_parity_plots_learning_curves_and_best_errors(two_stage_run):
    run = wandb_run(two_stage_run)
    for stage, steps in (("direct", [3, 6]), ("conservative", [8, 10])):
        parity = rows_with(run, f"{stage}/val/parity")
        assert [row["global_step"] for row in parity] == steps  # one per validation
        for row in parity:
            image = row[f"{stage}/val/parity"]
            assert image["_type"] == "image-file"
            assert (run["files_dir"] / image["path"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (final,) = rows_with(run, "fit/learning_curves")
    assert final["global_step"] == 10
    assert (run["files_dir"] / final["fit/learning_curves"]["path"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads((run["files_dir"] / final["fit/best_errors"]["path"]).read_text())
    assert table["columns"][:3] == ["stage", "step", "energy_mae_mev_per_atom"]
    for row in table["data"]:
        best = read_model_file(two_stage_run / "checkpoints" / row[0] / "best")
        assert row[1] == best["step"]
        assert dict(zip(table["columns"][2:], row[2:])) == pytest.approx(
            {key: best["metrics"].get(key) for key in table["columns"][2:]})
    assert [row[0] for row in table["data"]] == ["direct", "conservative"]


def test_wandb_summary_holds_each_stages_best_values(two_stage_run):
    summary = wandb_run(two_stage_run)["summary"]
    for stage, offset in (("direct", 0), ("conservative", 6)):
        best = read_model_file(two_stage_run / "checkpoints" / stage / "best")
        assert summary[f"{stage}/best/step"] == best["step"]
        assert summary[f"{stage}/best/global_step"] == offset + best["step"]
        for metric, value in best["metrics"].items():
            assert summary[f"{stage}/best/{metric}"] == pytest.approx(value)
        assert summary[f"{stage}/end/reason"] == "max_steps"
    assert summary["conservative/val/loaded_from"].endswith("checkpoints/direct/best")


def test_wandb_config_describes_model_data_code_and_cluster(two_stage_run):
    import subprocess

    import esen_train
    from esen_train.data.manifest import Manifest

    config = wandb_run(two_stage_run)["config"]
    direct_model = ESEN(replace(load_train_config(TINY, FAST).model, direct_forces=True))
    heads = sum(p.numel() for p in direct_model.direct_heads.parameters())
    assert config["direct_head_parameters"] == heads
    assert config["model_parameters"] == sum(p.numel() for p in direct_model.parameters()) - heads
    for split in ("train", "val"):
        (dataset,) = config["datasets"][split]
        manifest = Manifest.load(two_stage_run / "data" / split)
        assert dataset["path"] == str(two_stage_run / "data" / split)
        assert dataset["num_structures"] == manifest.num_structures and dataset["num_atoms"] == manifest.num_atoms
        assert dataset["shard_checksums"] == {shard.name: shard.checksum for shard in manifest.shards}
        assert dataset["provenance"]["tool"] == "esen-data emt"
        assert len(dataset["elements"]) == len(manifest.elements)
    repository = Path(esen_train.__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(repository), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert config["code"] == {"version": esen_train.__version__, "git_commit": commit or None}
    assert config["cluster"]["world_size"] == 1 and config["cluster"]["nodes"] == 1
    assert config["direct"]["max_steps"] == 6  # the resolved training config itself


def test_wandb_artifacts_hold_every_checkpoint_with_log_checkpoints_all(two_stage_run):
    import base64
    import hashlib

    run = wandb_run(two_stage_run)
    expected = {("direct", 3), ("direct", 6), ("conservative", 2), ("conservative", 4)}
    models = [a for a in run["artifacts"] if a["type"] == "model"]
    assert {(a["metadata"]["stage"], a["metadata"]["step"]) for a in models} == expected
    for artifact in models:
        stage, step = artifact["metadata"]["stage"], artifact["metadata"]["step"]
        assert artifact["name"] == f"model-{run['run_id']}-{stage}"
        assert f"step_{step}" in artifact["aliases"]
        assert ("best" in artifact["aliases"]) == (step in steps_that_were_best(two_stage_run, stage))
        entry = artifact["files"]["model.pt"]
        kept = Path(entry["local_path"])
        checkpoint = two_stage_run / "checkpoints" / stage / f"step_{step:08d}" / "model.pt"
        assert kept.read_bytes() == checkpoint.read_bytes()
        assert entry["digest"] == base64.b64encode(hashlib.md5(kept.read_bytes()).digest()).decode()


def test_resumed_run_continues_the_wandb_curves(tmp_path, monkeypatch):
    """A second start of the same run continues the wandb run: same id, rows from the step
    it resumed at, in a job array's group; only best checkpoints become artifacts."""
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    run_dir = tmp_path / "run"
    overrides = FAST + [f"run_dir={run_dir}", "stages=[direct]", "direct.val_every=2", "direct.checkpoint_every=2",
                        "logging.wandb.log_checkpoints=best"]
    fit(load_train_config(TINY, overrides + ["direct.max_steps=4"]))
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4321")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    fit(load_train_config(TINY, overrides + ["direct.max_steps=6"]))
    first, second = (read_offline_run(path) for path in find_run_files(run_dir))
    assert first["run_id"] == second["run_id"] == (run_dir / "wandb_run_id").read_text().strip()
    assert [row["global_step"] for row in rows_with(first, "direct/train/loss")] == [1, 2, 3, 4]
    assert [row["global_step"] for row in rows_with(second, "direct/train/loss")] == [5, 6]
    assert {"name": "", "glob_name": "*", "step_metric": "global_step"} in second["metrics"]
    assert second["group"] == "array-4321" and second["job_type"] == "direct"
    assert second["config"]["cluster"]["slurm_restart_count"] == 1
    models = [artifact for run in (first, second) for artifact in run["artifacts"] if artifact["type"] == "model"]
    assert [a["metadata"]["step"] for a in models] == sorted(steps_that_were_best(run_dir, "direct"))
    assert all("best" in a["aliases"] for a in models)


def test_eval_and_md_add_their_results_to_the_runs_wandb_run(two_stage_run, tmp_path, capsys, monkeypatch):
    """`esen-train eval|md --wandb` on a run's checkpoint resume its wandb run and log the
    parity plot and error table, and the NVE energy plot, at the checkpoint's global step."""
    import ase.build
    import ase.io

    from esen_train.cli.train import main

    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    run_dir = tmp_path / "run"
    shutil.copytree(two_stage_run, run_dir, symlinks=True)
    cell = tmp_path / "cell.xyz"
    ase.io.write(cell, ase.build.bulk("Cu", "fcc", a=3.6, cubic=True))
    assert main(["eval", str(run_dir), "--data", str(run_dir / "data" / "val"), "--out", str(tmp_path / "eval"), "--wandb"]) == 0
    assert main(["md", str(run_dir), "--structure", str(cell), "--steps", "4", "--timestep", "1", "--temperature", "300",
                 "--out", str(tmp_path / "md"), "--wandb"]) == 0
    fit_file, eval_file, md_file = find_run_files(run_dir)
    best_step = read_model_file(run_dir / "checkpoints" / "conservative" / "best")["step"]
    evaluation, md = read_offline_run(eval_file), read_offline_run(md_file)
    assert evaluation["run_id"] == md["run_id"] == read_offline_run(fit_file)["run_id"]
    (row,) = rows_with(evaluation, "conservative/eval/parity")
    assert row["global_step"] == 6 + best_step
    table = json.loads((evaluation["files_dir"] / row["conservative/eval/errors"]["path"]).read_text())
    report = json.loads((tmp_path / "eval" / "errors.json").read_text())
    assert table["data"][0][:3] == ["all", "all", report["num_structures"]]
    assert ["dataset", "val"] in [r[:2] for r in table["data"]]
    assert evaluation["summary"]["conservative/eval/force_mae_mev_per_A"] == pytest.approx(report["force_mae_mev_per_A"])
    (row,) = rows_with(md, "conservative/md/energy_vs_time")
    assert (md["files_dir"] / row["conservative/md/energy_vs_time"]["path"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drift = json.loads((tmp_path / "md" / "md.json").read_text())["drift_mev_per_atom_per_ps"]
    assert md["summary"]["conservative/md/drift_mev_per_atom_per_ps"] == pytest.approx(drift)

    plain = tmp_path / "plain"  # a run trained with wandb disabled: nothing to add to
    shutil.copytree(two_stage_run / "checkpoints", plain / "checkpoints", symlinks=True)
    capsys.readouterr()
    assert main(["md", str(plain), "--structure", str(cell), "--steps", "2", "--timestep", "1", "--temperature", "300",
                 "--out", str(tmp_path / "md2"), "--wandb"]) == 0
    assert "has no wandb run" in capsys.readouterr().err


def steps_that_were_best(run_dir: Path, stage: str) -> set[int]:
    """The validations whose checkpoint became the stage's best when it was written."""
    best, steps = math.inf, set()
    for row in read_metrics(run_dir):
        if row["stage"] == stage and row["split"] == "val" and "loaded_from" not in row and row["force_mae_mev_per_A"] < best:
            best = row["force_mae_mev_per_A"]
            steps.add(row["step"])
    return steps


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


def copy_with_recorded_error_off(two_stage_run: Path, run: Path, factor: float) -> float:
    """The run's data and direct checkpoints in `run`, the best one recording `factor` times the
    energy error its weights give. Returns how far off the record is (meV/atom)."""
    shutil.copytree(two_stage_run / "data", run / "data")
    shutil.copytree(two_stage_run / "checkpoints" / "direct", run / "checkpoints" / "direct", symlinks=True)
    best = (run / "checkpoints" / "direct" / "best").resolve() / "model.pt"
    payload = torch.load(best, weights_only=True)
    recorded = payload["metrics"]["energy_mae_mev_per_atom"]
    payload["metrics"]["energy_mae_mev_per_atom"] = recorded * factor
    torch.save(payload, best)
    return abs(recorded * factor - recorded)


def test_handover_tolerances_and_adamw_settings_take_effect(two_stage_run, tmp_path):
    """A direct checkpoint whose recorded energy error is 1% off what its weights give: the
    default hand-over tolerances refuse it; conservative.handover_rel_tol=0.05, or a
    handover_abs_tol above the difference, lets the stage start. That stage's optimizer has
    the AdamW betas and epsilon of its config."""
    overrides = FAST + ["stages=[conservative]", "conservative.max_steps=1"]
    off = copy_with_recorded_error_off(two_stage_run, tmp_path / "run", 1.01)
    with pytest.raises(StageMismatch, match="weights were lost"):
        fit(load_train_config(TINY, overrides + [f"run_dir={tmp_path / 'run'}"]))
    fit(load_train_config(TINY, overrides + [f"run_dir={tmp_path / 'run'}", "conservative.handover_rel_tol=0.05",
                                             "conservative.adam_betas=[0.8,0.95]", "conservative.adam_eps=1e-6"]))
    state_file = Path("checkpoints") / "conservative" / "last" / "train_state" / "state.pt"
    state = torch.load(tmp_path / "run" / state_file, weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert groups and all(tuple(g["betas"]) == (0.8, 0.95) and g["eps"] == 1e-6 for g in groups)
    default_state = torch.load(two_stage_run / state_file, weights_only=True)
    assert all(tuple(g["betas"]) == (0.9, 0.999) and g["eps"] == 1e-8 for g in default_state["optimizer"]["param_groups"])

    copy_with_recorded_error_off(two_stage_run, tmp_path / "absolute", 1.01)
    fit(load_train_config(TINY, overrides + [f"run_dir={tmp_path / 'absolute'}", f"conservative.handover_abs_tol={2 * off}"]))
    assert (tmp_path / "absolute" / "checkpoints" / "conservative" / "last").exists()


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
    status = read_status(run)
    assert status["state"] == "failed" and status["error"].startswith("TrainingDiverged: direct stage: 3 steps in a row")
    assert status["stages"]["direct"]["end_reason"] == "failed"
    last = read_model_file(run / "checkpoints" / "direct" / "last")
    assert last["step"] == 5
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_compile_setting_compiles_the_model_of_that_stage_only(tmp_path, monkeypatch):
    """The wiring of `<stage>.compile`; that a compiled model computes what the eager one
    does, double backward included, is tests/model/test_model_compile.py's (compiling a whole
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


def test_compiled_code_is_cached_in_the_run_directory_unless_the_user_chose_a_cache(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from esen_train.engine.trainer import use_compile_cache

    run_dir = tmp_path / "run"
    for unset_or_torch_default in (None, default_cache_dir()):
        if unset_or_torch_default is None:
            monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", unset_or_torch_default)
        assert use_compile_cache(run_dir) == str(run_dir / "compile_cache")
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(run_dir / "compile_cache")  # what torch reads
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "shared_cache"))
    assert use_compile_cache(run_dir) == str(tmp_path / "shared_cache")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "shared_cache")
