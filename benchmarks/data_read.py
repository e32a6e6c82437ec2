"""Read rate of the dataset reader per worker, and memory of a full pass; prints JSON.

    OMP_NUM_THREADS=1 python benchmarks/data_read.py [--workdir DIR] [--seconds 3]

1. Read rate in one process (= one DataLoader worker, per CPU second and per wall
   second), structures in random order:
   decode only (`LMDBDataset.read_record`) and decode plus graph (`dataset[i]`,
   the neighbour list at 6 Å and the torch_geometric `Data`), for rMD17 aspirin
   (converted from ../shared/data/rmd17/aspirin_train.xyz) and for 108-atom
   periodic Cu (3x3x3 fcc conventional cells, rattled, EMT labels).
   Targets on this machine: decode >= 20,000/s, decode + graph >= 2,000/s for Cu.
2. Peak memory of a full pass (every batch of an epoch through the loader, no
   workers) over 1M small synthetic molecules compared with 10k, each pass in a
   fresh process. Target: within 200 MB. LMDB shards are memory-mapped, so the
   resident set also counts the pages of the file read so far (`rss_file`: page
   cache, shared and reclaimable); `rss_anon` is the process's own memory.

Datasets are made in --workdir (a temporary directory by default) and reused
when already there. The 1M pass takes 10 to 40 minutes on this 2-core machine
(--no-memory skips it).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ase.build
import numpy as np
import torch
from ase.calculators.emt import EMT

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from esen_train.data.convert import convert  # noqa: E402
from shared_data import ASPIRIN  # noqa: E402
from esen_train.data.dataset import LMDBDataset  # noqa: E402
from esen_train.data.loader import build_dataloader  # noqa: E402
from esen_train.data.records import StructureRecord  # noqa: E402
from esen_train.data.writer import DatasetWriter  # noqa: E402

CUTOFF = 6.0
SMALL_MOLECULES = ("H2O", "CH4", "NH3", "C2H6", "CH3OH", "C2H4", "HCN", "CO2")


# ----- datasets ---------------------------------------------------------------------
def aspirin_dataset(workdir: Path) -> Path:
    out = workdir / "aspirin"
    if not out.exists():
        if not ASPIRIN.exists():
            raise SystemExit(f"{ASPIRIN} is absent: the aspirin case needs ../shared/data")
        convert([ASPIRIN], out, progress=False)
    return out


def cu_dataset(workdir: Path, count: int = 200) -> Path:
    out = workdir / "cu108"
    if out.exists():
        return out
    with DatasetWriter(out, num_shards=1, provenance={"made_by": "benchmarks/data_read.py"}) as writer:
        for index in range(count):
            atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True) * (3, 3, 3)
            atoms.rattle(0.05, seed=index)
            atoms.calc = EMT()
            writer.write(StructureRecord(
                positions=atoms.positions, atomic_numbers=atoms.numbers, cell=atoms.cell.array,
                pbc=atoms.pbc, energy=atoms.get_potential_energy(), forces=atoms.get_forces(),
                stress=atoms.get_stress(voigt=False), source_file="cu108", source_index=index,
            ))
        writer.finish()
    return out


def small_molecules_dataset(workdir: Path, count: int) -> Path:
    """`count` rattled small molecules with random labels: the format is real, the labels are not."""
    out = workdir / f"molecules_{count}"
    if out.exists():
        return out
    rng = np.random.default_rng(count)
    templates = [ase.build.molecule(name) for name in SMALL_MOLECULES]
    with DatasetWriter(out, num_shards=max(1, count // 250_000), provenance={"made_by": "benchmarks"}) as writer:
        for index in range(count):
            template = templates[index % len(templates)]
            natoms = len(template)
            writer.write(StructureRecord(
                positions=template.positions + rng.normal(scale=0.05, size=(natoms, 3)),
                atomic_numbers=template.numbers, cell=np.zeros((3, 3)), pbc=np.zeros(3, dtype=bool),
                energy=float(rng.normal()), forces=rng.normal(size=(natoms, 3)),
                source_file="synthetic", source_index=index,
            ))
        writer.finish()
    return out


# ----- read rates -------------------------------------------------------------------
def rate(function, indices: np.ndarray, seconds: float) -> tuple[float, float]:
    """Structures per CPU second and per wall second, calling `function(i)` over `indices`
    (cycled) for `seconds` of CPU time. On a shared machine the CPU-time rate is the
    one that says what a worker with a core of its own achieves."""
    done = 0
    wall, cpu = time.perf_counter(), time.process_time()
    while time.process_time() - cpu < seconds:
        function(int(indices[done % len(indices)]))
        done += 1
    return done / (time.process_time() - cpu), done / (time.perf_counter() - wall)


def read_rates(directory: Path, seconds: float) -> dict:
    dataset = LMDBDataset(directory, cutoff=CUTOFF)
    order = np.random.default_rng(0).permutation(len(dataset))
    rate(dataset.read_record, order[:200], 0.2)  # open the shards, warm the page cache
    rate(dataset.__getitem__, order[:20], 0.05)  # load the compiled neighbour list (once per worker)
    decode_cpu, decode_wall = rate(dataset.read_record, order, seconds)
    graph_cpu, graph_wall = rate(dataset.__getitem__, order, seconds)
    return {
        "structures": len(dataset),
        "atoms_per_structure": float(dataset.natoms.mean()),
        "edges_per_structure": float(np.mean([dataset[int(i)].edge_index.shape[1] for i in order[:20]])),
        "decode_per_cpu_s": round(decode_cpu),
        "decode_and_graph_per_cpu_s": round(graph_cpu),
        "decode_per_wall_s": round(decode_wall),
        "decode_and_graph_per_wall_s": round(graph_wall),
    }


# ----- memory of a full pass --------------------------------------------------------
def _memory_kib() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0])
    return fields


def full_pass(directory: Path) -> dict:
    """Runs in its own process: every batch of one epoch, sampling memory as it goes."""
    torch.set_num_threads(1)
    dataset = LMDBDataset(directory, cutoff=CUTOFF)
    loader = build_dataloader(dataset, max_atoms=2000, rank=0, world_size=1, seed=0, num_workers=0)
    before = _memory_kib()
    peak_anon, structures = before["RssAnon"], 0
    start = time.perf_counter()
    for number, batch in enumerate(loader.epoch()):
        structures += batch.num_graphs
        if number % 100 == 0:
            peak_anon = max(peak_anon, _memory_kib()["RssAnon"])
    after = _memory_kib()
    return {
        "structures": structures,
        "seconds": round(time.perf_counter() - start, 1),
        "rss_before_pass_mb": round(before["VmRSS"] / 1024, 1),
        "peak_rss_mb": round(after["VmHWM"] / 1024, 1),
        "peak_rss_anon_mb": round(max(peak_anon, after["RssAnon"]) / 1024, 1),
        "rss_file_at_end_mb": round(after["RssFile"] / 1024, 1),
    }


def full_pass_in_fresh_process(directory: Path) -> dict:
    command = [sys.executable, __file__, "--full-pass", str(directory)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="where datasets are made (default: a temporary directory)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing budget of each read-rate figure")
    parser.add_argument("--small", type=int, default=10_000, help="structures of the small memory case")
    parser.add_argument("--large", type=int, default=1_000_000, help="structures of the large memory case")
    parser.add_argument("--no-memory", action="store_true", help="skip the (long) full-pass memory part")
    parser.add_argument("--full-pass", type=Path, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.full_pass:
        print(json.dumps(full_pass(args.full_pass)))
        return

    with tempfile.TemporaryDirectory(prefix="esen_data_read_") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        report = {
            "cutoff": CUTOFF,
            "read_rate_one_worker": {
                "aspirin": read_rates(aspirin_dataset(workdir), args.seconds),
                "cu108": read_rates(cu_dataset(workdir), args.seconds),
            },
        }
        cu = report["read_rate_one_worker"]["cu108"]
        report["targets_met"] = {
            "cu_decode_ge_20000_per_cpu_s": cu["decode_per_cpu_s"] >= 20_000,
            "cu_decode_and_graph_ge_2000_per_cpu_s": cu["decode_and_graph_per_cpu_s"] >= 2_000,
        }
        if not args.no_memory:
            small = full_pass_in_fresh_process(small_molecules_dataset(workdir, args.small))
            large = full_pass_in_fresh_process(small_molecules_dataset(workdir, args.large))
            anon = round(large["peak_rss_anon_mb"] - small["peak_rss_anon_mb"], 1)
            total = round(large["peak_rss_mb"] - small["peak_rss_mb"], 1)
            report["full_pass_memory"] = {
                f"{args.small}": small,
                f"{args.large}": large,
                "peak_rss_difference_mb": total,
                "peak_rss_anon_difference_mb": anon,
            }
            report["targets_met"]["rss_anon_within_200mb"] = anon <= 200
            report["targets_met"]["rss_with_mapped_shards_within_200mb"] = total <= 200
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
