"""Who am I in the job: rank, world size and device, read from torchrun's or SLURM's environment.

`init_distributed()` is called once per process, before anything else touches the process
group. It understands three launch modes, checked in this order:

1. torchrun (or `esen-train fit --nproc N`, which uses torchrun underneath): `RANK`,
   `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` are set.
2. A SLURM job step (`srun`): `SLURM_PROCID`, `SLURM_STEP_NUM_TASKS` (else `SLURM_NTASKS`),
   `SLURM_LOCALID`; the master is the first host of `SLURM_JOB_NODELIST` and the port is
   derived from the job id, so every task of a job computes the same address without talking
   to the others. Only inside a step (`SLURM_STEP_ID` set): the batch script itself also sees
   `SLURM_PROCID=0` and `SLURM_NTASKS=N`, and a process started there is alone.
3. Neither: one process, a valid world of size 1. No process group is created for a world of
   one, so single-process runs need no free port and no rendezvous.

The backend is NCCL when CUDA is available and gloo otherwise.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# SLURM job ids map onto this port range; a job's tasks all derive the same port. It ends below
# Linux's ephemeral range (32768 and up), so an outgoing connection cannot be holding the port.
_SLURM_PORT_BASE = 20000
_SLURM_PORT_SPAN = 12000


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Read the world from the environment, pick the device and join the process group."""
    rank, local_rank, world_size = world_from_environment()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def world_from_environment() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) of this process; sets MASTER_ADDR/PORT for a SLURM step."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        return rank, int(env.get("LOCAL_RANK", rank)), world_size
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        rank = int(env["SLURM_PROCID"])
        world_size = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS", "1"))
        if world_size > 1:
            nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not nodelist:
                raise RuntimeError("SLURM job with several tasks but neither SLURM_JOB_NODELIST nor SLURM_NODELIST is set")
            env.setdefault("MASTER_ADDR", first_host(nodelist))
            env.setdefault("MASTER_PORT", str(slurm_master_port(env.get("SLURM_JOB_ID", "0"))))
        return rank, int(env.get("SLURM_LOCALID", 0)), world_size
    return 0, 0, 1


def slurm_master_port(job_id: str) -> int:
    """A port every task of the job agrees on; differs between concurrent jobs."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return _SLURM_PORT_BASE + int(digits) % _SLURM_PORT_SPAN


def first_host(nodelist: str) -> str:
    """First host name of a SLURM node list, as `scontrol show hostnames` would print it.

    Examples: `node7` -> `node7`; `gpu[003-010,012],cpu1` -> `gpu003`; `rack[2-3]-n[01-04]` -> `rack2-n01`.
    """
    first = _split_top_level(nodelist.strip())[0]
    # Replace each bracketed range list by its first value, keeping zero padding.
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], first)


def _split_top_level(nodelist: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, current = [], 0, []
    for char in nodelist:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    if depth != 0 or not parts[0]:
        raise ValueError(f"malformed SLURM node list: {nodelist!r}")
    return parts


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; returns the tensor (unchanged in a world of one)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum over ranks, in place; returns the tensor."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_from_main(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's values on every rank, in place; returns the tensor."""
    if dist.is_initialized():
        dist.broadcast(tensor, src=0)
    return tensor
