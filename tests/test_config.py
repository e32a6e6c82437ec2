"""Config loading: defaults, overrides, and errors that name the bad key before anything starts."""
from pathlib import Path

import pytest

from esen_train.cli import main
from esen_train.engine.config import ConfigError, TrainConfig, load_train_config

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_tiny_config_loads_with_model_preset_and_overrides():
    config = load_train_config(TINY, ["direct.max_steps=7", "model.num_layers=1", "run_dir=/tmp/x"])
    assert isinstance(config, TrainConfig)
    assert config.direct.max_steps == 7
    assert config.model.num_layers == 1
    assert config.run_dir == "/tmp/x"
    assert config.stages == ["direct", "conservative"]


def test_default_run_dir_is_under_runs():
    config = load_train_config(TINY)
    assert Path(config.run_dir).parts[0] == "runs"
    assert "tiny" in config.run_dir


@pytest.mark.parametrize(
    "override, named",
    [
        ("direct.max_stpes=3", "direct.max_stpes"),
        ("optimiser.lr=1", "optimiser"),
        ("model.num_layerz=3", "model.num_layerz"),
        ("direct.max_steps=many", "direct.max_steps"),
    ],
)
def test_unknown_or_mistyped_key_is_rejected_by_name(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_train_config(TINY, [override])


def test_unknown_key_in_file_is_rejected_by_name(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text() + "\nconservativ:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match="conservativ"):
        load_train_config(bad)


@pytest.mark.parametrize(
    "override, message",
    [
        ("strategy.name=horovod", "strategy.name"),
        ("strategy.zero_stage=3", "ZeRO-3"),
        ("stages=[direct,fancy]", "stages"),
        ("direct.precision=fp8", "direct.precision"),
        ("model=huge", "no model preset 'huge'"),
        ("conservative.max_minutes=-1", "conservative.max_minutes"),
        ("direct.clock=sundial", "direct.clock"),
    ],
)
def test_bad_values_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(TINY, [override])


def test_fit_cli_reports_config_error_and_starts_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["fit", str(TINY), "direct.max_stpes=3", f"run_dir={run_dir}"])
    assert code == 2
    assert "direct.max_stpes" in capsys.readouterr().err
    assert not run_dir.exists()


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_train_config("no/such/file.yaml")


def test_overrides_may_follow_options(tmp_path, capsys):
    code = main(["fit", str(TINY), "--nproc", "2", "direct.max_stpes=3", f"run_dir={tmp_path / 'run'}"])
    assert code == 2
    assert "direct.max_stpes" in capsys.readouterr().err
