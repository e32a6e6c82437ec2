"""Config loading: defaults, overrides, and errors that name the bad key before anything starts;
`esen-train config` and the keys listed by `esen-train fit --help`."""
import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from esen_train.cli.train import main
from esen_train.engine.config import (
    ConfigError, DataConfig, LoggingConfig, StageConfig, StrategyConfig, TrainConfig, WandbConfig, load_train_config,
)
from esen_train.model.config import ModelConfig, load_model_config

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


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


def test_a_yaml_syntax_error_names_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("direct:\n  max_steps: 10\n   lr: 3\n")  # lr indented one space too far
    with pytest.raises(ConfigError, match=f"{bad}: not valid YAML at line 3, column 6: mapping values are not allowed"):
        load_train_config(bad)
    assert main(["config", str(bad)]) == 2
    assert f"esen-train config: error: {bad}: not valid YAML at line 3" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("strategy.name=horovod", "strategy.name"),
        ("strategy.zero_stage=3", "ZeRO-3"),
        ("stages=[direct,fancy]", "stages"),
        ("direct.precision=fp8", "direct.precision"),
        ("model=huge", "no model preset 'huge'"),
        ("direct.patience=-1", "direct.patience"),
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


def test_single_strategy_named_with_several_processes_is_refused_before_they_start(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["fit", str(TINY), "strategy.name=single", f"run_dir={run_dir}", "--nproc", "2"])
    assert code == 2
    assert "strategy.name=single runs one process, but --nproc asks for 2" in capsys.readouterr().err
    assert not run_dir.exists()


def test_config_command_prints_the_resolved_config(capsys):
    assert main(["config", "tiny", "direct.lr=1e-3", "run_dir=runs/x"]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    expected = OmegaConf.structured(load_train_config(TINY, ["direct.lr=1e-3", "run_dir=runs/x"]))
    assert printed == expected
    assert printed.direct.lr == 1e-3 and printed.conservative.patience == 0  # an override, and a default filled in
    assert dict(printed.model) == dataclasses.asdict(load_model_config("tiny"))  # the preset expanded


def test_config_command_names_a_bad_key(capsys):
    assert main(["config", "tiny", "direct.max_stpes=3"]) == 2
    assert "direct.max_stpes" in capsys.readouterr().err


def test_fit_help_lists_every_config_key_with_type_and_default(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--help"])
    assert stopped.value.code == 0
    text = capsys.readouterr().out
    sections = {"": TrainConfig, "model.": ModelConfig, "data.": DataConfig, "strategy.": StrategyConfig,
                "<stage>.": StageConfig, "logging.": LoggingConfig, "logging.wandb.": WandbConfig}
    listed = {line.split()[0] for line in text.splitlines() if line.startswith("  ") and line.split()}
    for prefix, schema in sections.items():
        for field in dataclasses.fields(schema):
            if not field.type.endswith("Config"):  # sections are checked through their keys
                assert prefix + field.name in listed, prefix + field.name
    patience = next(line for line in text.splitlines() if line.split()[:1] == ["<stage>.patience"])
    assert patience.split()[1:4] == ["int", "0", "stop"]  # type, default, then the comment from the source
    assert next(line for line in text.splitlines() if line.split()[:1] == ["<stage>.lr"]).split()[1:] == ["float", "0.0004"]
    assert "each of: direct, conservative" in text
