"""The `esen-train eval` and `esen-train md` subcommands (esen_train/cli.py adds them).

    esen-train eval CHECKPOINT --data DIR_OR_FILE... [--predictions FILE.extxyz] [--json] [--out DIR] [--quiet]
                    [--energy-key K] [--forces-key K] [--stress-key K] [--config-type-key K] [--wandb]
    esen-train md CHECKPOINT --structure FILE --steps N --timestep FS --temperature K
                  [--forces conservative|direct] [--max-temperature K] [--max-energy-change EV]
                  [--json] [--out DIR] [--quiet] [--wandb]

CHECKPOINT is a checkpoint directory or a run directory (its last stage's best checkpoint).
Without --forces a checkpoint is used the way its stage trained it: direct forces for a
direct-stage checkpoint, conservative otherwise. Both commands print a table, or one JSON
object with --json, and write their plots (PNG) to --out; with --wandb they also add their
plots, tables and numbers to the wandb run of the checkpoint's run directory. eval streams
its data (structures are read, checked, predicted and tallied a batch at a time). Progress
goes to stderr (a bar on a terminal, a line per tenth in a file; --quiet: none). Errors in
the input (a structure with overlapping atoms, a cell in the wrong unit, an element the
checkpoint was not trained on, ...) end the command with a one-line message and exit code 2.
Dynamics that leave their bounds (temperature, total energy) stop `md` with a message, exit
code 3, and md.json and the plot of the trajectory up to there.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import ase.io
import torch
from ase import Atoms

from esen_train.data.cli import add_label_key_arguments, label_keys
from esen_train.data.manifest import DatasetError
from esen_train.data.shards import ShardError
from esen_train.data.validate import UnphysicalGeometry
from esen_train.engine.tracking import log_to_existing_run
from esen_train.evaluation.calculator import FORCE_MODES, ESENCalculator, UntrainedElements
from esen_train.evaluation.checkpoint import CheckpointError, load_model
from esen_train.evaluation.errors import (
    ErrorTables,
    LabelledStructure,
    ParityReservoir,
    count_structures,
    error_table_rows,
    format_error_table,
    iter_labelled_structures,
    predict_stream,
)
from esen_train.evaluation.md import MAX_ENERGY_CHANGE_EV_PER_ATOM, UnstableDynamics, run_nve
from esen_train.evaluation.plots import plot_energy_vs_time, plot_parity
from esen_train.evaluation.predictions import PredictionWriter
from esen_train.progress import ConsoleProgress

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# What a bad input raises: reported as one line and exit code 2 instead of a traceback.
INPUT_ERRORS = (CheckpointError, DatasetError, ShardError, FileNotFoundError, ValueError)
UNSTABLE_EXIT_CODE = 3


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("eval", help="error tables and parity plots of a checkpoint on labelled data")
    _add_model_arguments(parser, default_dtype="float32")
    parser.add_argument("--data", required=True, nargs="+", metavar="DIR_OR_FILE",
                        help="dataset directories (esen-data) or ASE-readable files; errors are tabled per dataset too")
    parser.add_argument("--predictions", metavar="FILE.extxyz",
                        help="write each structure with its reference (REF_*) and predicted (ESEN_*) labels")
    parser.add_argument("--max-atoms", type=int, default=512, help="atoms per forward pass (default 512)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--out", default="eval", help="directory for parity.png and errors.json (default ./eval)")
    add_label_key_arguments(parser, fields=("energy", "forces", "stress", "config_type"))
    parser.set_defaults(run=run_eval)
    return parser


def add_md_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("md", help="NVE molecular dynamics: energy drift of a checkpoint")
    _add_model_arguments(parser, default_dtype="float64")
    parser.add_argument("--structure", required=True, help="ASE-readable file; its first structure is used")
    parser.add_argument("--steps", type=int, required=True, help="velocity-Verlet steps")
    parser.add_argument("--timestep", type=float, required=True, help="time step in fs")
    parser.add_argument("--temperature", type=float, required=True, help="Maxwell-Boltzmann temperature in K")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial velocities (default 0)")
    parser.add_argument("--max-temperature", type=float, default=None, metavar="K",
                        help="stop when the temperature exceeds this (default 10 x max(--temperature, 300 K))")
    parser.add_argument("--max-energy-change", type=float, default=MAX_ENERGY_CHANGE_EV_PER_ATOM, metavar="EV",
                        help="stop when the total energy per atom moves more than this from its start, in eV "
                             f"(default {MAX_ENERGY_CHANGE_EV_PER_ATOM:g})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    parser.add_argument("--out", default="md", help="directory for energy_vs_time.png and md.json (default ./md)")
    parser.set_defaults(run=run_md)
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser, default_dtype: str) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory, or run directory (its last stage's best)")
    parser.add_argument("--forces", choices=FORCE_MODES, default=None,
                        help="force head (default: the checkpoint stage's own: direct or conservative)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=default_dtype,
                        help=f"model precision (default {default_dtype})")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the results to the wandb run of the checkpoint's run directory")


def run_eval(args: argparse.Namespace) -> int:
    tables, reservoir = ErrorTables(), ParityReservoir()
    try:
        calculator = _calculator(args)
        keys = label_keys(args)
        total = _total_structures(args.data)
        with (PredictionWriter(args.predictions) if args.predictions else nullcontext()) as writer, \
                ConsoleProgress("eval", total, "structures", every=None if total else 1000,
                                enabled=not args.quiet) as progress:
            for path, name in zip(args.data, _dataset_names(args.data)):
                structures = _checked(calculator, iter_labelled_structures(path, keys, dataset=name))
                for structure, prediction in predict_stream(calculator, structures, args.max_atoms):
                    reservoir.add(tables.add(structure, prediction))
                    if writer is not None:
                        writer.write(structure, prediction)
                    progress.update()
        metrics = tables.result()
    except INPUT_ERRORS as error:
        return _fail("eval", error)
    out = Path(args.out)
    names = ", ".join(Path(path).name for path in args.data)
    plot = plot_parity(reservoir.panels(), out / "parity.png", title=f"{names}: {calculator.forces_mode} forces")
    report = {**_describe(args, calculator), "data": list(args.data), **metrics, "parity_plot": str(plot),
              "predictions": args.predictions}
    _write_json(report, out / "errors.json")
    if args.wandb:
        _log_to_wandb("eval", calculator, images={"eval/parity": plot}, tables={"eval/errors": error_table_rows(metrics)},
                      summary={f"eval/{key}": value for key, value in metrics.items()})
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"checkpoint {report['checkpoint']} ({calculator.forces_mode} forces) on {names}")
        print(format_error_table(metrics))
        print(f"parity plot: {plot}")
        if args.predictions:
            print(f"predictions: {args.predictions}")
    return 0


def _total_structures(paths: list[str]) -> int | None:
    """The structures of all inputs, for the progress line; None when one input cannot say."""
    counts = [count_structures(path) for path in paths]
    return None if None in counts else sum(counts)


def _checked(calculator: ESENCalculator, structures: Iterator[LabelledStructure]) -> Iterator[LabelledStructure]:
    for structure in structures:
        _check_structure(calculator, structure.atoms, structure.source)
        yield structure


def _dataset_names(paths: list[str]) -> list[str]:
    """Each input's name in the tables: its file or directory name, or its path where two share a name."""
    names = [Path(path).name for path in paths]
    return [name if names.count(name) == 1 else str(path) for name, path in zip(names, paths)]


def run_md(args: argparse.Namespace) -> int:
    try:
        calculator = _calculator(args)
        atoms = _read_structure(args.structure)
        _check_structure(calculator, atoms, args.structure)
        with ConsoleProgress("md", args.steps, "steps", enabled=not args.quiet) as progress:
            result = run_nve(atoms, calculator, args.steps, args.timestep, args.temperature, seed=args.seed,
                             max_temperature_K=args.max_temperature,
                             max_energy_change_ev_per_atom=args.max_energy_change, progress=progress)
        stopped = None
    except UnstableDynamics as error:
        result, stopped = error.result, str(error)
    except INPUT_ERRORS as error:
        return _fail("md", error)
    out = Path(args.out)
    drift = result.get("drift_mev_per_atom_per_ps", float("nan"))
    plot = plot_energy_vs_time(
        result["time_ps"], result["potential_energy_ev"], result["kinetic_energy_ev"], result["num_atoms"],
        out / "energy_vs_time.png",
        title=f"NVE, {calculator.forces_mode} forces: " + ("stopped: unstable" if stopped else f"drift {drift:.3g} meV/atom/ps"),
    )
    series = ("time_ps", "potential_energy_ev", "kinetic_energy_ev")
    summary = {key: value for key, value in result.items() if key not in series}
    report = {**_describe(args, calculator), "structure": str(args.structure), **summary, "energy_plot": str(plot)}
    if stopped:
        report["stopped"] = stopped
    _write_json(report, out / "md.json")
    if args.wandb:
        _log_to_wandb("md", calculator, images={"md/energy_vs_time": plot}, tables={},
                      summary={f"md/{key}": value for key, value in summary.items()})
    if stopped:
        print(f"esen-train md: {stopped}; the trajectory up to there is in {out / 'md.json'} and {plot}", file=sys.stderr)
        return UNSTABLE_EXIT_CODE
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"NVE {args.steps} steps of {args.timestep} fs from {args.temperature} K, "
              f"{result['num_atoms']} atoms, {calculator.forces_mode} forces")
        print(f"  drift          {result['drift_mev_per_atom_per_ps']:+.4f} meV/atom/ps")
        print(f"  fluctuation    {result['fluctuation_mev_per_atom']:.4f} meV/atom (std)")
        print(f"  max deviation  {result['max_deviation_mev_per_atom']:.4f} meV/atom")
        print(f"energy plot: {plot}")
    return 0


def _check_structure(calculator: ESENCalculator, atoms: Atoms, source: str) -> None:
    """The calculator's checks (elements, geometry), with the file and structure in the message."""
    try:
        calculator.check_structure(atoms)
    except (UntrainedElements, UnphysicalGeometry) as error:
        raise ValueError(f"{source}: {error}") from None


def _calculator(args: argparse.Namespace) -> ESENCalculator:
    """The checkpoint's calculator; without --forces, the force head its stage trained."""
    model, info = load_model(args.checkpoint, device=args.device, dtype=DTYPES[args.dtype], use_ema=not args.no_ema)
    forces = args.forces or ("direct" if info.stage == "direct" else "conservative")
    return ESENCalculator(model, forces=forces, device=args.device, dtype=DTYPES[args.dtype], checkpoint=info)


def _log_to_wandb(command: str, calculator: ESENCalculator, images: dict, tables: dict, summary: dict) -> None:
    """Add the results to the wandb run of the run directory the checkpoint belongs to
    (RUN/checkpoints/<stage>/<name>/model.pt), at the checkpoint's step."""
    info = calculator.checkpoint
    parents = info.path.parents
    run_dir = parents[3] if len(parents) > 3 else parents[0]
    if not log_to_existing_run(run_dir, info.stage, info.step, images, tables, summary):
        print(f"esen-train {command}: --wandb: {run_dir} has no wandb run (trained with wandb disabled, "
              "or the checkpoint is not inside its run directory); nothing logged", file=sys.stderr)


def _read_structure(path: str) -> Atoms:
    if not Path(path).is_file():
        raise FileNotFoundError(f"structure file not found: {path}")
    try:
        atoms = ase.io.read(path, index=0)
    except Exception as error:  # ASE raises many types for unreadable input
        raise ValueError(f"{path}: not readable by ase.io.read ({type(error).__name__}: {error})") from None
    if len(atoms) == 0:
        raise ValueError(f"{path}: structure 0 has 0 atoms (a structure needs at least one)")
    return atoms


def _describe(args: argparse.Namespace, calculator: ESENCalculator) -> dict:
    info = calculator.checkpoint
    return {
        "checkpoint": str(info.path.parent),
        "stage": info.stage,
        "step": info.step,
        "forces": calculator.forces_mode,
        "dtype": args.dtype,
        "ema": info.used_ema,
    }


def _write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(report, indent=2) + "\n")
    temporary.replace(path)


def _fail(command: str, error: Exception) -> int:
    print(f"esen-train {command}: {error}", file=sys.stderr)
    return 2
