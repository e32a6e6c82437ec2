"""PNG plots: parity (predicted against reference), total energy against time, learning curves.

Training (learning curves, parity at each validation) and evaluation (parity, MD energy)
both draw with these; like progress.py, it depends on nothing else in esen_train.

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
    (stage, split), against the run's global step, with a dashed line where a stage starts."""
    rows = read_metrics_jsonl(metrics_jsonl)
    metrics = [name for name in LEARNING_CURVE_METRICS if any(_number(row.get(name)) for row in rows)]
    if not metrics:
        raise ValueError(f"{metrics_jsonl}: no rows with any of {', '.join(LEARNING_CURVE_METRICS)}")
    xs = _global_steps(rows)
    # One colour per (stage, split) in every panel.
    colours = {key: f"C{i}" for i, key in enumerate(dict.fromkeys((r.get("stage", ""), r.get("split", "")) for r in rows))}
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.8), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        for (stage, split), (steps, values) in _series(rows, xs, metric).items():
            axis.plot(steps, values, color=colours[stage, split], marker="." if split != "train" else None,
                      label=f"{stage} {split}")
        for boundary in _stage_starts(rows, xs)[1:]:
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


def _global_steps(rows: list[dict]) -> list[int]:
    """Each row's x: its `global_step` where the trainer wrote one; otherwise its `step`, with
    a stage whose counter restarts shifted to follow the steps seen before it."""
    offsets: dict[str, int] = {}
    end = 0
    xs = []
    for row in rows:
        stage, step = row.get("stage", ""), int(row["step"])
        if "global_step" in row:
            x = int(row["global_step"])
        else:
            if stage not in offsets:
                offsets[stage] = end if step < end else 0
            x = offsets[stage] + step
        end = max(end, x)
        xs.append(x)
    return xs


def _stage_starts(rows: list[dict], xs: list[int]) -> list[int]:
    """The first x of each stage, stages in order of appearance."""
    starts: dict[str, int] = {}
    for row, x in zip(rows, xs):
        stage = row.get("stage", "")
        starts[stage] = min(starts.get(stage, x), x)
    return list(starts.values())


def _series(rows: list[dict], xs: list[int], metric: str) -> dict[tuple[str, str], tuple[list, list]]:
    series: dict[tuple[str, str], tuple[list, list]] = {}
    for row, x in zip(rows, xs):
        value = row.get(metric)
        if not _number(value):
            continue
        steps, values = series.setdefault((row.get("stage", ""), row.get("split", "")), ([], []))
        steps.append(x)
        values.append(float(value))
    return series


def _number(value: object) -> bool:
    """Whether a metrics.jsonl value can be plotted (the trainer writes null for NaN and inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def _all_positive(rows: list[dict], metric: str) -> bool:
    return all(row[metric] > 0 for row in rows if _number(row.get(metric)))


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
