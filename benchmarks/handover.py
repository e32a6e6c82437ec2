"""The hand-over from direct to conservative training, variant by variant, at equal steps.

    OMP_NUM_THREADS=1 python benchmarks/handover.py DATASET --direct-steps N --conservative-steps K
                      [--val-every V] [--seeds S] [--set KEY=VALUE ...]
                      [--variant NAME [KEY=VALUE ...]] ... [--out DIR]

Per seed, `esen-train fit CONFIG stages=[direct]` trains N direct steps once; then every
variant trains K conservative steps from that checkpoint (`stages=[conservative]
conservative.init_from=DIRECT_BEST` plus the variant's overrides), validating every V steps,
so all variants start from the same weights and their learning curves can be laid side by
side. A variant that sets `direct.*` keys gets its own direct run (shared by the variants that
set the same keys); one that sets `conservative.init_from=none` starts from fresh weights (the
conservative-from-scratch reference). `--set` overrides go to every run. Steps, not minutes,
are equal across variants: on a shared machine whose load changes, that keeps the comparison
about the settings (the variants here do not change the cost of a step; benchmarks/two_stage.py
compares recipes at equal wall clock).

Per variant and seed: the validation curve of the conservative stage (step 0 is the loaded
direct weights with conservative forces), and test errors (`esen-train eval --dtype float64`)
of the final conservative checkpoint and of the direct checkpoint with its direct forces.
DATASET and data as in benchmarks/two_stage.py. Prints a table and one JSON object (last line;
also OUT/report.json).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))  # its sibling scripts
import accuracy  # noqa: E402
import two_stage  # noqa: E402
from accuracy import load_average  # noqa: E402


def direct_run(prepared: dict, seed: int, direct_overrides: list[str], args: argparse.Namespace, out: Path,
               cache: dict) -> dict:
    """The direct stage of `seed` with these overrides: trained once, tested with direct forces."""
    key = (seed, tuple(direct_overrides))
    if key not in cache:
        run_dir = out / f"seed{seed}" / f"direct-{len([k for k in cache if k[0] == seed])}" / "run"
        overrides = [*common(prepared, seed, args), "stages=[direct]", f"direct.max_steps={args.direct_steps}",
                     f"direct.val_every={args.direct_steps}", f"direct.checkpoint_every={args.direct_steps}",
                     *direct_overrides]
        load_before = load_average()
        wall = accuracy.fit(prepared["config"], run_dir, overrides)
        test = two_stage.test_run(prepared, run_dir, "direct", 0, run_dir.parent)["test"]
        cache[key] = {"run_dir": run_dir, "overrides": direct_overrides, "fit_wall_s": round(wall, 1),
                      "test": test, "load_average": [load_before, load_average()]}
    return cache[key]


def common(prepared: dict, seed: int, args: argparse.Namespace) -> list[str]:
    return [*prepared["base"], f"seed={seed}", f"data.train=[{prepared['dirs']['train']}]",
            f"data.val=[{prepared['dirs']['val']}]", *args.set]


def curve(run_dir: Path) -> list[dict]:
    """The conservative stage's validation rows: step, energy, force and stress errors."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = ("step", "energy_mae_mev_per_atom", "force_mae_mev_per_A", "stress_mae_mev_per_A3")
    return [{k: row[k] for k in keys if k in row} for row in rows
            if row["stage"] == "conservative" and row["split"] == "val"]


def variant_run(prepared: dict, name: str, settings: list[str], seed: int, args: argparse.Namespace, out: Path,
                cache: dict) -> dict:
    direct_settings = [s for s in settings if s.startswith("direct.")]
    own = [s for s in settings if not s.startswith("direct.")]
    from_scratch = "conservative.init_from=none" in own
    record = {"variant": name, "settings": settings, "seed": seed}
    init = []
    if not from_scratch:
        direct = direct_run(prepared, seed, direct_settings, args, out, cache)
        init = [f"conservative.init_from={direct['run_dir'] / 'checkpoints' / 'direct' / 'best'}"]
        record["direct"] = {k: v for k, v in direct.items() if k != "run_dir"}
    run_dir = out / f"seed{seed}" / name / "run"
    steps = args.conservative_steps
    overrides = [*common(prepared, seed, args), "stages=[conservative]", f"conservative.max_steps={steps}",
                 f"conservative.val_every={args.val_every}", f"conservative.checkpoint_every={steps}", *init, *own]
    load_before = load_average()
    wall = accuracy.fit(prepared["config"], run_dir, overrides)
    record.update({"overrides": overrides, "fit_wall_s": round(wall, 1), "curve": curve(run_dir),
                   "test": two_stage.test_run(prepared, run_dir, "conservative", 0, run_dir.parent)["test"],
                   "load_average": [load_before, load_average()]})
    final = record["test"]
    print(f"[{name} seed {seed}] test F {final['force_mae_mev_per_A']:.2f} meV/Å, E {final['energy_mae_mev_per_atom']:.3f} "
          f"meV/atom; curve F {[round(p['force_mae_mev_per_A'], 1) for p in record['curve']]}; "
          f"load {record['load_average'][1][0]}", file=sys.stderr, flush=True)
    return record


def summarise(records: list[dict]) -> list[dict]:
    variants: dict[str, list[dict]] = {}
    for record in records:
        variants.setdefault(record["variant"], []).append(record)
    rows = []
    for name, group in variants.items():
        row = {"variant": name, "settings": group[0]["settings"], "seeds": [r["seed"] for r in group]}
        for key in ("force_mae_mev_per_A", "energy_mae_mev_per_atom", "stress_mae_mev_per_A3"):
            values = np.array([r["test"][key] for r in group if r["test"].get(key) is not None])
            if values.size:
                row[f"test_{key}"] = {"mean": float(values.mean()),
                                      "std": float(values.std(ddof=1)) if values.size > 1 else None}
        direct = [r["direct"]["test"]["force_mae_mev_per_A"] for r in group if "direct" in r]
        if direct:
            row["direct_test_force_mae_mev_per_A"] = float(np.mean(direct))
        starts = [r["curve"][0]["force_mae_mev_per_A"] for r in group if r["curve"][0]["step"] == 0]
        row["start_val_force_mae_mev_per_A"] = float(np.mean(starts)) if starts else None  # none from scratch
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'variant':>24}  {'test F':>14}  {'test E':>14}  {'direct F':>9}  {'val F at step 0':>16}"]
    for row in rows:
        force, energy = row["test_force_mae_mev_per_A"], row["test_energy_mae_mev_per_atom"]
        lines.append(f"{row['variant']:>24}  {_cell(force):>14}  {_cell(energy):>14}  "
                     f"{row.get('direct_test_force_mae_mev_per_A', float('nan')):>9.2f}  "
                     f"{row['start_val_force_mae_mev_per_A'] or float('nan'):>16.1f}")
    return "\n".join(lines)


def _cell(stats: dict) -> str:
    return f"{stats['mean']:.2f}" + ("" if stats["std"] is None else f" ± {stats['std']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=["emt", *sorted(accuracy.DATASETS)])
    parser.add_argument("--direct-steps", type=int, required=True)
    parser.add_argument("--conservative-steps", type=int, required=True)
    parser.add_argument("--val-every", type=int, default=25)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    parser.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"), required=True,
                        help="a name and its overrides; repeat for each variant")
    parser.add_argument("--out", default=None, help="work directory (default runs/handover/DATASET)")
    args = parser.parse_args(argv)

    out = Path(args.out or REPO_ROOT / "runs" / "handover" / args.dataset).resolve()
    out.mkdir(parents=True, exist_ok=True)
    prepared = two_stage.prepare(args.dataset, out)
    report = {"dataset": args.dataset, "direct_steps": args.direct_steps, "conservative_steps": args.conservative_steps,
              "set": args.set, "config": str(prepared["config"]), "load_average_start": load_average(), "runs": []}
    cache: dict = {}
    for seed in range(args.seeds):
        for name, *settings in args.variant:
            report["runs"].append(variant_run(prepared, name, settings, seed, args, out, cache))
            two_stage.write_json(out / "report.json", report)
    report["variants"] = summarise(report["runs"])
    report["load_average_end"] = load_average()
    two_stage.write_json(out / "report.json", report)
    print(table(report["variants"]))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
