"""benchmarks/two_stage.py: what each arm trains, and the mean and spread over seeds;
benchmarks/mace_side.py: the two MACE sizes and the epochs a budget buys."""
from __future__ import annotations

import json

import pytest

from esen_train.engine.config import load_train_config
from tests.benchmark_helpers import load_benchmark
from tests.conftest import REPO_ROOT


TWO_STAGE = load_benchmark("two_stage")
CONFIG = REPO_ROOT / "configs" / "quickstart.yaml"


def arm_config(arm: str, share: float | None = None):
    return load_train_config(CONFIG, ["strategy.name=single", "data.emt_structures=10",
                                      *TWO_STAGE.arm_overrides(arm, 10.0, share)])


def test_scratch_is_a_conservative_stage_from_fresh_weights_for_the_whole_budget():
    config = arm_config("scratch")
    assert config.stages == ["conservative"]
    assert config.conservative.init_from == "none"
    assert config.conservative.max_minutes == 10.0


def test_two_stage_splits_the_budget_by_the_direct_share():
    config = arm_config("two_stage", 0.3)
    assert config.stages == ["direct", "conservative"]
    assert config.direct.max_minutes == pytest.approx(3.0)
    assert config.conservative.max_minutes == pytest.approx(7.0)
    assert config.conservative.init_from == ""  # this run's direct checkpoint


def test_two_stage_hands_over_also_where_the_recipe_is_conservative_only():
    # configs/rmd17-ethanol.yaml ships `stages: [conservative]` with `conservative.init_from: none`
    config = load_train_config(REPO_ROOT / "configs" / "rmd17-ethanol.yaml", TWO_STAGE.arm_overrides("two_stage", 10.0, 0.3))
    assert config.stages == ["direct", "conservative"]
    assert config.conservative.init_from == ""  # this run's direct checkpoint, not fresh weights


def test_direct_is_the_direct_stage_for_the_whole_budget():
    config = arm_config("direct")
    assert config.stages == ["direct"] and config.direct.max_minutes == 10.0


def record(arm, share, seed, force, drift=None):
    test = {"force_mae_mev_per_A": force, "energy_mae_mev_per_atom": 2 * force}
    return {"arm": arm, "direct_share": share, "seed": seed, "test": test, "fit_wall_s": 60.0,
            "steps": {"conservative": 10}, **({"nve": {"drift_mev_per_atom_per_ps": drift}} if drift is not None else {})}


def test_arms_are_aggregated_per_arm_and_share_with_mean_and_sample_spread():
    records = [record("scratch", None, 0, 10.0, 0.1), record("scratch", None, 1, 14.0, 0.3),
               record("two_stage", 0.3, 0, 8.0), record("two_stage", 0.5, 0, 9.0), record("two_stage", 0.3, 1, 12.0)]
    arms = {(a["arm"], a["direct_share"]): a for a in TWO_STAGE.aggregate(records)}
    assert set(arms) == {("scratch", None), ("two_stage", 0.3), ("two_stage", 0.5)}
    scratch = arms[("scratch", None)]
    assert scratch["force_mae_mev_per_A"] == {"mean": 12.0, "std": pytest.approx(2 ** 0.5 * 2), "min": 10.0, "max": 14.0}
    assert scratch["nve_drift_mev_per_atom_per_ps"]["mean"] == pytest.approx(0.2)
    assert scratch["seeds"] == [0, 1]
    assert arms[("two_stage", 0.5)]["force_mae_mev_per_A"]["std"] is None  # one seed: no spread
    assert "nve_drift_mev_per_atom_per_ps" not in arms[("two_stage", 0.3)]


def test_a_rerun_keeps_finished_runs_and_trains_the_rest(tmp_path, monkeypatch):
    import argparse
    args = argparse.Namespace(budget_minutes=1.0, clock="cpu", set=[], nve_steps=0)
    prepared = {"base": [], "dirs": {"train": tmp_path / "train", "val": tmp_path / "val"}, "config": CONFIG}
    overrides = ["seed=0", f"data.train=[{tmp_path / 'train'}]", f"data.val=[{tmp_path / 'val'}]",
                 *TWO_STAGE.arm_overrides("direct", 1.0, None, "cpu")]
    kept = record("direct", None, 0, 5.0) | {"overrides": overrides, "load_average": [[1.0], [1.0]]}
    (tmp_path / "seed0" / "direct").mkdir(parents=True)
    (tmp_path / "seed0" / "direct" / "record.json").write_text(json.dumps(kept))
    trained = []
    monkeypatch.setattr(TWO_STAGE.accuracy, "fit", lambda config, run_dir, overrides: trained.append(run_dir) or 1 / 0)
    assert TWO_STAGE.one_run(prepared, "direct", None, 0, args, tmp_path) == kept
    assert trained == []
    with pytest.raises(ZeroDivisionError):  # another seed has no record: it trains
        TWO_STAGE.one_run(prepared, "direct", None, 1, args, tmp_path)
    assert trained == [tmp_path / "seed1" / "direct" / "run"]


def test_first_seed_adds_later_seeds_alone(tmp_path, monkeypatch):
    """`--first-seed 1 --seeds 2` trains seeds 1 and 2, odd seeds with the arms in reverse order."""
    trained = []

    def fake_run(prepared, arm, share, seed, args, out):
        trained.append((seed, arm))
        return record(arm, share, seed, 10.0 + seed)

    monkeypatch.setattr(TWO_STAGE, "prepare", lambda dataset, out: {"config": CONFIG, "dirs": {}})
    monkeypatch.setattr(TWO_STAGE, "one_run", fake_run)
    TWO_STAGE.main(["emt", "--budget-minutes", "1", "--arms", "scratch", "direct", "--first-seed", "1",
                    "--seeds", "2", "--out", str(tmp_path)])
    assert trained == [(1, "direct"), (1, "scratch"), (2, "scratch"), (2, "direct")]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["seeds"] == [1, 2]
    assert {arm["arm"]: arm["seeds"] for arm in report["arms"]} == {"scratch": [1, 2], "direct": [1, 2]}


MACE = load_benchmark("mace_side")


def test_mace_is_trained_at_a_small_cpu_size_and_at_the_paper_size():
    small, paper = MACE.recipe("small"), MACE.recipe("paper")
    assert {"--num_channels=32", "--max_L=1", "--default_dtype=float32", "--forces_weight=100.0"} <= set(small)
    assert {"--hidden_irreps=128x0e + 128x1o", "--default_dtype=float64", "--forces_weight=1000.0"} <= set(paper)
    for recipe in (small, paper):
        assert {"--num_interactions=2", "--correlation=3", "--batch_size=5", "--lr=0.01", "--ema_decay=0.99",
                "--amsgrad", "--E0s=average"} <= set(recipe)
    assert (MACE.dtype_of("small"), MACE.dtype_of("paper")) == ("float32", "float64")


def test_mace_plan_fits_whole_epochs_or_one_epoch_of_at_least_a_batch():
    from datetime import datetime, timedelta

    start = datetime(2026, 1, 1)
    # Probe on 10 + 10 structures: 5 s of validation, a first epoch of 5 s (warm-up: cheap
    # training), then a second of 20 s, which alone sets the training cost.
    times = {"Started training": start, "Initial": start + timedelta(seconds=5),
             "Epoch 0": start + timedelta(seconds=10), "Epoch 1": start + timedelta(seconds=30)}
    plan = MACE.plan_epochs(probe_wall=40.0, times=times, n_train=100, n_val=10, budget_s=1000.0)
    assert plan["seconds_per_train_structure"] == pytest.approx(2.0)
    assert plan["fixed_s"] == pytest.approx(10.0)
    assert (plan["epochs"], plan["train_structures"]) == (4, 100)  # (1000 - 10 - 5) // (200 + 5)
    plan = MACE.plan_epochs(probe_wall=40.0, times=times, n_train=100, n_val=10, budget_s=30.0)
    assert (plan["epochs"], plan["train_structures"]) == (1, MACE.BATCH_SIZE)


def test_mace_log_times_need_the_epochs_asked_for(tmp_path):
    """The probe must reach its second epoch; a real run of one epoch has only "Epoch 0"."""
    (tmp_path / "stdout.log").write_text(
        "2026-12-05 08:00:00.000 INFO: Started training, reporting errors on validation set\n"
        "2026-12-05 08:00:01.000 INFO: Initial: head: Default, loss=1.0\n"
        "2026-12-05 08:00:05.500 INFO: Epoch 0: head: Default, loss=0.5\n"
        "2026-12-05 08:00:06.000 INFO: Training complete\n")
    times = MACE.log_times(tmp_path, epochs=1)
    assert (times["Training complete"] - times["Started training"]).total_seconds() == pytest.approx(6.0)
    with pytest.raises(RuntimeError, match="Epoch 1"):
        MACE.log_times(tmp_path, epochs=2)


def test_the_budget_can_count_cpu_time():
    config = load_train_config(CONFIG, ["strategy.name=single", "data.emt_structures=10",
                                        *TWO_STAGE.arm_overrides("two_stage", 10.0, 0.5, clock="cpu")])
    assert config.direct.clock == config.conservative.clock == "cpu"
    assert arm_config("direct").direct.clock == "wall"


def test_mace_plans_a_cpu_budget_from_the_probes_share_of_a_core():
    from datetime import datetime, timedelta
    start = datetime(2026, 1, 1)
    # probe: 10 s start-up, 10 validation structures in 5 s, then epochs of 10 s
    times = {"Started training": start, "Initial": start + timedelta(seconds=5),
             "Epoch 0": start + timedelta(seconds=10), "Epoch 1": start + timedelta(seconds=20)}
    budget = dict(probe_wall=30.0, times=times, n_train=100, n_val=10, budget_s=600.0)
    wall = MACE.plan_epochs(**budget)
    assert wall["seconds_per_train_structure"] == pytest.approx(1.0) and wall["epochs"] == int((600 - 10 - 5) / 105)
    # the same probe on a machine that gave it half a core: each structure costs half the CPU seconds
    cpu = MACE.plan_epochs(**budget, cpu_share=0.5)
    assert cpu["seconds_per_train_structure"] == pytest.approx(0.5) and cpu["fixed_s"] == pytest.approx(5.0)
    assert cpu["epochs"] == int((600 - 5 - 2.5) / 52.5)
