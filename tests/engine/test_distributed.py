"""Reading the world from torchrun's and SLURM's environment, and the process group's timeout
(strategy.process_group_timeout_s). The multi-process group itself is exercised by
tests/engine/test_strategies.py (torchrun-style environment) and, on the local SLURM cluster, by a
real two-node `srun` below."""
import os
import socket
import subprocess
import sys

import pytest
import torch

from esen_train.engine import distributed
from esen_train.engine.config import StageConfig, StrategyConfig, load_train_config
from esen_train.engine.distributed import first_host, slurm_master_port, world_from_environment
from esen_train.engine.fit import fit
from esen_train.engine.optim import OptimSettings
from esen_train.engine.strategies import build_strategy
from tests.slurm_cluster import require_slurm_cluster
from tests import strategy_harness
from tests.strategy_harness import ToyPotential, run_in_processes

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                    "SLURM_STEP_NUM_TASKS", "SLURM_STEP_ID", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_NODELIST",
                    "SLURM_JOB_ID")


@pytest.fixture
def clean_env(monkeypatch):
    # Set, then delete: monkeypatch then restores each variable's original absence too,
    # so a MASTER_ADDR that the code under test sets does not leak into later tests.
    for name in LAUNCH_VARIABLES:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize("nodelist, first", [
    ("node7", "node7"),
    ("gpu[003-010,012],cpu1", "gpu003"),
    ("esen-n[1-2]", "esen-n1"),
    ("rack[2-3]-n[01-04]", "rack2-n01"),
    ("a1,b[5-6]", "a1"),
])
def test_first_host_of_a_slurm_nodelist(nodelist, first):
    assert first_host(nodelist) == first


def test_malformed_nodelist_is_named():
    with pytest.raises(ValueError, match="malformed SLURM node list: 'gpu\\[1-2'"):
        first_host("gpu[1-2")


def test_no_launcher_is_a_world_of_one(clean_env):
    assert world_from_environment() == (0, 0, 1)
    info = distributed.init_distributed()
    assert (info.rank, info.world_size, info.device) == (0, 1, torch.device("cpu"))
    assert not torch.distributed.is_initialized()  # no process group for a world of one
    assert distributed.is_main()
    assert torch.equal(distributed.all_reduce_sum(torch.ones(2)), torch.ones(2))


def test_torchrun_environment(clean_env):
    clean_env.setenv("RANK", "3")
    clean_env.setenv("WORLD_SIZE", "4")
    clean_env.setenv("LOCAL_RANK", "1")
    clean_env.setenv("SLURM_STEP_ID", "0")  # torchrun inside a SLURM step: torchrun's view wins
    clean_env.setenv("SLURM_PROCID", "0")
    assert world_from_environment() == (3, 1, 4)


def test_slurm_step_environment(clean_env):
    for name, value in dict(SLURM_STEP_ID="0", SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_STEP_NUM_TASKS="8",
                            SLURM_LOCALID="1", SLURM_JOB_NODELIST="gpu[017-020]", SLURM_JOB_ID="4242").items():
        clean_env.setenv(name, value)
    assert world_from_environment() == (5, 1, 8)
    assert os.environ["MASTER_ADDR"] == "gpu017"
    assert os.environ["MASTER_PORT"] == str(slurm_master_port("4242"))


def test_slurm_batch_script_is_a_world_of_one(clean_env):
    """The batch script sees SLURM_PROCID=0 and SLURM_NTASKS=N but is not a task of a step."""
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "4")
    clean_env.setenv("SLURM_JOB_NODELIST", "node[1-2]")
    assert world_from_environment() == (0, 0, 1)


def test_master_port_depends_on_the_job_and_avoids_ephemeral_ports():
    ports = {slurm_master_port(str(job)) for job in [*range(100, 110), 12_345_678, 31_999]}
    assert len(ports) == 12 and all(20000 <= port < 32768 for port in ports)


@pytest.mark.slurm
def test_two_tasks_of_a_real_slurm_step_form_one_group():
    require_slurm_cluster()
    script = (
        "import torch; from esen_train.engine import distributed as d; info = d.init_distributed(timeout_s=60); "
        "print(info.rank, info.world_size, int(d.all_reduce_sum(torch.ones(1)).item()), flush=True); d.cleanup()"
    )
    result = subprocess.run(
        ["srun", "--nodes=2", "--ntasks=2", "--time=2", sys.executable, "-c", script],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, f"srun failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    assert sorted(result.stdout.split()) == sorted("0 2 2 1 2 2".split())


def group_timeout_s() -> float:
    """The timeout of this process's default group (gloo)."""
    backend = torch.distributed.group.WORLD._get_backend(torch.device("cpu"))
    return backend.options._timeout.total_seconds()


def report_group_timeout(dist) -> dict:
    return {"timeout_s": group_timeout_s()}


def test_the_process_group_gets_the_timeout_it_is_given(tmp_path):
    """init_distributed(timeout_s) in a real two-process gloo world (the harness passes 300 s)."""
    results = run_in_processes(2, report_group_timeout, (), tmp_path)
    assert [result["timeout_s"] for result in results] == [300.0, 300.0]


def report_rank(dist) -> dict:
    return {"rank": dist.rank}


def test_a_world_whose_port_was_taken_starts_again_on_a_new_one(tmp_path, monkeypatch):
    """The harness's port is free when chosen and can be taken before rank 0 binds it: here
    another listener holds the first port, so rank 0's store cannot listen there."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1], strategy_harness.free_port()])
        monkeypatch.setattr(strategy_harness, "free_port", lambda: next(ports))
        results = run_in_processes(2, report_rank, (), tmp_path)
    assert [result["rank"] for result in results] == [0, 1]
    assert next(ports, None) is None  # both ports were used


def test_fit_joins_the_process_group_with_the_configured_timeout(tmp_path, monkeypatch):
    """fit hands strategy.process_group_timeout_s to init_distributed (stopped right there)."""
    class Joined(Exception):
        pass

    def join(timeout_s):
        raise Joined(timeout_s)

    monkeypatch.setattr(distributed, "init_distributed", join)
    config = load_train_config("tiny", [f"run_dir={tmp_path / 'run'}", "strategy.process_group_timeout_s=77"])
    with pytest.raises(Joined) as joined:
        fit(config)
    assert joined.value.args == (77.0,)


class GroupMade(Exception):
    """Stops DeepSpeed's set-up once the process group exists: the rest is not under test."""


def deepspeed_group_timeout(timeout_s: float, dist) -> dict:
    from esen_train.engine.strategies import zero

    def stop(**kwargs):
        raise GroupMade

    zero.deepspeed.initialize = stop  # in this child process only
    strategy = build_strategy(StrategyConfig(name="deepspeed", process_group_timeout_s=timeout_s), StageConfig(), dist)
    with pytest.raises(GroupMade):
        strategy.setup(ToyPotential(direct_forces=True), OptimSettings(lr=1e-3, weight_decay=0.0), conservative=False,
                       ema_decay=0.9)
    return {"timeout_s": group_timeout_s()}


def test_deepspeed_alone_makes_its_group_with_the_configured_timeout(tmp_path):
    """A world of one: DeepSpeed's one-process group gets strategy.process_group_timeout_s."""
    (result,) = run_in_processes(1, deepspeed_group_timeout, (77.0,), tmp_path)
    assert result["timeout_s"] == 77.0
