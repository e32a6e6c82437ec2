"""The training configuration: typed dataclasses with defaults, read from omegaconf YAML.

`load_train_config(path, overrides)` merges a YAML file and `key=value` overrides into the
`TrainConfig` schema; omegaconf rejects an unknown or mistyped key, and
`config_loading.omegaconf_errors` re-raises that with the key's full name so the user sees
what to fix before anything starts. Each config class checks its own values in its
`check(where)` method; `TrainConfig.check` runs them all (and the checks that span classes).
`check_against_data` and `check_resume` need the dataset directories and the run
directory; `fit` runs them before it creates anything.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ase.data import atomic_numbers, chemical_symbols
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from esen_train import shipped_config
from esen_train.config_loading import ConfigError, omegaconf_errors
from esen_train.data import emt
from esen_train.data.manifest import DatasetError, Manifest, checked_natoms
from esen_train.model.config import ModelConfig, load_model_config
from esen_train.model.model_file import MODEL_FILE, CheckpointError, checkpoint_model_config, resolve_checkpoint


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # dataset directories (esen-data format)
    val: list[str] = field(default_factory=list)
    # When > 0 and `train` is empty: generate this many built-in EMT structures into
    # RUN/data (emt_val_fraction of them, at least 2, for validation; the rest for
    # training) before training, so a config runs with no download.
    emt_structures: int = 0
    emt_seed: int = 0
    # The share of the built-in EMT structures set aside for validation, in (0, 1).
    emt_val_fraction: float = 0.1
    num_workers: int = 0

    def check(self, where: str) -> None:
        if self.num_workers < 0 or self.emt_structures < 0 or self.emt_seed < 0:
            raise ConfigError(f"{where}: data.num_workers, data.emt_structures and data.emt_seed must be >= 0")
        if not 0 < self.emt_val_fraction < 1:
            raise ConfigError(f"{where}: data.emt_val_fraction must be in (0, 1), got {self.emt_val_fraction}")
        if not self.train and self.emt_structures <= 0:
            raise ConfigError(f"{where}: give data.train (dataset directories) or data.emt_structures > 0")


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
    # AdamW's moment decay rates (beta1, beta2), each in [0, 1).
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8  # AdamW's epsilon, added to the root of the second moment (> 0)
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
    # steps then pay the compile time, kept in RUN/compile_cache (or TORCHINDUCTOR_CACHE_DIR)
    # so that a resumed or requeued job does not pay it again. Single and ddp strategies.
    compile: bool = False
    log_every: int = 10
    val_every: int = 50
    checkpoint_every: int = 50
    keep_last: int = 2  # step_<n> checkpoints kept besides `last` and `best`
    best_metric: str = "force_mae_mev_per_A"  # the validation metric (lower is better) that picks `best`
    patience: int = 0  # stop the stage after this many validations in a row without a new best; 0: never
    max_nonfinite_in_row: int = 5
    # Weights to start from: a checkpoint or run directory (e.g. one `esen-train
    # import-fairchem` wrote), or `none` for fresh weights (a conservative model trained from
    # scratch). Empty: a fresh model for the direct stage; for the conservative stage, this
    # run's direct `best` checkpoint.
    init_from: str = ""
    # Starting from a checkpoint, the per-element reference energies: "keep" the checkpoint's;
    # "refit": the checkpoint's plus the per-element least-squares correction of what the
    # loaded model misses on this stage's training data (one pass, energies only); "given":
    # the checkpoint's, with the elements of `given_references` replaced.
    references: str = "keep"
    given_references: dict[str, float] = field(default_factory=dict)  # element symbol -> eV
    # Fine-tuning: freeze the embeddings (element, edge-element, edge-degree, charge/spin)
    # and the first `freeze_blocks` message-passing blocks; the backbone's learning rate is
    # lr * backbone_lr_scale (the energy and direct heads train at lr).
    freeze_embeddings: bool = False
    freeze_blocks: int = 0
    backbone_lr_scale: float = 1.0
    # A stage that starts from a checkpoint validates first and must reproduce the validation
    # energy MAE the checkpoint recorded, within this relative tolerance or handover_abs_tol,
    # else it stops with StageMismatch (weights lost in the hand-over). Both >= 0.
    handover_rel_tol: float = 1e-4
    handover_abs_tol: float = 1e-6  # meV/atom; see handover_rel_tol

    def check(self, where: str, stage: str) -> None:
        """The values of the stage named `stage` (direct or conservative) on their own."""
        for name, (allowed, description) in _STAGE_RANGES.items():
            value = getattr(self, name)
            if not (math.isfinite(value) and allowed(value)):
                raise ConfigError(f"{where}: {stage}.{name} must be {description}, got {value}")
        if len(self.adam_betas) != 2 or not all(0 <= beta < 1 for beta in self.adam_betas):
            raise ConfigError(f"{where}: {stage}.adam_betas must be two numbers in [0, 1), got {list(self.adam_betas)}")
        if self.energy_weight + self.force_weight + self.stress_weight == 0:
            raise ConfigError(f"{where}: {stage}: energy_weight, force_weight and stress_weight are all 0: nothing to train")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"{where}: {stage}.precision must be fp32 or bf16, got {self.precision!r}")
        if self.clock not in CLOCKS:
            raise ConfigError(f"{where}: {stage}.clock must be one of {CLOCKS}, got {self.clock!r}")
        if self.best_metric not in BEST_METRICS:
            raise ConfigError(f"{where}: {stage}.best_metric must be one of {', '.join(BEST_METRICS)}; got {self.best_metric!r}")
        if self.init_from not in ("", FRESH_WEIGHTS) and not Path(self.init_from).exists():
            raise ConfigError(f"{where}: {stage}.init_from: {self.init_from} does not exist")
        self._check_references(where, stage)

    def _check_references(self, where: str, stage: str) -> None:
        if self.references not in REFERENCE_CHOICES:
            raise ConfigError(f"{where}: {stage}.references must be one of {REFERENCE_CHOICES}, got {self.references!r}")
        starts_fresh = stage == "direct" and not self.init_from
        if self.references != "keep" and starts_fresh:
            raise ConfigError(f"{where}: {stage}.references={self.references} needs {stage}.init_from (a fresh model's "
                              "reference energies come from the training data)")
        if self.references == "given" and not self.given_references:
            raise ConfigError(f"{where}: {stage}.references=given needs {stage}.given_references, e.g. {{Cu: -3.5}}")
        if self.given_references and self.references != "given":
            raise ConfigError(f"{where}: {stage}.given_references is set but {stage}.references is {self.references!r}, not 'given'")


@dataclass
class StrategyConfig:
    name: str = "single"  # single | ddp | fsdp | deepspeed
    zero_stage: int = 2  # deepspeed only: 1 or 2
    # How long a rank waits for the others (joining, or in any collective) before the process
    # group gives up and the run fails; also the timeout of the one-process group DeepSpeed
    # needs when it runs alone. Seconds, > 0.
    process_group_timeout_s: float = 1800.0

    def check(self, where: str) -> None:
        # Imported here, not with this module: the strategies import torch's distributed
        # checkpointing (about 0.1 s), which reading the config's dataclasses does not need.
        from esen_train.engine.strategies import STRATEGIES

        if self.name not in STRATEGIES:
            raise ConfigError(f"{where}: strategy.name must be one of {tuple(STRATEGIES)}, got {self.name!r}")
        if self.zero_stage not in (1, 2):
            raise ConfigError(f"{where}: strategy.zero_stage must be 1 or 2 (ZeRO-3 breaks double backward)")
        if not (math.isfinite(self.process_group_timeout_s) and self.process_group_timeout_s > 0):
            raise ConfigError(f"{where}: strategy.process_group_timeout_s must be > 0, got {self.process_group_timeout_s}")


@dataclass
class WandbConfig:
    mode: str = ""  # online | offline | disabled; empty: online with an API key, else offline
    project: str = "esen-train"
    entity: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    # How long an online run may take to reach the server before logging goes offline.
    init_timeout_s: float = 20.0
    # Runs that belong together on the dashboard: esen-launch --sweep sets the sweep's name;
    # empty: a SLURM job array's id (`array-<id>`), else none.
    group: str = ""
    job_type: str = ""  # empty: the stages trained, e.g. "direct+conservative"
    log_checkpoints: str = "none"  # none | best | all: model.pt of those checkpoints as wandb artifacts

    def check(self, where: str) -> None:
        if self.mode not in ("", "online", "offline", "disabled"):
            raise ConfigError(f"{where}: logging.wandb.mode must be online, offline or disabled")
        if not math.isfinite(self.init_timeout_s) or self.init_timeout_s <= 0:
            raise ConfigError(f"{where}: logging.wandb.init_timeout_s must be > 0, got {self.init_timeout_s}")
        if self.log_checkpoints not in CHECKPOINT_LOGGING:
            raise ConfigError(f"{where}: logging.wandb.log_checkpoints must be one of {CHECKPOINT_LOGGING}, "
                              f"got {self.log_checkpoints!r}")


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True  # progress lines on rank 0's stdout; `esen-train fit --quiet` sets false


@dataclass
class TrainConfig:
    run_dir: str = ""  # empty: runs/<config name>-<timestamp>
    seed: int = 0
    model: ModelConfig = MISSING  # a preset name in configs/model/ (tiny, esen-sm, esen-30m) or every field
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    stages: list[str] = field(default_factory=lambda: ["direct", "conservative"])
    direct: StageConfig = field(default_factory=StageConfig)
    conservative: StageConfig = field(default_factory=StageConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Starting again in a run directory whose config.yaml names other data is refused unless
    # this is true (fine-tuning a run on new data in place); see `check_resume`.
    resume_with_other_data: bool = False
    # Keep freed host memory in the process instead of returning it to the kernel (glibc only;
    # see engine/host_memory.py): faster CPU steps for slightly more resident memory
    # (benchmarks/README.md, "Host memory").
    keep_freed_host_memory: bool = True

    def check(self, where: str | Path = "config") -> None:
        """Raise ConfigError naming the first key whose value is out of its range: each part's
        own `check`, then the values that depend on one another."""
        self.strategy.check(where)
        if not self.stages or len(set(self.stages)) != len(self.stages):
            raise ConfigError(f"{where}: stages must name each stage of {STAGES} at most once, got {self.stages}")
        for stage in self.stages:
            if stage not in STAGES:
                raise ConfigError(f"{where}: stages must be a list drawn from {STAGES}, got {stage!r}")
        for stage in STAGES:
            settings: StageConfig = getattr(self, stage)
            settings.check(where, stage)
            self._check_stage_against_model_and_strategy(stage, settings, where)
        if self.seed < 0:
            raise ConfigError(f"{where}: seed must be >= 0, got {self.seed}")
        self._check_conservative_start(where)
        self.logging.wandb.check(where)
        self.data.check(where)

    def _check_conservative_start(self, where) -> None:
        """An empty conservative.init_from means this run's best direct checkpoint: either the
        direct stage trains first, or an earlier start of the run left that checkpoint."""
        if "conservative" not in self.stages or self.conservative.init_from:
            return
        direct_best = Path(self.run_dir) / "checkpoints" / "direct" / "best"
        if "direct" in self.stages[: self.stages.index("conservative")] or direct_best.exists():
            return
        raise ConfigError(
            f"{where}: the conservative stage starts from this run's direct checkpoint, but stages={list(self.stages)} "
            f"does not train direct before it and {direct_best} does not exist: train direct first, set "
            f"conservative.init_from=CHECKPOINT, or conservative.init_from={FRESH_WEIGHTS} to train from fresh weights"
        )

    def _check_stage_against_model_and_strategy(self, stage: str, settings: StageConfig, where) -> None:
        if settings.compile and self.strategy.name not in ("single", "ddp"):
            raise ConfigError(f"{where}: {stage}.compile is supported with the single and ddp strategies, "
                              f"not {self.strategy.name!r}")
        for symbol in settings.given_references:
            if atomic_numbers.get(symbol, self.model.max_num_elements + 1) > self.model.max_num_elements:
                raise ConfigError(f"{where}: {stage}.given_references: {symbol!r} is not an element this model embeds "
                                  f"(Z 1..{self.model.max_num_elements})")
        if settings.freeze_blocks > self.model.num_layers:
            raise ConfigError(f"{where}: {stage}.freeze_blocks must be in 0..{self.model.num_layers} (model.num_layers), "
                              f"got {settings.freeze_blocks}")


STAGES = ("direct", "conservative")
FRESH_WEIGHTS = "none"  # init_from value: start from freshly initialised weights
REFERENCE_CHOICES = ("keep", "refit", "given")
# The validation metrics (ErrorAccumulator.result) that can pick the best checkpoint: lower is better.
BEST_METRICS = ("energy_mae_mev_per_atom", "force_mae_mev_per_A", "stress_mae_mev_per_A3")
# The data settings a resumed run must share with the run it resumes.
DATA_IDENTITY = ("train", "val", "emt_structures", "emt_seed", "emt_val_fraction")
CHECKPOINT_LOGGING = ("none", "best", "all")
CLOCKS = ("wall", "cpu")


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read CONFIG (a YAML path, or the name of a shipped config such as `tiny`) and
    `key=value` overrides into a validated `TrainConfig`."""
    path = shipped_config(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    schema = OmegaConf.structured(TrainConfig)
    with omegaconf_errors(str(path)):
        from_file = OmegaConf.load(path)
        _expand_model_preset(from_file, f"{path}: model")
        from_cli = OmegaConf.from_dotlist(list(overrides))
        _expand_model_preset(from_cli, "command line: model")
        merged = OmegaConf.merge(schema, from_file, from_cli)
    if not merged.run_dir:
        merged.run_dir = str(Path("runs") / f"{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        config: TrainConfig = OmegaConf.to_object(merged)
    except ConfigError as error:  # ModelConfig.check, run when the ModelConfig is made
        raise ConfigError(f"{path}: model: {error}") from None
    config.check(path)
    return config


def _expand_model_preset(raw: DictConfig, where: str) -> None:
    """`model: tiny` names a preset in configs/model/, `model: DIR` a checkpoint (or run)
    directory, e.g. an imported fairchem model: replace it with its fields."""
    preset = raw.get("model") if isinstance(raw, DictConfig) else None
    if not isinstance(preset, str):
        return
    if Path(preset).is_dir():
        raw.model = OmegaConf.structured(_checkpoint_model_config(preset, where))
        return
    try:
        raw.model = OmegaConf.structured(load_model_config(preset))
    except FileNotFoundError as error:
        raise ConfigError(f"{where}: no model preset {preset!r} ({error})") from None


def _checkpoint_model_config(path: str, where: str) -> ModelConfig:
    try:
        checkpoint = resolve_checkpoint(path)
        return checkpoint_model_config(checkpoint / MODEL_FILE)
    except CheckpointError as error:
        raise ConfigError(f"{where}: {error}") from None


def _at_least(low):
    return lambda value: value >= low, f">= {low}"


def _positive():
    return lambda value: value > 0, "> 0"


# The allowed range of each numeric StageConfig field: (test, what the message says).
_STAGE_RANGES = {
    "max_steps": _at_least(1),
    "max_atoms": _at_least(1),
    "grad_accum_steps": _at_least(1),
    "lr": _positive(),
    "min_lr_ratio": (lambda value: 0 <= value <= 1, "in [0, 1]"),
    "warmup_steps": _at_least(0),
    "weight_decay": _at_least(0),
    "clip_grad_norm": _positive(),
    "ema_decay": (lambda value: 0 <= value < 1, "in [0, 1) (1 would keep the initial weights forever)"),
    "energy_weight": _at_least(0),
    "force_weight": _at_least(0),
    "stress_weight": _at_least(0),
    "log_every": _at_least(1),
    "val_every": _at_least(1),
    "checkpoint_every": _at_least(1),
    "keep_last": _at_least(0),
    "max_nonfinite_in_row": _at_least(1),
    "patience": (lambda value: value >= 0, "0 (no early stopping) or positive"),
    "max_minutes": (lambda value: value >= 0, ">= 0 (0: no time limit)"),
    "freeze_blocks": _at_least(0),
    "backbone_lr_scale": _positive(),
    "adam_eps": _positive(),
    "handover_rel_tol": _at_least(0),
    "handover_abs_tol": _at_least(0),
}


def check_against_data(config: TrainConfig) -> list[str]:
    """The values that depend on the data: every dataset directory must be readable, each
    stage's max_atoms hold the largest structure, a stress metric have stress labels.
    Returns warnings: validation data with elements the training data lacks."""
    largest, where, has_stress = _largest_structure(config)
    for stage in config.stages:
        settings: StageConfig = getattr(config, stage)
        if settings.max_atoms < largest:
            raise ConfigError(
                f"{stage}.max_atoms={settings.max_atoms} is below the largest structure of the data ({largest} atoms, "
                f"in {where}): a batch could not hold it; set {stage}.max_atoms={largest} or more"
            )
        if settings.best_metric == "stress_mae_mev_per_A3" and not has_stress:
            raise ConfigError(f"{stage}.best_metric=stress_mae_mev_per_A3, but data.train has no stress labels")
    return _untrained_validation_elements(config)


def _untrained_validation_elements(config: TrainConfig) -> list[str]:
    """A warning per validation dataset with elements no training dataset has: this run teaches
    the model nothing about them (an embedding as initialised, a reference energy of 0), so
    the validation errors on them, and the best checkpoint chosen by those errors, say little."""
    if not config.data.train:  # the built-in EMT data: one generator makes both splits
        return []
    trained = {number for directory in config.data.train for number in Manifest.load(directory).elements}
    warnings = []
    for directory in config.data.val:
        untrained = [chemical_symbols[number] for number in Manifest.load(directory).elements if number not in trained]
        if untrained:
            warnings.append(f"data.val {directory} has {', '.join(untrained)}, which data.train lacks: validation "
                            "errors on them measure elements this run does not train")
    return warnings


def _largest_structure(config: TrainConfig) -> tuple[int, str, bool]:
    """(atoms of the largest structure, where it is, whether the training data has stress)."""
    if not config.data.train:
        return emt.MAX_ATOMS, "the built-in EMT data", True
    largest, where, has_stress = 0, "", False
    for key in ("train", "val"):
        for directory in getattr(config.data, key):
            try:
                manifest = Manifest.load(directory)
                natoms = int(checked_natoms(directory, manifest, mmap=True).max())
            except DatasetError as error:
                raise ConfigError(f"data.{key}: {error}") from None
            if natoms > largest:
                largest, where = natoms, directory
            has_stress |= key == "train" and "stress" in manifest.properties
    return largest, where, has_stress


def strategy_for_processes(strategy: str, overrides: list[str], processes: str) -> list[str]:
    """The overrides that run a config on several processes: a single-process strategy becomes
    ddp, unless the command line named it, which is refused (it would fail in every process,
    after they started). `processes` says how many, for the message ("--nproc asks for 2")."""
    if strategy != "single":
        return []
    if any(o.startswith("strategy.name=") for o in overrides):
        raise ConfigError(f"strategy.name=single runs one process, but {processes}: use strategy.name=ddp, fsdp "
                          "or deepspeed, or leave strategy.name out (then ddp)")
    return ["strategy.name=ddp"]


def check_resume(config: TrainConfig) -> None:
    """Starting again in a run directory that has a config.yaml resumes that run: refuse when
    its data differs, unless `resume_with_other_data` says that is meant."""
    saved = Path(config.run_dir) / "config.yaml"
    if not saved.is_file() or config.resume_with_other_data:
        return
    with omegaconf_errors(f"{saved}: cannot be read"):
        before = OmegaConf.load(saved).get("data", {})
    # A key the saved config lacks (written before the key existed) had its default value.
    saved_data = {key: _plain(before.get(key, getattr(DataConfig(), key))) for key in DATA_IDENTITY}
    differences = [
        f"data.{key} was {saved_data[key]}, now {_plain(getattr(config.data, key))}"
        for key in DATA_IDENTITY
        if saved_data[key] != _plain(getattr(config.data, key))
    ]
    if differences:
        raise ConfigError(
            f"{config.run_dir} holds a run trained on other data ({'; '.join(differences)}): resuming it would "
            "mix the two. Use another run_dir, or set resume_with_other_data=true to go on with the new data"
        )


def _plain(value):
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def save_config(config: TrainConfig, run_dir: Path) -> list[str]:
    """Write the fully resolved config to RUN/config.yaml (atomically) so a run can be
    reproduced. A start whose config differs from the one there keeps the older one as
    RUN/config.<n>.yaml (n = 1, 2, ... oldest first). Returns what changed, one line per key
    ("direct.lr: 0.003 -> 0.001 (the earlier config kept as config.1.yaml)"); empty for a new
    run or the same config."""
    path = run_dir / "config.yaml"
    structured = OmegaConf.structured(config)
    text = OmegaConf.to_yaml(structured)
    before = path.read_text() if path.is_file() else text
    if before == text:
        _write_atomically(path, text)
        return []
    number = 1
    while (run_dir / f"config.{number}.yaml").exists():
        number += 1
    kept = run_dir / f"config.{number}.yaml"
    _write_atomically(kept, before)
    changes = _changed_keys(_flat(OmegaConf.to_container(OmegaConf.create(before))),
                            _flat(OmegaConf.to_container(structured)))
    _write_atomically(path, text)
    return [f"{change} (the earlier config kept as {kept.name})" for change in changes]


def _flat(tree, prefix: str = "") -> dict:
    """{"direct": {"lr": 0.003}} -> {"direct.lr": 0.003}; lists are values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _changed_keys(before: dict, after: dict) -> list[str]:
    missing = "(absent)"
    return [f"{key}: {before.get(key, missing)} -> {after.get(key, missing)}"
            for key in sorted(before.keys() | after.keys()) if before.get(key, missing) != after.get(key, missing)]


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
