"""Metrics go to RUN/metrics.jsonl (always) and to wandb (online, offline or disabled).

Only rank 0 logs. The wandb run id is kept in RUN/wandb_run_id, so a resumed or requeued
job continues the same wandb run instead of starting a new one.
"""
from __future__ import annotations

import json
import math
import os
import uuid
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
        self.run = wandb.init(
            project=settings.project,
            entity=settings.entity or None,
            name=settings.name or run_dir.name,
            tags=list(settings.tags),
            id=id_file.read_text().strip(),
            resume="allow",
            dir=str(run_dir),
            mode=mode,
            config=config,
            settings=wandb.Settings(quiet=True),
        )

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
            self.run.log({**numbers, "global_step": record["global_step"]})

    def forget_after(self, stage: str, step: int) -> None:
        """Drop rows of `stage` logged after `step`, and its `end` row: a resumed run repeats
        those steps and ends the stage again."""
        if not self.enabled or not self.metrics_path.exists():
            return
        kept = [row for row in read_metrics(self.metrics_path.parent)
                if row["stage"] != stage or (row["step"] <= step and row["split"] != "end")]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        tmp.replace(self.metrics_path)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
