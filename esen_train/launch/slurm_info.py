"""What a SLURM cluster offers, read from `scontrol -o show partition|node`.

Used to check a cluster profile before submission: does the partition exist, and do enough
of its nodes have the CPUs, GPUs and memory that one node's share of the job needs.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Optional


class SlurmUnreachable(RuntimeError):
    """No SLURM controller answers (no `scontrol`, no SLURM_CONF, controller down)."""


@dataclass
class NodeInfo:
    name: str
    cpus: int
    memory_mb: int
    gpus: int
    partitions: list[str] = field(default_factory=list)


@dataclass
class PartitionInfo:
    name: str
    max_time_min: Optional[int]  # None: no limit
    node_names: list[str] = field(default_factory=list)


@dataclass
class ClusterInfo:
    partitions: dict[str, PartitionInfo]
    nodes: dict[str, NodeInfo]


def query_cluster() -> ClusterInfo:
    """Ask the running controller; raises SlurmUnreachable when there is none."""
    partitions = {}
    for record in _scontrol_records("partition"):
        name = record["PartitionName"]
        partitions[name] = PartitionInfo(name=name, max_time_min=parse_time_limit(record.get("MaxTime", "UNLIMITED")))
    nodes = {}
    for record in _scontrol_records("node"):
        node = NodeInfo(
            name=record["NodeName"],
            cpus=int(record.get("CPUEfctv") or record["CPUTot"]),
            memory_mb=int(record.get("RealMemory", "0")),
            gpus=count_gpus(record.get("Gres", "(null)")),
            partitions=[p for p in record.get("Partitions", "").split(",") if p],
        )
        nodes[node.name] = node
        for partition in node.partitions:
            if partition in partitions:
                partitions[partition].node_names.append(node.name)
    return ClusterInfo(partitions=partitions, nodes=nodes)


def _scontrol_records(kind: str) -> list[dict[str, str]]:
    if shutil.which("scontrol") is None:
        raise SlurmUnreachable("`scontrol` is not on PATH: this is not a SLURM login node")
    conf = os.environ.get("SLURM_CONF")
    if conf and not os.path.isfile(conf):
        # scontrol itself would retry for a minute before saying so.
        raise SlurmUnreachable(f"SLURM_CONF={conf} does not exist (is the cluster started?)")
    try:
        result = subprocess.run(
            ["scontrol", "--oneliner", "show", kind], capture_output=True, text=True, timeout=60, check=False
        )
    except subprocess.TimeoutExpired:
        raise SlurmUnreachable(f"`scontrol show {kind}` did not answer within 60 s") from None
    if result.returncode != 0:
        last_line = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:]
        raise SlurmUnreachable(f"`scontrol show {kind}` failed ({' '.join(last_line)}); is SLURM_CONF set?")
    return [parse_record(line) for line in result.stdout.splitlines() if line.strip()]


_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_/:.]*=")


def parse_record(line: str) -> dict[str, str]:
    """`Key=Value Key=Value ...`; a value may contain spaces (OS=Linux 6.1 #1 SMP)."""
    record: dict[str, str] = {}
    key = None
    for token in line.split():
        if _KEY.match(token):
            key, value = token.split("=", 1)
            record[key] = value
        elif key is not None:
            record[key] += " " + token
    return record


def parse_time_limit(text: str) -> Optional[int]:
    """scontrol's `[days-]hours:minutes:seconds` (or `UNLIMITED`) in whole minutes."""
    if text in ("UNLIMITED", "INFINITE", "NONE"):
        return None
    days, _, clock = text.rpartition("-")
    parts = [int(part) for part in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    hours, minutes, seconds = parts
    return (int(days or 0) * 24 + hours) * 60 + minutes + (1 if seconds else 0)


def count_gpus(gres: str) -> int:
    """GPUs in a node's Gres field: `gpu:4`, `gpu:a100:4(S:0-1)`, `gpu:a100:2,gpu:v100:2`, `(null)`."""
    total = 0
    for entry in re.split(r",(?![^(]*\))", gres):
        name, *rest = entry.split("(")[0].split(":")
        if name == "gpu" and rest and rest[-1].isdigit():
            total += int(rest[-1])
    return total
