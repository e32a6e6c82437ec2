"""Conversion rate of `esen-data convert` and decode rate of records; prints JSON.

    OMP_NUM_THREADS=1 python benchmarks/data_convert.py [--num 100000] [--workers 2] [--repeats 7]

1. Conversion rate (structures/s, wall clock, one worker and --workers workers) for the
   files in ../shared/data (skipped when absent).
2. The same for --num EMT structures: the extxyz inputs are generated once into a
   temporary directory (in parallel, --workers files; generation time is reported but
   is not part of the rate), then converted.
3. Decode rate: `decode_record` alone over records already in memory, and
   `ShardReader.read` (LMDB lookup + decode) in random order, for rMD17 aspirin (21
   atoms) and the EMT records, over --repeats passes: wall-clock median and best, and
   the median per CPU second of this process (what the code costs, whatever else runs on
   the machine). Target on this machine: decode >= 20,000 structures/s.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from esen_train.data.convert import convert  # noqa: E402
from shared_data import SHARED_DATA  # noqa: E402
from esen_train.data.emt import write_emt_extxyz  # noqa: E402
from esen_train.data.manifest import DatasetDirectory  # noqa: E402
from esen_train.data.records import decode_record  # noqa: E402

DECODE_TARGET = 20_000


def time_conversion(inputs: list[Path], out_dir: Path, workers: int) -> dict:
    """Wall-clock rate, and with one worker also the rate per CPU second of this process
    (all the work then runs here), which other load on the machine barely changes."""
    start, cpu_start = time.perf_counter(), time.process_time()
    manifest = convert(inputs, out_dir, workers=workers, overwrite=True, progress=False)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    result = {
        "workers": workers,
        "structures": manifest.num_structures,
        "seconds": round(seconds, 3),
        "structures_per_s": round(manifest.num_structures / seconds, 1),
    }
    if workers == 1:
        result["structures_per_cpu_s"] = round(manifest.num_structures / cpu_seconds, 1)
    return result


def _write_part(args: tuple[Path, int, int, int]) -> None:
    path, num, seed, start = args
    write_emt_extxyz(path, num, seed, start=start)


def generate_emt_inputs(directory: Path, num: int, parts: int) -> tuple[list[Path], float]:
    """`parts` extxyz files holding EMT structures 0..num-1 of seed 0."""
    bounds = np.linspace(0, num, parts + 1).astype(int)
    jobs = [
        (directory / f"emt_{k}.xyz", int(bounds[k + 1] - bounds[k]), 0, int(bounds[k]))
        for k in range(parts)
    ]
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(parts) as pool:
        pool.map(_write_part, jobs)
    return [job[0] for job in jobs], time.perf_counter() - start


def decode_rates(dataset_dir: Path, limit: int, repeats: int) -> dict:
    """Structures/s of full passes over up to `limit` records: median and best of
    `repeats` (the best is the least disturbed by other work on a shared machine)."""
    dataset = DatasetDirectory(dataset_dir)
    count = min(limit, len(dataset))
    raw = []
    for reader in dataset.readers:
        raw += [reader.read_bytes(i) for i in range(min(len(reader), count - len(raw)))]
    order = np.random.default_rng(0).permutation(len(dataset))[:count]
    locations = [dataset.locate(int(i)) for i in order]

    def rates(step) -> dict:
        wall, cpu = [], []
        for _ in range(repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            for item in range(count):
                step(item)
            wall.append(count / (time.perf_counter() - start))
            cpu.append(count / (time.process_time() - cpu_start))
        return {
            "wall_median": round(float(np.median(wall))),
            "wall_best": round(max(wall)),
            "per_cpu_s_median": round(float(np.median(cpu))),
        }

    decode = rates(lambda i: decode_record(raw[i], where="benchmark"))
    read = rates(lambda i: dataset.readers[locations[i][0]].read(locations[i][1]))
    dataset.close()
    return {
        "records": count,
        "mean_atoms": float(np.mean([decode_record(b, "x").num_atoms for b in raw])),
        "record_bytes_mean": float(np.mean([len(b) for b in raw])),
        "decode_only_per_s": decode,
        "lmdb_read_and_decode_random_per_s": read,
        "decode_target_per_s": DECODE_TARGET,
        "meets_target_per_cpu_s": decode["per_cpu_s_median"] >= DECODE_TARGET,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=100_000, help="EMT structures (0: skip)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="passes per decode measurement")
    args = parser.parse_args()
    results = {
        "machine": {"cpus": os.cpu_count(), "load_average_1min_at_start": os.getloadavg()[0]},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shared = sorted(SHARED_DATA.glob("*/*.xyz"))
        if shared:
            results["shared_data"] = {
                "files": [str(p.relative_to(SHARED_DATA)) for p in shared],
                "one_worker": time_conversion(shared, tmp / "shared", 1),
                "workers": time_conversion(shared, tmp / "shared", args.workers),
            }
            aspirin = tmp / "aspirin"
            convert([SHARED_DATA / "rmd17" / "aspirin_train.xyz"], aspirin, progress=False)
            results["decode_rmd17_aspirin"] = decode_rates(aspirin, 1000, args.repeats)
        if args.num == 0:
            print(json.dumps(results, indent=2))
            return
        inputs, generate_seconds = generate_emt_inputs(tmp, args.num, args.workers)
        results["emt"] = {
            "num": args.num,
            "generate_extxyz_seconds": round(generate_seconds, 1),
            "extxyz_bytes": sum(p.stat().st_size for p in inputs),
            "one_worker": time_conversion(inputs, tmp / "emt", 1),
            "workers": time_conversion(inputs, tmp / "emt", args.workers),
        }
        results["decode_emt"] = decode_rates(tmp / "emt", 20_000, args.repeats)
        results["machine"]["load_average_1min_at_end"] = os.getloadavg()[0]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
