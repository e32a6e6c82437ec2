"""launch/local_slurm.sh and the cluster it starts: real daemons, real jobs, real accounting.

The first tests start a second, private cluster (own state directory and ports) so that start,
start again, status and stop can be checked without disturbing the cluster CI started; the
others run jobs on that CI cluster (SLURM_CONF).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cloudpickle
import pytest
import submitit

from tests.slurm_cluster import job_state, require_slurm_cluster

pytestmark = pytest.mark.slurm

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "local_slurm.sh"
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd-esen-n1", "slurmd-esen-n2")


def run_script(command: str, env: dict[str, str], timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), command], capture_output=True, text=True, env=env, timeout=timeout)


def daemon_pids(status_output: str) -> dict[str, int]:
    return {name: int(pid) for name, pid in re.findall(r"^(\S+): running \(pid (\d+)\)", status_output, re.M)}


@pytest.fixture(scope="module")
def private_cluster():
    """A cluster of our own, started from an empty state directory and stopped at the end."""
    if os.geteuid() != 0:
        pytest.skip("local_slurm.sh needs root")
    if shutil.which("slurmctld") is None or shutil.which("mariadbd") is None:
        pytest.skip("SLURM and MariaDB are not installed: `bash launch/local_slurm.sh start` installs them")
    # Not under pytest's tmp_path: munged wants every directory above its socket to be
    # searchable by all, and pytest's are private.
    state_dir = Path(tempfile.mkdtemp(prefix="esen-slurm-test-", dir="/tmp"))
    state_dir.chmod(0o755)
    env = {
        **os.environ,
        "ESEN_SLURM_DIR": str(state_dir),
        "ESEN_SLURM_PORT_BASE": str(20000 + (os.getpid() % 2000) * 5),
    }
    env.pop("SLURM_CONF", None)
    try:
        yield state_dir, env
    finally:
        run_script("stop", env)
        shutil.rmtree(state_dir, ignore_errors=True)


def test_start_twice_status_job_and_stop(private_cluster):
    state_dir, env = private_cluster
    conf = state_dir / "etc" / "slurm.conf"

    first = run_script("start", env)
    assert first.returncode == 0, first.stderr
    assert first.stdout == f"export SLURM_CONF={conf}\n"  # stdout is only the line to eval
    status = run_script("status", env)
    assert status.returncode == 0, status.stdout
    pids = daemon_pids(status.stdout)
    assert sorted(pids) == sorted(DAEMONS)
    assert re.search(r"^esen-n1 debug\* idle 2 8000$", status.stdout, re.M), status.stdout
    assert re.search(r"^esen-n2 debug\* idle 2 8000$", status.stdout, re.M), status.stdout

    second = run_script("start", env)  # idempotent: nothing restarted, same answer
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert daemon_pids(run_script("status", env).stdout) == pids

    job_env = {**env, "SLURM_CONF": str(conf)}
    # srun's own messages ("step creation temporarily disabled, retrying" while the nodes
    # finish setting up the job) go to stderr: a file of their own, so the output holds the
    # node names alone.
    output, errors = state_dir / "job.out", state_dir / "job.err"
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--wait", "--nodes=2", f"--output={output}", f"--error={errors}",
         "--wrap", "srun printenv SLURMD_NODENAME"],
        capture_output=True, text=True, env=job_env, timeout=120,
    )
    assert submitted.returncode == 0, submitted.stderr
    assert sorted(output.read_text().split()) == ["esen-n1", "esen-n2"], errors.read_text()
    assert job_state(submitted.stdout.strip(), env=job_env) == "COMPLETED"

    stopped = run_script("stop", env)
    assert stopped.returncode == 0, stopped.stderr
    after = run_script("status", env)
    assert after.returncode != 0
    assert all(f"{name}: stopped" in after.stdout for name in DAEMONS), after.stdout
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert run_script("stop", env).returncode == 0  # stopping a stopped cluster is fine


@pytest.fixture(scope="module")
def cluster():
    return require_slurm_cluster()


def test_sacct_sees_finished_and_failed_jobs(cluster, tmp_path):
    ids = {}
    for name, command in (("ok", "true"), ("bad", "exit 3")):
        submitted = subprocess.run(
            ["sbatch", "--parsable", "--wait", "--job-name", f"esen-test-{name}", f"--output={tmp_path}/%j.out",
             "--wrap", command],
            capture_output=True, text=True, timeout=120,
        )
        ids[name] = submitted.stdout.strip()
    assert job_state(ids["ok"]) == "COMPLETED"
    assert job_state(ids["bad"]) == "FAILED"
    exit_code = subprocess.run(
        ["sacct", "-j", ids["bad"], "-X", "-n", "-P", "-o", "ExitCode"], capture_output=True, text=True, timeout=30
    )
    assert exit_code.stdout.strip() == "3:0"


def all_reduce_ranks() -> dict:
    """Runs in each task of a two-node job: join a gloo group the way esen_train/launch/job.py does."""
    import torch
    import torch.distributed as dist

    env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    dist.init_process_group("gloo")
    total = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(total)
    dist.destroy_process_group()
    return {"node": os.environ["SLURMD_NODENAME"], "master": env.master_addr, "rank": env.rank, "sum": total.item()}


def test_submitit_two_node_job_forms_a_process_group(cluster, tmp_path):
    # The function is defined in this test module, which the job cannot import: send it by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        executor = submitit.AutoExecutor(tmp_path, cluster="slurm")
        executor.update_parameters(
            nodes=2, tasks_per_node=1, cpus_per_task=1, timeout_min=5, slurm_partition="debug", slurm_mem="1G"
        )
        job = executor.submit(all_reduce_ranks)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    results = sorted(job.results(), key=lambda r: r["rank"])
    assert [r["node"] for r in results] == ["esen-n1", "esen-n2"]
    assert all(r["master"] == "esen-n1" and r["sum"] == 3.0 for r in results)
    assert job_state(job.job_id) == "COMPLETED"
