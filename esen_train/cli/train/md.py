"""NVE molecular dynamics of a checkpoint: the energy drift.

    esen-train md CHECKPOINT --structure FILE --steps N --timestep FS --temperature K
                  [--forces conservative|direct] [--max-temperature K] [--max-energy-change EV]
                  [--json] [--out DIR] [--quiet] [--wandb]

CHECKPOINT and --forces are read as by `esen-train eval`. Prints a summary, or one JSON object
with --json, and writes energy_vs_time.png and md.json to --out; with --wandb it also adds its
plot and numbers to the wandb run of the checkpoint's run directory. Errors in the input end
the command with a one-line message and exit code 2. Dynamics that leave their bounds
(temperature, total energy) stop it with a message, exit code 3, and md.json and the plot of
the trajectory up to there.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from esen_train.cli.common import fail
from esen_train.cli.train.evaluate import add_model_arguments, calculator_of
from esen_train.evaluation.md import MAX_ENERGY_CHANGE_EV_PER_ATOM
from esen_train.evaluation.workflow import INPUT_ERRORS, describe, log_to_wandb, run_md, write_json
from esen_train.plots import plot_energy_vs_time

HELP = "NVE molecular dynamics: energy drift of a checkpoint"
UNSTABLE_EXIT_CODE = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, default_dtype="float64")
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


def run(args: argparse.Namespace) -> int:
    try:
        calculator = calculator_of(args)
        result, stopped = run_md(calculator, args.structure, args.steps, args.timestep, args.temperature, args.seed,
                                 args.max_temperature, args.max_energy_change, progress=not args.quiet)
    except INPUT_ERRORS as error:
        return fail("esen-train md", error)
    out = Path(args.out)
    drift = result.get("drift_mev_per_atom_per_ps", float("nan"))
    plot = plot_energy_vs_time(
        result["time_ps"], result["potential_energy_ev"], result["kinetic_energy_ev"], result["num_atoms"],
        out / "energy_vs_time.png",
        title=f"NVE, {calculator.forces_mode} forces: " + ("stopped: unstable" if stopped else f"drift {drift:.3g} meV/atom/ps"),
    )
    series = ("time_ps", "potential_energy_ev", "kinetic_energy_ev")
    summary = {key: value for key, value in result.items() if key not in series}
    report = {**describe(calculator, args.dtype), "structure": str(args.structure), **summary, "energy_plot": str(plot)}
    if stopped:
        report["stopped"] = stopped
    write_json(report, out / "md.json")
    if args.wandb:
        log_to_wandb("md", calculator, images={"md/energy_vs_time": plot}, tables={},
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
