"""The whole recipe on built-in EMT data, through the same commands a user types.

    esen-train quickstart [--out DIR] [--nproc N] [--structures N] [--md-steps N] [key=value ...]

1. make EMT-labelled structures (extended XYZ), convert them to LMDB shards, split, stats;
2. `esen-train fit configs/quickstart.yaml --nproc N`: direct pretraining, then
   conservative fine-tuning from the direct stage's best checkpoint;
3. `esen-train eval` of both stages on the held-out test split;
4. `esen-train md`: the NVE test of both models, beside EMT itself (the floor); with wandb on,
   both add their plots and tables to the training's wandb run (`--wandb`);
5. OUT/summary.json with errors, drifts, wall time and where every file is.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import ase.build
import ase.io
from ase.calculators.emt import EMT

from esen_train import CONFIG_DIR
from esen_train.cli import data as esen_data
from esen_train.cli.common import fail
from esen_train.data.emt import write_emt_extxyz
from esen_train.engine.config import ConfigError, load_train_config
from esen_train.evaluation.md import run_nve

HELP = "the whole recipe on built-in EMT data"
CONFIG = CONFIG_DIR / "quickstart.yaml"
DATA = Path("data", "emt")  # OUT/data/emt, then OUT/data/emt_train, _val and _test
MD_TIMESTEP_FS, MD_TEMPERATURE_K = 2.0, 300.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/quickstart", help="output directory")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (default 2)")
    parser.add_argument("--structures", type=int, default=800, help="EMT structures to make (default 800)")
    parser.add_argument("--md-steps", type=int, default=400, help="NVE steps of 2 fs (default 400)")
    parser.add_argument("overrides", nargs="*", help="key=value settings for the training, e.g. direct.max_steps=50")


def run(args: argparse.Namespace) -> int:
    try:
        # A wrong setting stops here, before any data is made.
        load_train_config(CONFIG, _training_settings(Path(args.out).resolve(), args.overrides))
    except ConfigError as error:
        return fail("esen-train quickstart", error)
    run_quickstart(args.out, nproc=args.nproc, structures=args.structures, md_steps=args.md_steps,
                   overrides=args.overrides)
    return 0


def run_quickstart(out: str | Path, nproc: int = 2, structures: int = 800, md_steps: int = 400,
                   overrides: list[str] = ()) -> dict:
    """Run every step into `out`; `overrides` are `key=value` settings for `esen-train fit`."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    data = _make_data(out, structures)
    run_dir = out / "run"
    _step(f"training: direct pretraining then conservative fine-tuning on {nproc} process(es)")
    _esen_train(["fit", str(CONFIG), *_training_settings(out, overrides), f"--nproc={nproc}"])
    summary = {"run_dir": str(run_dir), "learning_curves": str(run_dir / "learning_curves.png")}
    md_settings = ["--steps", str(md_steps), "--timestep", str(MD_TIMESTEP_FS), "--temperature", str(MD_TEMPERATURE_K)]
    for stage in ("direct", "conservative"):
        summary[stage] = _evaluate(run_dir / "checkpoints" / stage / "best", f"{data}_test", out, stage, md_settings)
    summary["emt_floor"] = _emt_floor(out / "md_structure.xyz", md_steps)
    summary["wall_time_s"] = round(time.time() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary, out)
    return summary


def _training_settings(out: Path, overrides: list[str]) -> list[str]:
    """The key=value settings of the training: where its run and data are, then the user's."""
    data = out / DATA
    return [f"run_dir={out / 'run'}", f"data.train=[{data}_train]", f"data.val=[{data}_val]", *overrides]


def _make_data(out: Path, structures: int) -> Path:
    raw = out / "emt.xyz"
    _step(f"making {structures} EMT-labelled structures: {raw}")
    write_emt_extxyz(raw, structures, seed=0)
    data = out / DATA
    _step(f"converting to LMDB shards: {data}")
    _esen_data(["convert", str(raw), "--out", str(data), "--shards", "2", "--overwrite"])
    _esen_data(["split", str(data), "--out", str(data), "--fractions", "0.8,0.1,0.1", "--seed", "0", "--overwrite"])
    _esen_data(["stats", f"{data}_train"])
    _esen_data(["inspect", f"{data}_train"])
    ase.io.write(out / "md_structure.xyz", _md_structure())
    return data


def _md_structure():
    """A 32-atom CuAu fcc cell, like the training data."""
    atoms = ase.build.bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 2, 2))
    atoms.symbols[::4] = "Au"
    return atoms


def _evaluate(checkpoint: Path, test_data: str, out: Path, stage: str, md_settings: list[str]) -> dict:
    _step(f"{stage}: errors on the test split and the NVE test")
    stage_out, forces = out / stage, ["--forces", stage]
    # The test errors and the NVE plot join the training's wandb run, if it has one.
    wandb = ["--wandb"] if (checkpoint.parents[2] / "wandb_run_id").is_file() else []
    _esen_train(["eval", str(checkpoint), "--data", test_data, "--out", str(stage_out), *forces, *wandb])
    _esen_train(["md", str(checkpoint), "--structure", str(out / "md_structure.xyz"), *md_settings,
                 "--out", str(stage_out), *forces, *wandb])
    errors = json.loads((stage_out / "errors.json").read_text())
    md = json.loads((stage_out / "md.json").read_text())
    keys = ("energy_mae_mev_per_atom", "force_mae_mev_per_A", "stress_mae_mev_per_A3")
    return {
        "checkpoint": str(checkpoint),
        **{key: errors.get(key) for key in keys},
        "drift_mev_per_atom_per_ps": md["drift_mev_per_atom_per_ps"],
        "max_deviation_mev_per_atom": md["max_deviation_mev_per_atom"],
        "parity_plot": errors["parity_plot"],
        "energy_plot": md["energy_plot"],
    }


def _emt_floor(structure: Path, steps: int) -> dict:
    """EMT itself with the same integrator and time step: the drift floor."""
    result = run_nve(ase.io.read(structure), EMT(), steps, MD_TIMESTEP_FS, MD_TEMPERATURE_K)
    return {key: result[key] for key in ("drift_mev_per_atom_per_ps", "max_deviation_mev_per_atom")}


def _esen_data(argv: list[str]) -> None:
    if esen_data.main(argv) != 0:
        raise SystemExit(f"quickstart: esen-data {' '.join(argv)} failed")


def _esen_train(argv: list[str]) -> None:
    # A fresh interpreter per command, as a user would run them (and so the
    # multi-process launcher owns its processes).
    command = [sys.executable, "-m", "esen_train.cli", *argv]
    if subprocess.call(command) != 0:
        raise SystemExit(f"quickstart: esen-train {' '.join(argv)} failed")


def _step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def _print_summary(summary: dict, out: Path) -> None:
    print("\n==> quickstart finished in", f"{summary['wall_time_s']:.0f} s")
    print(f"{'model':<14}{'E MAE meV/at':>14}{'F MAE meV/Å':>14}{'drift meV/at/ps':>18}")
    for name in ("direct", "conservative"):
        row = summary[name]
        print(f"{name:<14}{row['energy_mae_mev_per_atom']:>14.2f}{row['force_mae_mev_per_A']:>14.1f}"
              f"{row['drift_mev_per_atom_per_ps']:>18.4f}")
    print(f"{'EMT (floor)':<14}{'':>28}{summary['emt_floor']['drift_mev_per_atom_per_ps']:>18.4f}")
    print(f"summary: {out / 'summary.json'}; learning curves: {summary['learning_curves']}")
