"""`esen-launch`: submit `esen-train fit` to SLURM (or run it locally) with submitit.

    esen-launch CONFIG cluster=NAME [launch key=value ...] [training key=value ...]
                [--sweep KEY=V1,V2,...]... [--dry-run] [--wait]

Launch keys (cluster=NAME and the profile fields: nodes, tasks_per_node, cpus_per_task,
gpus_per_node, mem_gb, time_min, partition, account, qos, constraint, signal_delay_s,
max_requeues) override the cluster profile configs/cluster/NAME.yaml; every other key=value is a
training override passed to `esen-train fit`. Each --sweep KEY=V1,V2 varies one training key;
several --sweep options combine as a grid, and the grid is submitted as one SLURM job array
with one run directory per point: <run_dir>/<index>-<key>=<value>... (commas inside [...] stay
part of a value).

The profile, the training config and every override are checked before anything is
submitted; the partition and the resources are checked against the cluster when SLURM answers.
"""
from __future__ import annotations

import argparse
import itertools
import re
import sys
from pathlib import Path

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

from esen_train import shipped_config
from esen_train.engine.config import ConfigError, check_against_data, check_resume, load_train_config
from esen_train.engine.tracking import resolve_wandb_mode
from esen_train.launch.profile import LAUNCH_KEYS, ProfileError, check_against_cluster, load_profile
from esen_train.launch.slurm_info import SlurmUnreachable, query_cluster
from esen_train.launch.submission import LaunchPlan, Run, sbatch_script, submit

WANDB_ID_FILE = "wandb_run_id"  # kept in the run directory by esen_train.engine.tracking


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        plan = plan_launch(args.config, args.overrides, args.sweep)
        _check_cluster(plan, required=not args.dry_run)
    except (ProfileError, ConfigError, SlurmUnreachable) as error:
        print(f"esen-launch: error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        _print_dry_run(plan)
        return 0
    jobs = submit(plan)
    _print_jobs(plan, jobs)
    if args.wait:
        return _wait(jobs)
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="esen-launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help="training config: a YAML path, or a shipped config by name (tiny, quickstart)")
    parser.add_argument("overrides", nargs="*", help="cluster=NAME, launch keys and training overrides (key=value)")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2", help="vary a training key (repeat for a grid)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script and submit nothing")
    parser.add_argument("--wait", action="store_true", help="block until the job ends; exit non-zero if it failed")
    return parser.parse_intermixed_args(argv)


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
    if profile.nodes * profile.tasks_per_node > 1 and base.strategy.name == "single":
        training_overrides.append("strategy.name=ddp")  # several tasks: data parallel, as `--nproc` does
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


def _check_cluster(plan: LaunchPlan, required: bool) -> None:
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


def _print_dry_run(plan: LaunchPlan) -> None:
    if plan.profile.executor == "slurm":
        print(sbatch_script(plan))
    else:
        print(f"# local executor: {plan.profile.tasks_per_node} process(es) on this machine, no SLURM")
    for index, run in enumerate(plan.runs):
        task = f"array task {index}" if len(plan.runs) > 1 else "each task"
        print(f"# {task} runs: esen-train fit {plan.config_file} {' '.join(run.overrides)}")


def _print_jobs(plan: LaunchPlan, jobs: list[submitit.Job]) -> None:
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


def _wait(jobs: list[submitit.Job]) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
