"""Metrics go to RUN/metrics.jsonl (always) and to wandb (online, offline or disabled).

Only rank 0 logs. The wandb run id is kept in RUN/wandb_run_id, so a resumed or requeued job
continues the same wandb run instead of starting a new one, and `esen-train eval|md --wandb`
add their results to it (`log_to_existing_run`). An online run that cannot reach its server
within `init_timeout_s` (compute nodes without internet) falls back to an offline run with one
warning, and a wandb call that fails stops wandb, not the training: tracking never stops training.

What the wandb run holds:
- every chart against `global_step` (`define_metric`): the step counted over the stages in
  order, which a resumed or requeued job continues; one section per stage
  (`direct/train/loss`, `conservative/val/force_mae_mev_per_A`, ...);
- `<stage>/val/parity`, a parity plot at each validation; at the end of the fit
  `fit/learning_curves` and `fit/best_errors` (each stage's best validation errors);
- in the summary, each stage's best validation metrics as `<stage>/best/<metric>`, with
  `<stage>/best/step` and `<stage>/best/global_step`, and the text of the rows, such as why a
  stage ended (`<stage>/end/reason`);
- in the config, the resolved training config plus `model_parameters`, `datasets` (each
  dataset's manifest: counts, elements, properties, provenance, shard checksums), `code`
  (version, git commit) and `cluster` (SLURM job, nodes, world size);
- `group` (a sweep or job array) and `job_type` (the stages trained);
- with `logging.wandb.log_checkpoints` best or all, the model.pt of the best (or every)
  checkpoint as a version of the artifact `model-<run id>-<stage>`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
import uuid
import warnings
from dataclasses import asdict
from pathlib import Path

import wandb
from ase.data import chemical_symbols
from omegaconf import OmegaConf

import esen_train
from esen_train.config_loading import omegaconf_errors
from esen_train.data.manifest import Manifest
from esen_train.engine.config import TrainConfig, WandbConfig
from esen_train.model.model_file import MODEL_FILE
from esen_train.plots import plot_parity

GLOBAL_STEP = "global_step"
ID_FILE = "wandb_run_id"
# The columns of `fit/best_errors`, from each stage's best checkpoint's metrics.json.
BEST_TABLE_METRICS = ("energy_mae_mev_per_atom", "force_mae_mev_per_A", "force_cosine", "stress_mae_mev_per_A3")


def resolve_wandb_mode(requested: str) -> str:
    """Online only when asked, or when unset and an API key is configured."""
    if requested:
        return requested
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file() and "api.wandb.ai" in (
        Path.home() / ".netrc"
    ).read_text()
    return "online" if has_key else "offline"


def global_step(config: TrainConfig, stage: str, step: int) -> int:
    """`step` of `stage` counted over the stages in order: a stage's steps follow the
    max_steps of the stages before it."""
    before = config.stages[: config.stages.index(stage)] if stage in config.stages else []
    return sum(getattr(config, earlier).max_steps for earlier in before) + step


def open_wandb_run(run_dir: Path, config: TrainConfig, with_config: bool):
    """Start or resume the wandb run of `run_dir` (its id in RUN/wandb_run_id), with every chart
    against `global_step`; None when wandb is disabled."""
    settings = config.logging.wandb
    mode = resolve_wandb_mode(settings.mode)
    if mode == "disabled":
        return None
    id_file = run_dir / ID_FILE
    if not id_file.exists():
        id_file.write_text(uuid.uuid4().hex[:12])
    arguments = dict(
        project=settings.project,
        entity=settings.entity or None,
        name=settings.name or run_dir.name,
        tags=list(settings.tags),
        group=run_group(settings),
        job_type=settings.job_type or "+".join(config.stages),
        id=id_file.read_text().strip(),
        resume="allow",
        dir=str(run_dir),
        config=asdict(config) if with_config else None,
    )
    if mode == "online":
        run = _init_online_or_offline(arguments, settings.init_timeout_s, run_dir / "wandb")
    else:
        run = wandb.init(mode=mode, settings=wandb.Settings(quiet=True), **arguments)
    run.define_metric(GLOBAL_STEP)
    run.define_metric("*", step_metric=GLOBAL_STEP)
    return run


def _init_online_or_offline(arguments: dict, timeout_s: float, wandb_dir: Path):
    """An online run, or an offline one when wandb cannot start it (the server cannot be
    reached within `timeout_s`, or answers with an error). The failed attempt's directory is
    removed, so RUN/wandb holds one directory per start of the job."""
    before = set(wandb_dir.glob("run-*")) if wandb_dir.is_dir() else set()
    try:
        return wandb.init(mode="online", settings=wandb.Settings(quiet=True, init_timeout=timeout_s), **arguments)
    except wandb.errors.Error as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    wandb.teardown()  # the failed run still holds its id in wandb's service process
    for failed in set(wandb_dir.glob("run-*")) - before:
        shutil.rmtree(failed, ignore_errors=True)
    warnings.warn(
        f"wandb could not start an online run ({reason}); logging offline to {wandb_dir}/offline-run-*. "
        "Upload it later with `wandb sync`, or set logging.wandb.mode=offline to skip the attempt",
        stacklevel=4,
    )
    return wandb.init(mode="offline", settings=wandb.Settings(quiet=True), **arguments)


def run_group(settings: WandbConfig) -> str | None:
    """The configured group, else one per SLURM job array."""
    if settings.group:
        return settings.group
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"array-{array_job}" if array_job else None


class RunLogger:
    def __init__(self, run_dir: Path, config: TrainConfig, world_size: int, enabled: bool) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.config = config
        self.metrics_path = run_dir / "metrics.jsonl"
        self.run = open_wandb_run(run_dir, config, with_config=True) if enabled else None
        self._update_config({"code": code_version(), "cluster": cluster_description(world_size)})

    def log(self, record: dict) -> None:
        """One row: `step`, `stage`, `split` and metrics."""
        if not self.enabled:
            return
        clean = {key: _finite_or_none(value) for key, value in record.items()}
        with self.metrics_path.open("a") as stream:
            stream.write(json.dumps(clean) + "\n")
        if self.run is not None:
            prefix = f"{record['stage']}/{record['split']}"
            numbers = {f"{prefix}/{k}": v for k, v in clean.items()
                       if isinstance(v, (int, float)) and k not in ("step", GLOBAL_STEP)}
            self._call(lambda run: run.log({**numbers, GLOBAL_STEP: record[GLOBAL_STEP]}))
            # Text (why a stage ended, the checkpoint a stage loaded) is no chart: it goes to the summary.
            text = {f"{prefix}/{k}": v for k, v in clean.items() if isinstance(v, str) and k not in ("stage", "split")}
            if text:
                self._call(lambda run: run.summary.update(text))

    def log_datasets(self, train_dirs: list[str], val_dirs: list[str]) -> None:
        """The manifests of the training and validation datasets, into the config."""
        if self.run is not None:
            self._update_config({"datasets": {"train": [describe_dataset(d) for d in train_dirs],
                                              "val": [describe_dataset(d) for d in val_dirs]}})

    def log_model(self, model) -> None:
        """Parameter counts into the config: the model inference uses, and the direct heads
        (the direct stage only; the conservative stage drops them)."""
        if self.run is None:
            return
        counts = {"model_parameters": sum(p.numel() for name, p in model.named_parameters()
                                          if not name.startswith("direct_heads."))}
        if model.direct_heads is not None:
            counts["direct_head_parameters"] = sum(p.numel() for p in model.direct_heads.parameters())
        self._update_config(counts)

    def log_parity(self, stage: str, step: int, panels: list[tuple]) -> None:
        """A parity plot of a validation as `<stage>/val/parity`."""
        if self.run is None or not panels:
            return
        with tempfile.TemporaryDirectory() as scratch:
            plot = plot_parity(panels, Path(scratch) / "parity.png", title=f"{stage} validation, step {step}")
            row = {f"{stage}/val/parity": wandb.Image(str(plot)), GLOBAL_STEP: global_step(self.config, stage, step)}
            self._call(lambda run: run.log(row))

    def log_checkpoint(self, stage: str, step: int, directory: Path, metrics: dict, is_best: bool) -> None:
        """A new best checkpoint's metrics into the summary; its model.pt as an artifact
        version when `log_checkpoints` asks for it."""
        if self.run is None:
            return
        if is_best:
            best = {f"{stage}/best/{k}": v for k, v in metrics.items() if _is_number(v)}
            best.update({f"{stage}/best/step": step, f"{stage}/best/global_step": global_step(self.config, stage, step)})
            self._call(lambda run: run.summary.update(best))
        wanted = self.config.logging.wandb.log_checkpoints
        if wanted == "all" or (wanted == "best" and is_best):
            self._call(lambda run: self._log_model_artifact(run, stage, step, directory, metrics, is_best))

    def _log_model_artifact(self, run, stage: str, step: int, directory: Path, metrics: dict, is_best: bool) -> None:
        # The artifact points at a hard link of model.pt under RUN/wandb/artifacts: the step
        # directory may be pruned before an offline run is synced, and the link costs no copy.
        kept = self.run_dir / "wandb" / "artifacts" / stage / directory.name / MODEL_FILE
        if not kept.exists():
            kept.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(directory / MODEL_FILE, kept)
            except OSError:  # a file system without hard links
                shutil.copyfile(directory / MODEL_FILE, kept)
        artifact = wandb.Artifact(f"model-{run.id}-{stage}", type="model",
                                  metadata={"stage": stage, "step": step, "metrics": metrics})
        artifact.add_file(str(kept), name=MODEL_FILE, policy="immutable")
        run.log_artifact(artifact, aliases=[f"step_{step}"] + (["best"] if is_best else []))

    def log_final(self, learning_curves_png: Path) -> None:
        """The end of the fit: learning curves and each stage's best validation errors."""
        if self.run is None:
            return
        last_stage = self.config.stages[-1]
        end = global_step(self.config, last_stage, getattr(self.config, last_stage).max_steps)
        self._call(lambda run: run.log({"fit/learning_curves": wandb.Image(str(learning_curves_png)),
                                        "fit/best_errors": self._best_errors_table(), GLOBAL_STEP: end}))

    def _best_errors_table(self) -> wandb.Table:
        rows = []
        for stage in self.config.stages:
            metrics_file = self.run_dir / "checkpoints" / stage / "best" / "metrics.json"
            if metrics_file.is_file():
                metrics = json.loads(metrics_file.read_text())
                rows.append([stage, metrics["step"], *(metrics.get(name) for name in BEST_TABLE_METRICS)])
        return wandb.Table(columns=["stage", "step", *BEST_TABLE_METRICS], data=rows)

    def _update_config(self, values: dict) -> None:
        self._call(lambda run: run.config.update(values, allow_val_change=True))

    def _call(self, action) -> None:
        """`action(run)` when wandb runs. A failure (wandb's own process gone: SLURM signals every
        process of a job it requeues) stops wandb for the rest of the run, never the training."""
        if self.run is None:
            return
        try:
            action(self.run)
        except Exception as error:
            self._stop_wandb(error)

    def _stop_wandb(self, error: Exception) -> None:
        """Go on without wandb; metrics.jsonl keeps every row."""
        warnings.warn(
            f"wandb stopped working ({type(error).__name__}: {error}); metrics go on to {self.metrics_path} only",
            stacklevel=4,
        )
        self.run = None
        try:
            wandb.teardown()  # forget the dead service, so a later run in this process starts a new one
        except Exception:  # it is gone: there is nothing left to tear down
            pass

    def forget_after(self, stage: str, step: int) -> None:
        """Drop rows of `stage` logged after `step` (all of them for step -1), and its `end`
        row: the stage repeats those steps and ends again. A torn last line goes too."""
        if not self.enabled or not self.metrics_path.exists():
            return
        kept = [row for row in read_metrics(self.metrics_path.parent)
                if row["stage"] != stage or (row["step"] <= step and row["split"] != "end")]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        tmp.replace(self.metrics_path)

    def close(self) -> None:
        self._call(finish_wandb_run)
        self.run = None


def log_to_existing_run(run_dir: Path, stage: str, step: int, images: dict[str, Path],
                        tables: dict[str, tuple[list, list]], summary: dict) -> bool:
    """Add results computed after training (evaluation, NVE test) to the wandb run of
    `run_dir`, at the global step of the checkpoint (`stage`, `step`) they come from. Keys
    are put under `<stage>/`. Returns False when the run has no wandb run (wandb disabled)."""
    config_file = run_dir / "config.yaml"
    if not (run_dir / ID_FILE).is_file() or not config_file.is_file():
        return False
    with omegaconf_errors(str(config_file)):
        config: TrainConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(config_file)))
    run = open_wandb_run(run_dir, config, with_config=False)
    if run is None:
        return False
    try:
        row = {f"{stage}/{key}": wandb.Image(str(path)) for key, path in images.items()}
        row.update({f"{stage}/{key}": wandb.Table(columns=columns, data=rows) for key, (columns, rows) in tables.items()})
        run.log({**row, GLOBAL_STEP: global_step(config, stage, step)})
        run.summary.update({f"{stage}/{key}": value for key, value in summary.items() if _is_number(value)})
    finally:
        finish_wandb_run(run)
    return True


def finish_wandb_run(run) -> None:
    """Finish the run and wait until wandb's service process has written and closed its files:
    `finish()` alone returns before that, and a run resumed or synced right after would find
    them incomplete."""
    run.finish()
    wandb.teardown()


def describe_dataset(directory: str) -> dict:
    """What a run's wandb config says of one dataset directory: its manifest in short."""
    manifest = Manifest.load(directory, check_shards=False)
    return {
        "path": str(Path(directory).resolve()),
        "num_structures": manifest.num_structures,
        "num_atoms": manifest.num_atoms,
        "elements": [chemical_symbols[z] for z in manifest.elements],
        "properties": manifest.properties,
        "skipped": manifest.skipped,
        "provenance": manifest.provenance,
        "shard_checksums": {shard.name: shard.checksum for shard in manifest.shards},
    }


def code_version() -> dict:
    """esen-train's version, and the git commit when the package is imported from a checkout."""
    return {"version": esen_train.__version__, "git_commit": _git_commit(Path(esen_train.__file__).resolve().parent)}


def _git_commit(package_dir: Path) -> str | None:
    try:
        answer = subprocess.run(["git", "-C", str(package_dir), "rev-parse", "--show-toplevel", "HEAD"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = answer.stdout.split()
    # Only the checkout the package belongs to: an installed copy may sit inside another repository.
    if answer.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != package_dir.parent:
        return None
    return lines[1]


def cluster_description(world_size: int) -> dict:
    """Where the job runs: SLURM's job, array and node list where SLURM started it."""
    environ = os.environ
    local_world = int(environ.get("LOCAL_WORLD_SIZE", world_size))
    slurm = {
        "slurm_job_id": environ.get("SLURM_JOB_ID"),
        "slurm_array_job_id": environ.get("SLURM_ARRAY_JOB_ID"),
        "slurm_array_task_id": environ.get("SLURM_ARRAY_TASK_ID"),
        "slurm_nodelist": environ.get("SLURM_JOB_NODELIST"),
        "slurm_restart_count": int(environ.get("SLURM_RESTART_COUNT", 0)),
    }
    nodes = int(environ.get("SLURM_JOB_NUM_NODES") or max(world_size // max(local_world, 1), 1))
    return {"world_size": world_size, "nodes": nodes, **{k: v for k, v in slurm.items() if v is not None}}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of RUN/metrics.jsonl. A last line that is not JSON was torn by a write that
    did not finish (a crash, a full disk): it is dropped with a warning. A bad line anywhere
    else is an error naming the file and line."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number < len(lines):
                raise ValueError(f"{path}: line {number} is not JSON ({error.msg})") from None
            warnings.warn(f"{path}: dropped the torn last line {line[:80]!r} (a write that did not finish)", stacklevel=2)
    return rows
