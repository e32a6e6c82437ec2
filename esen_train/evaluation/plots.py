"""PNG plots: parity (predicted against reference), total energy against time, learning curves.

matplotlib's Agg backend draws without a display (clusters, CI). Every function writes the
figure to a temporary file beside `out_png` and renames it, so a reader never sees half a PNG.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

# The metrics a learning curve shows, in this order, when metrics.jsonl has them.
LEARNING_CURVE_METRICS = (
    "loss",
    "energy_mae_mev_per_atom",
    "force_mae_mev_per_A",
    "stress_mae_mev_per_A3",
    "force_cosine",
)


def plot_parity(
    panels: Sequence[tuple[str, np.ndarray, np.ndarray]],
    out_png: str | Path,
    title: str = "",
) -> Path:
    """One parity panel per `(label, reference, predicted)`; the label carries the unit."""
    if not panels:
        raise ValueError("plot_parity needs at least one panel")
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for axis, (label, reference, predicted) in zip(axes[0], panels):
        reference = np.ravel(reference)
        predicted = np.ravel(predicted)
        low = min(reference.min(), predicted.min())
        high = max(reference.max(), predicted.max())
        axis.plot([low, high], [low, high], color="grey", linewidth=0.8, zorder=0)
        axis.scatter(reference, predicted, s=6, alpha=0.6, edgecolors="none")
        mae = np.mean(np.abs(predicted - reference))
        axis.set_title(f"{label}\nMAE {mae:.4g}", fontsize=10)
        axis.set_xlabel("reference")
        axis.set_ylabel("predicted")
        axis.set_aspect("equal", adjustable="datalim")
    if title:
        figure.suptitle(title)
    return _save(figure, out_png)


def plot_energy_vs_time(
    time_ps: np.ndarray,
    potential_energy_ev: np.ndarray,
    kinetic_energy_ev: np.ndarray,
    num_atoms: int,
    out_png: str | Path,
    title: str = "",
) -> Path:
    """Total, potential and kinetic energy per atom relative to step 0 (meV/atom), against time."""
    potential = (np.asarray(potential_energy_ev) - potential_energy_ev[0]) * 1000.0 / num_atoms
    kinetic = (np.asarray(kinetic_energy_ev) - kinetic_energy_ev[0]) * 1000.0 / num_atoms
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(time_ps, potential + kinetic, color="black")
    top.set_ylabel("total energy − E(0) (meV/atom)")
    bottom.plot(time_ps, potential, label="potential")
    bottom.plot(time_ps, kinetic, label="kinetic")
    bottom.set_ylabel("energy − E(0) (meV/atom)")
    bottom.set_xlabel("time (ps)")
    bottom.legend()
    if title:
        top.set_title(title)
    return _save(figure, out_png)


def plot_learning_curves(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    """Learning curves from a trainer's metrics.jsonl: one panel per metric, one line per
    (stage, split). Each stage's steps are shifted to follow the previous stage's, with a
    dashed line where a stage starts, so a two-stage run reads left to right."""
    rows = read_metrics_jsonl(metrics_jsonl)
    metrics = [name for name in LEARNING_CURVE_METRICS if any(name in row for row in rows)]
    if not metrics:
        raise ValueError(f"{metrics_jsonl}: no rows with any of {', '.join(LEARNING_CURVE_METRICS)}")
    stage_offsets = _stage_offsets(rows)
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.8), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        for (stage, split), (steps, values) in _series(rows, metric, stage_offsets).items():
            axis.plot(steps, values, marker="." if split != "train" else None, label=f"{stage} {split}")
        for boundary in _stage_starts(rows, stage_offsets)[1:]:
            axis.axvline(boundary, color="grey", linestyle="--", linewidth=0.8)
        if metric != "force_cosine" and _all_positive(rows, metric):
            axis.set_yscale("log")
        axis.set_title(metric, fontsize=10)
        axis.set_xlabel("step")
        axis.legend(fontsize=8)
    return _save(figure, out_png)


def read_metrics_jsonl(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl, each a dict; a bad line is reported with its number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {number} is not JSON ({error.msg})") from None
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"{path}: line {number} is not an object with a 'step' field")
        rows.append(row)
    return rows


def _stage_offsets(rows: list[dict]) -> dict[str, int]:
    """How far each stage's steps are shifted on the shared x axis: a stage whose step counter
    restarts is placed after the steps seen so far; one that counts on is left where it is."""
    offsets: dict[str, int] = {}
    end = 0
    for row in rows:
        stage = row.get("stage", "")
        if stage not in offsets:
            offsets[stage] = end if int(row["step"]) < end else 0
        end = max(end, offsets[stage] + int(row["step"]))
    return offsets


def _stage_starts(rows: list[dict], stage_offsets: dict[str, int]) -> list[int]:
    """The first x of each stage, in order of appearance."""
    starts: dict[str, int] = {}
    for row in rows:
        stage = row.get("stage", "")
        x = stage_offsets[stage] + int(row["step"])
        starts[stage] = min(starts.get(stage, x), x)
    return list(starts.values())


def _series(rows: list[dict], metric: str, stage_offsets: dict[str, int]) -> dict[tuple[str, str], tuple]:
    series: dict[tuple[str, str], tuple[list, list]] = {}
    for row in rows:
        value = row.get(metric)
        if not isinstance(value, (int, float)) or not np.isfinite(value):
            continue
        stage = row.get("stage", "")
        steps, values = series.setdefault((stage, row.get("split", "")), ([], []))
        steps.append(stage_offsets[stage] + int(row["step"]))
        values.append(float(value))
    return series


def _all_positive(rows: list[dict], metric: str) -> bool:
    values = [row[metric] for row in rows if isinstance(row.get(metric), (int, float))]
    return all(value > 0 for value in values)


def _save(figure: Figure, out_png: str | Path) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    temporary = out_png.with_name(f".{out_png.name}.tmp{os.getpid()}")
    try:
        figure.tight_layout()
        figure.savefig(temporary, format="png", dpi=110)
    finally:
        plt.close(figure)
    os.replace(temporary, out_png)
    return out_png
