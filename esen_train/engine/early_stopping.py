"""The best validation of a stage, early stopping on it, and why a stage ends.

Each validation either sets a new best of the stage's `best_metric` (lower is better; the
energy MAE where that metric is not measured), and the trainer points the stage's `best`
checkpoint at it, or counts as one more validation without improvement. With `patience` > 0
a stage ends once `patience` validations in a row brought no new best. The counts are fields
of the trainer's Progress, which every checkpoint saves, so a resumed stage stops where an
uninterrupted one would, and a stage that stopped early stays stopped when started again.

`end_reason` says whether the loop is over: `max_steps`, `max_minutes` (the stage's wall-clock
budget is used up) or `early_stopping` (None: go on).
The other reasons a stage ends are `preempted` (SLURM stops the job and requeues it) and
`failed` (an exception), recorded by the trainer and RUN/status.json.
"""
from __future__ import annotations


def best_metric_value(metrics: dict, best_metric: str) -> float | None:
    return metrics.get(best_metric, metrics.get("energy_mae_mev_per_atom"))


def record_validation(progress, metrics: dict, best_metric: str) -> bool:
    """Count one validation in `progress` (the trainer's Progress); return whether it is the
    best so far."""
    value = best_metric_value(metrics, best_metric)
    if value is not None and value < progress.best_value:
        progress.best_value, progress.best_step, progress.validations_since_best = value, progress.step, 0
        return True
    progress.validations_since_best += 1
    return False


def end_reason(progress, max_steps: int, patience: int, out_of_time: bool = False) -> str | None:
    if progress.step >= max_steps:
        return "max_steps"
    if out_of_time:
        return "max_minutes"
    if patience > 0 and progress.validations_since_best >= patience:
        return "early_stopping"
    return None
