"""Where a conservative training step spends time and memory, phase by phase; prints JSON.

    OMP_NUM_THREADS=1 python benchmarks/profile_conservative.py [--systems cu108,aspirin]
        [--cu-cells 1] [--aspirin-molecules 8] [--threads 2] [--repeats 3] [--top 20]
        [--model small|esen-sm|esen-30m] [--times-only] [--max-profiled-steps 8]

The step of model_vs_fairchem.py's "train conservative" case (the spec's "small" eSEN, or
one of our presets with `--model`; float32, random weights, the same batches and loss),
split into its three phases:
  forward          positions (and strain) -> energy
  first_backward   forces (and stress) = dE/dpos (dE/deps), create_graph=True
  second_backward  the loss's gradients of the parameters: the double backward
(the AdamW update is left out). For each system it reports:
- `phase_s`: median wall seconds of each phase over `repeats` unprofiled steps;
- `saved_for_backward`: what autograd keeps, counted with saved_tensors_hooks: the forward
  saves for the first backward, the first backward (create_graph) for the second; bytes of
  distinct storages, split into per-edge tensors (leading size = edges), per-atom and other,
  and by the model module that saved them (forward only: backward nodes have no module);
- `phases`: a profiled step (torch.profiler, record_shapes and profile_memory): per phase
  the self CPU time and memory allocated, by module and by op (op and input shapes), top
  `top` each. The profiler's records make the first profiled steps of a large system
  fault fresh pages in, so steps are profiled until one runs without (`profiled`: how
  many, and the reported step's page faults). Backward ops are charged to the module whose
  forward op made their autograd node (the profiler's sequence numbers), so the second
  backward's time lands on the module whose forward (through its first backward) it
  differentiates.
`--times-only` reports `phase_s` alone (the other two take one or more steps each, slow for
esen-30m).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))
import case_server  # noqa: E402
import esen_side  # noqa: E402
import model_vs_fairchem as bench  # noqa: E402
from esen_train.engine.host_memory import keep_freed_host_memory  # noqa: E402

PHASES = ("forward", "first_backward", "second_backward")


# ----- the step, phase by phase -----------------------------------------------------------------
def conservative_loss(model, batch, targets, stress: bool, phase_hook=None):
    """The loss of the benchmark's conservative training step, computed as ESEN.conservative_outputs
    does, with `phase_hook(name)` returning a context manager around each phase."""
    phase_hook = phase_hook or (lambda name: contextlib.nullcontext())
    inputs = model._inputs(batch)
    with phase_hook("forward"):
        pos = inputs["pos"].detach().requires_grad_()
        strain = torch.zeros_like(inputs["cell"]).requires_grad_(stress)
        cell = inputs["cell"]
        if stress:
            symmetric = 0.5 * (strain + strain.transpose(1, 2))
            pos_strained = pos + torch.einsum("ni,nij->nj", pos, symmetric[inputs["batch"]])
            cell = cell + torch.bmm(cell, symmetric)
        else:
            pos_strained = pos
        energy, network, _, _ = model._energy(pos_strained, cell, inputs)
    with phase_hook("first_backward"):
        leaves = [pos, strain] if stress else [pos]
        grads = torch.autograd.grad(network.sum(), leaves, create_graph=True)
        out = {"energy": energy, "forces": -model.force_scale.to(pos.dtype) * grads[0]}
        if stress:
            volume = torch.linalg.det(inputs["cell"]).abs().view(-1, 1, 1)
            out["stress"] = model.stress_scale.to(pos.dtype) * grads[1] / volume
        loss = case_server.loss_of(out, targets)
    return loss


def check_same_loss(model, batch, targets, stress: bool) -> None:
    """This file's step must compute the model's own conservative loss (or the profile is of something else)."""
    ours = conservative_loss(model, batch, targets, stress).detach()  # its graph freed: one graph at a time
    model_loss = case_server.loss_of(model(batch, forces="conservative", stress=stress, create_graph=True), targets)
    if not torch.allclose(ours, model_loss, rtol=1e-5):
        raise SystemExit(f"profiled step's loss {ours.item()} differs from the model's {model_loss.item()}")


def timed_phases(model, batch, targets, stress: bool) -> dict[str, float]:
    times = {}

    class Timer:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            self.start = time.perf_counter()

        def __exit__(self, *exc):
            times[self.name] = time.perf_counter() - self.start

    loss = conservative_loss(model, batch, targets, stress, Timer)
    with Timer("second_backward"):
        case_server.backward_to_parameters(loss, model)
    model.zero_grad(set_to_none=True)
    return times


# ----- saved tensors ----------------------------------------------------------------------------
class SavedTensors:
    """Counts what autograd saves while active: distinct storages, by size class and module."""

    def __init__(self, num_edges: int, num_atoms: int, module_stack: list[str]) -> None:
        self.num_edges, self.num_atoms, self.module_stack = num_edges, num_atoms, module_stack
        self.storages: dict[int, tuple[int, str, str]] = {}

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if isinstance(tensor, torch.nn.Parameter) or storage.data_ptr() in self.storages:
            return tensor
        leading = tensor.shape[0] if tensor.dim() else 0
        kind = "per_edge" if leading == self.num_edges else "per_atom" if leading == self.num_atoms else "other"
        module = re.sub(r"blocks\.\d+", "blocks.*", self.module_stack[-1]) if self.module_stack else "(none)"
        self.storages[storage.data_ptr()] = (storage.nbytes(), kind, module)
        return tensor

    def summary(self, top: int) -> dict:
        by_kind, by_module = defaultdict(int), defaultdict(int)
        for nbytes, kind, module in self.storages.values():
            by_kind[kind] += nbytes
            by_module[module] += nbytes
        total = sum(by_kind.values())
        modules = sorted(by_module.items(), key=lambda item: -item[1])[:top]
        return {
            "total_mb": mb(total),
            "tensors": len(self.storages),
            "by_kind_mb": {kind: mb(value) for kind, value in sorted(by_kind.items())},
            "by_module_mb": {module: mb(value) for module, value in modules},
        }


def mb(nbytes: float) -> float:
    return round(nbytes / 2**20, 1)


def track_modules(model: torch.nn.Module, stack: list[str], ranges: bool) -> list:
    """Forward hooks that keep `stack` at the innermost running module's name (and, with `ranges`,
    open a profiler range "module:NAME" for it). Returns the handles."""
    handles = []
    for name, module in model.named_modules():
        if not name or not _worth_naming(name):
            continue

        def enter(module, args, name=name):
            stack.append(name)
            if ranges:
                module._profile_range = torch.profiler.record_function(f"module:{name}")
                module._profile_range.__enter__()

        def leave(module, args, output):
            stack.pop()
            if ranges:
                module._profile_range.__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def _worth_naming(name: str) -> bool:
    """Module names down to a block's parts (backbone.blocks.0.edgewise.conv1), not every Linear."""
    parts = name.split(".")
    if parts[:2] == ["backbone", "blocks"]:
        return len(parts) <= 5 and not (len(parts) == 5 and parts[3] == "feed_forward")
    return len(parts) <= 2


def saved_for_backward(model, batch, targets, stress: bool, top: int) -> dict:
    edges, atoms = batch.edge_index.shape[1], batch.pos.shape[0]
    stack: list[str] = []
    handles = track_modules(model, stack, ranges=False)
    counters = {phase: SavedTensors(edges, atoms, stack) for phase in PHASES[:2]}

    def phase_hook(name):
        return torch.autograd.graph.saved_tensors_hooks(counters[name].pack, lambda tensor: tensor)

    try:
        loss = conservative_loss(model, batch, targets, stress, phase_hook)
    finally:
        for handle in handles:
            handle.remove()
    case_server.backward_to_parameters(loss, model)
    model.zero_grad(set_to_none=True)
    first = counters["forward"].summary(top)
    second = counters["first_backward"].summary(top)
    second.pop("by_module_mb")  # no module runs during a backward
    return {"for_first_backward": first, "for_second_backward": second}


# ----- the profiled step ------------------------------------------------------------------------
def profiled_step(model, batch, targets, stress: bool, top: int,
                  max_steps: int = case_server.MAX_PROFILED_STEPS) -> tuple[dict, dict]:
    """(the phases' tables of a profiled step, how it was reached: profiled steps and page faults)."""
    stack: list[str] = []
    handles = track_modules(model, stack, ranges=True)

    def phase_hook(name):
        return torch.profiler.record_function(f"phase:{name}")

    def step() -> None:
        loss = conservative_loss(model, batch, targets, stress, phase_hook)
        with phase_hook("second_backward"):
            case_server.backward_to_parameters(loss, model)
        model.zero_grad(set_to_none=True)

    try:
        profiler, steps, faults = case_server.profile_until_steady(step, max_steps, record_shapes=True,
                                                                   profile_memory=True)
    finally:
        for handle in handles:
            handle.remove()
    return attribute(profiler.events(), top), {"profiled_steps": steps, "page_faults": faults}


def attribute(events, top: int) -> dict:
    """Self time and memory of every op, per phase, by op (with input shapes) and by module."""
    module_of_sequence: dict[int, str] = {}
    by_phase = {phase: {"op": defaultdict(lambda: [0.0, 0, 0]), "op_name": defaultdict(lambda: [0.0, 0, 0]),
                        "module": defaultdict(lambda: [0.0, 0])} for phase in PHASES}
    for event in sorted(events, key=lambda e: e.time_range.start):
        phase, module = context_of(event, module_of_sequence)
        if event.sequence_nr >= 0 and not event.name.startswith("autograd::engine") and module:
            module_of_sequence.setdefault(event.sequence_nr, module)
        if phase is None or event.name.startswith(("phase:", "module:", "autograd::engine")):
            continue
        memory = max(event.self_cpu_memory_usage, 0)
        shapes = f"{event.name} {event.input_shapes}" if event.input_shapes else event.name
        for table, key in (("op", shapes), ("op_name", event.name)):
            op = by_phase[phase][table][key]
            op[0] += event.self_cpu_time_total
            op[1] += memory
            op[2] += 1
        # The blocks are alike: one row per part of a block, all blocks together.
        owner = by_phase[phase]["module"][re.sub(r"blocks\.\d+", "blocks.*", module or "(outside modules)")]
        owner[0] += event.self_cpu_time_total
        owner[1] += memory
    return {phase: phase_summary(tables, top) for phase, tables in by_phase.items()}


def context_of(event, module_of_sequence: dict[int, str]) -> tuple[str | None, str | None]:
    """The phase an event ran in and the module it belongs to: the innermost "module:" range
    around it, or the module of the forward op whose autograd node it is evaluating."""
    phase = module = None
    parent = event
    while parent is not None:
        if module is None and parent.name.startswith("module:"):
            module = parent.name[len("module:"):]
        elif module is None and parent.name.startswith("autograd::engine::evaluate_function"):
            module = module_of_sequence.get(parent.sequence_nr)
        if parent.name.startswith("phase:"):
            phase = parent.name[len("phase:"):]
        parent = parent.cpu_parent
    return phase, module


def phase_summary(tables: dict, top: int) -> dict:
    total_us = sum(value[0] for value in tables["module"].values())
    modules = sorted(tables["module"].items(), key=lambda item: -item[1][0])

    def top_ops(table: str) -> list[dict]:
        ops = sorted(tables[table].items(), key=lambda item: -item[1][0])[:top]
        return [{"op": name, "self_s": round(us / 1e6, 3), "share": round(us / total_us, 3),
                 "allocated_mb": mb(memory), "calls": calls} for name, (us, memory, calls) in ops]

    return {
        "self_s": round(total_us / 1e6, 3),
        "allocated_mb": mb(sum(value[1] for value in tables["module"].values())),
        "by_module": [{"module": name, "self_s": round(us / 1e6, 3), "share": round(us / total_us, 3),
                       "allocated_mb": mb(memory)} for name, (us, memory) in modules],
        "by_op_name": top_ops("op_name"),
        "by_op_and_shapes": top_ops("op"),
    }


# ----- main -------------------------------------------------------------------------------------
def system_batch(name: str, args) -> tuple[dict, bool]:
    cutoff = args.hyperparameters["cutoff"]
    if name == "cu108":
        return bench.batch_arrays(bench.cu_cells(args.cu_cells), cutoff, args.seed), True
    if name == "aspirin":
        if not bench.ASPIRIN.exists():
            raise SystemExit(f"{bench.ASPIRIN} is absent: run with --systems cu108")
        return bench.batch_arrays(bench.aspirin_molecules(args.aspirin_molecules), cutoff, args.seed), False
    raise SystemExit(f"unknown system {name!r} (known: cu108, aspirin)")


def profile_system(name: str, args) -> dict:
    arrays, periodic = system_batch(name, args)
    torch.manual_seed(args.seed)
    case = {"mode": "conservative", "model": args.hyperparameters, "stress": periodic, "device": "cpu"}
    model = esen_side.build(case, arrays)[0]
    model.train()
    batch, targets = esen_side.batch_of(arrays, "cpu"), case_server.targets_of(arrays, "cpu")
    check_same_loss(model, batch, targets, periodic)
    timed_phases(model, batch, targets, periodic)  # warm-up
    runs = [timed_phases(model, batch, targets, periodic) for _ in range(args.repeats)]
    report = {
        "atoms": int(arrays["natoms"].sum()),
        "edges": int(arrays["edge_index"].shape[1]),
        "stress": periodic,
        "phase_s": {phase: round(statistics.median(run[phase] for run in runs), 3) for phase in PHASES},
        "step_s": round(statistics.median(sum(run.values()) for run in runs), 3),
    }
    if not args.times_only:
        report["saved_for_backward"] = saved_for_backward(model, batch, targets, periodic, args.top)
        report["phases"], report["profiled"] = profiled_step(model, batch, targets, periodic, args.top,
                                                             args.max_profiled_steps)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--systems", default="cu108,aspirin", type=lambda s: s.split(","))
    parser.add_argument("--cu-cells", type=int, default=1)
    parser.add_argument("--aspirin-molecules", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="small", choices=["small", "esen-sm", "esen-30m"],
                        help="the spec's small eSEN, or one of our presets")
    parser.add_argument("--max-profiled-steps", type=int, default=case_server.MAX_PROFILED_STEPS,
                        help="profile at most this many steps while waiting for one without page faults "
                             "(each profiled step can grow the heap: 1 for a model near the host's memory)")
    parser.add_argument("--times-only", action="store_true",
                        help="phase times only: no saved-tensor count, no profiled step")
    parser.add_argument("--release-freed-host-memory", action="store_true",
                        help="leave glibc's allocator as it is (by default freed memory is kept, as "
                             "`esen-train fit` does: engine/host_memory.py)")
    args = parser.parse_args(argv)
    args.hyperparameters = bench.hyperparameters(args.model)
    torch.set_num_threads(args.threads)
    kept = False if args.release_freed_host_memory else keep_freed_host_memory()
    report = {
        "benchmark": "conservative training step of eSEN, phase by phase",
        "model": args.model,
        "hyperparameters": args.hyperparameters,
        "threads": args.threads,
        "keep_freed_host_memory": kept,
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "versions": {"torch": torch.__version__, "esen_train.model": esen_side.model_version(), "numpy": np.__version__},
        "systems": {name: profile_system(name, args) for name in args.systems},
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
