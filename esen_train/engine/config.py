"""The training configuration: typed dataclasses with defaults, read from omegaconf YAML.

`load_train_config(path, overrides)` merges a YAML file and `key=value` overrides into the
`TrainConfig` schema; omegaconf rejects an unknown or mistyped key, and we re-raise that
with the key's full name so the user sees what to fix before anything starts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from esen_train import shipped_config
from esen_train.model.config import ModelConfig, load_model_config


class ConfigError(ValueError):
    """A configuration file or override that cannot be used."""


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # dataset directories (esen-data format)
    val: list[str] = field(default_factory=list)
    # When > 0 and `train` is empty: generate this many built-in EMT structures into
    # RUN/data (90% train, 10% val) before training, so a config runs with no download.
    emt_structures: int = 0
    emt_seed: int = 0
    num_workers: int = 0


@dataclass
class StageConfig:
    max_steps: int = 100
    # > 0: the stage also stops once it has trained this many minutes of wall clock (its
    # validation and checkpoints included), and the cosine schedule runs on the fraction of
    # that time used, so a stage stopped by the clock has decayed its learning rate. The stage
    # ends at max_steps or max_minutes, whichever comes first.
    max_minutes: float = 0.0
    # What max_minutes counts: `wall` clock, or `cpu`, this process's CPU time (user +
    # system; data-loader workers not included), which stays a fair budget on a machine that
    # other work slows down.
    clock: str = "wall"
    max_atoms: int = 256  # atoms per optimizer step, summed over all ranks
    grad_accum_steps: int = 1
    lr: float = 4e-4
    min_lr_ratio: float = 0.01
    warmup_steps: int = 10
    weight_decay: float = 1e-3
    clip_grad_norm: float = 100.0
    ema_decay: float = 0.999
    energy_weight: float = 20.0  # per-atom energy MAE
    force_weight: float = 10.0  # per-atom force L2 norm
    stress_weight: float = 1.0  # stress MAE, structures with stress labels only
    precision: str = "fp32"  # fp32 | bf16 (bf16 autocast is applied on GPU only)
    # torch.compile the model's per-batch computations (model.compile_model); the first
    # steps then pay the compile time. Works with the single and ddp strategies.
    compile: bool = False
    log_every: int = 10
    val_every: int = 50
    checkpoint_every: int = 50
    keep_last: int = 2  # step_<n> checkpoints kept besides `last` and `best`
    best_metric: str = "force_mae_mev_per_A"
    max_nonfinite_in_row: int = 5
    # Weights to start from: a checkpoint or run directory, or `none` for fresh weights (a
    # conservative model trained from scratch). Empty: a fresh model for the direct stage;
    # for the conservative stage, this run's direct `best` checkpoint.
    init_from: str = ""


@dataclass
class StrategyConfig:
    name: str = "single"  # single | ddp | fsdp | deepspeed
    zero_stage: int = 2  # deepspeed only: 1 or 2


@dataclass
class WandbConfig:
    mode: str = ""  # online | offline | disabled; empty: online with an API key, else offline
    project: str = "esen-train"
    entity: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TrainConfig:
    run_dir: str = ""  # empty: runs/<config name>-<timestamp>
    seed: int = 0
    model: ModelConfig = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    stages: list[str] = field(default_factory=lambda: ["direct", "conservative"])
    direct: StageConfig = field(default_factory=StageConfig)
    conservative: StageConfig = field(default_factory=StageConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


STAGES = ("direct", "conservative")
STRATEGIES = ("single", "ddp", "fsdp", "deepspeed")
CLOCKS = ("wall", "cpu")


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read CONFIG (a YAML path, or the name of a shipped config such as `tiny`) and
    `key=value` overrides into a validated `TrainConfig`."""
    path = shipped_config(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    schema = OmegaConf.structured(TrainConfig)
    try:
        from_file = OmegaConf.load(path)
        _expand_model_preset(from_file, f"{path}: model")
        from_cli = OmegaConf.from_dotlist(list(overrides))
        _expand_model_preset(from_cli, "command line: model")
        merged = OmegaConf.merge(schema, from_file, from_cli)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{path}: {_describe(error)}") from None
    if not merged.run_dir:
        merged.run_dir = str(Path("runs") / f"{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    config: TrainConfig = OmegaConf.to_object(merged)
    _check_values(config, path)
    return config


def _expand_model_preset(raw: DictConfig, where: str) -> None:
    """`model: tiny` names a preset in configs/model/; replace it with its fields."""
    preset = raw.get("model") if isinstance(raw, DictConfig) else None
    if isinstance(preset, str):
        try:
            raw.model = OmegaConf.structured(load_model_config(preset))
        except FileNotFoundError as error:
            raise ConfigError(f"{where}: no model preset {preset!r} ({error})") from None


def _describe(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None)
    message = str(error).splitlines()[0]
    return f"key '{key}': {message}" if key else message


def _check_values(config: TrainConfig, path: Path) -> None:
    if config.strategy.name not in STRATEGIES:
        raise ConfigError(f"{path}: strategy.name must be one of {STRATEGIES}, got {config.strategy.name!r}")
    if config.strategy.zero_stage not in (1, 2):
        raise ConfigError(f"{path}: strategy.zero_stage must be 1 or 2 (ZeRO-3 breaks double backward)")
    for stage in config.stages:
        if stage not in STAGES:
            raise ConfigError(f"{path}: stages must be a list drawn from {STAGES}, got {stage!r}")
    for stage in STAGES:
        settings: StageConfig = getattr(config, stage)
        if settings.precision not in ("fp32", "bf16"):
            raise ConfigError(f"{path}: {stage}.precision must be fp32 or bf16, got {settings.precision!r}")
        if settings.compile and config.strategy.name not in ("single", "ddp"):
            raise ConfigError(
                f"{path}: {stage}.compile is supported with the single and ddp strategies, "
                f"not {config.strategy.name!r}"
            )
        if settings.max_steps < 1 or settings.max_atoms < 1 or settings.grad_accum_steps < 1:
            raise ConfigError(f"{path}: {stage}.max_steps, max_atoms and grad_accum_steps must be positive")
        if settings.clock not in CLOCKS:
            raise ConfigError(f"{path}: {stage}.clock must be one of {CLOCKS}, got {settings.clock!r}")
        if settings.max_minutes < 0:
            raise ConfigError(f"{path}: {stage}.max_minutes must be >= 0 (0: no time limit), got {settings.max_minutes}")
    if config.logging.wandb.mode not in ("", "online", "offline", "disabled"):
        raise ConfigError(f"{path}: logging.wandb.mode must be online, offline or disabled")
    if not config.data.train and config.data.emt_structures <= 0:
        raise ConfigError(f"{path}: give data.train (dataset directories) or data.emt_structures > 0")


def save_config(config: TrainConfig, path: Path) -> None:
    """Write the fully resolved config (atomically) so a run can be reproduced."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
    tmp.replace(path)
