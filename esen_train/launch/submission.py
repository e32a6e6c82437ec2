"""Turn a validated launch plan into submitit jobs, or into the sbatch script they would use.

One plan holds the training config, the cluster profile and one `Run` per job (several for a
sweep, submitted as one SLURM job array). submitit keeps its pickles and logs in
`<run_dir>/submitit/` (the sweep's parent directory for an array), so the logs live beside
the checkpoints and metrics of the run they belong to.
"""
from __future__ import annotations

import contextlib
import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from submitit.slurm.slurm import _make_sbatch_string

from esen_train.engine.config import TrainConfig
from esen_train.launch.job import TrainingJob
from esen_train.launch.profile import ClusterProfile


@dataclass
class Run:
    run_dir: Path
    overrides: list[str]  # training overrides, ending with run_dir=<run_dir>
    config: TrainConfig  # what those overrides resolve to (checked before submission)


@dataclass
class LaunchPlan:
    cluster: str  # the profile's name (or path), as given with cluster=
    config_file: str  # the training config, absolute path
    profile: ClusterProfile
    runs: list[Run]
    submitit_dir: Path
    job_name: str


def sbatch_parameters(plan: LaunchPlan) -> dict[str, Any]:
    """The profile as submitit's SlurmExecutor parameters (sbatch option names, underscores)."""
    profile = plan.profile
    parameters: dict[str, Any] = {
        "job_name": plan.job_name,
        "partition": profile.partition,
        "time": profile.time_min,
        "nodes": profile.nodes,
        "ntasks_per_node": profile.tasks_per_node,
        "cpus_per_task": profile.cpus_per_task,
        "signal_delay_s": profile.signal_delay_s,
    }
    if profile.gpus_per_node:
        parameters["gpus_per_node"] = profile.gpus_per_node
    if profile.mem_gb is not None:
        parameters["mem"] = f"{round(profile.mem_gb * 1024)}M"
    for name in ("account", "qos", "constraint"):
        if getattr(profile, name):
            parameters[name] = getattr(profile, name)
    if profile.setup:
        parameters["setup"] = list(profile.setup)
    if profile.sbatch_args:
        parameters["additional_parameters"] = dict(profile.sbatch_args)
    return parameters


def sbatch_script(plan: LaunchPlan) -> str:
    """The batch script submitit would write for this plan, without asking SLURM anything."""
    # This is the command SlurmExecutor puts in its scripts (its `_submitit_command_str`).
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(plan.submitit_dir))}"
    map_count = len(plan.runs) if len(plan.runs) > 1 else None
    return _make_sbatch_string(command=command, folder=plan.submitit_dir, map_count=map_count, **sbatch_parameters(plan))


def build_executor(plan: LaunchPlan) -> submitit.AutoExecutor:
    profile = plan.profile
    if profile.executor == "slurm":
        executor = submitit.AutoExecutor(plan.submitit_dir, cluster="slurm", slurm_max_num_timeout=profile.max_requeues)
        executor.update_parameters(**{f"slurm_{key}": value for key, value in sbatch_parameters(plan).items()})
        return executor
    executor = submitit.AutoExecutor(plan.submitit_dir, cluster="local", local_max_num_timeout=profile.max_requeues)
    executor.update_parameters(
        name=plan.job_name,
        timeout_min=profile.time_min,
        nodes=1,
        tasks_per_node=profile.tasks_per_node,
        gpus_per_node=profile.gpus_per_node,
    )
    if profile.setup:
        executor.update_parameters(local_setup=list(profile.setup))
    return executor


def free_local_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on this machine now (held open together, so no repeats)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def submit(plan: LaunchPlan) -> list[submitit.Job]:
    """Submit every run; a sweep becomes one job array on SLURM."""
    executor = build_executor(plan)
    # On SLURM the tasks agree on a port from the job id; see job.py.
    ports = free_local_ports(len(plan.runs)) if plan.profile.executor == "local" else [None] * len(plan.runs)
    jobs = [TrainingJob(plan.config_file, run.overrides, port) for run, port in zip(plan.runs, ports)]
    if len(jobs) == 1:
        return [executor.submit(jobs[0])]
    return executor.submit_array(jobs)
