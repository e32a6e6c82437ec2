"""The two-stage recipe at equal time: conservative from scratch, direct then conservative,
direct only.

    OMP_NUM_THREADS=1 python benchmarks/two_stage.py DATASET --budget-minutes M --seeds S [--first-seed K]
                      [--direct-share F [F ...]] [--clock wall|cpu] [--arms scratch two_stage direct]
                      [--set KEY=VALUE ...] [--nve-steps N] [--out DIR]

Every arm trains for the same M minutes, ended by the stages' `max_minutes`: of wall clock, or
with `--clock cpu` of the training process's CPU time (on a machine shared with other work, a
wall-clock minute bought 2-4x more or fewer steps from one hour to the next; a CPU minute is
what the process got). max_steps is lifted out of the way, and the cosine schedule runs on the
fraction of the time used, so each arm ends with its learning rate decayed. All through the
user-facing commands:
- `scratch`: `esen-train fit CONFIG stages=[conservative] conservative.init_from=none
  conservative.max_minutes=M`, a conservative model from fresh weights;
- `two_stage`: `stages=[direct,conservative]`, direct.max_minutes = F M, conservative.max_minutes
  = (1 - F) M, one arm per share F of `--direct-share` (default 0.5);
- `direct`: `stages=[direct] direct.max_minutes=M`.
Validation only at each stage's end, a checkpoint every 1000 steps. `--set KEY=VALUE` overrides
go to every arm (e.g. `conservative.lr=3e-4`). Each run's best checkpoint is tested with
`esen-train eval --dtype float64` on the test split (its own forces: direct for `direct`,
conservative for the others; the direct stage of `two_stage` too) and run in NVE with
`esen-train md`. Seeds K..K+S-1 (K = `--first-seed`, default 0; a later K adds seeds on another
machine or at another time) set the model's initialisation and the data order; within a seed
the arms run one after another, in reverse order on odd seeds, so that a change in the
machine's load does not always fall on the same arm.

DATASET: `emt` (the built-in data: `esen-data emt` 1000 structures, seed 0, split 0.8/0.1/0.1,
trained with configs/quickstart.yaml in one process) or one of benchmarks/accuracy.py's
(rmd17-aspirin, rmd17-ethanol, mlearn-si, mlearn-li, acac; converted from the shared data the
same way, trained with configs/DATASET.yaml). NVE: EMT from the quickstart's 32-atom CuAu cell
at 300 K and 2 fs; the real data from the first test structure at 500 K and 0.5 fs.

A finished run leaves its record in OUT/seedN/ARM/record.json; the same command run again
keeps the runs whose settings match, resumes a killed one from its last checkpoint (its
stage clocks included) and trains the rest.

Prints a table and one JSON object (last line; also OUT/report.json): per run its settings,
steps, `fit` wall clock, test errors, NVE drift and the load average before and after; per
arm the mean, sample standard deviation, minimum and maximum over the seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import ase.build
import ase.io
import numpy as np

from esen_train import shipped_config

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))  # its sibling scripts, also when loaded by a test
import accuracy  # noqa: E402
from accuracy import load_average, run  # noqa: E402

EMT_DIR = REPO_ROOT / "data" / "emt"
EMT_CONFIG = shipped_config("quickstart")
ARMS = ("scratch", "two_stage", "direct")
METRICS = ("energy_mae_mev_per_atom", "energy_mae_mev_per_structure", "force_mae_mev_per_A",
           "stress_mae_mev_per_A3", "nve_drift_mev_per_atom_per_ps", "fit_wall_s")
NVE = {"emt": {"timestep": 2.0, "temperature": 300.0}, "real": {"timestep": 0.5, "temperature": 500.0}}


# ----- data -----------------------------------------------------------------------------
def prepare(dataset: str, out: Path) -> dict:
    """Config, data directories and NVE structure of DATASET, converted once."""
    if dataset == "emt":
        dirs = {part: EMT_DIR / f"emt_{part}" for part in ("train", "val", "test")}
        if not all((path / "manifest.json").exists() for path in dirs.values()):
            run(["esen-data", "emt", "--out", str(EMT_DIR / "emt_all"), "--num", "1000", "--seed", "0", "--overwrite"])
            run(["esen-data", "split", str(EMT_DIR / "emt_all"), "--out", str(EMT_DIR / "emt"),
                 "--fractions", "0.8,0.1,0.1", "--seed", "0", "--overwrite"])
        structure = out / "md_structure.xyz"
        atoms = ase.build.bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 2, 2))
        atoms.symbols[::4] = "Au"
        ase.io.write(structure, atoms)
        return {"config": EMT_CONFIG, "dirs": dirs, "structure": structure, "nve": NVE["emt"],
                "base": ["strategy.name=single"]}
    spec = accuracy.DATASETS[dataset]
    dirs = accuracy.prepare_data(spec)
    structure = accuracy.SHARED_DATA / (spec.test_file or spec.train_file)
    return {"config": spec.config, "dirs": dirs, "structure": structure, "nve": NVE["real"], "base": []}


# ----- one run --------------------------------------------------------------------------
def arm_overrides(arm: str, budget_minutes: float, direct_share: float | None, clock: str = "wall") -> list[str]:
    """The stages of an arm, their time limits and where its conservative stage starts
    (accuracy.stage_overrides)."""
    if arm == "two_stage":
        minutes = accuracy.stage_minutes(direct_share, budget_minutes)
    else:
        minutes = {"scratch": {"conservative": budget_minutes}, "direct": {"direct": budget_minutes}}[arm]
    return accuracy.stage_overrides(minutes, clock)


def handover_start(run_dir: Path) -> dict | None:
    """Validation errors of the conservative stage's weights before its first step."""
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["stage"] == "conservative" and "loaded_from" in row:
            return {key: row.get(key) for key in ("energy_mae_mev_per_atom", "force_mae_mev_per_A")}
    return None


def test_run(prepared: dict, run_dir: Path, stage: str, nve_steps: int, out: Path) -> dict:
    """Test errors (float64) of a stage's best checkpoint, with that stage's forces, and its NVE drift."""
    checkpoint = run_dir / "checkpoints" / stage / "best"
    result = {"test": accuracy.evaluate(checkpoint, prepared["dirs"]["test"], stage, out / f"eval_{stage}")}
    if nve_steps > 0:
        stdout, _ = run(["esen-train", "md", str(checkpoint), "--structure", str(prepared["structure"]),
                         "--forces", stage, "--steps", str(nve_steps), "--timestep", str(prepared["nve"]["timestep"]),
                         "--temperature", str(prepared["nve"]["temperature"]), "--json", "--out", str(out / f"md_{stage}")])
        result["nve"] = {key: value for key, value in json.loads(stdout).items()
                         if key in ("drift_mev_per_atom_per_ps", "max_deviation_mev_per_atom", "num_atoms", "steps",
                                    "timestep_fs", "temperature_K")}
    return result


def one_run(prepared: dict, arm: str, direct_share: float | None, seed: int, args: argparse.Namespace,
            out: Path) -> dict:
    name = arm if direct_share is None else f"{arm}-{direct_share:g}"
    run_dir = out / f"seed{seed}" / name
    overrides = [*prepared["base"], f"seed={seed}", f"data.train=[{prepared['dirs']['train']}]",
                 f"data.val=[{prepared['dirs']['val']}]",
                 *arm_overrides(arm, args.budget_minutes, direct_share, args.clock), *args.set]
    finished = run_dir / "record.json"
    if finished.exists() and json.loads(finished.read_text())["overrides"] == overrides:
        record = json.loads(finished.read_text())  # a rerun of the same command skips what it has
        print(f"[{name} seed {seed}] (kept) {summary_line(record)}", file=sys.stderr, flush=True)
        return record
    load_before = load_average()
    wall = accuracy.fit(prepared["config"], run_dir / "run", overrides)
    record = {"arm": arm, "direct_share": direct_share, "seed": seed, "overrides": overrides,
              "fit_wall_s": round(wall, 1), "steps": accuracy.stage_steps(run_dir / "run"),
              "load_average": [load_before, load_average()]}
    final_stage = "direct" if arm == "direct" else "conservative"
    record.update(test_run(prepared, run_dir / "run", final_stage, args.nve_steps, run_dir))
    if arm == "two_stage":
        record["direct_stage"] = test_run(prepared, run_dir / "run", "direct", 0, run_dir)
        record["handover_start_val"] = handover_start(run_dir / "run")
    print(f"[{name} seed {seed}] {summary_line(record)}", file=sys.stderr, flush=True)
    write_json(finished, record)
    return record


def write_json(path: Path, value: dict) -> None:
    """Write through a temporary file and rename, so an interrupted write leaves the old file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)


def flat_metrics(record: dict) -> dict:
    test = record["test"]
    values = {key: test.get(key) for key in METRICS if key in test}
    values["nve_drift_mev_per_atom_per_ps"] = record.get("nve", {}).get("drift_mev_per_atom_per_ps")
    values["fit_wall_s"] = record["fit_wall_s"]
    return values


def summary_line(record: dict) -> str:
    values = flat_metrics(record)
    return (f"F {values['force_mae_mev_per_A']:.2f} meV/Å, E {values['energy_mae_mev_per_atom']:.3f} meV/atom, "
            f"steps {record['steps']}, fit {record['fit_wall_s']:.0f} s, load {record['load_average'][1][0]}")


# ----- aggregate ------------------------------------------------------------------------
def aggregate(records: list[dict]) -> list[dict]:
    """Per arm (and direct share): mean, sample std, min and max of each metric over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault((record["arm"], record["direct_share"]), []).append(record)
    arms = []
    for (arm, share), group in groups.items():
        stats = {}
        for key in METRICS:
            values = [flat_metrics(r).get(key) for r in group]
            values = np.array([v for v in values if v is not None], dtype=float)
            if values.size:
                stats[key] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if values.size > 1 else None,
                              "min": float(values.min()), "max": float(values.max())}
        steps = {stage: [r["steps"].get(stage) for r in group] for stage in ("direct", "conservative")}
        arms.append({"arm": arm, "direct_share": share, "seeds": [r["seed"] for r in group],
                     "steps": {stage: values for stage, values in steps.items() if any(values)}, **stats})
    return arms


def table(arms: list[dict]) -> str:
    rows = [("arm", "F meV/Å", "E meV/atom", "S meV/Å³", "drift meV/atom/ps", "fit s")]
    for arm in arms:
        label = arm["arm"] if arm["direct_share"] is None else f"{arm['arm']} ({arm['direct_share']:g} direct)"
        rows.append((label, *(_mean_std(arm.get(key)) for key in
                              ("force_mae_mev_per_A", "energy_mae_mev_per_atom", "stress_mae_mev_per_A3",
                               "nve_drift_mev_per_atom_per_ps", "fit_wall_s"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _mean_std(stats: dict | None) -> str:
    if not stats:
        return "-"
    return f"{stats['mean']:.3g}" + ("" if stats["std"] is None else f" ± {stats['std']:.2g}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=["emt", *sorted(accuracy.DATASETS)])
    parser.add_argument("--budget-minutes", type=float, required=True, help="training wall clock of every arm")
    parser.add_argument("--seeds", type=int, default=2, help="how many seeds (default 2)")
    parser.add_argument("--first-seed", type=int, default=0, help="the seeds are K..K+S-1 (default K = 0)")
    parser.add_argument("--direct-share", type=float, nargs="+", default=[0.5],
                        help="share(s) of the budget for the direct stage of two_stage (default 0.5)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="what the budget counts: wall clock, or each process's CPU time (equal "
                             "compute on a machine whose load from other work changes)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every arm")
    parser.add_argument("--nve-steps", type=int, default=200, help="NVE steps per run (0: none)")
    parser.add_argument("--out", default=None, help="work directory (default runs/two_stage/DATASET)")
    args = parser.parse_args(argv)
    if any(not 0 < share < 1 for share in args.direct_share):
        parser.error("--direct-share values must lie strictly between 0 and 1")

    out = Path(args.out or REPO_ROOT / "runs" / "two_stage" / args.dataset).resolve()
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare(args.dataset, out)
    plan = [(arm, share) for arm in args.arms for share in (args.direct_share if arm == "two_stage" else [None])]
    report = {"dataset": args.dataset, "budget_minutes": args.budget_minutes, "clock": args.clock,
              "seeds": list(range(args.first_seed, args.first_seed + args.seeds)),
              "direct_shares": args.direct_share, "set": args.set, "config": str(prepared["config"]),
              "data": {part: str(path) for part, path in prepared["dirs"].items()},
              "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "load_average_start": load_average(), "runs": []}
    for seed in report["seeds"]:
        for arm, share in (plan if seed % 2 == 0 else plan[::-1]):
            report["runs"].append(one_run(prepared, arm, share, seed, args, out))
            write_json(out / "report.json", report)  # kept if a later run fails
    report["arms"] = aggregate(report["runs"])
    report["load_average_end"] = load_average()
    write_json(out / "report.json", report)
    print(table(report["arms"]))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
