"""One side of the side-by-side model benchmark: runs cases on request, each in a forked child.

`model_vs_fairchem.py` starts one server per model (ours with the project's Python,
fairchem's inside its own virtualenv, where esen_train is not importable: so this file
needs only torch, numpy and the standard library) and speaks JSON lines with it:

    {"cmd": "open", "case": {...}, "batch": "cu108.npz"}  -> {"num_parameters", "rss_mb", ...}
    {"cmd": "step"}                                      -> {"seconds", "cpu_seconds", "rss_mb", "peak_rss_mb"}
    {"cmd": "flops"}                                     -> {"flops"}   (one step under FlopCounterMode)
    {"cmd": "profile", "top": 25}                        -> {"profile"} (one step under torch.profiler)
    {"cmd": "matmuls"}                                   -> {"matmul_s", "calls", "shapes"} (`matmuls_alone`)
    {"cmd": "close"}                                     -> {"peak_rss_mb"}
    {"cmd": "quit"}

"open" forks a child that builds the model and runs the case until "close", then exits.
The server imports its stack once (fairchem's import alone takes ~10-20 s here) but never
builds a model or runs a threaded op itself, so every child starts as a fresh process
that has just done the imports: its peak resident set (VmHWM, which Linux starts at the
resident set at fork) is that of a fresh process running only this case. While the
server waits for the child, the child owns stdin and the protocol channel.

After each step the child frees what it no longer holds (gc, then glibc's malloc_trim unless
the case keeps freed memory), outside the timed region, so that an idle child holds only its
model, optimizer state and batch while the other model's child runs.

Both sides share the step definitions below (`forward_step`, `training_step`, the loss,
AdamW), so the only thing that differs between them is the model: each side provides
`build(case, arrays) -> (model, predict)` where `predict()` runs the model on the batch
and returns {"energy" [B], "forces" [N, 3], "stress" [B, 3, 3] (if case["stress"])}, with
model and batch on `case["device"]`.

On a GPU (case["device"] "cuda") a step is timed between two synchronisations, and its
reply adds `peak_device_mb`, the most GPU memory allocated since the case opened (torch's
allocator; the resident set then counts the host side only). case["precision"] "bf16" runs
the steps, forward and backward, under bf16 autocast, as the trainer does on a GPU (on a CPU
the CPU's autocast, which checks the path but is not what training runs). The server itself
never touches the GPU, since a child forked from a process that has initialised CUDA cannot
use it; the driver starts it with PYTORCH_NVML_BASED_CUDA_CHECK=1, so that a library asking at
import whether there is a GPU does not initialise CUDA either.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import resource
import statistics
import sys
import time
import traceback
from typing import Callable

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

Predict = Callable[[], dict]
Precision = Callable[[], contextlib.AbstractContextManager]  # a new context for each step
Build = Callable[[dict, dict], tuple[torch.nn.Module, Predict]]


# ----- the steps both models run --------------------------------------------------------
def load_arrays(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def batch_tensors(arrays: dict[str, np.ndarray], device: str) -> dict[str, torch.Tensor]:
    """The batch fields both models read, float32 on `device`: each side adds its own."""
    natoms = torch.from_numpy(arrays["natoms"])
    fields = {
        "pos": torch.from_numpy(arrays["pos"]).float(),
        "atomic_numbers": torch.from_numpy(arrays["atomic_numbers"]),
        "cell": torch.from_numpy(arrays["cell"]).float(),
        "pbc": torch.from_numpy(arrays["pbc"]),
        "natoms": natoms,
        "edge_index": torch.from_numpy(arrays["edge_index"]),
        "cell_offsets": torch.from_numpy(arrays["cell_offsets"]).float(),
        "batch": torch.repeat_interleave(torch.arange(len(natoms)), natoms),
    }
    return {name: value.to(device) for name, value in fields.items()}


def targets_of(arrays: dict[str, np.ndarray], device: str) -> dict[str, torch.Tensor]:
    targets = {
        "energy": torch.from_numpy(arrays["target_energy"]).float(),
        "forces": torch.from_numpy(arrays["target_forces"]).float(),
        "stress": torch.from_numpy(arrays["target_stress"]).float(),
        "natoms": torch.from_numpy(arrays["natoms"]).float(),
    }
    return {name: value.to(device) for name, value in targets.items()}


def precision_context(case: dict) -> Precision:
    """bf16 autocast on the case's device, or nothing (fp32)."""
    device_type = torch.device(case["device"]).type
    return lambda: torch.autocast(device_type, dtype=torch.bfloat16, enabled=case["precision"] == "bf16")


def loss_of(out: dict, targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-atom energy MSE + force MSE (+ stress MSE): the same for both models."""
    energy = (out["energy"].float() - targets["energy"]) / targets["natoms"]
    loss = energy.square().mean() + (out["forces"].float() - targets["forces"]).square().mean()
    if "stress" in out:
        loss = loss + (out["stress"].float().reshape(-1, 3, 3) - targets["stress"]).square().mean()
    return loss


def forward_step(model: torch.nn.Module, predict: Predict, precision: Precision) -> Callable[[], None]:
    """Inference: energy and forces (and stress), no parameter gradients."""
    model.eval()

    def step() -> None:
        with torch.no_grad(), precision():  # both models switch autograd on inside for conservative forces
            predict()

    return step


def backward_to_parameters(loss: torch.Tensor, model: torch.nn.Module) -> None:
    """Gradients of the trainable parameters only, as esen-train's trainer computes them: the
    positions' and strain's gradients, which a conservative loss also reaches, are never used."""
    loss.backward(inputs=[parameter for parameter in model.parameters() if parameter.requires_grad])


def training_step(model: torch.nn.Module, predict: Predict, targets: dict,
                  precision: Precision) -> Callable[[], None]:
    """Loss, backward (a double backward for conservative forces), AdamW step."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with precision():  # forward and backward, as the trainer's autocast
            backward_to_parameters(loss_of(predict(), targets), model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# ----- process bookkeeping ----------------------------------------------------------------
def memory_mb() -> tuple[float, float]:
    """(current, peak) resident set of this process in MB, from /proc/self/status."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def page_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


MAX_PROFILED_STEPS = 8
STEADY_PAGE_FAULTS = 1000  # 4 MB of fresh pages: noise against a step's gigabytes


def profile_until_steady(run: Callable[[], None], max_steps: int = MAX_PROFILED_STEPS,
                         **profiler_options) -> tuple[torch.profiler.profile, int, int]:
    """(profiler, steps, page faults) of `run` under torch.profiler, repeated until a run
    faults no fresh pages in (at most `max_steps` runs). The profiler's own records take
    heap memory between the step's tensors, so with freed memory kept the first profiled
    steps of a large system fault pages in (Cu108: up to 1.8 GB a step), which inflates every
    op that writes a new tensor (zero fills, bmm) against an unprofiled step."""
    for steps in range(1, max_steps + 1):
        faults = page_faults()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], **profiler_options) as profiler:
            run()
        faults = page_faults() - faults
        if faults < STEADY_PAGE_FAULTS:
            break
    return profiler, steps, faults


def profile_step(step: Callable[[], None], top: int) -> dict:
    """The `top` operators of a step by self CPU time (torch.profiler), with call counts, and
    how many profiled steps it took to reach one without page faults."""
    profiler, steps, faults = profile_until_steady(step)
    release_free_memory()
    events = sorted(profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    total = sum(event.self_cpu_time_total for event in events)
    return {
        "profiled_steps": steps,
        "page_faults": faults,
        "ops": [
            {"op": event.key, "self_s": round(event.self_cpu_time_total / 1e6, 3),
             "share": round(event.self_cpu_time_total / total, 4), "calls": event.count}
            for event in events[:top]
        ],
    }


class MatmulRecorder(TorchDispatchMode):
    """Counts the calls of a step's matmul-like ops (those FlopCounterMode counts: mm, addmm,
    bmm, ...) by their arguments: shapes, strides and dtypes of the tensors, other values as
    they are."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[tuple, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in flop_registry:
            key = (func, describe(args), describe(tuple(sorted(kwargs.items()))))
            self.calls[key] = self.calls.get(key, 0) + 1
        return func(*args, **kwargs)


def describe(value):
    """A hashable stand-in for an op's argument, from which `rebuild` makes a like one."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), value.dtype, str(value.device))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(describe(item) for item in value))
    return value


def rebuild(description):
    """Random data in the described layout (a transposed or broadcast operand stays so)."""
    if isinstance(description, tuple) and description and description[0] == "tensor":
        _, shape, stride, dtype, device = description
        extent = 1 + sum((size - 1) * step for size, step in zip(shape, stride)) if all(shape) else 0
        storage = torch.randn(extent, device=device).to(dtype)  # matmul operands are floating point
        return storage.as_strided(shape, stride)
    if isinstance(description, tuple) and description and description[0] in ("list", "tuple"):
        items = [rebuild(item) for item in description[1]]
        return items if description[0] == "list" else tuple(items)
    return description


def matmuls_alone(step: Callable[[], None], on_gpu: bool, repeats: int = 5) -> dict:
    """The time a step's matmul-like ops take when run alone: one step records every call
    (op and operand layouts), then each distinct call runs on random operands of the same
    layout, once to warm up and `repeats` times timed; the sum over calls of count x median.
    What the step would take if nothing but its matmuls cost time: a bound on its speed at
    these FLOPs and this library's kernels."""
    recorder = MatmulRecorder()
    with recorder:
        step()
    release_free_memory()
    total, shapes = 0.0, []
    with torch.no_grad():
        for (func, args, kwargs), count in recorder.calls.items():
            args, kwargs = rebuild(args), dict(rebuild(kwargs))
            func(*args, **kwargs)
            times = []
            for _ in range(repeats):
                synchronize(on_gpu)
                start = time.perf_counter()
                func(*args, **kwargs)
                synchronize(on_gpu)
                times.append(time.perf_counter() - start)
            seconds = count * statistics.median(times)
            total += seconds
            shapes.append({"op": str(func), "shapes": [list(a.shape) for a in args if isinstance(a, torch.Tensor)],
                           "calls": count, "seconds": round(seconds, 4)})
    shapes.sort(key=lambda entry: entry["seconds"], reverse=True)
    return {"matmul_s": total, "calls": sum(recorder.calls.values()), "shapes": shapes[:10]}


def parameters_by_module(model: torch.nn.Module, depth: int = 2) -> dict[str, int]:
    """Trainable parameters per module path cut at `depth` ("backbone.blocks": ...)."""
    counts: dict[str, int] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            key = ".".join(name.split(".")[:depth])
            counts[key] = counts.get(key, 0) + parameter.numel()
    return counts


def set_mmap_threshold(size: int) -> None:
    """glibc serves every allocation of `size` bytes or more with its own mmap and unmaps it
    when freed. The resident set then follows the live tensors instead of glibc's heap, which
    keeps freed blocks (up to 32 MB each by default) for reuse; every large allocation pays
    page faults, so steps are slower."""
    M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
    if ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, size) != 1:
        raise RuntimeError(f"mallopt(M_MMAP_THRESHOLD, {size}) failed")


TRIM_FREED_MEMORY = True  # off in a child that keeps freed memory (keep_freed_memory)


def keep_freed_memory() -> None:
    """glibc never mmaps and never trims: freed blocks of every size stay in the heap for reuse.
    The same two mallopt calls as esen_train/engine/host_memory.py, which this file cannot
    import (fairchem's side runs in a virtualenv without esen_train)."""
    global TRIM_FREED_MEMORY
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    if libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, -1) != 1:
        raise RuntimeError("mallopt(M_MMAP_MAX / M_TRIM_THRESHOLD) failed")
    TRIM_FREED_MEMORY = False


def release_free_memory() -> None:
    """gc, then (unless freed memory is kept) hand glibc's free pages back to the kernel."""
    gc.collect()
    if TRIM_FREED_MEMORY:
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Channel:
    """JSON lines: commands on stdin (read unbuffered, so a forked child and its parent
    never hold each other's bytes), replies on the original stdout. Anything libraries
    print goes to stderr instead."""

    def __init__(self) -> None:
        self.reply_fd = os.dup(1)
        os.dup2(2, 1)
        self.commands = os.fdopen(0, "rb", buffering=0)

    def receive(self) -> dict:
        line = self.commands.readline()
        if not line:
            raise EOFError("the driver closed the command channel")
        return json.loads(line)

    def reply(self, message: dict) -> None:
        os.write(self.reply_fd, (json.dumps(message) + "\n").encode())


# ----- server and child -------------------------------------------------------------------
def serve(build: Build, versions: dict[str, str]) -> None:
    """Answer "open" by forking a child that runs the case; exit on "quit" or end of input."""
    # No thread pool in the server: a forked child must not inherit a started OpenMP pool.
    torch.set_num_threads(1)
    if torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised while the server imported its stack: a case forked from it "
                           "could not use the GPU (start it with PYTORCH_NVML_BASED_CUDA_CHECK=1)")
    channel = Channel()
    channel.reply({"ready": True, "rss_mb": memory_mb()[0], "versions": {"torch": torch.__version__, **versions}})
    while True:
        try:
            command = channel.receive()
        except EOFError:
            return
        if command["cmd"] == "quit":
            return
        if command["cmd"] != "open":
            channel.reply({"error": f"expected 'open' or 'quit', got {command['cmd']!r}"})
            continue
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                run_case(channel, build, command)
            except BaseException:  # report anything, then leave without running the server's cleanup
                channel.reply({"error": traceback.format_exc()})
                status = 1
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        # Killed (the out-of-memory killer picks the process that is stepping, not an idle
        # one): the driver waits for the reply the child could not give.
        if os.WIFSIGNALED(status):
            channel.reply({"error": f"the case's process was killed by signal {os.WTERMSIG(status)}"
                                    " (SIGKILL: out of memory?)"})


def run_case(channel: Channel, build: Build, command: dict) -> None:
    # If the shared machine runs out of memory, this process is what the kernel should
    # kill first, not someone else's work (the driver reports the case as killed).
    with open("/proc/self/oom_score_adj", "w") as oom_score:
        oom_score.write("1000")
    case = command["case"]
    if case.get("malloc_mmap_threshold"):
        set_mmap_threshold(case["malloc_mmap_threshold"])
    if case.get("keep_freed_host_memory"):
        keep_freed_memory()
    torch.set_num_threads(case["threads"])
    torch.manual_seed(case["seed"])
    arrays = load_arrays(command["batch"])
    model, predict = build(case, arrays)
    precision = precision_context(case)
    if case["task"] == "train":
        step = training_step(model, predict, targets_of(arrays, case["device"]), precision)
    else:
        step = forward_step(model, predict, precision)
    on_gpu = torch.device(case["device"]).type == "cuda"
    release_free_memory()
    channel.reply({
        "num_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parameters_by_module": parameters_by_module(model),
        "rss_mb": memory_mb()[0],
        "threads": torch.get_num_threads(),
    })
    while True:
        command = channel.receive()
        if command["cmd"] == "step":
            synchronize(on_gpu)
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            synchronize(on_gpu)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
            release_free_memory()
            rss, peak_rss = memory_mb()
            reply = {"seconds": seconds, "cpu_seconds": cpu_seconds, "rss_mb": rss, "peak_rss_mb": peak_rss}
            if on_gpu:
                reply["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
            channel.reply(reply)
        elif command["cmd"] == "flops":
            with FlopCounterMode(display=False) as counter:
                step()
            release_free_memory()
            channel.reply({"flops": counter.get_total_flops()})
        elif command["cmd"] == "profile":
            channel.reply({"profile": profile_step(step, command.get("top", 25))})
        elif command["cmd"] == "matmuls":
            channel.reply(matmuls_alone(step, on_gpu))
        elif command["cmd"] == "close":
            channel.reply({"peak_rss_mb": memory_mb()[1]})
            return
        else:
            channel.reply({"error": f"unknown command {command['cmd']!r}"})


def synchronize(on_gpu: bool) -> None:
    """Wait for the GPU's queued work, so that a step's time is its work's (no-op on a CPU)."""
    if on_gpu:
        torch.cuda.synchronize()


def main(build: Build, versions: dict[str, str]) -> None:
    """A side's entry point; `versions` are reported to the driver (with torch's)."""
    if len(sys.argv) != 1:
        raise SystemExit(f"usage: {sys.argv[0]} (speaks JSON lines on stdin/stdout; see case_server.py)")
    serve(build, versions)
