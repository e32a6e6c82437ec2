"""benchmarks/two_stage.py: what each arm trains, and the mean and spread over seeds."""
from __future__ import annotations

import importlib.util
import sys

import pytest

from esen_train.engine.config import load_train_config
from tests.conftest import REPO_ROOT


def _benchmark(name: str):
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


TWO_STAGE = _benchmark("two_stage")
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
