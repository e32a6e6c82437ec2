"""Cluster profiles: where and with what resources `esen-launch` runs a training job.

A profile is a YAML file in configs/cluster/ (`cluster=NAME` picks configs/cluster/NAME.yaml,
or give a path to any YAML file). Its fields are those of `ClusterProfile`; launch keys on the
command line (`nodes=2 time_min=30 ...`) override them. `load_profile` rejects an unknown key,
a missing or mistyped field and inconsistent values with the file and field in the message;
`check_against_cluster` then asks SLURM whether the partition exists and whether its nodes
can hold the job, so a bad profile fails before anything is submitted.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from esen_train import CONFIG_DIR
from esen_train.config_loading import ConfigError, omegaconf_errors
from esen_train.launch.slurm_info import ClusterInfo, NodeInfo

PROFILE_DIR = CONFIG_DIR / "cluster"
EXECUTORS = ("slurm", "local")


class ProfileError(ConfigError):
    """A cluster profile (or a launch key) that cannot be used; the message says where."""


@dataclass
class ClusterProfile:
    executor: str = MISSING  # slurm: submit with sbatch | local: run on this machine, no SLURM
    nodes: int = MISSING
    cpus_per_task: int = MISSING
    time_min: int = MISSING  # wall-clock limit of one job (it requeues itself when it runs out)
    # Processes per node. One task drives one GPU, so on GPU nodes this defaults to
    # gpus_per_node and may not differ from it; without GPUs it defaults to 1.
    tasks_per_node: Optional[int] = None
    gpus_per_node: int = 0
    mem_gb: Optional[float] = None  # per node; None: the partition's default
    partition: Optional[str] = None  # required by the slurm executor
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None  # node features, e.g. "a100|h100"
    # SLURM sends USR2 this many seconds before the time limit; the job then checkpoints and
    # requeues itself. Leave room for one checkpoint write (SLURM may signal up to a minute early).
    signal_delay_s: int = 120
    max_requeues: int = 3  # time-outs after which the job gives up (preemptions do not count)
    # Any other sbatch option, by its long name without dashes: {"reservation": "x", "exclusive": true}.
    sbatch_args: dict[str, Any] = field(default_factory=dict)
    # Shell lines run in the batch script before the tasks start (modules, conda, env vars).
    setup: list[str] = field(default_factory=list)

    def check(self, where: str) -> None:
        """Raise ProfileError for values that are wrong whatever the cluster."""
        if self.executor not in EXECUTORS:
            raise ProfileError(f"{where}: executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        for name in ("nodes", "tasks_per_node", "cpus_per_task", "time_min"):
            if getattr(self, name) < 1:
                raise ProfileError(f"{where}: {name} must be at least 1, got {getattr(self, name)}")
        if self.gpus_per_node < 0 or self.signal_delay_s < 0 or self.max_requeues < 0:
            raise ProfileError(f"{where}: gpus_per_node, signal_delay_s and max_requeues cannot be negative")
        if self.mem_gb is not None and self.mem_gb <= 0:
            raise ProfileError(f"{where}: mem_gb must be positive, got {self.mem_gb}")
        if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise ProfileError(
                f"{where}: one task drives one GPU, so tasks_per_node ({self.tasks_per_node}) must equal "
                f"gpus_per_node ({self.gpus_per_node})"
            )
        if self.executor == "slurm" and not self.partition:
            raise ProfileError(f"{where}: missing required field 'partition' (the slurm executor needs one)")
        if self.executor == "local" and self.nodes != 1:
            raise ProfileError(f"{where}: the local executor runs on this machine only: nodes must be 1, got {self.nodes}")
        managed = sorted(set(self.sbatch_args) & _MANAGED_SBATCH_OPTIONS)
        if managed:
            raise ProfileError(
                f"{where}: sbatch_args {', '.join(managed)} are set by esen-launch itself; "
                "use the profile fields (partition, time_min, nodes, ...) instead"
            )


PROFILE_KEYS = tuple(f.name for f in dataclasses.fields(ClusterProfile))
# Launch keys on the command line: the profile's scalar fields (lists and dicts stay in YAML).
LAUNCH_KEYS = tuple(name for name in PROFILE_KEYS if name not in ("sbatch_args", "setup"))


def available_profiles() -> list[str]:
    return sorted(path.stem for path in PROFILE_DIR.glob("*.yaml"))


def profile_path(name: str) -> Path:
    """configs/cluster/NAME.yaml, or NAME itself when it is a path to a YAML file."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
    else:
        path = PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ProfileError(
            f"cluster profile {name!r} not found ({path}); available in {PROFILE_DIR}: "
            f"{', '.join(available_profiles()) or 'none'}"
        )
    return path


def load_profile(name: str, overrides: dict[str, str] | None = None) -> ClusterProfile:
    """Read a profile and apply launch-key overrides (`{"nodes": "2"}`, as typed on the command line)."""
    path = profile_path(name)
    with omegaconf_errors(f"{path}: not a valid YAML mapping", ProfileError):
        from_file = OmegaConf.load(path)
    if not isinstance(from_file, DictConfig):
        raise ProfileError(f"{path}: a profile is a mapping of field: value, got a list")
    unknown = sorted(set(from_file.keys()) - set(PROFILE_KEYS))
    if unknown:
        raise ProfileError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; profile keys are {', '.join(PROFILE_KEYS)}")
    from_cli = OmegaConf.from_dotlist([f"{key}={value}" for key, value in (overrides or {}).items()])
    merged = _merge(path, from_file, from_cli)
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ProfileError(f"{path}: missing required field(s) {', '.join(missing)}")
    profile: ClusterProfile = OmegaConf.to_object(merged)
    if profile.tasks_per_node is None:
        profile.tasks_per_node = profile.gpus_per_node or 1
    profile.check(str(path))
    return profile


def _merge(path: Path, from_file: DictConfig, from_cli: DictConfig) -> DictConfig:
    with omegaconf_errors(str(path), ProfileError):
        schema = OmegaConf.merge(OmegaConf.structured(ClusterProfile), from_file)
    with omegaconf_errors(f"launch keys (profile {path})", ProfileError):
        return OmegaConf.merge(schema, from_cli)


# sbatch options that esen-launch or submitit write from the profile's own fields.
_MANAGED_SBATCH_OPTIONS = {
    "partition", "time", "nodes", "ntasks-per-node", "ntasks_per_node", "cpus-per-task", "cpus_per_task",
    "gpus-per-node", "gpus_per_node", "mem", "account", "qos", "constraint", "signal", "output", "error",
    "array", "job-name", "job_name", "open-mode",
}


def check_against_cluster(profile: ClusterProfile, cluster: ClusterInfo, where: str) -> None:
    """The partition exists and has enough nodes, each able to hold one node's share of the job."""
    partition = cluster.partitions.get(profile.partition or "")
    if partition is None:
        raise ProfileError(
            f"{where}: unknown partition {profile.partition!r}; this cluster has "
            f"{', '.join(sorted(cluster.partitions)) or 'no partitions'} (see `sinfo`)"
        )
    if partition.max_time_min is not None and profile.time_min > partition.max_time_min:
        raise ProfileError(
            f"{where}: time_min={profile.time_min} exceeds partition {partition.name!r}'s limit of "
            f"{partition.max_time_min} minutes"
        )
    nodes = [cluster.nodes[name] for name in partition.node_names if name in cluster.nodes]
    fitting = [node for node in nodes if _node_fits(node, profile)]
    if len(fitting) < profile.nodes:
        raise ProfileError(
            f"{where}: impossible resources on partition {partition.name!r}: the job needs {profile.nodes} "
            f"node(s), each with {_describe_need(profile)}, but only {len(fitting)} of its {len(nodes)} node(s) "
            f"can hold that (largest node: {_describe_largest(nodes)}; see `scontrol show node`)"
        )


def _node_fits(node: NodeInfo, profile: ClusterProfile) -> bool:
    cpus = profile.tasks_per_node * profile.cpus_per_task
    memory_ok = profile.mem_gb is None or node.memory_mb >= profile.mem_gb * 1024
    return node.cpus >= cpus and node.gpus >= profile.gpus_per_node and memory_ok


def _describe_need(profile: ClusterProfile) -> str:
    cpus = profile.tasks_per_node * profile.cpus_per_task
    need = f"{cpus} CPUs (tasks_per_node={profile.tasks_per_node} x cpus_per_task={profile.cpus_per_task})"
    if profile.gpus_per_node:
        need += f", {profile.gpus_per_node} GPUs"
    if profile.mem_gb is not None:
        need += f", {profile.mem_gb:g} GB memory"
    return need


def _describe_largest(nodes: list[NodeInfo]) -> str:
    if not nodes:
        return "none"
    return (
        f"{max(n.cpus for n in nodes)} CPUs, {max(n.gpus for n in nodes)} GPUs, "
        f"{max(n.memory_mb for n in nodes) / 1024:.1f} GB"
    )
