"""Conversion rate of `esen-data convert` and decode rate of records; prints JSON.

    OMP_NUM_THREADS=1 python benchmarks/data_convert.py [--num 100000] [--workers 2]

1. Conversion rate (structures/s, wall clock, one worker and --workers workers) for the
   files in ../shared/data (skipped when absent).
2. The same for --num EMT structures: the extxyz inputs are generated once into a
   temporary directory (in parallel, --workers files; generation time is reported but
   is not part of the rate), then converted.
3. Decode rate: `decode_record` alone over records already in memory, and
   `ShardReader.read` (LMDB lookup + decode) in random order, for rMD17 aspirin (21
   atoms) and the EMT records. Target on this machine: decode >= 20,000 structures/s.
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
from esen_train.data.emt import write_emt_extxyz  # noqa: E402
from esen_train.data.manifest import DatasetDirectory  # noqa: E402
from esen_train.data.records import decode_record  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DECODE_TARGET = 20_000


def time_conversion(inputs: list[Path], out_dir: Path, workers: int) -> dict:
    start = time.perf_counter()
    manifest = convert(inputs, out_dir, workers=workers, overwrite=True, progress=False)
    seconds = time.perf_counter() - start
    return {
        "workers": workers,
        "structures": manifest.num_structures,
        "seconds": round(seconds, 3),
        "structures_per_s": round(manifest.num_structures / seconds, 1),
    }


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


def decode_rates(dataset_dir: Path, limit: int, seconds: float) -> dict:
    dataset = DatasetDirectory(dataset_dir)
    count = min(limit, len(dataset))
    raw = []
    for reader in dataset.readers:
        raw += [reader.read_bytes(i) for i in range(min(len(reader), count - len(raw)))]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(dataset))[:count]
    locations = [dataset.locate(int(i)) for i in order]

    def rate(step) -> float:
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for item in range(count):
                step(item)
            done += count
        return done / (time.perf_counter() - start)

    decode_only = rate(lambda i: decode_record(raw[i], where="benchmark"))
    read_and_decode = rate(lambda i: dataset.readers[locations[i][0]].read(locations[i][1]))
    dataset.close()
    return {
        "records": count,
        "mean_atoms": float(np.mean([decode_record(b, "x").num_atoms for b in raw])),
        "record_bytes_mean": float(np.mean([len(b) for b in raw])),
        "decode_only_per_s": round(decode_only),
        "lmdb_read_and_decode_random_per_s": round(read_and_decode),
        "decode_target_per_s": DECODE_TARGET,
        "meets_target": decode_only >= DECODE_TARGET,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=100_000, help="EMT structures to convert")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=2.0, help="per decode measurement")
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
            results["decode_rmd17_aspirin"] = decode_rates(aspirin, 1000, args.seconds)

        inputs, generate_seconds = generate_emt_inputs(tmp, args.num, args.workers)
        results["emt"] = {
            "num": args.num,
            "generate_extxyz_seconds": round(generate_seconds, 1),
            "extxyz_bytes": sum(p.stat().st_size for p in inputs),
            "one_worker": time_conversion(inputs, tmp / "emt", 1),
            "workers": time_conversion(inputs, tmp / "emt", args.workers),
        }
        results["decode_emt"] = decode_rates(tmp / "emt", 20_000, args.seconds)
        results["machine"]["load_average_1min_at_end"] = os.getloadavg()[0]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
