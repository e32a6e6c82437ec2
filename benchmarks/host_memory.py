"""keep_freed_host_memory on and off: the conservative training step's time, page faults and
peak resident memory, each mode in fresh processes taking turns; prints JSON.

    OMP_NUM_THREADS=1 python benchmarks/host_memory.py [--systems cu108,aspirin] [--pairs 2]
        [--steps 4] [--threads 2]

The step is profile_conservative.py's (model_vs_fairchem.py's "train conservative" without
the AdamW update). Per system, `pairs` times: one process with glibc's defaults, then one with
esen_train.engine.host_memory.keep_freed_host_memory() (what `esen-train fit` applies unless
keep_freed_host_memory=false), each running `steps` steps after one warm-up step. Reported per
mode: the median step (wall and CPU seconds), minor page faults per step, peak RSS (MB), and
the ratio keep / default of the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
MODES = ("default", "keep")


def child(system: str, mode: str, steps: int, threads: int) -> dict:
    """One process's measurement (run as `host_memory.py --child SYSTEM MODE ...`)."""
    sys.path.insert(0, str(BENCHMARKS))
    import torch

    import case_server
    import esen_side
    import model_vs_fairchem as bench
    import profile_conservative as profile
    from esen_train.engine.host_memory import keep_freed_host_memory

    if mode == "keep" and not keep_freed_host_memory():
        raise SystemExit("keep_freed_host_memory() is not available here (not glibc)")
    torch.set_num_threads(threads)
    batch_args = argparse.Namespace(cu_cells=1, aspirin_molecules=8, seed=0, hyperparameters=bench.SMALL)
    arrays, periodic = profile.system_batch(system, batch_args)
    torch.manual_seed(0)
    case = {"mode": "conservative", "model": bench.SMALL, "stress": periodic, "device": "cpu"}
    model = esen_side.build(case, arrays)[0]
    batch, targets = esen_side.batch_of(arrays, "cpu"), case_server.targets_of(arrays, "cpu")

    def step() -> tuple[float, float, int]:
        usage, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        loss = case_server.loss_of(model(batch, forces="conservative", stress=periodic, create_graph=True), targets)
        case_server.backward_to_parameters(loss, model)
        model.zero_grad(set_to_none=True)
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
        return time.perf_counter() - wall, cpu, after.ru_minflt - usage.ru_minflt

    step()  # warm-up
    runs = [step() for _ in range(steps)]
    return {"wall_s": [run[0] for run in runs], "cpu_s": [run[1] for run in runs],
            "page_faults": [run[2] for run in runs],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(system: str, mode: str, args) -> dict:
    command = [sys.executable, __file__, "--child", system, mode, "--steps", str(args.steps),
               "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(runs: list[dict]) -> dict:
    def median(key: str) -> float:
        return statistics.median(value for run in runs for value in run[key])

    return {"step_wall_s": round(median("wall_s"), 3), "step_cpu_s": round(median("cpu_s"), 3),
            "page_faults_per_step": int(median("page_faults")),
            "peak_rss_mb": round(max(run["peak_rss_mb"] for run in runs), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", default="cu108,aspirin", type=lambda s: s.split(","))
    parser.add_argument("--pairs", type=int, default=2, help="processes per mode, taking turns")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("SYSTEM", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.steps, args.threads)))
        return 0
    report = {"benchmark": "keep_freed_host_memory off (default) and on (keep), conservative training step",
              "threads": args.threads, "load_average_start": os.getloadavg(), "systems": {}}
    for system in args.systems:
        runs = {mode: [] for mode in MODES}
        for _ in range(args.pairs):
            for mode in MODES:
                runs[mode].append(measure(system, mode, args))
        figures = {mode: summary(runs[mode]) for mode in MODES}
        figures["keep_over_default"] = {
            key: round(figures["keep"][key] / figures["default"][key], 3)
            for key in ("step_wall_s", "step_cpu_s", "peak_rss_mb")}
        report["systems"][system] = figures
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
