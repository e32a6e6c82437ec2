"""What tests/engine/test_strategies.py runs in each process: a small potential with a double backward,
deterministic batches, and one training scenario driven through the Strategy interface exactly
as the trainer drives it (`optimizer_step` with loss shares and accumulation, EMA, save/load).

The toy potential has what the strategies care about: an embedding (no weight decay), a
LayerNorm, blocks (FSDP's per-block units, which `fsdp_units` names), an energy head, and
either direct heads (a force head, and a stress head that the data leaves unused and that is
frozen, as the trainer freezes ESEN's on data without stress) or conservative forces = -autograd.grad(E, pos, create_graph=True) inside
forward. Scenarios with `model="esen"` train the real tiny eSEN on small EMT-labelled Cu/Ni
clusters instead; with `isolated=True` every other structure has no neighbour within the
cutoff, so on two ranks rank 1 trains on batches without a single edge.
"""
from __future__ import annotations

import os
import signal
import socket
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch_geometric.data import Batch

from esen_train.engine import distributed
from esen_train.engine.checkpoint import CheckpointManager
from esen_train.engine.config import StageConfig, StrategyConfig
from esen_train.engine.distributed import DistInfo
from esen_train.engine.optim import OptimSettings
from esen_train.engine.strategies import Strategy, build_strategy
from esen_train.model import ESEN
from tests.model_helpers import tiny_config, to_data

NUM_SPECIES = 3
NUM_GAUSSIANS = 8


class ToyBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear_in = nn.Linear(width, width)
        self.linear_out = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.linear_out(torch.nn.functional.silu(self.linear_in(self.norm(h))))


class ToyPotential(nn.Module):
    def __init__(self, direct_forces: bool, width: int = 16, num_blocks: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(NUM_SPECIES, width)
        self.radial = nn.Linear(NUM_GAUSSIANS, width)
        self.blocks = nn.ModuleList(ToyBlock(width) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(width)
        self.energy_head = nn.Linear(width, 1)
        self.force_head = nn.Linear(width, 3) if direct_forces else None
        self.stress_head = nn.Linear(width, 9) if direct_forces else None  # unused: no stress here
        self.register_buffer("centers", torch.linspace(0.5, 3.0, NUM_GAUSSIANS))

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.blocks)

    def forward(self, batch: dict, forces: str, stress: bool = False, create_graph: bool = False) -> dict[str, torch.Tensor]:
        pos = batch["pos"]
        if forces == "conservative":
            pos = pos.detach().requires_grad_()
        with torch.enable_grad() if forces == "conservative" else nullcontext():
            source, target = batch["edge_index"]
            distance = (pos[source] - pos[target]).norm(dim=1)
            basis = torch.exp(-((distance[:, None] - self.centers) ** 2))
            neighbours = torch.zeros(pos.shape[0], NUM_GAUSSIANS, dtype=pos.dtype, device=pos.device)
            h = self.embedding(batch["species"]) + self.radial(neighbours.index_add(0, target, basis))
            for block in self.blocks:
                h = block(h)
            h = self.norm(h)
            per_atom = self.energy_head(h).squeeze(1)
            energy = per_atom.new_zeros(batch["natoms"].shape[0]).index_add(0, batch["structure"], per_atom)
            if forces == "conservative":
                out_forces = -torch.autograd.grad(energy.sum(), pos, create_graph=create_graph)[0]
            else:
                out_forces = self.force_head(h)
        out = {"energy": energy, "forces": out_forces}
        # As ESEN does: conservative outputs outside training carry no graph.
        return out if create_graph or forces != "conservative" else {k: v.detach() for k, v in out.items()}


def toy_structures(step: int, micro: int, dtype: torch.dtype, count: int = 8) -> list[dict]:
    """The global batch of one micro-step: `count` structures of 3 to 6 atoms, with labels."""
    generator = torch.Generator().manual_seed(1000 * step + micro)
    structures = []
    for _ in range(count):
        natoms = int(torch.randint(3, 7, (1,), generator=generator))
        structures.append({
            "pos": torch.rand(natoms, 3, generator=generator, dtype=dtype) * 3.0,
            "species": torch.randint(0, NUM_SPECIES, (natoms,), generator=generator),
            "energy": torch.randn((), generator=generator, dtype=dtype),
            "forces": torch.randn(natoms, 3, generator=generator, dtype=dtype),
        })
    return structures


def collate(structures: list[dict]) -> dict:
    pos, species, structure, energy, forces, natoms, edges, offset = [], [], [], [], [], [], [], 0
    for index, item in enumerate(structures):
        n = item["pos"].shape[0]
        pairs = torch.cartesian_prod(torch.arange(n), torch.arange(n))
        pairs = pairs[pairs[:, 0] != pairs[:, 1]].T + offset
        pos.append(item["pos"]), species.append(item["species"]), forces.append(item["forces"])
        structure.append(torch.full((n,), index)), energy.append(item["energy"]), natoms.append(n)
        edges.append(pairs)
        offset += n
    return {
        "pos": torch.cat(pos), "species": torch.cat(species), "structure": torch.cat(structure),
        "energy": torch.stack(energy), "forces": torch.cat(forces), "natoms": torch.tensor(natoms),
        "edge_index": torch.cat(edges, dim=1),
    }


def esen_structures(step: int, micro: int, dtype: torch.dtype, count: int = 4, isolated: bool = False) -> list:
    """The global batch of one micro-step for ESEN: rattled 4-atom Cu/Ni clusters, EMT labels;
    with `isolated`, the structures at odd positions are atoms without neighbours instead."""
    rng = np.random.default_rng(1000 * step + micro)
    structures = []
    for index in range(count):
        if isolated and index % 2 == 1:
            atoms = isolated_structure(rng)
        else:
            atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
            atoms.pbc = False
            atoms.numbers[rng.random(len(atoms)) < 0.5] = 28
            atoms.positions += rng.normal(scale=0.15, size=atoms.positions.shape)
        atoms.calc = EMT()
        data = to_data(atoms, tiny_config().cutoff)
        data.pos, data.cell, data.cell_offsets = data.pos.to(dtype), data.cell.to(dtype), data.cell_offsets.to(dtype)
        data.energy = torch.tensor([atoms.get_potential_energy()], dtype=dtype)
        data.forces = torch.tensor(atoms.get_forces(), dtype=dtype)
        structures.append(data)
    return structures


def isolated_structure(rng: np.random.Generator) -> Atoms:
    """No neighbour within the tiny model's 5 Å cutoff: one atom, a dimer 5.5 Å apart or one
    atom in a periodic 20 Å box, drawn with `rng`."""
    kind = rng.integers(3)
    if kind == 0:
        return Atoms([int(rng.choice([29, 28]))], positions=rng.normal(size=(1, 3)))
    if kind == 1:
        direction = rng.normal(size=3)
        return Atoms("CuNi", positions=[[0.0, 0.0, 0.0], 5.5 * direction / np.linalg.norm(direction)])
    return Atoms("Cu", positions=rng.uniform(0, 20, size=(1, 3)), cell=[20.0, 20.0, 20.0], pbc=True)


def rank_batch(step: int, micro: int, dist: DistInfo, scenario: "Scenario"):
    """This rank's share of the global micro-batch (structures rank, rank + world, ...)."""
    if scenario.model == "esen":
        structures = esen_structures(step, micro, scenario.dtype, isolated=scenario.isolated)
        return Batch.from_data_list(structures[dist.rank :: dist.world_size])
    return collate(toy_structures(step, micro, scenario.dtype)[dist.rank :: dist.world_size])


def loss_share(out: dict, batch: dict, dist: DistInfo) -> torch.Tensor:
    """This rank's share of the global mean loss: local sums over global counts, times the
    world size because the strategies average gradients over ranks."""
    counts = distributed.all_reduce_sum(torch.tensor([batch["natoms"].shape[0], batch["natoms"].sum()], dtype=torch.float64))
    energy = ((out["energy"] - batch["energy"]) / batch["natoms"]).pow(2).sum() / counts[0]
    forces = (out["forces"] - batch["forces"]).pow(2).sum() / counts[1]
    return (energy + forces) * dist.world_size


@dataclass
class Scenario:
    strategy: str  # single | ddp | fsdp | deepspeed
    conservative: bool
    model: str = "toy"  # toy | esen
    isolated: bool = False  # esen: every other structure without neighbours (all of rank 1's)
    grad_accum_steps: int = 1
    zero_stage: int = 2
    dtype: torch.dtype = torch.float64
    steps: int = 6
    save_after: int = 4  # steps done when the checkpoint is written
    nonfinite_step: int = 2  # the last rank's loss is NaN on this step
    ema_decay: float = 0.9
    lr: float = 3e-2
    max_grad_norm: float = 1.0

    @property
    def forces(self) -> str:
        return "conservative" if self.conservative else "direct"

    @property
    def key(self) -> str:
        zero = f"-zero{self.zero_stage}" if self.strategy == "deepspeed" else ""
        isolated = "-isolated" if self.isolated else ""
        return f"{self.model}{isolated}-{self.strategy}{zero}-{self.forces}-accum{self.grad_accum_steps}"


def build(scenario: Scenario, dist: DistInfo, seed: int) -> Strategy:
    """A fresh model (initialised from `seed`) inside a set-up strategy with an EMA."""
    torch.manual_seed(seed)
    if scenario.model == "esen":
        model = ESEN(tiny_config(direct_forces=not scenario.conservative)).to(scenario.dtype)
    else:
        model = ToyPotential(direct_forces=not scenario.conservative).to(scenario.dtype)
    if not scenario.conservative:  # no stress labels here: the trainer freezes the direct stress head
        (model.direct_heads.stress if scenario.model == "esen" else model.stress_head).requires_grad_(False)
    strategy = build_strategy(
        StrategyConfig(name=scenario.strategy, zero_stage=scenario.zero_stage),
        StageConfig(grad_accum_steps=scenario.grad_accum_steps, precision="fp32"),
        dist,
    )
    strategy.setup(model, OptimSettings(lr=scenario.lr, weight_decay=0.01), conservative=scenario.conservative,
                   ema_decay=scenario.ema_decay)
    return strategy


def train_step(strategy: Strategy, scenario: Scenario, step: int, dist: DistInfo) -> tuple[float, bool, float]:
    """One optimizer step as the trainer does it; returns (global loss, skipped, grad norm)."""
    accum = scenario.grad_accum_steps
    strategy.set_lr(scenario.lr * (1.0 - 0.05 * step))
    losses = []

    def loss_of(model: nn.Module, batch) -> torch.Tensor:
        out = model(batch, forces=scenario.forces, stress=False, create_graph=scenario.conservative)
        loss = loss_share(out, batch, dist)
        if step == scenario.nonfinite_step and dist.rank == dist.world_size - 1:
            loss = loss * float("nan")
        losses.append(loss.detach())
        return loss

    micro_batches = (rank_batch(step, micro, dist, scenario) for micro in range(accum))
    result = strategy.optimizer_step(micro_batches, loss_of, scenario.max_grad_norm)
    total = torch.zeros((), dtype=torch.float64)
    for loss in losses:
        total += (loss / accum).double()
    return float(distributed.all_reduce_sum(total) / dist.world_size), result.skipped, result.grad_norm


def validation_loss(strategy: Strategy, scenario: Scenario, dist: DistInfo) -> float:
    """Global loss of the EMA weights on a held-out batch (every rank takes part)."""
    batch = rank_batch(999, 0, dist, scenario)
    with strategy.ema.swapped_in(), torch.no_grad() if not scenario.conservative else nullcontext():
        out = strategy.model(batch, forces=scenario.forces, stress=False, create_graph=False)
        share = loss_share(out, batch, dist).detach().double()
    return float(distributed.all_reduce_sum(share) / dist.world_size)


def run_scenario(scenario: Scenario, dist: DistInfo, checkpoint_dir: Path) -> dict:
    """Train, validate and save mid-way, continue; then a fresh model loads the checkpoint and
    repeats the last steps. Returns what the test compares (weights on rank 0 only)."""
    strategy = build(scenario, dist, seed=0)
    result = {"losses": [], "skipped": [], "grad_norms": [],
              "edges": [rank_batch(step, 0, dist, scenario)["edge_index"].shape[1] for step in range(scenario.steps)]}
    for step in range(scenario.steps):
        if step == scenario.save_after:
            result["val_loss"] = validation_loss(strategy, scenario, dist)
            write_training_state(strategy, checkpoint_dir, extra={"step": step, "rank": dist.rank, "rng": torch.get_rng_state()})
            result["saved_weights"] = strategy.full_state_dict(use_ema=False)
            result["saved_ema"] = strategy.full_state_dict(use_ema=True)
        loss, skipped, norm = train_step(strategy, scenario, step, dist)
        result["losses"].append(loss), result["skipped"].append(skipped), result["grad_norms"].append(norm)
    result["final_weights"] = strategy.full_state_dict(use_ema=False)
    result["final_ema"] = strategy.full_state_dict(use_ema=True)
    result["optimizer_state_bytes"] = strategy.optimizer_state_bytes()
    result["sharded_blocks"] = any(
        isinstance(module, FSDPModule) for name, module in strategy.module.named_modules() if name.endswith("blocks.0")
    )

    resumed = build(scenario, dist, seed=1)
    extra = resumed.load_from(checkpoint_dir)
    result["loaded_extra"] = {"step": extra["step"], "rank": extra["rank"]}
    result["resumed_losses"] = [train_step(resumed, scenario, step, dist)[0] for step in range(scenario.save_after, scenario.steps)]
    result["resumed_final_weights"] = resumed.full_state_dict(use_ema=False)
    result["resumed_final_ema"] = resumed.full_state_dict(use_ema=True)
    return result


def load_on_this_world(scenarios: list[Scenario], checkpoint_root: Path, dist: DistInfo) -> dict:
    """Load each scenario's two-rank checkpoint into a fresh model on this world; report the
    weights, EMA and extra it got, any warnings, and the losses of the steps after the save."""
    results = {}
    for scenario in scenarios:
        strategy = build(scenario, dist, seed=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            extra = strategy.load_from(checkpoint_root / scenario.key)
        results[scenario.key] = {
            "weights": strategy.full_state_dict(use_ema=False),
            "ema": strategy.full_state_dict(use_ema=True),
            "extra_rank": extra["rank"],
            "warnings": [str(w.message) for w in caught],
            "losses": [train_step(strategy, scenario, step, dist)[0] for step in range(scenario.save_after, scenario.steps)],
        }
    return results


def write_training_state(strategy: Strategy, directory: Path, extra: dict) -> None:
    """What CheckpointManager.save does around `save_into`: rank 0 creates the directory, then
    every rank writes into it."""
    if distributed.is_main():
        directory.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    strategy.save_into(directory, extra)
    distributed.barrier()


def save_checkpoint(manager: CheckpointManager, strategy: Strategy, step: int, extra: dict) -> Path:
    """A checkpoint of the tiny eSEN (a `model="esen"` scenario without conservative forces)."""
    return manager.save(strategy, tiny_config(direct_forces=True), "direct", step, {}, extra=extra, is_best=False)


def save_then_die(stage_dir: Path) -> None:
    """Save the checkpoint of step 1, then die by SIGKILL half-way through writing step 2's."""

    class KillsWhilePickled:
        def __reduce__(self):
            os.kill(os.getpid(), signal.SIGKILL)

    strategy = build(Scenario("single", conservative=False, model="esen"), single_process_dist(), seed=0)
    manager = CheckpointManager(stage_dir, keep_last=2, elements=[28, 29])
    save_checkpoint(manager, strategy, 1, extra={"step": 1})
    save_checkpoint(manager, strategy, 2, extra={"step": 2, "payload": KillsWhilePickled()})


# ----- processes ------------------------------------------------------------------
# The fork server (run_in_processes) imports this module, and with it torch, before it forks.
mp.set_forkserver_preload([__name__])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, task, args: tuple, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist = distributed.init_distributed(timeout_s=300)
    try:
        torch.save(task(*args, dist=dist), Path(out_dir) / f"results_rank{rank}.pt")
    finally:
        distributed.cleanup()


# What gloo says when the world's rendezvous fails. free_port's port is free when chosen, but
# until rank 0 binds it another process on the host (a parallel test's world, a training run)
# can take it; torchrun's elastic agent restarts its workers for the same reason.
RENDEZVOUS_ERRORS = ("connectfullmesh", "address already in use")  # lower case


def run_in_processes(world_size: int, task, args: tuple, out_dir: Path, attempts: int = 3) -> list[dict]:
    """`task(*args, dist=...)` in `world_size` new processes joined by gloo, as torchrun would
    start them (RANK, WORLD_SIZE, MASTER_ADDR/PORT); returns each rank's result. A world whose
    rendezvous failed before any rank finished its task starts again on a new port."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        try:
            # forkserver, not fork: the test process may have threads by now (torch.compile's
            # pools, tqdm's monitor), and a child forked from a threaded process inherits
            # whatever state they left behind. The server imports this module (and torch) once
            # and forks clean children from it, so no world imports torch again.
            mp.start_processes(_worker, args=(world_size, free_port(), task, args, str(out_dir)),
                               nprocs=world_size, join=True, start_method="forkserver")
            break
        except mp.ProcessRaisedException as error:
            finished = list(out_dir.glob("results_rank*.pt"))
            if attempt == attempts or finished or not any(text in str(error).lower() for text in RENDEZVOUS_ERRORS):
                raise
    return [torch.load(out_dir / f"results_rank{rank}.pt", weights_only=True) for rank in range(world_size)]


def train_scenarios(scenarios: list[Scenario], checkpoint_root: Path, dist: DistInfo) -> dict:
    return {s.key: run_scenario(s, dist, checkpoint_root / s.key) for s in scenarios}


def single_process_dist() -> DistInfo:
    return DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
