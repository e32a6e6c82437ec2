"""Console progress of long commands: a live bar on a terminal, plain lines in a file.

`esen-train fit` (rank 0), `esen-data convert`, `esen-train eval` and `esen-train md` all
report through `ConsoleProgress`. On a terminal it is a tqdm bar redrawn in place. When the
output is a file (a SLURM log, `> log`) a bar's carriage returns would pile up into one
unreadable line, so it prints a plain line each time the count passes a multiple of `every`
instead: what `tail -f` shows. Disabled (`--quiet`, ranks other than 0) it prints nothing but
still keeps time, so the trainer can record the time left in RUN/status.json.

A plain line: `what count/total unit (percent) | details | rate | elapsed | left`, e.g.

    direct 30/60 steps (50%) | loss 1.234  E MAE 12.3 meV/atom ... | 1.02 steps/s | elapsed 0:00:29 | left 0:00:29

`StageConsole` is the trainer's use of it: one line per logged training step, one per
validation with the best so far, one when the stage ends. This module depends on nothing
else in esen_train, so every package may use it.
"""
from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from tqdm import tqdm

# How metrics are shown on the console and by `esen-train status`: (key, before, after the number).
METRIC_FORMATS = (
    ("loss", "loss ", ""),
    ("energy_mae_mev_per_atom", "E MAE ", " meV/atom"),
    ("force_mae_mev_per_A", "F MAE ", " meV/Å"),
    ("stress_mae_mev_per_A3", "S MAE ", " meV/Å³"),
    ("force_cosine", "F cos ", ""),
    ("lr", "lr ", ""),
    ("grad_norm", "grad norm ", ""),
    ("atoms_per_s", "", " atoms/s"),
)

# Why a stage ended, as `esen-train status` and the console say it.
END_REASONS = {
    "max_steps": "reached max_steps",
    "max_minutes": "used up max_minutes",
    "early_stopping": "early stopping",
    "preempted": "stopped by a signal, with its step saved (resumes from the last checkpoint)",
    "failed": "failed",
}


def format_duration(seconds: float | None) -> str:
    """H:MM:SS, or '?' when not known."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    total = int(round(seconds))
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


def format_number(value) -> str:
    """Four significant digits, without exponents up to 10^9; '-' for no value."""
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if abs(value) >= 1e4 and abs(value) < 1e9:
        return f"{value:.0f}"
    return f"{value:.4g}"


def format_metrics(row: dict) -> str:
    """The known metrics of a metrics row, e.g. `loss 1.234  E MAE 12.3 meV/atom  lr 0.002`."""
    return "  ".join(f"{before}{format_number(row[key])}{after}" for key, before, after in METRIC_FORMATS if key in row)


def format_best(metric: str, value: float, step: int) -> str:
    """`force_mae_mev_per_A 45.6 at step 30`."""
    if not math.isfinite(value):
        return f"{metric}: none yet"
    return f"{metric} {format_number(value)} at step {step}"


class ConsoleProgress:
    """Progress of a count towards `total` (None: unknown), written to `stream` (stderr by
    default, so that a command's result on stdout stays clean)."""

    def __init__(self, what: str, total: int | None, unit: str, *, every: int | None = None, initial: int = 0,
                 stream: TextIO | None = None, enabled: bool = True) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.every = every or max(1, (total or 0) // 10)  # a line per tenth of the way by default
        self.initial = self.count = initial
        self.started = time.monotonic()
        self.enabled = enabled
        live = enabled and _is_terminal(self.stream)
        self.plain_lines = enabled and not live
        self.bar = (tqdm(total=total, initial=initial, desc=what, unit=f" {unit}", file=self.stream, dynamic_ncols=True)
                    if live else None)

    def update(self, amount: int = 1, details: str = "") -> None:
        self.update_to(self.count + amount, details)

    def update_to(self, count: int, details: str = "") -> None:
        """The count is now `count`; `details` (metrics, ...) go on the bar or the line."""
        previous, self.count = self.count, count
        if self.bar is not None:
            if details:
                self.bar.set_postfix_str(details, refresh=False)
            self.bar.update(count - previous)
        elif self.plain_lines and count != previous and (count // self.every > previous // self.every or count == self.total):
            self.write(self.line(details))

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def rate(self) -> float | None:
        """Units per second since this object started counting."""
        done, elapsed = self.count - self.initial, self.elapsed_s()
        return done / elapsed if done > 0 and elapsed > 0 else None

    def time_left_s(self) -> float | None:
        rate = self.rate()
        if self.total is None or rate is None:
            return None
        return max(self.total - self.count, 0) / rate

    def line(self, details: str = "") -> str:
        share = f" ({100 * self.count / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.what} {self.count}/{self.total if self.total else '?'} {self.unit}{share}"]
        if details:
            parts.append(details)
        rate = self.rate()
        parts.append(f"{format_number(rate)} {self.unit}/s" if rate else f"? {self.unit}/s")
        parts.append(f"elapsed {format_duration(self.elapsed_s())}")
        if self.total:
            parts.append(f"left {format_duration(self.time_left_s())}")
        return " | ".join(parts)

    def write(self, text: str) -> None:
        """A line of its own (above the bar on a terminal); nothing when disabled."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        elif self.enabled:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> ConsoleProgress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class StageConsole:
    """What the trainer prints on rank 0 during one stage, on stdout (the run's log).

    `show(record, progress)` takes each metrics row as the trainer logs it: a `train` row
    moves the bar (or prints a line, every `log_every` steps), a `val` row prints the
    validation and the best so far, an `end` row why the stage ended. `progress` is the
    trainer's Progress (best_value, best_step, validations_since_best)."""

    def __init__(self, stage: str, max_steps: int, log_every: int, best_metric: str, patience: int, enabled: bool) -> None:
        self.stage, self.max_steps, self.log_every = stage, max_steps, log_every
        self.best_metric, self.patience, self.enabled = best_metric, patience, enabled
        self.steps: ConsoleProgress | None = None  # from `start`: the clock counts the steps this process trains

    def start(self, step: int) -> None:
        self.steps = ConsoleProgress(self.stage, self.max_steps, "steps", every=self.log_every, initial=step,
                                     stream=sys.stdout, enabled=self.enabled)

    def timing(self) -> dict:
        if self.steps is None:
            return {"elapsed_s": 0.0, "time_left_s": None}
        return {"elapsed_s": self.steps.elapsed_s(), "time_left_s": self.steps.time_left_s()}

    def show(self, record: dict, progress) -> None:
        step, split = record["step"], record["split"]
        if split == "train" and self.steps is not None:
            self.steps.update_to(step, format_metrics(record))
        elif split == "val":
            best = "best " + format_best(self.best_metric, progress.best_value, progress.best_step)
            if "loaded_from" in record:
                best = f"weights loaded from {record['loaded_from']}"
            self.write(f"{self.stage} validation at step {step}/{self.max_steps} | {format_metrics(record)} | {best}")
        elif split == "end":
            self.write(f"{self.stage} ended at step {step}/{self.max_steps}: {self.explain_end(record['reason'], progress)}"
                       f" | best {format_best(self.best_metric, progress.best_value, progress.best_step)}"
                       f" | elapsed {format_duration(self.timing()['elapsed_s'])}")

    def explain_end(self, reason: str, progress) -> str:
        if reason == "early_stopping":
            return (f"early stopping: no better {self.best_metric} in the last "
                    f"{progress.validations_since_best} validations (patience {self.patience})")
        return END_REASONS.get(reason, reason)

    def write(self, text: str) -> None:
        if self.steps is not None:
            self.steps.write(text)
        elif self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.steps is not None:
            self.steps.close()


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
