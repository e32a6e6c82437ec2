"""RUN/status.json: where a run is, for `esen-train status RUN` and for scripts.

Rank 0 rewrites the file whenever it logs, validates, checkpoints or ends a stage, and when the
run finishes or fails: written to a temporary file and renamed, so a reader never sees half of
it. A restarted or requeued run reads the file back and goes on, so stages that ended in an
earlier start keep their record.

    {"state": "running" | "finished" | "failed" | "preempted",
     "error": "TrainingDiverged: ..." (failed) or null,
     "stage": the stage running (or the last one),
     "run_dir", "started_at", "updated_at" (ISO 8601, UTC),
     "host", "pid", "slurm_job_id": the process writing it (to tell a killed run from a live one),
     "last_checkpoint": the newest checkpoint directory of any stage,
     "stages": {"<stage>": {"state": "waiting" | "running" | "ended", "end_reason": null | "max_steps" | "max_minutes" |
                            "early_stopping" | "preempted" | "failed", "step", "max_steps", "best_metric",
                            "train": last train row, "val": last validation row,
                            "best": {"metric", "value", "step", "checkpoint"}, "last_checkpoint",
                            "elapsed_s", "time_left_s"}, ...}}

`read_status(run_dir)` reads it back (adding `process_alive` where this machine can tell) and
`format_status(status)` says it in a few lines.
"""
from __future__ import annotations

import json
import math
import os
import socket
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from esen_train.engine.config import TrainConfig
from esen_train.engine.early_stopping import best_metric_value
from esen_train.progress import END_REASONS, format_best, format_duration, format_metrics

STATUS_FILE = "status.json"


class StatusError(ValueError):
    """A run directory without a readable status.json; the message names the file."""


class RunStatus:
    """Keeps RUN/status.json up to date (rank 0; with `enabled=False` every call does nothing).

    Used as a context manager around the whole run: the run is `running` inside, `finished`
    when the block ends, `failed` with the error's message when an exception leaves it."""

    def __init__(self, run_dir: Path, config: TrainConfig, enabled: bool) -> None:
        self.path = Path(run_dir) / STATUS_FILE
        self.enabled = enabled
        if not enabled:
            return
        previous = _previous_status(self.path)
        stages = previous.get("stages", {})
        self.status = {
            "state": "running",
            "error": None,
            "stage": config.stages[0],
            "run_dir": str(Path(run_dir)),
            "started_at": previous.get("started_at", _now()),
            "updated_at": _now(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "last_checkpoint": previous.get("last_checkpoint"),
            "stages": {
                stage: {"state": "waiting", "end_reason": None, "step": 0, **stages.get(stage, {}),
                        "max_steps": getattr(config, stage).max_steps, "best_metric": getattr(config, stage).best_metric}
                for stage in config.stages
            },
        }

    def __enter__(self) -> RunStatus:
        if self.enabled:
            self._write()
        return self

    def __exit__(self, exc_type, error, traceback) -> None:
        if error is None:
            self._update(state="finished")
        else:
            self.fail(error)

    def start_stage(self, stage: str, step: int) -> None:
        self._set_stage(stage, state="running", end_reason=None, step=step)
        self._update(stage=stage)

    def record(self, row: dict, timing: dict) -> None:
        """A metrics row of the trainer (`train`, `val` or `end`) and the stage's elapsed and
        remaining time."""
        stage, split = row["stage"], row["split"]
        fields = {"step": row["step"], **timing}
        if split in ("train", "val"):
            fields[split] = {key: _finite_or_none(value) for key, value in row.items() if key not in ("stage", "split")}
        elif split == "end":
            fields.update(state="ended", end_reason=row["reason"], time_left_s=0.0)
        self._set_stage(stage, **fields)
        self._update()

    def checkpoint(self, stage: str, directory: Path, step: int, best_metrics: dict | None) -> None:
        """A checkpoint of `step` was written to `directory`; `best_metrics` are its validation
        metrics when it is the stage's new best, else None."""
        if not self.enabled:
            return
        if best_metrics is not None:
            metric = self._stages[stage]["best_metric"]
            if metric not in best_metrics:
                metric = "energy_mae_mev_per_atom"
            best = {"metric": metric, "value": best_metric_value(best_metrics, metric), "step": step,
                    "checkpoint": str(directory)}
            self._set_stage(stage, best=best)
        self._set_stage(stage, last_checkpoint=str(directory))
        self._update(last_checkpoint=str(directory))

    def preempted(self, step: int) -> None:
        """A signal stopped the run (SLURM requeueing the job, Ctrl-C, `kill`): the ranks
        stopped after `step`, saved."""
        if self.enabled:
            self._set_stage(self.status["stage"], state="ended", end_reason="preempted", step=step)
            self._update(state="preempted")

    def fail(self, error: BaseException) -> None:
        """The run stopped with `error`. After a preemption the job is being stopped on
        purpose, so whatever is raised then does not make it a failure."""
        if not self.enabled or self.status["state"] == "preempted":
            return
        message = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        self._set_stage(self.status["stage"], state="ended", end_reason="failed")
        self._update(state="failed", error=message)

    @property
    def _stages(self) -> dict:
        return self.status["stages"]

    def _set_stage(self, stage: str, **fields) -> None:
        if self.enabled:
            self._stages[stage].update(fields)

    def _update(self, **fields) -> None:
        """Set run-level fields and write the file."""
        if self.enabled:
            self.status.update(fields, updated_at=_now())
            self._write()

    def _write(self) -> None:
        """Temporary file (a unique name), then rename."""
        descriptor, temporary = tempfile.mkstemp(prefix=f".{STATUS_FILE}.", dir=self.path.parent)
        try:
            with os.fdopen(descriptor, "w") as stream:
                json.dump(self.status, stream, indent=2)
            os.replace(temporary, self.path)
        except BaseException:
            os.unlink(temporary)
            raise


def read_status(run_dir: str | Path) -> dict:
    """RUN/status.json, plus `process_alive`: whether the writing process still runs (None
    when it ran on another machine, or the run is not running)."""
    path = Path(run_dir) / STATUS_FILE
    if not path.is_file():
        what = "has not started yet (queued?) or is not a run directory" if not path.parent.is_dir() else (
            "is not a run directory of esen-train fit, or its run has not started")
        raise StatusError(f"{path} not found: {run_dir} {what}")
    status = _read_json(path)
    status["process_alive"] = None
    if status.get("state") == "running" and status.get("host") == socket.gethostname():
        status["process_alive"] = _process_alive(int(status["pid"]))
    return status


def format_status(status: dict) -> str:
    """A few lines for people: state, stage and step, time left, metrics, best, checkpoints."""
    stage = status["stage"]
    current = status["stages"][stage]
    rows = [("run", status["run_dir"]), ("state", _describe_state(status))]
    rows.append(("stage", f"{stage}, step {current['step']}/{current['max_steps']}"))
    if status["state"] == "running":
        rows.append(("time left", f"{format_duration(current.get('time_left_s'))} in this stage"))
    for split, title in (("train", "last train"), ("val", "last validation")):
        if current.get(split):
            rows.append((title, f"step {current[split]['step']}: {format_metrics(current[split])}"))
    for name, entry in status["stages"].items():
        best = entry.get("best")
        if best:
            rows.append((f"best {name}", f"{format_best(best['metric'], best['value'], best['step'])}: {best['checkpoint']}"))
    rows.append(("last checkpoint", status.get("last_checkpoint") or "none yet"))
    rows.append(("stages", "; ".join(_describe_stage(name, entry) for name, entry in status["stages"].items())))
    width = max(len(title) for title, _ in rows)
    return "\n".join(f"{title:<{width}}  {text}" for title, text in rows)


def _describe_state(status: dict) -> str:
    state = status["state"]
    ago = _seconds_since(status["updated_at"])
    where = f"pid {status['pid']} on {status['host']}" + (f", SLURM job {status['slurm_job_id']}" if status.get("slurm_job_id") else "")
    if state == "failed":
        return f"failed: {status['error']}"
    if state == "preempted":
        resumes = ("SLURM requeues the job, which resumes" if status.get("slurm_job_id")
                   else "start the same command again to resume")
        return f"preempted {format_duration(ago)} ago ({where}), the step it was at saved: {resumes} from the last checkpoint"
    if state == "running" and status.get("process_alive") is False:
        return (f"stopped: status.json says running, but {where} is gone (killed?); "
                "start the same command again to resume from the last checkpoint")
    if state == "running":
        return f"running (updated {format_duration(ago)} ago; {where})"
    return state


def _describe_stage(name: str, entry: dict) -> str:
    if entry["state"] == "waiting":
        return f"{name} not started ({entry['max_steps']} steps)"
    if entry["state"] == "ended":
        return f"{name} ended at step {entry['step']}/{entry['max_steps']} ({END_REASONS.get(entry['end_reason'], entry['end_reason'])})"
    return f"{name} at step {entry['step']}/{entry['max_steps']}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _previous_status(path: Path) -> dict:
    """What an earlier start of this run wrote; nothing if there is none or it cannot be read
    (the file only describes the run, so training must not stop over it)."""
    try:
        return _read_json(path) if path.is_file() else {}
    except StatusError:
        return {}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise StatusError(f"{path}: cannot be read ({error})") from None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _seconds_since(timestamp: str) -> float:
    return (datetime.now(timezone.utc) - datetime.fromisoformat(timestamp)).total_seconds()


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value
