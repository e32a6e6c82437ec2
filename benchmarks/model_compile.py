"""Eager against torch.compile'd eSEN (`compile_model`): training-step time; prints JSON.

    OMP_NUM_THREADS=1 python benchmarks/model_compile.py [--model esen-sm] [--steps 3]

For each system (108-atom periodic Cu at 6 Å; a batch of 5 rMD17 aspirins, or 5 ethanol
molecules from ASE when ../shared/data is absent) and each force mode (direct:
energy + direct forces, one backward; conservative: forces by autograd with
create_graph, then the double backward), it measures the median CPU time of a
training step (forward, loss, backward) after warm-up, eager and compiled, in this
one process, and the ratio eager / compiled (> 1: compiling pays). Compile time is the
first compiled step's. The atoms of each system jiggle between steps (same graph
sizes) so that nothing is cached across steps.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import ase.build
import ase.io
import numpy as np
import torch
from ase import Atoms
from torch_geometric.data import Batch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from esen_train.data.dataset import record_to_graph  # noqa: E402
from shared_data import ASPIRIN  # noqa: E402
from esen_train.data.records import StructureRecord  # noqa: E402
from esen_train.model import ESEN, compile_model, load_model_config  # noqa: E402



def systems() -> dict[str, list[Atoms]]:
    copper = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True) * (3, 3, 3)
    copper.rattle(0.05, seed=0)
    if ASPIRIN.exists():
        molecules = ("aspirin_x5", ase.io.read(ASPIRIN, ":5"))
    else:
        molecules = ("ethanol_x5", [ase.build.molecule("CH3CH2OH") for _ in range(5)])
    return {"cu108": [copper], molecules[0]: molecules[1]}


def batch_of(structures: list[Atoms], cutoff: float) -> Batch:
    """The batch the data loader would give for these structures (labels zero: unused)."""
    records = [
        StructureRecord(
            positions=atoms.positions, atomic_numbers=atoms.numbers, cell=atoms.cell.array, pbc=atoms.pbc,
            energy=0.0, forces=np.zeros_like(atoms.positions), source_file="benchmark", source_index=index,
        )
        for index, atoms in enumerate(structures)
    ]
    return Batch.from_data_list([record_to_graph(record, cutoff, torch.float32) for record in records])


def step_seconds(model: ESEN, batch: Batch, forces: str, steps: int) -> tuple[list[float], float]:
    """CPU seconds of each training step (the first one separately: it includes compiling)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    times = []
    for step in range(steps + 2):
        batch.pos = batch.pos + 1e-4 * torch.randn_like(batch.pos)
        started = time.process_time()
        out = model(batch, forces=forces, create_graph=forces == "conservative")
        loss = out["energy"].float().square().mean() + out["forces"].square().mean()
        torch.autograd.grad(loss, parameters, allow_unused=True)
        times.append(time.process_time() - started)
    return times[2:], times[0]


def measure(model_name: str, structures: list[Atoms], forces: str, steps: int) -> dict:
    config = replace(load_model_config(model_name), direct_forces=forces == "direct")
    torch.manual_seed(0)
    eager = ESEN(config)
    compiled = compile_model(ESEN(config))
    compiled.load_state_dict(eager.state_dict())
    batch = batch_of(structures, config.cutoff)
    eager_times, _ = step_seconds(eager, batch, forces, steps)
    compiled_times, first = step_seconds(compiled, batch, forces, steps)
    eager_median, compiled_median = statistics.median(eager_times), statistics.median(compiled_times)
    return {
        "atoms": int(batch.natoms.sum()),
        "edges": int(batch.edge_index.shape[1]),
        "eager_step_s": round(eager_median, 4),
        "compiled_step_s": round(compiled_median, 4),
        "speedup_eager_over_compiled": round(eager_median / compiled_median, 3),
        "first_compiled_step_s": round(first, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="esen-sm", help="model preset (configs/model/)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after warm-up")
    args = parser.parse_args()
    report = {"model": args.model, "torch": torch.__version__, "threads": torch.get_num_threads()}
    for name, structures in systems().items():
        for forces in ("direct", "conservative"):
            report[f"{name}_{forces}"] = measure(args.model, structures, forces, args.steps)
            print(f"{name} {forces}: {report[f'{name}_{forces}']}", file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
