"""MACE beside eSEN: mace-torch trained on the same split for the same wall-clock budget, at
two model sizes; the comparison is against the better of them.

    python benchmarks/mace_side.py DATASET --budget-minutes M --train DIR --val DIR --test DIR --out DIR
                                   [--clock wall|cpu]
                                   [--sizes small paper] [--test-structures N]

benchmarks/accuracy.py --mace calls this with its own dataset directories, so both models see
the same structures. mace-torch lives in its own virtualenv, .venvs/mace in the checkout (ignored by
git), made on first use: `python -m venv`, then `pip install torch==2.13.0` first (the CPU wheel
on this disk; an unpinned torch pulls a multi-GB CUDA build), then `pip install mace-torch==0.3.16`.

Sizes (each trains for the whole budget, one after the other; `--sizes` picks them):
- `small`, the size for a CPU budget: 32 channels with max_L 1 (hidden irreps 32x0e + 32x1o),
  2 interactions, correlation 3, float32 (MACE's README: "float32 gives a significant speed-up,
  usually a factor of x2 in training"), forces weight 100 against energy 1 (mace-torch's
  default), batch 5, lr 0.01, EMA 0.99, AMSGrad, E0s average. On rMD17 aspirin with one core and
  35 minutes this size trains about 24 epochs, against 1-7 for the paper size.
- `paper`: the training example of the MACE README (github.com/ACEsuit/mace, "Training":
  hidden irreps 128x0e + 128x1o, max_ell 3, r_max 5 Å, EMA 0.99, AMSGrad, float64) with the
  rMD17 settings of the MACE work on top: batch 5, lr 0.01, forces weight 1000 against energy 1.
Both: r_max 5 Å, 8 radial functions, SWA ("stage two", mace-torch's default stage-two weights,
energy 1000 and forces 100) over the last quarter when there are at least 4 epochs; periodic
data with stress adds `--loss=stress` with stress weight 100.

Budget: a probe run per size (two epochs on 10 training and 10 validation structures, not
counted) gives, from MACE's own log timestamps, upper bounds on the seconds per validation
structure (start of training to the "Initial" validation line, warm-up included) and per
training structure (the second epoch, its validation included; the first epoch's warm-up made
training look up to 6x cheaper than it is), and the fixed cost (start-up, model saving). The
real run gets as many epochs as fit the budget, so it may use less of it than planned:
`accuracy.py --match-mace-cpu` then gives eSEN exactly what MACE used. When not even one
epoch fits, it trains one epoch on as many training structures (drawn at random, seed 0) as
fit: the same wall-clock, fewer samples seen.
With `--clock cpu` the budget is CPU time of the training process (eSEN's `clock: cpu`): the
probe's timings are scaled by its CPU time over its wall clock, so a probe on a busy machine
plans the same epochs as on an idle one; each run also reports its CPU seconds.

Prints one JSON object (last line): per size its plan, wall clock, load and test errors
(computed with esen_train.evaluation.errors from `mace_eval_configs` predictions, so the numbers
are defined exactly as `esen-train eval`'s); `best_size` is the size with the lower test force
MAE, and `test` / `train_wall_s` at the top level are that size's.
"""
from __future__ import annotations

import argparse
import resource
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import ase.io
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script: import esen_train from this checkout

from esen_train.evaluation.errors import compute_errors, read_labelled_structures  # noqa: E402

VENV = REPO_ROOT / ".venvs" / "mace"
PROBE_STRUCTURES = 10
PROBE_EPOCHS = 2  # the plan times the last one; the first carries the warm-up
BATCH_SIZE = 5
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) INFO: (Started training|Initial|Epoch \d+|Training complete)")

COMMON = [
    "--model=MACE", "--num_interactions=2", "--correlation=3", "--max_ell=3", "--r_max=5.0",
    "--num_radial_basis=8", "--E0s=average", "--energy_weight=1.0", "--lr=0.01", f"--batch_size={BATCH_SIZE}",
    "--valid_batch_size=5", "--ema", "--ema_decay=0.99", "--amsgrad", "--device=cpu", "--seed=123",
    "--error_table=TotalMAE", "--energy_key=REF_energy", "--forces_key=REF_forces", "--save_cpu",
    "--eval_interval=1",
    "--plot=False",  # the plots re-evaluate the whole training set after training, on our clock
]
SIZES = {
    "small": ["--num_channels=32", "--max_L=1", "--default_dtype=float32", "--forces_weight=100.0"],
    "paper": ["--hidden_irreps=128x0e + 128x1o", "--default_dtype=float64", "--forces_weight=1000.0"],
}


def recipe(size: str) -> list[str]:
    return [*COMMON, *SIZES[size]]


def dtype_of(size: str) -> str:
    return next(arg.split("=", 1)[1] for arg in SIZES[size] if arg.startswith("--default_dtype="))


def ensure_venv() -> Path:
    """The virtualenv's bin directory, created with torch 2.13.0 (CPU) then mace-torch."""
    bin_dir = VENV / "bin"
    if (bin_dir / "mace_run_train").exists():
        return bin_dir
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(bin_dir / "pip"), "install", "-q", "torch==2.13.0"], check=True)
    subprocess.run([str(bin_dir / "pip"), "install", "-q", "mace-torch==0.3.16"], check=True)
    return bin_dir


def write_extxyz(dataset_dir: Path, path: Path, limit: int | None = None) -> tuple[int, bool]:
    """A dataset directory as extxyz with MACE's REF_* keys; returns (structures, has stress).
    With `limit`, that many structures drawn at random (seed 0)."""
    structures = random_subset(read_labelled_structures(dataset_dir), limit)
    frames = []
    for structure in structures:
        atoms = structure.atoms.copy()
        atoms.info["REF_energy"] = structure.energy
        atoms.arrays["REF_forces"] = structure.forces
        if structure.stress is not None:
            atoms.info["REF_stress"] = structure.stress.reshape(9)
        frames.append(atoms)
    path.parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(path, frames, format="extxyz")
    return len(frames), any(s.stress is not None for s in structures)


def random_subset(structures: list, limit: int | None) -> list:
    """`limit` structures drawn at random (seed 0), in their original order; all if None."""
    if limit is None or limit >= len(structures):
        return structures
    chosen = np.random.default_rng(0).choice(len(structures), size=limit, replace=False)
    return [structures[i] for i in sorted(chosen)]


def train(bin_dir: Path, work: Path, train_file: Path, val_file: Path, epochs: int, stress: bool,
          size: str) -> tuple[float, float]:
    """One `mace_run_train` of a size in work/ (replaced); returns its wall and CPU seconds."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    args = [str(bin_dir / "mace_run_train"), "--name=mace", f"--train_file={train_file}", f"--valid_file={val_file}",
            f"--max_num_epochs={epochs}", "--skip_evaluate_heads=Default", *recipe(size)]
    if epochs >= 4:  # stage two over the last quarter; a shorter run has no last quarter
        args += ["--swa", f"--start_swa={epochs - max(1, epochs // 4)}"]
    if stress:
        args += ["--loss=stress", "--stress_key=REF_stress", "--stress_weight=100.0"]
    started, cpu_started = time.perf_counter(), children_cpu_seconds()
    result = subprocess.run(args, cwd=work, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds, cpu_seconds = time.perf_counter() - started, children_cpu_seconds() - cpu_started
    (work / "stdout.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"mace_run_train failed in {work}:\n{result.stderr[-3000:]}")
    return seconds, cpu_seconds


def children_cpu_seconds() -> float:
    """User + system CPU time of the finished child processes of this one."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def log_times(work: Path, epochs: int) -> dict[str, datetime]:
    """Timestamps of "Started training", "Initial" (validation) and "Epoch N" in MACE's log,
    which must reach "Epoch {epochs - 1}"."""
    times = {}
    for line in (work / "stdout.log").read_text().splitlines():
        match = LOG_LINE.match(line)
        if match:
            times[match.group(2)] = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S.%f")
    missing = {"Started training", "Initial", *(f"Epoch {n}" for n in range(epochs))} - set(times)
    if missing:
        raise RuntimeError(f"MACE's log in {work} lacks the lines {sorted(missing)}")
    return times


def plan_epochs(probe_wall: float, times: dict[str, datetime], n_train: int, n_val: int, budget_s: float,
                cpu_share: float = 1.0) -> dict:
    """Epochs, and training structures per epoch, that fit the budget, from a probe of
    PROBE_EPOCHS epochs on PROBE_STRUCTURES training and validation structures. Upper bounds:
    a training structure costs at most a tenth of the probe's last epoch (its validation
    included), a validation structure a tenth of the first validation (warm-up included). The
    first epoch is not used: its warm-up made training look several times cheaper than it is.
    The log gives wall seconds; `cpu_share` (the probe's CPU time over its wall clock; 1 for
    a wall-clock budget) turns them into the budget's seconds."""
    last, before_last = f"Epoch {PROBE_EPOCHS - 1}", f"Epoch {PROBE_EPOCHS - 2}"
    per_val = cpu_share * (times["Initial"] - times["Started training"]).total_seconds() / PROBE_STRUCTURES
    per_train = cpu_share * (times[last] - times[before_last]).total_seconds() / PROBE_STRUCTURES
    fixed = cpu_share * (probe_wall - (times[last] - times["Started training"]).total_seconds())
    available = budget_s - fixed - n_val * per_val  # the initial validation
    epoch = n_train * per_train + n_val * per_val
    plan = {"probe_wall_s": probe_wall, "cpu_share": cpu_share, "seconds_per_train_structure": per_train,
            "seconds_per_val_structure": per_val, "fixed_s": fixed, "epoch_s_estimate": epoch}
    if available >= epoch:
        return {**plan, "epochs": int(available / epoch), "train_structures": n_train}
    fitting = int((available - n_val * per_val) / per_train)
    # mace-torch drops an incomplete last batch: fewer than a batch would train nothing
    return {**plan, "epochs": 1, "train_structures": max(BATCH_SIZE, min(n_train, fitting))}


def evaluate(bin_dir: Path, work: Path, test_dir: Path, limit: int | None, dtype: str) -> dict:
    """Test errors of the trained model (the stage-two model when there is one) on the test
    set, or on `limit` of its structures (random, seed 0; the file test.xyz says which)."""
    model = work / "mace_stagetwo.model"
    if not model.exists():
        model = work / "mace.model"
    test_file, predicted = work / "test.xyz", work / "test_predicted.xyz"
    _, stress = write_extxyz(test_dir, test_file, limit)
    subprocess.run([str(bin_dir / "mace_eval_configs"), f"--configs={test_file}", f"--model={model}",
                    f"--output={predicted}", "--device=cpu", f"--default_dtype={dtype}", "--batch_size=20",
                    *(["--compute_stress"] if stress else [])],
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    structures = random_subset(read_labelled_structures(test_dir), limit)
    predictions = []
    for atoms in ase.io.read(predicted, index=":"):
        prediction = {"energy": atoms.info["MACE_energy"], "forces": atoms.arrays["MACE_forces"]}
        if "MACE_stress" in atoms.info:
            prediction["stress"] = np.asarray(atoms.info["MACE_stress"])
        predictions.append(prediction)
    metrics = compute_errors(structures, predictions)
    metrics.pop("per_element")
    natoms = {len(s.atoms) for s in structures}
    metrics["energy_mae_mev_per_structure"] = (
        metrics["energy_mae_mev_per_atom"] * natoms.pop() if len(natoms) == 1 else None
    )
    return {**metrics, "model": str(model), "test_file": str(test_file)}


def run_size(bin_dir: Path, size: str, args: argparse.Namespace, out: Path, n_train: int, n_val: int,
             stress: bool) -> dict:
    """Probe, plan, train and test one size in out/size/."""
    work = out / size
    load_probe = list(os.getloadavg())
    probe_wall, probe_cpu = train(bin_dir, work / "probe", out / "probe_train.xyz", out / "probe_val.xyz",
                                  PROBE_EPOCHS, stress, size)
    cpu_share = probe_cpu / probe_wall if args.clock == "cpu" else 1.0
    probe_times = log_times(work / "probe", PROBE_EPOCHS)
    plan = plan_epochs(probe_wall, probe_times, n_train, n_val, 60 * args.budget_minutes, cpu_share)
    train_file = out / "train.xyz"
    if plan["train_structures"] < n_train:
        train_file = work / "train_subset.xyz"
        write_extxyz(args.train, train_file, limit=plan["train_structures"])
    load_before = list(os.getloadavg())
    train_wall, train_cpu = train(bin_dir, work / "run", train_file, out / "val.xyz", plan["epochs"], stress, size)
    load_after = list(os.getloadavg())
    run_times = log_times(work / "run", plan["epochs"])
    train_loop_s = (run_times["Training complete"] - run_times["Started training"]).total_seconds()
    test = evaluate(bin_dir, work / "run", args.test, args.test_structures, dtype_of(size))
    return {"plan": plan, "train_wall_s": train_wall, "train_cpu_s": train_cpu, "train_loop_s": train_loop_s, "test": test,
            "recipe": recipe(size), "load_average": {"probe": load_probe, "training_start": load_before,
                                                     "training_end": load_after}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="a name for the report (the data comes from --train/--val/--test)")
    parser.add_argument("--budget-minutes", type=float, required=True, help="per size")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="what the budget counts: wall clock, or the training process's CPU time")
    parser.add_argument("--train", type=Path, required=True, help="training dataset directory (esen-data)")
    parser.add_argument("--val", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "mace_side")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["small", "paper"],
                        help="model sizes, trained one after the other (default both)")
    parser.add_argument("--test-structures", type=int, default=None,
                        help="evaluate on this many test structures (random, seed 0; default all)")
    args = parser.parse_args(argv)

    bin_dir = ensure_venv()
    out = args.out.resolve()
    n_train, stress = write_extxyz(args.train, out / "train.xyz")
    n_val, _ = write_extxyz(args.val, out / "val.xyz")
    write_extxyz(args.train, out / "probe_train.xyz", limit=PROBE_STRUCTURES)
    write_extxyz(args.val, out / "probe_val.xyz", limit=PROBE_STRUCTURES)
    sizes = {size: run_size(bin_dir, size, args, out, n_train, n_val, stress) for size in args.sizes}
    best = min(sizes, key=lambda size: sizes[size]["test"]["force_mae_mev_per_A"])
    report = {
        "dataset": args.dataset, "budget_minutes": args.budget_minutes, "train_structures_available": n_train,
        "val_structures": n_val, "sizes": sizes, "best_size": best, "test": sizes[best]["test"],
        "train_wall_s": sizes[best]["train_wall_s"],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
