"""What `esen-launch` does (esen_train/cli/launch.py parses its arguments): split the key=value
arguments into launch keys and training overrides, expand the sweeps, check the profile, every
run's config and the cluster before anything is submitted, print the plan or the submitted jobs,
and wait for them.
"""
from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

from esen_train import shipped_config
from esen_train.engine.config import check_against_data, check_resume, load_train_config, strategy_for_processes
from esen_train.engine.tracking import resolve_wandb_mode
from esen_train.launch.profile import LAUNCH_KEYS, ProfileError, check_against_cluster, load_profile
from esen_train.launch.slurm_info import SlurmUnreachable, query_cluster
from esen_train.launch.submission import LaunchPlan, Run, sbatch_script

WANDB_ID_FILE = "wandb_run_id"  # kept in the run directory by esen_train.engine.tracking


def plan_launch(config: str, overrides: list[str], sweeps: list[str]) -> LaunchPlan:
    """Split the key=value arguments, load and check the profile and the training config."""
    launch_keys, training_overrides = split_overrides(overrides)
    cluster = launch_keys.pop("cluster", None)
    if cluster is None:
        raise ProfileError("choose a cluster profile with cluster=NAME (configs/cluster/NAME.yaml), e.g. cluster=local")
    profile = load_profile(cluster, launch_keys)
    config_path = shipped_config(config).absolute()  # as given: configs/ is a link
    base = load_train_config(config_path, training_overrides)
    base_run_dir = Path(base.run_dir).resolve()
    tasks = profile.nodes * profile.tasks_per_node
    if tasks > 1:  # several tasks: data parallel, as `--nproc` does
        training_overrides += strategy_for_processes(base.strategy.name, training_overrides, f"the job has {tasks} tasks")
    if sweeps and not any(o.startswith("logging.wandb.group=") for o in training_overrides):
        training_overrides.append(f"logging.wandb.group={base_run_dir.name}")  # one wandb group per sweep
    runs = []
    for index, point in enumerate(expand_sweep(sweeps)):
        run_dir = base_run_dir / sweep_dir_name(index, point) if sweeps else base_run_dir
        run_overrides = [o for o in training_overrides if not o.startswith("run_dir=")] + point + [f"run_dir={run_dir}"]
        # Every sweep point must be a valid config, for its data and its run directory, before
        # anything is submitted.
        run_config = load_train_config(config_path, run_overrides)
        check_against_data(run_config)
        check_resume(run_config)
        runs.append(Run(run_dir=run_dir, overrides=run_overrides, config=run_config))
    return LaunchPlan(
        cluster=cluster,
        config_file=str(config_path),
        profile=profile,
        runs=runs,
        submitit_dir=base_run_dir / "submitit",
        job_name=f"esen-{config_path.stem}",
    )


def split_overrides(overrides: list[str]) -> tuple[dict[str, str], list[str]]:
    """Launch keys (cluster and profile fields) apart from training overrides."""
    launch_keys: dict[str, str] = {}
    training: list[str] = []
    for item in overrides:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise ProfileError(f"expected key=value, got {item!r}")
        if key == "cluster" or key in LAUNCH_KEYS:
            launch_keys[key] = value
        else:
            training.append(item)
    return launch_keys, training


def expand_sweep(sweeps: list[str]) -> list[list[str]]:
    """`["a=1,2", "b=x,y"]` -> the grid `[["a=1","b=x"], ["a=1","b=y"], ...]`; no sweep: `[[]]`."""
    axes = []
    for sweep in sweeps:
        key, equals, values = sweep.partition("=")
        if not equals or not key or not values:
            raise ProfileError(f"--sweep expects KEY=V1,V2,..., got {sweep!r}")
        if key == "cluster" or key in LAUNCH_KEYS or key == "run_dir":
            raise ProfileError(f"--sweep varies training keys only; {key!r} is the same for every job of an array")
        axes.append([f"{key}={value}" for value in re.split(r",(?![^\[]*\])", values)])
    return [list(point) for point in itertools.product(*axes)]


def sweep_dir_name(index: int, point: list[str]) -> str:
    readable = "_".join(point)
    return f"{index:03d}-" + re.sub(r"[^A-Za-z0-9.=_+-]", "-", readable)[:100]


def check_cluster(plan: LaunchPlan, required: bool) -> None:
    """Ask SLURM whether the partition exists and can hold the job; a dry run may go without."""
    if plan.profile.executor != "slurm":
        return
    try:
        cluster = query_cluster()
    except SlurmUnreachable as error:
        if required:
            raise
        print(f"esen-launch: warning: partition and resources not checked against a cluster ({error})", file=sys.stderr)
        return
    check_against_cluster(plan.profile, cluster, f"cluster profile {plan.cluster!r}")


def print_dry_run(plan: LaunchPlan) -> None:
    if plan.profile.executor == "slurm":
        print(sbatch_script(plan))
    else:
        print(f"# local executor: {plan.profile.tasks_per_node} process(es) on this machine, no SLURM")
    for index, run in enumerate(plan.runs):
        task = f"array task {index}" if len(plan.runs) > 1 else "each task"
        print(f"# {task} runs: esen-train fit {plan.config_file} {' '.join(run.overrides)}")


def print_jobs(plan: LaunchPlan, jobs: list[submitit.Job]) -> None:
    profile = plan.profile
    for job, run in zip(jobs, plan.runs):
        print(f"job {job.job_id}: {profile.nodes} node(s) x {profile.tasks_per_node} task(s) ({profile.executor})")
        print(f"  run directory: {run.run_dir}")
        print(f"  status:        esen-train status {run.run_dir}")
        print(f"  logs:          {job.paths.stdout} and .err (one pair per task: _<task>_log)")
        print(f"  wandb run:     {_describe_wandb_run(run)}")
    if profile.executor == "slurm":
        ids = ",".join(sorted({job.job_id.split("_")[0] for job in jobs}))
        print(f"follow: squeue -j {ids}; sacct -j {ids}; tail -f {jobs[0].paths.stdout}")


def _describe_wandb_run(run: Run) -> str:
    settings = run.config.logging.wandb
    mode = resolve_wandb_mode(settings.mode)
    if mode == "disabled":
        return "disabled (logging.wandb.mode=disabled)"
    id_file = run.run_dir / WANDB_ID_FILE
    run_id = f"{id_file.read_text().strip()} (resumed)" if id_file.is_file() else f"id written to {id_file} when training starts"
    where = f"project {settings.project}, {mode}"
    if mode == "offline":
        where += f"; upload with `wandb sync {run.run_dir / 'wandb' / 'offline-run-*'}`"
    return f"{run_id}; {where}"


def wait_for(jobs: list[submitit.Job]) -> int:
    failed = 0
    for job in jobs:
        try:
            job.results()
        except (FailedJobError, UncompletedJobError) as error:
            failed += 1
            print(f"job {job.job_id}: FAILED ({job.state}); logs {job.paths.stderr}\n{error}", file=sys.stderr)
        else:
            print(f"job {job.job_id}: completed")
    return 1 if failed else 0

