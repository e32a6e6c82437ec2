"""MACE beside eSEN: mace-torch trained on the same split for the same wall-clock budget.

    python benchmarks/mace_side.py DATASET --budget-minutes M --train DIR --val DIR --test DIR --out DIR

benchmarks/accuracy.py --mace calls this with its own dataset directories, so both models see
the same structures. mace-torch lives in its own virtualenv, /work/main/.venvs/mace (ignored by
git), made on first use: `python -m venv`, then `pip install torch==2.13.0` first (the CPU wheel
on this disk; an unpinned torch pulls a multi-GB CUDA build), then `pip install mace-torch`.

Recipe: the training example of the MACE README (github.com/ACEsuit/mace, "Training":
`mace_run_train` with model MACE, hidden_irreps '128x0e + 128x1o', r_max 5 Å, EMA 0.99,
AMSGrad, SWA ("stage two") over the last quarter, float64), with the rMD17 settings the MACE
work uses on top: batch size 5, learning rate 0.01, forces weight 1000 against energy weight 1
(the paper's rMD17 models are larger than the README example; on this CPU even this size
trains for only a few epochs). Stage two keeps mace-torch's default weights (energy 1000,
forces 100). Periodic data with stress adds `--loss=stress`.

Budget: a probe run (2 epochs on 50 training structures, not counted) gives the time of an
epoch from MACE's own log timestamps; the real run gets as many epochs as fit the budget.
Validation structures are costed at a third of a training structure (forward and one backward
against forward, double backward and optimizer step). Prints one JSON object (last line):
test errors computed with esen_train.evaluation.errors from `mace_eval_configs` predictions,
so the numbers are defined exactly as `esen-train eval`'s.
"""
from __future__ import annotations

import argparse
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
PROBE_STRUCTURES = 50
PROBE_EPOCHS = 2
VALIDATION_COST = 1 / 3  # of a training structure's
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) INFO: (Initial|Epoch \d+):")

RECIPE = [
    "--model=MACE", "--num_interactions=2", "--hidden_irreps=128x0e + 128x1o", "--correlation=3",
    "--max_ell=3", "--r_max=5.0", "--num_radial_basis=8", "--E0s=average",
    "--energy_weight=1.0", "--forces_weight=1000.0", "--lr=0.01", "--batch_size=5", "--valid_batch_size=5",
    "--ema", "--ema_decay=0.99", "--amsgrad", "--default_dtype=float64", "--device=cpu", "--seed=123",
    "--error_table=TotalMAE", "--energy_key=REF_energy", "--forces_key=REF_forces", "--save_cpu",
    "--eval_interval=1",
]


def ensure_venv() -> Path:
    """The virtualenv's bin directory, created with torch 2.13.0 (CPU) then mace-torch."""
    bin_dir = VENV / "bin"
    if (bin_dir / "mace_run_train").exists():
        return bin_dir
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(bin_dir / "pip"), "install", "-q", "torch==2.13.0"], check=True)
    subprocess.run([str(bin_dir / "pip"), "install", "-q", "mace-torch"], check=True)
    return bin_dir


def write_extxyz(dataset_dir: Path, path: Path, limit: int | None = None) -> tuple[int, bool]:
    """A dataset directory as extxyz with MACE's REF_* keys; returns (structures, has stress)."""
    structures = read_labelled_structures(dataset_dir)[:limit]
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


def train(bin_dir: Path, work: Path, train_file: Path, val_file: Path, epochs: int, stress: bool) -> float:
    """One `mace_run_train` in work/ (replaced); returns its wall seconds."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    args = [str(bin_dir / "mace_run_train"), "--name=mace", f"--train_file={train_file}", f"--valid_file={val_file}",
            f"--max_num_epochs={epochs}", "--skip_evaluate_heads=Default", *RECIPE]
    if epochs >= 4:  # stage two over the last quarter; a shorter run has no last quarter
        args += ["--swa", f"--start_swa={epochs - max(1, epochs // 4)}"]
    if stress:
        args += ["--loss=stress", "--stress_key=REF_stress", "--stress_weight=100.0"]
    started = time.perf_counter()
    result = subprocess.run(args, cwd=work, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - started
    (work / "stdout.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"mace_run_train failed in {work}:\n{result.stderr[-3000:]}")
    return seconds


def log_times(work: Path) -> list[datetime]:
    """Timestamps of MACE's validation lines ("Initial", "Epoch 0", ...) in the run's log."""
    times = []
    for line in (work / "stdout.log").read_text().splitlines():
        match = LOG_LINE.match(line)
        if match:
            times.append(datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S.%f"))
    return times


def plan_epochs(probe_wall: float, times: list[datetime], n_train: int, n_val: int, budget_s: float) -> dict:
    """Epochs that fit the budget, from the probe's epoch time scaled to the full set."""
    if len(times) < PROBE_EPOCHS + 1:
        raise RuntimeError(f"the MACE probe logged {len(times)} validation lines, expected {PROBE_EPOCHS + 1}")
    epoch_probe = (times[-1] - times[0]).total_seconds() / PROBE_EPOCHS
    per_structure = epoch_probe / (PROBE_STRUCTURES + VALIDATION_COST * n_val)
    epoch_full = per_structure * (n_train + VALIDATION_COST * n_val)
    fixed = probe_wall - PROBE_EPOCHS * epoch_probe
    epochs = max(1, int((budget_s - fixed) / epoch_full))
    return {"probe_wall_s": probe_wall, "probe_epoch_s": epoch_probe, "epoch_s_estimate": epoch_full,
            "fixed_s": fixed, "epochs": epochs}


def evaluate(bin_dir: Path, work: Path, test_dir: Path) -> dict:
    """Test errors of the trained model (the stage-two model when there is one)."""
    model = work / "mace_stagetwo.model"
    if not model.exists():
        model = work / "mace.model"
    test_file, predicted = work / "test.xyz", work / "test_predicted.xyz"
    write_extxyz(test_dir, test_file)
    subprocess.run([str(bin_dir / "mace_eval_configs"), f"--configs={test_file}", f"--model={model}",
                    f"--output={predicted}", "--device=cpu", "--default_dtype=float64", "--batch_size=20"],
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    structures = read_labelled_structures(test_dir)
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
    return {**metrics, "model": str(model)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="a name for the report (the data comes from --train/--val/--test)")
    parser.add_argument("--budget-minutes", type=float, required=True)
    parser.add_argument("--train", type=Path, required=True, help="training dataset directory (esen-data)")
    parser.add_argument("--val", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "mace_side")
    args = parser.parse_args(argv)

    bin_dir = ensure_venv()
    out = args.out.resolve()
    n_train, stress = write_extxyz(args.train, out / "train.xyz")
    n_val, _ = write_extxyz(args.val, out / "val.xyz")
    write_extxyz(args.train, out / "probe_train.xyz", limit=PROBE_STRUCTURES)

    load_probe = list(os.getloadavg())
    probe_wall = train(bin_dir, out / "probe", out / "probe_train.xyz", out / "val.xyz", PROBE_EPOCHS, stress)
    plan = plan_epochs(probe_wall, log_times(out / "probe"), n_train, n_val, 60 * args.budget_minutes)
    load_before = list(os.getloadavg())
    train_wall = train(bin_dir, out / "run", out / "train.xyz", out / "val.xyz", plan["epochs"], stress)
    load_after = list(os.getloadavg())
    test = evaluate(bin_dir, out / "run", args.test)
    report = {
        "dataset": args.dataset, "budget_minutes": args.budget_minutes, "train_structures": n_train,
        "val_structures": n_val, "plan": plan, "train_wall_s": train_wall, "test": test,
        "recipe": RECIPE, "load_average": {"probe": load_probe, "training_start": load_before,
                                           "training_end": load_after},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
