"""Our eSEN against fairchem-core's eSEN, same hyperparameters, same batch, one run; prints JSON.

    python benchmarks/model_vs_fairchem.py [--repeats 3] [--warmup 1] [--systems aspirin,cu108]
                                           [--tasks forward,train] [--modes direct,conservative]
                                           [--fairchem-flops] [--profile 25] [--matmuls-alone]
                                           [--ours-commit REV]
                                           [--device cpu|cuda] [--precision fp32|bf16]
                                           [--sides ours,fairchem] [--output figures.json]

Models: the "small" preset of ../shared/ESEN_SPEC.md (4 layers, 64 sphere channels, 128
hidden, 128 edge, lmax = mmax = 2, 64 Gaussians, 6 Å, RMS norm, gate activation on edges,
grid feed-forward), random weights, float32, 2 threads each. fairchem-core runs in its own
virtualenv (default .venvs/fairchem); when that cannot import fairchem the driver makes it:

    python -m venv .venvs/fairchem
    .venvs/fairchem/bin/pip install torch==2.13.0      # the CPU wheel; an unpinned torch is CUDA
    .venvs/fairchem/bin/pip install fairchem-core==2.24.0

Batches: 4 periodic 108-atom Cu cells (3x3x3 fcc conventional, rattled) and 16 rMD17
aspirin molecules (21 atoms, from ../shared/data; skipped when absent), with every
neighbour within 6 Å from our neighbour list, handed to both models as the same arrays.

Cases: forward (energy + forces) and training step (loss, the parameters' gradients, AdamW step), each in
direct mode (force head) and conservative mode (forces and, for Cu, stress by autograd;
training backpropagates through them: a double backward). The same loss and optimizer
for both (case_server.py).

Method. One server per model imports its stack once; for every case each forks a fresh
child (case_server.py), so `peak_rss_mb` is the peak resident set (VmHWM) of a fresh
process that ran only that case's steps, imports included (fairchem's are larger), and
`step_rss_mb` is that peak minus the resident set once model and batch were built
(`build_rss_mb`): the memory the steps need. The two children of a case take turns step
by step (ours, fairchem, fairchem, ours, ...), because the machine's cores are shared:
load hits both alike. `--one-side-at-a-time` runs one side's steps and closes it before the
other's open, for steps too large for the machine's memory twice (esen-30m's conservative
training on a 24 GB host); use it on an idle machine. Warm-up steps are not timed; times are
medians; CPU seconds of the process per step are reported beside wall seconds (less
sensitive to other processes).
The 1-minute load average is recorded per case. FLOPs per step are counted with torch's
FlopCounterMode (matmul-like ops: mm, addmm, bmm, ...; elementwise work is not counted)
in one extra step, and compared with a float32 2048x2048 matmul on the same threads,
measured before and after the cases (the higher one is the machine's peak).
`--matmuls-alone` also times, per side, the matmul-like calls of one step each run on its
own with operands of the same layout (`matmuls_alone_s`): what the step would take if
nothing but its matmuls cost time. Ours over it is `atoms_per_s_matmuls_alone`, and that
over fairchem's measured speed (`throughput_bound`) is the most the speed ratio can reach
with these FLOPs and torch's kernels.
Shared machine: before each step the driver waits until the memory the step needs is
available (what that side's previous step took; for a case's first step, an estimate per
edge from the smaller system, which runs first), and the case processes volunteer to be
the first the kernel kills when memory runs out (oom_score_adj 1000). A killed case is
tried once more; a case that fails on one side is reported with its error and the run
goes on; with --output the JSON so far is written after every case.
Peak RSS includes what glibc keeps of freed memory for reuse: its heap holds freed blocks
up to 32 MB, and how much of it stays resident depends on the order and sizes of the
allocations, not only on how much is alive at once. `--malloc-mmap-threshold 1048576`
makes both sides' children mmap every block of 1 MiB or more and unmap it when freed, so
their peak RSS follows the live tensors; their steps are then slower (page faults), so
compare only memory in such a run. `--keep-freed-host-memory` does the opposite, on both
sides alike: no mmap at all and no trimming (what `esen-train fit` does on glibc), so freed
blocks of any size are reused and large tensors cost no page faults.
`--model esen-sm` or `esen-30m` benchmarks one of our presets instead of the spec's small
model (fairchem_side.py gives fairchem the same hyperparameters in its names).
GPU: `--device cuda` puts both models and batches on the GPU, times each step between two
synchronisations, reports each side's peak GPU memory (`peak_device_mb`) and takes the
matmul peak there; `--precision bf16` runs the steps under bf16 autocast, as training with
`precision: bf16` does, and takes the peak of a bfloat16 matmul. `--sides ours` runs our
side alone (no ratios), for a machine where fairchem-core cannot be installed; fairchem's
side runs with any interpreter that imports it (`--venv`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ase.build
import ase.io
import numpy as np
import torch
from ase import Atoms

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from esen_train.data.neighbors import build_neighbor_list  # noqa: E402
from esen_train.model.config import load_model_config  # noqa: E402
from case_server import synchronize  # noqa: E402
from shared_data import ASPIRIN  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parent
DEFAULT_VENV = REPO / ".venvs" / "fairchem"
TORCH_PIN = "torch==2.13.0"
FAIRCHEM_PIN = "fairchem-core==2.24.0"

# The sizes compared, in our names (ModelConfig's fields); fairchem_side.py maps them to
# fairchem's. "small" is the spec's small eSEN; the others are our presets.
COMPARED_FIELDS = ("num_layers", "sphere_channels", "hidden_channels", "edge_channels", "lmax", "mmax",
                   "num_radial_basis", "cutoff", "max_num_elements", "feed_forward")
SMALL = {
    "num_layers": 4,
    "sphere_channels": 64,
    "hidden_channels": 128,
    "edge_channels": 128,
    "lmax": 2,
    "mmax": 2,
    "num_radial_basis": 64,
    "cutoff": 6.0,
    "max_num_elements": 100,
    "feed_forward": "grid",
}


def hyperparameters(model: str) -> dict:
    """"small", or a preset of ours (esen-sm, esen-30m): the compared fields, in our names."""
    if model == "small":
        return SMALL
    return {field: getattr(load_model_config(model), field) for field in COMPARED_FIELDS}


# fairchem's charge/spin conditioning (UMA's; eSEN has none): left out when comparing sizes.
FAIRCHEM_EXTRA_MODULES = ("backbone.mix_csd",)
SIDES = ("ours", "fairchem")
TASKS = ("forward", "train")
MODES = ("direct", "conservative")
PRECISIONS = {"fp32": "float32", "bf16": "bf16 autocast (forward and backward) over float32 weights"}


# ----- the fairchem virtualenv --------------------------------------------------------------
def ensure_fairchem_venv(venv: Path) -> Path:
    """fairchem-core's interpreter, creating the virtualenv first if it cannot import fairchem."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import fairchem.core"], capture_output=True).returncode == 0:
        return python
    print(f"creating {venv} with {TORCH_PIN} and {FAIRCHEM_PIN} (a few minutes)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    # torch first and pinned: fairchem-core would otherwise pull a multi-GB CUDA build.
    subprocess.run([python, "-m", "pip", "install", "-q", TORCH_PIN], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", FAIRCHEM_PIN], check=True)
    return python


# ----- batches --------------------------------------------------------------------------------
def cu_cells(count: int) -> list[Atoms]:
    cells = []
    for seed in range(count):
        atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True) * (3, 3, 3)
        atoms.rattle(0.05, seed=seed)
        cells.append(atoms)
    return cells


def aspirin_molecules(count: int) -> list[Atoms]:
    frames = ase.io.read(ASPIRIN, index=":")
    return frames[:: max(len(frames) // count, 1)][:count]


def batch_arrays(structures: list[Atoms], cutoff: float, seed: int) -> dict[str, np.ndarray]:
    """The structures as one batch (edge indices offset per structure), plus random targets."""
    rng = np.random.default_rng(seed)
    edge_index, cell_offsets, nedges = [], [], []
    offset = 0
    for atoms in structures:
        edges, shifts = build_neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
        edge_index.append(edges + offset)
        cell_offsets.append(shifts)
        nedges.append(edges.shape[1])
        offset += len(atoms)
    num_atoms, num_structures = offset, len(structures)
    return {
        "pos": np.concatenate([atoms.positions for atoms in structures]),
        "atomic_numbers": np.concatenate([atoms.numbers for atoms in structures]).astype(np.int64),
        "cell": np.stack([atoms.cell.array for atoms in structures]),
        "pbc": np.stack([atoms.pbc for atoms in structures]),
        "natoms": np.array([len(atoms) for atoms in structures], dtype=np.int64),
        "edge_index": np.concatenate(edge_index, axis=1),
        "cell_offsets": np.concatenate(cell_offsets).astype(np.float64),
        "nedges": np.array(nedges, dtype=np.int64),
        "target_energy": rng.normal(size=num_structures),
        "target_forces": rng.normal(size=(num_atoms, 3)),
        "target_stress": rng.normal(scale=0.01, size=(num_structures, 3, 3)),
    }


def write_batches(args: argparse.Namespace, workdir: Path) -> dict[str, dict]:
    """{system: {"path", "periodic", "atoms", "structures", "edges"}} for the systems asked for."""
    systems = {}
    for name in args.systems:
        if name == "cu108":
            structures, periodic = cu_cells(args.cu_cells), True
        elif name == "aspirin":
            if not ASPIRIN.exists():
                print(f"skipping aspirin: {ASPIRIN} is absent", file=sys.stderr)
                continue
            structures, periodic = aspirin_molecules(args.aspirin_molecules), False
        else:
            raise SystemExit(f"unknown system {name!r} (known: cu108, aspirin)")
        arrays = batch_arrays(structures, args.hyperparameters["cutoff"], args.seed)
        path = workdir / f"{name}.npz"
        np.savez(path, **arrays)
        systems[name] = {
            "path": str(path),
            "periodic": periodic,
            "atoms": int(arrays["natoms"].sum()),
            "structures": len(structures),
            "edges": int(arrays["edge_index"].shape[1]),
        }
    return systems


# ----- the machine's matmul rate ----------------------------------------------------------------
def matmul_gflops(threads: int, device: str = "cpu", precision: str = "fp32", repeats: int = 7) -> float:
    """Median GFLOP/s of a square matmul on `threads` threads or the GPU: float32 [2048, 2048]
    on a CPU; on a GPU [8192, 8192], in bfloat16 for bf16 (what autocast's matmuls run in)."""
    on_gpu = torch.device(device).type == "cuda"
    size = 8192 if on_gpu else 2048
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        synchronize(on_gpu)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(on_gpu)
        times.append(time.perf_counter() - start)
    torch.set_num_threads(previous)
    return 2 * size**3 / statistics.median(times) / 1e9


# ----- talking to the two servers ---------------------------------------------------------------
class SideError(RuntimeError):
    """One side failed a case; its case process has exited."""

    def __init__(self, side: str, message: str) -> None:
        super().__init__(f"{side}: {message}")
        self.side = side


class Server:
    """A case server (case_server.py) in a subprocess; `ask` sends one command, returns the reply."""

    def __init__(self, side: str, command: list, env: dict | None = None) -> None:
        self.side = side
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO,
                                        env=env)
        self.hello = self._read()

    def ask(self, message: dict) -> dict:
        self.process.stdin.write((json.dumps(message) + "\n").encode())
        self.process.stdin.flush()
        return self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.side} server exited (code {self.process.wait()}); see its stderr above")
        reply = json.loads(line)
        if "error" in reply:
            raise SideError(self.side, reply["error"])
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write(b'{"cmd": "quit"}\n')
            self.process.stdin.close()
            self.process.wait()


def export_commit(revision: str, workdir: Path) -> dict:
    """esen_train as of `revision`, extracted under workdir: the environment for our server."""
    commit = subprocess.run(["git", "rev-parse", "--short", f"{revision}^{{commit}}"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.strip()
    source = workdir / "esen_train_source"
    source.mkdir()
    archive = subprocess.run(["git", "archive", commit, "esen_train"], cwd=REPO, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", source], input=archive.stdout, check=True)
    return os.environ | {"ESEN_TRAIN_SOURCE": str(source), "ESEN_TRAIN_COMMIT": commit}


def start_servers(sides: list[str], fairchem_python: Path | None, ours_env: dict | None) -> dict[str, Server]:
    # The servers fork a child per case, and a child forked after CUDA was initialised cannot
    # use the GPU: torch.cuda.is_available() (which libraries call at import) then asks NVML
    # for the devices instead of initialising CUDA.
    fork_safe = {"PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
    servers = {}
    if "ours" in sides:
        servers["ours"] = Server("ours", [sys.executable, BENCHMARKS / "esen_side.py"],
                                 env=(ours_env or dict(os.environ)) | fork_safe)
    if "fairchem" in sides:
        servers["fairchem"] = Server("fairchem", [fairchem_python, BENCHMARKS / "fairchem_side.py"],
                                     env=dict(os.environ) | fork_safe)
    return servers


def available_mb() -> float:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def wait_for_memory(need_mb: float, limit_s: float) -> float:
    """Wait until the machine has `need_mb` available (others' jobs come and go); seconds waited.
    Gives up after `limit_s` and goes ahead."""
    start = time.monotonic()
    announced = False
    while available_mb() < need_mb and time.monotonic() - start < limit_s:
        if not announced:
            print(f"  waiting for {need_mb:.0f} MB of free memory ({available_mb():.0f} MB now)",
                  file=sys.stderr, flush=True)
            announced = True
        time.sleep(5)
    return time.monotonic() - start


def measure_case(servers: dict[str, Server], case: dict, batch: str, args: argparse.Namespace,
                 need_mb: dict[str, float]) -> dict:
    """Open the case on both sides, alternate their steps, count FLOPs, close; raw figures per side.
    With `args.one_side_at_a_time`, one side runs all its steps and closes before the other
    opens, so only one case process holds memory at a time (for steps that would not fit the
    machine twice; the machine's load is then not shared alike, so use it idle).

    Before each step, waits until the machine has the memory that side's step needs
    (`need_mb` at first, an estimate; then what its previous step took), so that the
    benchmark does not push others' work out of memory."""
    raw = {side: {"steps": [], "memory_wait_s": 0.0} for side in servers}
    need_mb = dict(need_mb)
    open_sides = []

    def open_side(side: str) -> None:
        raw[side]["opened"] = servers[side].ask({"cmd": "open", "case": case, "batch": batch})
        open_sides.append(side)

    def step(side: str, timed: bool) -> None:
        raw[side]["memory_wait_s"] += wait_for_memory(need_mb[side], args.memory_wait_limit)
        reply = servers[side].ask({"cmd": "step"})
        need_mb[side] = 1.1 * (reply["peak_rss_mb"] - reply["rss_mb"])
        if timed:
            raw[side]["steps"].append(reply)

    def extras_and_close(side: str) -> None:
        # The last step's peak is the steps' peak: the FLOP and profile steps come after it.
        if side == "ours" or args.fairchem_flops:
            wait_for_memory(need_mb[side], args.memory_wait_limit)
            raw[side]["flops"] = servers[side].ask({"cmd": "flops"})["flops"]
        if args.profile:
            wait_for_memory(need_mb[side], args.memory_wait_limit)
            raw[side]["profile"] = servers[side].ask({"cmd": "profile", "top": args.profile})["profile"]
        if args.matmuls_alone:
            wait_for_memory(need_mb[side], args.memory_wait_limit)
            raw[side]["matmuls"] = servers[side].ask({"cmd": "matmuls"})
        open_sides.remove(side)
        servers[side].ask({"cmd": "close"})

    try:
        if args.one_side_at_a_time:
            for side in servers:
                open_side(side)
                for index in range(args.warmup + args.repeats):
                    step(side, timed=index >= args.warmup)
                extras_and_close(side)
        else:
            for side in servers:
                open_side(side)
            sides = list(servers)
            for index in range(args.warmup + args.repeats):
                for side in sides if index % 2 == 0 else sides[::-1]:  # ABBA: neither side always goes first
                    step(side, timed=index >= args.warmup)
            for side in servers:
                extras_and_close(side)
    except SideError as error:
        if error.side in open_sides:
            open_sides.remove(error.side)  # its process has gone; the other side's still waits
        raise
    finally:
        for side in open_sides:
            servers[side].ask({"cmd": "close"})
    return raw


# ----- figures ----------------------------------------------------------------------------------
def ratio(a: float, b: float) -> float:
    return round(a / b, 3)


def side_figures(raw: dict, atoms: int, peak_gflops: float) -> dict:
    seconds = [step["seconds"] for step in raw["steps"]]
    median = statistics.median(seconds)
    median_cpu = statistics.median(step["cpu_seconds"] for step in raw["steps"])
    peak_rss = raw["steps"][-1]["peak_rss_mb"]
    figures = {
        "median_s": round(median, 3),
        "seconds": [round(t, 3) for t in seconds],
        "atoms_per_s": round(atoms / median, 2),
        "median_cpu_s": round(median_cpu, 3),
        "atoms_per_cpu_s": round(atoms / median_cpu, 2),
        "peak_rss_mb": round(peak_rss),
        "step_rss_mb": round(peak_rss - raw["opened"]["rss_mb"]),
        "build_rss_mb": round(raw["opened"]["rss_mb"]),
        "memory_wait_s": round(raw["memory_wait_s"], 1),
    }
    if "peak_device_mb" in raw["steps"][-1]:
        figures["peak_device_mb"] = round(raw["steps"][-1]["peak_device_mb"])
    if "flops" in raw:
        figures["gflop_per_step"] = round(raw["flops"] / 1e9, 2)
        figures["gflop_per_s"] = round(raw["flops"] / median / 1e9, 2)
        figures["fraction_of_matmul_peak"] = round(raw["flops"] / median / 1e9 / peak_gflops, 4)
    if "matmuls" in raw:
        matmul_s = raw["matmuls"]["matmul_s"]
        figures["matmuls_alone_s"] = round(matmul_s, 3)
        figures["matmul_share_of_step"] = round(matmul_s / median, 3)
        figures["atoms_per_s_matmuls_alone"] = round(atoms / matmul_s, 2)
        figures["matmul_shapes"] = raw["matmuls"]["shapes"]
    if "profile" in raw:
        figures["profile"] = raw["profile"]
    return figures


def case_figures(raw: dict, atoms: int, peak_gflops: float) -> dict:
    """Each side's figures and, when both sides ran, ours over fairchem's."""
    figures = {side: side_figures(raw[side], atoms, peak_gflops) for side in raw}
    if set(figures) != set(SIDES):
        return figures
    ours, theirs = figures["ours"], figures["fairchem"]
    figures["ours_over_fairchem"] = {
        "throughput": ratio(ours["atoms_per_s"], theirs["atoms_per_s"]),
        "throughput_per_cpu_s": ratio(ours["atoms_per_cpu_s"], theirs["atoms_per_cpu_s"]),
        "peak_rss": ratio(ours["peak_rss_mb"], theirs["peak_rss_mb"]),
        "step_rss": ratio(ours["step_rss_mb"], theirs["step_rss_mb"]),
    }
    if "atoms_per_s_matmuls_alone" in ours:
        # The most the speed ratio can be at these FLOPs: ours if only its matmuls cost time.
        figures["ours_over_fairchem"]["throughput_bound"] = ratio(ours["atoms_per_s_matmuls_alone"], theirs["atoms_per_s"])
    if "peak_device_mb" in ours:
        figures["ours_over_fairchem"]["peak_device_memory"] = ratio(ours["peak_device_mb"], theirs["peak_device_mb"])
    return figures


def parameter_counts(measured: list[dict]) -> dict:
    """Trainable parameters per mode; fairchem's also without its charge/spin mixing layer."""
    counts = {}
    for item in measured:
        mode, raw = item["case"]["mode"], item.get("raw")
        if mode in counts or raw is None:
            continue
        counts[mode] = {side: raw[side]["opened"]["num_parameters"] for side in raw}
        if "fairchem" in raw:
            extra = sum(count for module, count in raw["fairchem"]["opened"]["parameters_by_module"].items()
                        if module in FAIRCHEM_EXTRA_MODULES)
            counts[mode]["fairchem_without_charge_spin_mixing"] = counts[mode]["fairchem"] - extra
    return counts


def conservative_to_direct(cases: list[dict]) -> dict:
    """Time of a conservative step over a direct one, per system, task and side."""
    done = {(c["system"], c["task"], c["mode"]): c for c in cases if "error" not in c}
    out = {}
    for (system, task, mode), conservative in done.items():
        direct = done.get((system, task, "direct"))
        if mode == "conservative" and direct is not None:
            out[f"{system}_{task}"] = {
                side: ratio(conservative[side]["median_s"], direct[side]["median_s"])
                for side in SIDES if side in conservative
            }
    return out


def build_report(args, systems, measured, versions, peaks, load_at_start, started) -> dict:
    peak = max(peaks.values())  # load from other processes only lowers it
    cases = []
    for item in measured:
        case = item["case"]
        entry = {key: case[key] for key in ("system", "task", "mode", "stress")}
        entry["load_average_1min"] = item["load_average_1min"]
        if "error" in item:
            entry["error"] = item["error"]
        else:
            entry |= case_figures(item["raw"], systems[case["system"]]["atoms"], peak)
        cases.append(entry)
    return {
        "benchmark": "eSEN: ours vs fairchem-core, same hyperparameters, batch and threads, measured side by side",
        "model": args.model,
        "hyperparameters": args.hyperparameters,
        "keep_freed_host_memory": args.keep_freed_host_memory,
        "steps": steps_order(args),
        "threads": args.threads,
        "device": args.device,
        "precision": PRECISIONS[args.precision],
        "warmup_steps": args.warmup,
        "timed_steps": args.repeats,
        "memory": "peak_rss_mb: VmHWM of a fresh process (forked after imports) running only the case's steps; "
                  "step_rss_mb: that minus build_rss_mb, its resident set once model and batch were built; "
                  "on a GPU peak_device_mb: the most GPU memory allocated (torch) since the case opened",
        "versions": versions,
        "matmul_peak_gflops": {name: round(value, 1) for name, value in peaks.items()} | {"used": round(peak, 1)},
        "load_average_1_5_15": {"start": [round(x, 2) for x in load_at_start],
                                "now": [round(x, 2) for x in os.getloadavg()]},
        "cpus": os.cpu_count(),
        "systems": {name: {k: v for k, v in info.items() if k != "path"} for name, info in systems.items()},
        "parameters": parameter_counts(measured),
        "cases": cases,
        "conservative_to_direct": conservative_to_direct(cases),
        "wall_s": round(time.time() - started, 1),
    }


def steps_order(args) -> str:
    if len(set(args.sides)) == 1:
        return f"one side only: {args.sides[0]}"
    return "one side's, then the other's" if args.one_side_at_a_time else "the two sides' in turn (ABBA)"


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(text)
    temporary.replace(path)


# ----- main -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per side and case (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--systems", default="aspirin,cu108", type=lambda s: s.split(","),
                        help="run smallest first whatever the order (memory estimates)")
    parser.add_argument("--tasks", default=",".join(TASKS), type=lambda s: s.split(","))
    parser.add_argument("--modes", default=",".join(MODES), type=lambda s: s.split(","))
    parser.add_argument("--cu-cells", type=int, default=4)
    parser.add_argument("--aspirin-molecules", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="glibc mmaps allocations of this size or more and unmaps them when freed, so peak "
                             "RSS follows live tensors rather than glibc's heap (slower: compare memory only)")
    parser.add_argument("--keep-freed-host-memory", action="store_true",
                        help="both sides' children keep freed memory in glibc's heap, as `esen-train fit` does "
                             "by default (keep_freed_host_memory): no page faults for large tensors at every step")
    parser.add_argument("--model", default="small", choices=["small", "esen-sm", "esen-30m", "tiny"],
                        help="the spec's small eSEN, or one of our presets (both sides get the same hyperparameters; "
                             "tiny: a quick check of the benchmark itself)")
    parser.add_argument("--sides", default=",".join(SIDES), type=lambda s: s.split(","),
                        help="ours, fairchem or both (ratios need both; ours alone where fairchem-core cannot "
                             "be installed)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: steps timed between synchronisations, "
                                                        "and each side's peak GPU memory")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                        help="bf16: the steps under bf16 autocast, as training with precision=bf16 on a GPU")
    parser.add_argument("--fairchem-flops", action="store_true",
                        help="count fairchem's FLOPs too (one more step per case; ours are always counted)")
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="add each side's TOP operators by self CPU time in a profiled step (profiled "
                             "until one runs without page faults: case_server.profile_until_steady)")
    parser.add_argument("--matmuls-alone", action="store_true",
                        help="time each side's matmul-like calls of one step run alone (case_server.matmuls_alone): "
                             "the step's time if nothing else cost any, and so the most the speed ratio can be")
    parser.add_argument("--one-side-at-a-time", action="store_true",
                        help="each case: one side's steps, then the other's, so that one case process holds memory "
                             "at a time (for steps too large for two on the machine; run it on an idle machine)")
    parser.add_argument("--memory-wait-limit", type=float, default=1800, metavar="SECONDS",
                        help="longest wait for free memory before a step (then it runs anyway)")
    parser.add_argument("--ours-commit", metavar="REV",
                        help="benchmark esen_train as of this git revision (default: the checkout as it is)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="fairchem-core's virtualenv")
    parser.add_argument("--output", type=Path, help="also write the JSON here (after every case)")
    args = parser.parse_args(argv)
    for values, known, what in ((args.tasks, TASKS, "task"), (args.modes, MODES, "mode")):
        for value in values:
            if value not in known:
                parser.error(f"unknown {what} {value!r} (known: {', '.join(known)})")
    if args.keep_freed_host_memory and args.malloc_mmap_threshold:
        parser.error("--keep-freed-host-memory and --malloc-mmap-threshold are opposites: pick one")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if not args.sides or any(side not in SIDES for side in args.sides):
        parser.error(f"--sides takes ours, fairchem or both, got {','.join(args.sides)!r}")
    if args.profile and torch.device(args.device).type != "cpu":
        parser.error("--profile reports CPU self times: on a GPU profile with torch.profiler's CUDA activity")
    args.hyperparameters = hyperparameters(args.model)  # read once: every case and the report use it
    return args


def physical_memory_mb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20


class MemoryEstimate:
    """Memory a step will need, from the steps measured so far: per (side, task, mode), the
    most MB per edge any system's steps took (the small molecule batch takes more per edge
    than Cu: an overestimate, capped at 80% of the machine). Systems run smallest first,
    so the large one's first step is not a blind guess."""

    CAP = 0.8

    def __init__(self) -> None:
        self.mb_per_edge: dict[tuple, float] = {}

    def need_mb(self, case: dict, edges: int) -> dict[str, float]:
        key = (case["task"], case["mode"])
        return {side: min(edges * self.mb_per_edge.get((side, *key), 0.0), self.CAP * physical_memory_mb())
                for side in SIDES}

    def record(self, case: dict, edges: int, raw: dict) -> None:
        for side in raw:
            step_mb = max(step["peak_rss_mb"] for step in raw[side]["steps"]) - raw[side]["opened"]["rss_mb"]
            key = (side, case["task"], case["mode"])
            self.mb_per_edge[key] = max(self.mb_per_edge.get(key, 0.0), step_mb / edges)


def measure_with_retry(servers, case: dict, info: dict, args, memory: MemoryEstimate) -> dict:
    """measure_case; a case whose process was killed (out of memory: others' jobs come and go)
    is tried once more, when the memory it needs (or, with no estimate, 80% of the
    machine's) is available. Returns {"raw": ...} or {"error": ...}."""
    need_mb = memory.need_mb(case, info["edges"])
    for attempt in (1, 2):
        try:
            raw = measure_case(servers, case, info["path"], args, need_mb)
            memory.record(case, info["edges"], raw)
            return {"raw": raw}
        except SideError as error:
            print(f"  failed: {error}", file=sys.stderr, flush=True)
            if attempt == 2 or "killed by signal" not in str(error):
                return {"error": str(error)}
            fallback = MemoryEstimate.CAP * physical_memory_mb()
            wait_for_memory(max(need_mb.values()) or fallback, args.memory_wait_limit)
            print("  trying the case again", file=sys.stderr, flush=True)


def run_cases(args, systems: dict, servers: dict[str, Server], on_case) -> list[dict]:
    """Every case of every system (smallest system first); `on_case(measured)` after each."""
    measured, memory = [], MemoryEstimate()
    for system, info in sorted(systems.items(), key=lambda item: item[1]["edges"]):
        for task in args.tasks:
            for mode in args.modes:
                case = {"system": system, "task": task, "mode": mode, "model": args.hyperparameters,
                        "stress": mode == "conservative" and info["periodic"],
                        "threads": args.threads, "seed": args.seed,
                        "device": args.device, "precision": args.precision,
                        "malloc_mmap_threshold": args.malloc_mmap_threshold,
                        "keep_freed_host_memory": args.keep_freed_host_memory}
                print(f"{system} {task} {mode} ...", file=sys.stderr, flush=True)
                item = {"case": case, "load_average_1min": round(os.getloadavg()[0], 2)}
                item |= measure_with_retry(servers, case, info, args, memory)
                measured.append(item)
                on_case(measured)
    return measured


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    fairchem_python = ensure_fairchem_venv(args.venv) if "fairchem" in args.sides else None
    load_at_start = os.getloadavg()
    peaks = {"start": matmul_gflops(args.threads, args.device, args.precision)}
    with tempfile.TemporaryDirectory(prefix="esen-vs-fairchem-") as workdir:
        systems = write_batches(args, Path(workdir))
        ours_env = export_commit(args.ours_commit, Path(workdir)) if args.ours_commit else None
        servers = start_servers(args.sides, fairchem_python, ours_env)
        versions = {side: server.hello["versions"] for side, server in servers.items()}

        def save_so_far(measured: list[dict]) -> None:
            if args.output:
                report = build_report(args, systems, measured, versions, peaks, load_at_start, started)
                write_atomically(args.output, json.dumps(report, indent=2) + "\n")

        try:
            measured = run_cases(args, systems, servers, save_so_far)
        finally:
            for server in servers.values():
                server.close()
    peaks["end"] = matmul_gflops(args.threads, args.device, args.precision)
    text = json.dumps(build_report(args, systems, measured, versions, peaks, load_at_start, started), indent=2)
    print(text)
    if args.output:
        write_atomically(args.output, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
