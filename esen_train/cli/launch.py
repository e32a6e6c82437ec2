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
submitted (a bad one: exit code 2); the partition and the resources are checked against the
cluster when SLURM answers. With --wait the command exits with 1 when a job failed.
"""
from __future__ import annotations

import argparse

from esen_train.cli.common import fail, new_parser
from esen_train.engine.config import ConfigError
from esen_train.launch.launcher import check_cluster, plan_launch, print_dry_run, print_jobs, wait_for
from esen_train.launch.profile import ProfileError
from esen_train.launch.slurm_info import SlurmUnreachable
from esen_train.launch.submission import submit


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("esen-launch", __doc__)
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training config: a YAML path, or a shipped config by name (tiny, quickstart)")
    parser.add_argument("overrides", nargs="*", help="cluster=NAME, launch keys and training overrides (key=value)")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2", help="vary a training key (repeat for a grid)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script and submit nothing")
    parser.add_argument("--wait", action="store_true", help="block until the job ends; exit non-zero if it failed")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        plan = plan_launch(args.config, args.overrides, args.sweep)
        check_cluster(plan, required=not args.dry_run)
    except (ProfileError, ConfigError, SlurmUnreachable) as error:
        return fail("esen-launch", error)
    if args.dry_run:
        print_dry_run(plan)
        return 0
    jobs = submit(plan)
    print_jobs(plan, jobs)
    if args.wait:
        return wait_for(jobs)
    return 0
