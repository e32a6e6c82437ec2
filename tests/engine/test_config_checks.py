"""Every config value is checked before anything is created: ranges, metric names, `max_atoms`
against the data, the data of a run that is resumed; and DeepSpeed in one process. Commands
run in-process through `esen-train`'s `main`, or as the console script where DeepSpeed is
concerned; real dataset directories, real training runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from esen_train.cli.train import main
from esen_train.data.convert import convert
from esen_train.data.emt import MAX_ATOMS, generate_emt_dataset
from esen_train.data.manifest import Manifest, load_natoms
from esen_train.engine.config import (
    BEST_METRICS,
    ConfigError,
    DataConfig,
    check_against_data,
    check_resume,
    load_train_config,
    save_config,
)
from esen_train.engine.fit import _ensure_emt_data, fit
from esen_train.engine.losses import ErrorAccumulator
from esen_train.engine.trainer import same_validation_data
from esen_train.model.model_file import read_model_file

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
QUICK = ["stages=[direct]", "direct.max_steps=2", "direct.val_every=2", "direct.checkpoint_every=2",
         "direct.log_every=1", "direct.warmup_steps=1", "logging.wandb.mode=disabled"]


def refused(tmp_path, capsys, *overrides) -> str:
    """Run `esen-train fit tiny` with `overrides`; it must exit 2 having created nothing.
    Returns its error message."""
    run_dir = tmp_path / "run"
    assert main(["fit", str(TINY), f"run_dir={run_dir}", *overrides]) == 2
    assert not run_dir.exists()
    return capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("direct.lr=-0.1", "direct.lr must be > 0, got -0.1"),
    ("conservative.lr=0", "conservative.lr must be > 0, got 0.0"),
    ("direct.lr=.nan", "direct.lr must be > 0, got nan"),
    ("model.cutoff=0", "model: ModelConfig.cutoff must be > 0"),
    ("direct.val_every=0", "direct.val_every must be >= 1, got 0"),
    ("direct.checkpoint_every=0", "direct.checkpoint_every must be >= 1"),
    ("direct.log_every=-3", "direct.log_every must be >= 1"),
    ("direct.warmup_steps=-1", "direct.warmup_steps must be >= 0"),
    ("direct.min_lr_ratio=2", "direct.min_lr_ratio must be in [0, 1]"),
    ("direct.ema_decay=1.0", "direct.ema_decay must be in [0, 1)"),
    ("direct.clip_grad_norm=0", "direct.clip_grad_norm must be > 0"),
    ("direct.weight_decay=-1e-3", "direct.weight_decay must be >= 0"),
    ("direct.force_weight=-1", "direct.force_weight must be >= 0"),
    ("direct.keep_last=-1", "direct.keep_last must be >= 0"),
    ("direct.max_nonfinite_in_row=0", "direct.max_nonfinite_in_row must be >= 1"),
    ("seed=-1", "seed must be >= 0"),
    ("data.num_workers=-2", "data.num_workers"),
    ("stages=[]", "stages must name each stage"),
    ("stages=[direct,direct]", "stages must name each stage"),
    ("direct.init_from=/no/such/checkpoint", "direct.init_from: /no/such/checkpoint does not exist"),
    ("strategy.process_group_timeout_s=0", "strategy.process_group_timeout_s must be > 0, got 0.0"),
    ("direct.adam_betas=[0.9,1.0]", "direct.adam_betas must be two numbers in [0, 1), got [0.9, 1.0]"),
    ("conservative.adam_betas=[0.9]", "conservative.adam_betas must be two numbers in [0, 1)"),
    ("direct.adam_eps=0", "direct.adam_eps must be > 0, got 0.0"),
    ("data.emt_val_fraction=1", "data.emt_val_fraction must be in (0, 1), got 1.0"),
    ("conservative.handover_rel_tol=-1", "conservative.handover_rel_tol must be >= 0, got -1.0"),
    ("conservative.handover_abs_tol=-1e-3", "conservative.handover_abs_tol must be >= 0, got -0.001"),
])
def test_values_out_of_range_are_refused_naming_the_key(tmp_path, capsys, override, message):
    assert message in refused(tmp_path, capsys, override)


def test_all_loss_weights_zero_is_refused(tmp_path, capsys):
    error = refused(tmp_path, capsys, "direct.energy_weight=0", "direct.force_weight=0", "direct.stress_weight=0")
    assert "nothing to train" in error


def test_a_misspelt_best_metric_names_the_valid_ones(tmp_path, capsys):
    error = refused(tmp_path, capsys, "direct.best_metric=force_mae")
    assert "direct.best_metric must be one of energy_mae_mev_per_atom, force_mae_mev_per_A, stress_mae_mev_per_A3" in error
    assert "'force_mae'" in error


def test_best_metrics_are_lower_is_better_metrics_validation_reports():
    """The names `best_metric` accepts are what validation reports (less force_cosine, where
    higher is better)."""
    import torch
    from torch_geometric.data import Batch, Data

    batch = Batch.from_data_list([Data(natoms=torch.tensor([2]), energy=torch.zeros(1), forces=torch.ones(2, 3),
                                       stress=torch.zeros(1, 3, 3), has_stress=torch.tensor([True]))])
    errors = ErrorAccumulator()
    errors.add({"energy": torch.ones(1), "forces": torch.zeros(2, 3), "stress": torch.ones(1, 3, 3)}, batch)
    assert set(BEST_METRICS) == set(errors.result()) - {"force_cosine"}


def test_max_atoms_below_the_largest_structure_is_refused(tmp_path, capsys):
    data = tmp_path / "emt"
    generate_emt_dataset(data, num=30, seed=0)
    largest = int(load_natoms(data).max())
    error = refused(tmp_path, capsys, f"data.train=[{data}]", f"direct.max_atoms={largest - 1}")
    assert f"direct.max_atoms={largest - 1} is below the largest structure of the data ({largest} atoms, in {data})" in error
    # The built-in EMT data, generated only once training starts, is bounded by its generator.
    error = refused(tmp_path, capsys, "conservative.max_atoms=32")
    assert f"conservative.max_atoms=32 is below the largest structure of the data ({MAX_ATOMS} atoms, in the built-in EMT data)" in error


def test_esen_launch_checks_the_data_before_submitting(tmp_path, capsys):
    from esen_train.cli.launch import main as launch

    data = tmp_path / "emt"
    generate_emt_dataset(data, num=30, seed=0)
    largest = int(load_natoms(data).max())
    run_dir = tmp_path / "run"
    status = launch([str(TINY), "cluster=local", f"run_dir={run_dir}", f"data.train=[{data}]",
                     f"direct.max_atoms={largest - 1}", "--dry-run"])
    assert status == 2
    assert f"direct.max_atoms={largest - 1} is below the largest structure" in capsys.readouterr().err
    assert not run_dir.exists()


def test_missing_data_and_a_stress_metric_without_stress_are_refused(tmp_path, capsys):
    error = refused(tmp_path, capsys, f"data.train=[{tmp_path / 'nowhere'}]")
    assert f"data.train: {tmp_path / 'nowhere'}: dataset directory does not exist" in error
    molecules = []
    for index in range(4):
        atoms = molecule("CH4")
        atoms.rattle(0.05, seed=index)
        atoms.calc = EMT()
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
        molecules.append(atoms)
    ase.io.write(tmp_path / "ch4.xyz", molecules, format="extxyz")
    convert([str(tmp_path / "ch4.xyz")], tmp_path / "ch4", progress=False)
    error = refused(tmp_path, capsys, f"data.train=[{tmp_path / 'ch4'}]", "direct.best_metric=stress_mae_mev_per_A3")
    assert "direct.best_metric=stress_mae_mev_per_A3, but data.train has no stress labels" in error


def labelled_molecules(path: Path, name: str) -> Path:
    """Four rattled copies of an ASE molecule with EMT labels, converted to a dataset at `path`."""
    molecules = []
    for index in range(4):
        atoms = molecule(name)
        atoms.rattle(0.05, seed=index)
        atoms.calc = EMT()
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
        molecules.append(atoms)
    ase.io.write(path.with_suffix(".xyz"), molecules, format="extxyz")
    convert([str(path.with_suffix(".xyz"))], path, progress=False)
    return path


def test_validation_elements_the_training_data_lacks_are_warned_of(tmp_path):
    methane, ammonia = labelled_molecules(tmp_path / "ch4", "CH4"), labelled_molecules(tmp_path / "nh3", "NH3")
    config = load_train_config(TINY, [f"data.train=[{methane}]", f"data.val=[{methane},{ammonia}]"])
    assert check_against_data(config) == [
        f"data.val {ammonia} has N, which data.train lacks: validation errors on them measure elements this run "
        "does not train"
    ]
    assert check_against_data(load_train_config(TINY, [f"data.train=[{methane},{ammonia}]", f"data.val=[{ammonia}]"])) == []


def test_resuming_with_other_data_is_refused_unless_told_and_every_config_is_kept(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    generate_emt_dataset(first, num=20, seed=0)
    generate_emt_dataset(second, num=20, seed=1)
    run_dir = tmp_path / "run"
    on_first = QUICK + [f"run_dir={run_dir}", f"data.train=[{first}]"]
    fit(load_train_config(TINY, on_first))
    original = (run_dir / "config.yaml").read_text()
    # The model records the elements of its training data.
    assert read_model_file(run_dir / "checkpoints" / "direct" / "last" / "model.pt")["elements"] == \
        Manifest.load(first).elements

    capsys.readouterr()
    fit(load_train_config(TINY, on_first))  # the same config again: resumes, nothing new kept
    assert sorted(p.name for p in run_dir.glob("config*.yaml")) == ["config.yaml"]
    assert "config changed" not in capsys.readouterr().out

    on_second = QUICK + [f"run_dir={run_dir}", f"data.train=[{second}]"]
    with pytest.raises(ConfigError, match=rf"data.train was \['{first}'\], now \['{second}'\].*resume_with_other_data=true"):
        fit(load_train_config(TINY, on_second))
    assert (run_dir / "config.yaml").read_text() == original

    fit(load_train_config(TINY, on_second + ["resume_with_other_data=true", "direct.max_steps=3"]))
    assert (run_dir / "config.1.yaml").read_text() == original
    # Each changed key is said once, with both values.
    changed = [line for line in capsys.readouterr().out.splitlines() if "config changed" in line]
    assert [line.split(": ", 1)[1].split(" (")[0] for line in changed] == [
        f"data.train: ['{first}'] -> ['{second}']", "direct.max_steps: 2 -> 3",
        "resume_with_other_data: False -> True",
    ]
    assert all(line.endswith("(the earlier config kept as config.1.yaml)") for line in changed)
    latest = load_train_config(run_dir / "config.yaml")
    assert latest.data.train == [str(second)] and latest.direct.max_steps == 3 and latest.resume_with_other_data


def test_emt_val_fraction_sets_the_validation_share_of_the_built_in_data(tmp_path):
    config = load_train_config(TINY, [f"run_dir={tmp_path}", "data.emt_structures=12", "data.emt_val_fraction=0.5"])
    _ensure_emt_data(config, tmp_path)
    assert Manifest.load(tmp_path / "data" / "val").num_structures == 6
    assert Manifest.load(tmp_path / "data" / "train").num_structures == 6
    default = load_train_config(TINY, [f"run_dir={tmp_path / 'default'}", "data.emt_structures=30"])
    _ensure_emt_data(default, tmp_path / "default")
    assert Manifest.load(tmp_path / "default" / "data" / "val").num_structures == 3  # a tenth


def test_resuming_with_another_emt_val_fraction_is_refused(tmp_path):
    """A run directory whose config.yaml predates the key had the default share."""
    saved = load_train_config(TINY, [f"run_dir={tmp_path}"])
    save_config(saved, tmp_path)
    text = (tmp_path / "config.yaml").read_text()
    (tmp_path / "config.yaml").write_text("".join(line for line in text.splitlines(keepends=True)
                                                  if "emt_val_fraction" not in line))
    check_resume(load_train_config(TINY, [f"run_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"data.emt_val_fraction was 0.1, now 0.2"):
        check_resume(load_train_config(TINY, [f"run_dir={tmp_path}", "data.emt_val_fraction=0.2"]))


def test_a_checkpoint_of_another_emt_val_fraction_validated_on_other_data():
    """The hand-over check compares energy errors only on the same validation set."""
    ours = DataConfig(emt_structures=40, emt_seed=0)
    assert same_validation_data({"emt_structures": 40, "emt_seed": 0, "train": [], "val": []}, ours)  # an older config.yaml
    assert same_validation_data({"emt_structures": 40, "emt_seed": 0, "emt_val_fraction": 0.1}, ours)
    assert not same_validation_data({"emt_structures": 40, "emt_seed": 0, "emt_val_fraction": 0.2}, ours)
    assert not same_validation_data({"emt_structures": 40, "emt_seed": 1}, ours)


@pytest.mark.slow
def test_deepspeed_trains_in_one_process(tmp_path):
    """No launcher sets LOCAL_RANK; `esen-train fit` sets what DeepSpeed needs for a world of one."""
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "esen_train.cli", "fit", str(TINY), f"run_dir={run_dir}", "strategy.name=deepspeed",
               "data.emt_structures=20", *QUICK]
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=500)
    assert finished.returncode == 0, finished.stderr[-3000:]
    payload = read_model_file(run_dir / "checkpoints" / "direct" / "last" / "model.pt")
    assert payload["step"] == 2
    assert all(np.isfinite(v.numpy()).all() for v in payload["model"].values() if v.is_floating_point())
