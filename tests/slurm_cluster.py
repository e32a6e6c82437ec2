"""Finding the SLURM cluster that tests marked `slurm` run on.

CI starts it with `eval "$(bash launch/local_slurm.sh start)"`, which exports SLURM_CONF.
Without it these tests skip, saying how to start the cluster.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

START_HINT = 'start the local cluster with: eval "$(bash launch/local_slurm.sh start)"'


def require_slurm_cluster() -> Path:
    """SLURM_CONF of a cluster whose controller answers, or skip the test."""
    conf = os.environ.get("SLURM_CONF")
    if not conf:
        pytest.skip(f"SLURM_CONF is unset: no SLURM cluster to run on ({START_HINT})")
    if not Path(conf).is_file():
        pytest.skip(f"SLURM_CONF={conf} does not exist ({START_HINT})")
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"scontrol does not answer ({error}); {START_HINT}")
    if ping.returncode != 0 or "UP" not in ping.stdout:
        pytest.skip(f"the SLURM controller of {conf} is down ({ping.stdout.strip()}); {START_HINT}")
    return Path(conf)


def job_state(job_id: str, timeout_s: float = 60, env: dict[str, str] | None = None) -> str:
    """The final accounting state of a job (COMPLETED, FAILED, ...), once sacct has it."""
    deadline = time.monotonic() + timeout_s
    state = ""
    while time.monotonic() < deadline:
        result = subprocess.run(
            ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"], capture_output=True, text=True, timeout=30, env=env
        )
        state = result.stdout.strip().split("\n")[0].split(" ")[0]
        if state and state not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"):
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} has no final state in sacct after {timeout_s} s (last: {state!r})")


def jobs_named(name: str) -> list[str]:
    """Ids of the jobs with this name that the controller or the accounting knows."""
    queued = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True, timeout=30)
    accounted = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-S", "now-1days", "--name", name, "-o", "JobID"],
        capture_output=True, text=True, timeout=30,
    )
    return sorted(set(queued.stdout.split()) | set(accounted.stdout.split()))
