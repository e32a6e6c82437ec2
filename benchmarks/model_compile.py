"""Eager against torch.compile'd eSEN (`compile_model`): training-step time; prints JSON.

    OMP_NUM_THREADS=1 python benchmarks/model_compile.py [--model esen-sm] [--steps 3]
    OMP_NUM_THREADS=1 python benchmarks/model_compile.py --recipe mlearn-si [--modes conservative]

For each system (108-atom periodic Cu at 6 Å; a batch of 5 rMD17 aspirins, or 5 ethanol
molecules from ASE when ../shared/data is absent) and each force mode (direct:
energy + direct forces, one backward; conservative: forces and stress by autograd with
create_graph, then the double backward), it measures the median CPU time of a
training step (forward, loss, backward) after warm-up, eager and compiled steps taking
turns in this one process, and the ratio eager / compiled (> 1: compiling pays). Compile
time is the first compiled step's, in CPU and wall seconds. The atoms of each system
jiggle between steps (same graph sizes) so that nothing is cached across steps. Freed
host memory is kept, as `esen-train fit` does (`keep_freed_host_memory`).

`--recipe NAME` measures a shipped recipe (configs/NAME.yaml) instead: its model, on one
batch of its own data as its conservative stage takes it (the first structures of the
training file, up to `max_atoms` atoms; the built-in EMT data for the quickstart).
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
from accuracy import DATASETS  # noqa: E402
from esen_train.data.dataset import record_to_graph  # noqa: E402
from esen_train.data.emt import emt_structure  # noqa: E402
from esen_train.data.records import StructureRecord  # noqa: E402
from esen_train.engine.config import load_train_config  # noqa: E402
from esen_train.engine.host_memory import keep_freed_host_memory  # noqa: E402
from esen_train.model import ESEN, ModelConfig, compile_model, load_model_config  # noqa: E402
from shared_data import ASPIRIN, SHARED_DATA  # noqa: E402


def systems() -> dict[str, list[Atoms]]:
    copper = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True) * (3, 3, 3)
    copper.rattle(0.05, seed=0)
    if ASPIRIN.exists():
        molecules = ("aspirin_x5", ase.io.read(ASPIRIN, ":5"))
    else:
        molecules = ("ethanol_x5", [ase.build.molecule("CH3CH2OH") for _ in range(5)])
    return {"cu108": [copper], molecules[0]: molecules[1]}


def recipe_system(recipe: str) -> tuple[ModelConfig, dict[str, list[Atoms]]]:
    """The recipe's model, and its first training structures up to the conservative stage's
    `max_atoms` (quickstart: the built-in EMT data)."""
    config = load_train_config(recipe, ["data.emt_structures=1"] if recipe == "quickstart" else [])  # a shipped config
    if recipe == "quickstart":
        pool = (emt_structure(0, index) for index in range(10_000))
    else:
        source = SHARED_DATA / DATASETS[recipe].train_file
        if not source.exists():
            raise SystemExit(f"{source} is absent: --recipe {recipe} needs the real DFT data of ../shared/data")
        pool = ase.io.iread(source)
    structures, atoms = [], 0
    for structure in pool:
        if atoms + len(structure) > config.conservative.max_atoms:
            break
        structures.append(structure)
        atoms += len(structure)
    return config.model, {recipe: structures}


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


def train_step(model: ESEN, batch: Batch, forces: str) -> float:
    """CPU seconds of one training step (forward, loss, gradients of the parameters), the
    atoms moved a little first."""
    batch.pos = batch.pos + 1e-4 * torch.randn_like(batch.pos)
    parameters = [p for p in model.parameters() if p.requires_grad]
    started = time.process_time()
    out = model(batch, forces=forces, create_graph=forces == "conservative")
    loss = out["energy"].float().square().mean() + out["forces"].square().mean() + out["stress"].square().mean()
    torch.autograd.grad(loss, parameters, allow_unused=True)
    return time.process_time() - started


def measure(model_config: ModelConfig, structures: list[Atoms], forces: str, steps: int) -> dict:
    """Eager and compiled steps taking turns (after a warm-up step each), so that the load
    of the machine weighs on both alike."""
    config = replace(model_config, direct_forces=forces == "direct")
    torch.manual_seed(0)
    eager = ESEN(config)
    compiled = compile_model(ESEN(config))
    compiled.load_state_dict(eager.state_dict())
    batch = batch_of(structures, config.cutoff)
    started = time.perf_counter()
    first_cpu = train_step(compiled, batch, forces)
    first_wall = time.perf_counter() - started
    train_step(eager, batch, forces)
    eager_times, compiled_times = [], []
    for _ in range(steps):
        eager_times.append(train_step(eager, batch, forces))
        compiled_times.append(train_step(compiled, batch, forces))
    eager_median, compiled_median = statistics.median(eager_times), statistics.median(compiled_times)
    return {
        "atoms": int(batch.natoms.sum()),
        "edges": int(batch.edge_index.shape[1]),
        "eager_step_s": round(eager_median, 4),
        "compiled_step_s": round(compiled_median, 4),
        "speedup_eager_over_compiled": round(eager_median / compiled_median, 3),
        # Inductor builds its kernels in worker processes: their CPU time is not in the
        # first step's CPU seconds, which is why its wall seconds are reported too.
        "first_compiled_step_cpu_s": round(first_cpu, 1),
        "first_compiled_step_wall_s": round(first_wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="esen-sm", help="model preset (configs/model/)")
    parser.add_argument("--recipe", choices=["quickstart", *sorted(DATASETS)],
                        help="a shipped recipe (configs/RECIPE.yaml): its model on its data")
    parser.add_argument("--modes", nargs="+", default=["direct", "conservative"], choices=["direct", "conservative"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after warm-up")
    args = parser.parse_args()
    keep_freed_host_memory()
    if args.recipe:
        model_config, cases = recipe_system(args.recipe)
    else:
        model_config, cases = load_model_config(args.model), systems()
    report = {"model": args.recipe or args.model, "torch": torch.__version__, "threads": torch.get_num_threads()}
    for name, structures in cases.items():
        for forces in args.modes:
            report[f"{name}_{forces}"] = measure(model_config, structures, forces, args.steps)
            print(f"{name} {forces}: {report[f'{name}_{forces}']}", file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
