"""Metrics go to RUN/metrics.jsonl (always) and to wandb (online, offline or disabled).

Only rank 0 logs. The wandb run id is kept in RUN/wandb_run_id, so a resumed or requeued
job continues the same wandb run instead of starting a new one. An online run that cannot
reach its server within `init_timeout_s` (compute nodes without internet) falls back to an
offline run with one warning: tracking never stops training.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import uuid
import warnings
from pathlib import Path

import wandb

from esen_train.engine.config import WandbConfig


def resolve_wandb_mode(requested: str) -> str:
    """Online only when asked, or when unset and an API key is configured."""
    if requested:
        return requested
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file() and "api.wandb.ai" in (
        Path.home() / ".netrc"
    ).read_text()
    return "online" if has_key else "offline"


class RunLogger:
    def __init__(self, run_dir: Path, settings: WandbConfig, config: dict, enabled: bool) -> None:
        self.enabled = enabled
        self.metrics_path = run_dir / "metrics.jsonl"
        self.run = None
        if not enabled:
            return
        mode = resolve_wandb_mode(settings.mode)
        if mode == "disabled":
            return
        id_file = run_dir / "wandb_run_id"
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:12])
        arguments = dict(
            project=settings.project,
            entity=settings.entity or None,
            name=settings.name or run_dir.name,
            tags=list(settings.tags),
            id=id_file.read_text().strip(),
            resume="allow",
            dir=str(run_dir),
            config=config,
        )
        if mode == "online":
            self.run = _init_online_or_offline(arguments, settings.init_timeout_s, run_dir / "wandb")
        else:
            self.run = wandb.init(mode=mode, settings=wandb.Settings(quiet=True), **arguments)

    def log(self, record: dict) -> None:
        """One row: `step`, `stage`, `split` and metrics."""
        if not self.enabled:
            return
        clean = {key: _finite_or_none(value) for key, value in record.items()}
        with self.metrics_path.open("a") as stream:
            stream.write(json.dumps(clean) + "\n")
        if self.run is not None:
            prefix = f"{record['stage']}/{record['split']}"
            numbers = {f"{prefix}/{k}": v for k, v in clean.items() if isinstance(v, (int, float)) and k != "step"}
            try:
                self.run.log({**numbers, "global_step": record["global_step"]})
            except Exception as error:  # wandb's own process is gone (SLURM signals every process of a job)
                self._stop_wandb(error)

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
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as error:
                self._stop_wandb(error)
            self.run = None

    def _stop_wandb(self, error: Exception) -> None:
        """Tracking never stops training: go on without wandb; metrics.jsonl keeps every row."""
        warnings.warn(
            f"wandb stopped working ({type(error).__name__}: {error}); metrics go on to {self.metrics_path} only",
            stacklevel=3,
        )
        self.run = None
        try:
            wandb.teardown()  # forget the dead service, so a later run in this process starts a new one
        except Exception:  # it is gone: there is nothing left to tear down
            pass


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
        stacklevel=3,
    )
    return wandb.init(mode="offline", settings=wandb.Settings(quiet=True), **arguments)


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
