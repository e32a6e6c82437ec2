"""Throughput, scaling and memory of each training strategy on a fixed synthetic workload; prints JSON.

    OMP_NUM_THREADS=1 python benchmarks/strategies.py [--model tiny] [--structures 4] [--steps 5]

Workload: eSEN (a preset from configs/model) on rattled periodic Cu/Ni fcc cells of 32 atoms
with random labels; a global batch of --structures cells per optimizer step, split over the
ranks. Each strategy runs in fresh processes (gloo on CPU, NCCL on GPU) at 1 and 2 processes,
first the direct stage (per-block FSDP) then the conservative one (double backward, root-only
FSDP), each with --warmup untimed steps and --steps timed ones. Reported per run:
- atoms_per_s: global atoms per optimizer step / step time (slowest rank);
- optimizer_state_bytes: bytes of AdamW state tensors held by each rank (its shard under FSDP
  and ZeRO); zero_master_bytes: ZeRO's fp32 master slice of the weights, held besides;
- peak_resident_param_bytes: the most parameter bytes held by a rank at any module's forward
  (its persistent copy or shard plus what FSDP has gathered at that moment);
- peak_memory_mb: torch.cuda.max_memory_allocated on GPU (per stage); on the CPU the
  process's peak RSS so far (the conservative row includes the direct stage run before it).
Summary: scaling efficiency = atoms/s at 2 processes / (2 x atoms/s at 1), conservative step
time / direct step time, optimizer state per rank at 2 processes / at 1.
On a shared CPU machine the throughput figures follow the load (reported as load_average).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
from ase.build import bulk
from torch_geometric.data import Batch, Data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from esen_train.data.neighbors import build_neighbor_list  # noqa: E402
from esen_train.engine import distributed  # noqa: E402
from esen_train.engine.config import StageConfig, StrategyConfig  # noqa: E402
from esen_train.engine.optim import OptimSettings  # noqa: E402
from esen_train.engine.strategies import Strategy, build_strategy  # noqa: E402
from esen_train.model import ESEN, load_model_config  # noqa: E402

RUNS = [("single", 1), ("ddp", 1), ("ddp", 2), ("fsdp", 1), ("fsdp", 2),
        ("deepspeed-zero1", 1), ("deepspeed-zero1", 2), ("deepspeed-zero2", 1), ("deepspeed-zero2", 2)]


def synthetic_structures(count: int, cutoff: float, seed: int) -> list[Data]:
    rng = np.random.default_rng(seed)
    structures = []
    for _ in range(count):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
        atoms.numbers[rng.random(len(atoms)) < 0.3] = 28
        atoms.positions += rng.normal(scale=0.1, size=atoms.positions.shape)
        edge_index, offsets = build_neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
        structures.append(Data(
            pos=torch.tensor(atoms.positions, dtype=torch.float32),
            atomic_numbers=torch.tensor(atoms.numbers),
            cell=torch.tensor(atoms.cell.array, dtype=torch.float32).unsqueeze(0),
            pbc=torch.tensor(atoms.pbc).unsqueeze(0),
            natoms=torch.tensor([len(atoms)]),
            edge_index=torch.tensor(edge_index),
            cell_offsets=torch.tensor(offsets, dtype=torch.float32),
            energy=torch.tensor([rng.normal()], dtype=torch.float32),
            forces=torch.tensor(rng.normal(size=(len(atoms), 3)), dtype=torch.float32),
        ))
    return structures


def loss_share(out: dict, batch: Batch, world_size: int) -> torch.Tensor:
    counts = distributed.all_reduce_sum(torch.tensor([batch.natoms.numel(), batch.natoms.sum()], dtype=torch.float32,
                                                     device=batch.pos.device))
    energy = ((out["energy"] - batch.energy) / batch.natoms).abs().sum() / counts[0]
    forces = (out["forces"] - batch.forces).norm(dim=1).sum() / counts[1]
    return (20 * energy + 10 * forces) * world_size


class ResidentParameters:
    """The most parameter bytes held at once, sampled before every module's forward: the
    parameters as they are between steps (FSDP's shards, ZeRO's flat buffer, DDP's tensors)
    plus whatever is gathered at that moment (FSDP registers the gathered parameters in place
    of the shards while a unit runs)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.peak = module, 0
        self.persistent = self._storages()
        self.handles = [m.register_forward_pre_hook(self._sample) for m in module.modules()]

    def _storages(self) -> dict[int, int]:
        storages = {}  # ZeRO's parameters are views of one flat buffer: count each storage once
        for param in self.module.parameters():
            storage = (param.to_local() if hasattr(param, "to_local") else param).untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return storages

    def _sample(self, *_) -> None:
        self.peak = max(self.peak, sum({**self.persistent, **self._storages()}.values()))


def zero_master_bytes(strategy: Strategy) -> int:
    partitions = getattr(strategy.optimizer, "single_partition_of_fp32_groups", [])
    return sum(p.numel() * p.element_size() for p in partitions)


def measure_stage(name: str, zero_stage: int, conservative: bool, args, dist) -> dict:
    config = replace(load_model_config(args.model), direct_forces=not conservative)
    torch.manual_seed(0)
    model = ESEN(config).to(dist.device)
    parameters = sum(p.numel() for p in model.parameters())
    strategy = build_strategy(StrategyConfig(name=name, zero_stage=zero_stage), StageConfig(precision=args.precision), dist)
    strategy.setup(model, OptimSettings(lr=1e-4, weight_decay=1e-3), conservative=conservative, ema_decay=0.999)
    resident = ResidentParameters(strategy.module)
    structures = synthetic_structures(args.structures, config.cutoff, seed=1)
    batch = Batch.from_data_list(structures[dist.rank :: dist.world_size]).to(dist.device)
    global_atoms = sum(int(s.natoms) for s in structures)
    forces = "conservative" if conservative else "direct"

    def loss_of(model, micro_batch) -> torch.Tensor:
        out = model(micro_batch, forces=forces, stress=False, create_graph=conservative)
        return loss_share(out, micro_batch, dist.world_size)

    def step() -> None:
        strategy.optimizer_step([batch], loss_of, max_grad_norm=100.0)

    for _ in range(args.warmup):
        step()
    distributed.barrier()
    if dist.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    if dist.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = distributed.all_reduce_max(torch.tensor(time.perf_counter() - started, dtype=torch.float64,
                                                      device=dist.device)).item()
    for handle in resident.handles:
        handle.remove()
    return {
        "step_s": elapsed / args.steps,
        "atoms_per_s": global_atoms * args.steps / elapsed,
        "parameters": parameters,
        "optimizer_state_bytes": strategy.optimizer_state_bytes(),
        "zero_master_bytes": zero_master_bytes(strategy),
        "peak_resident_param_bytes": resident.peak,
    }


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def _worker(rank: int, world_size: int, port: int, run: str, args, out_dir: str) -> None:
    torch.set_num_threads(args.threads)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist = distributed.init_distributed()
    name, _, zero = run.partition("-zero")
    try:
        rows = {}
        with contextlib.redirect_stdout(sys.stderr):  # stdout is for the JSON (DeepSpeed prints)
            for mode in ("direct", "conservative"):
                if dist.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dist.device)
                rows[mode] = measure_stage(name, int(zero or 2), mode == "conservative", args, dist)
                rows[mode]["peak_memory_mb"] = peak_memory_mb(dist.device)
        torch.save(rows, Path(out_dir) / f"{run}-{world_size}-rank{rank}.pt")
    finally:
        distributed.cleanup()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def benchmark(run: str, world_size: int, args, out_dir: Path) -> list[dict]:
    mp.start_processes(_worker, args=(world_size, free_port(), run, args, str(out_dir)), nprocs=world_size,
                       join=True, start_method="spawn")
    per_rank = [torch.load(out_dir / f"{run}-{world_size}-rank{rank}.pt", weights_only=True) for rank in range(world_size)]
    rows = []
    for mode in ("direct", "conservative"):
        first = per_rank[0][mode]
        rows.append({
            "strategy": run, "world_size": world_size, "mode": mode,
            "step_s": first["step_s"], "atoms_per_s": first["atoms_per_s"], "parameters": first["parameters"],
            "optimizer_state_bytes_per_rank": [r[mode]["optimizer_state_bytes"] for r in per_rank],
            "zero_master_bytes_per_rank": [r[mode]["zero_master_bytes"] for r in per_rank],
            "peak_resident_param_bytes_per_rank": [r[mode]["peak_resident_param_bytes"] for r in per_rank],
            "peak_memory_mb_per_rank": [r[mode]["peak_memory_mb"] for r in per_rank],
        })
    return rows


def summarise(rows: list[dict]) -> dict:
    index = {(r["strategy"], r["world_size"], r["mode"]): r for r in rows}
    summary = {"scaling_efficiency": {}, "conservative_over_direct_step_time": {}, "optimizer_state_fraction_at_2": {}}
    for strategy in sorted({r["strategy"] for r in rows}):
        for mode in ("direct", "conservative"):
            one, two = index.get((strategy, 1, mode)), index.get((strategy, 2, mode))
            if one and two:
                summary["scaling_efficiency"][f"{strategy}/{mode}"] = two["atoms_per_s"] / (2 * one["atoms_per_s"])
                summary["optimizer_state_fraction_at_2"][f"{strategy}/{mode}"] = (
                    max(two["optimizer_state_bytes_per_rank"]) / one["optimizer_state_bytes_per_rank"][0]
                )
        for world in (1, 2):
            direct, conservative = index.get((strategy, world, "direct")), index.get((strategy, world, "conservative"))
            if direct and conservative:
                summary["conservative_over_direct_step_time"][f"{strategy}/{world}"] = conservative["step_s"] / direct["step_s"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="preset in configs/model")
    parser.add_argument("--structures", type=int, default=4, help="32-atom cells per global batch")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--runs", nargs="*", default=[f"{s}:{w}" for s, w in RUNS], help="strategy:world_size ...")
    args = parser.parse_args()
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for item in args.runs:
            strategy, world = item.split(":")
            rows += benchmark(strategy, int(world), args, Path(out_dir))
    print(json.dumps({
        "workload": {"model": args.model, "structures_per_step": args.structures, "atoms_per_structure": 32,
                     "steps": args.steps, "warmup": args.warmup, "precision": args.precision,
                     "threads_per_process": args.threads},
        "machine": {"cuda": torch.cuda.is_available(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                    "torch": torch.__version__},
        "runs": rows,
        "summary": summarise(rows),
        "wall_s": time.time() - started,
    }, indent=1))


if __name__ == "__main__":
    main()
