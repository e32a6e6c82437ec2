"""esen-launch: profiles, validation, dry runs, sweeps, and real jobs on the local SLURM cluster.

The first part needs no cluster. Then real training: `cluster=local` (submitit's local
executor) and, in the tests marked `slurm`, the cluster that launch/local_slurm.sh started
(CI starts it; they skip without SLURM_CONF): a bad profile is refused before submission, a
two-node DDP job gives the same metrics as `esen-train fit --nproc 2` on this machine, a job
requeued by `scontrol requeue` or by reaching its time limit resumes its run directory and
ends like an uninterrupted run, and a job stopped by a signal (SIGTERM of a requeue, USR2 of
a preemption, also during validation) saves the step it was at on both ranks: the requeued
run continues at the next step and ends with an uninterrupted run's weights.
"""
from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import torch

from esen_train.cli.launch import main
from esen_train.engine.status import read_status
from esen_train.launch.job import TrainingJob
from esen_train.launch.launcher import expand_sweep, plan_launch, split_overrides, sweep_dir_name
from esen_train.launch.profile import ClusterProfile, ProfileError, available_profiles, check_against_cluster, load_profile
from esen_train.launch.slurm_info import ClusterInfo, NodeInfo, PartitionInfo, count_gpus, parse_record, parse_time_limit
from tests.slurm_cluster import job_state, jobs_named, require_slurm_cluster
from tests.wandb_offline import find_run_files, read_offline_run

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")


def write_profile(tmp_path: Path, text: str) -> str:
    path = tmp_path / "profile.yaml"
    path.write_text(text)
    return str(path)


VALID_PROFILE = """\
executor: slurm
partition: debug
nodes: 1
tasks_per_node: 2
cpus_per_task: 1
time_min: 10
"""


# ----- argument handling -------------------------------------------------------------------


def test_launch_keys_are_split_from_training_overrides():
    launch, training = split_overrides(["cluster=local", "nodes=2", "direct.lr=1e-3", "time_min=5", "seed=3"])
    assert launch == {"cluster": "local", "nodes": "2", "time_min": "5"}
    assert training == ["direct.lr=1e-3", "seed=3"]
    with pytest.raises(ProfileError, match="expected key=value, got 'nodes'"):
        split_overrides(["nodes"])


def test_sweeps_form_a_grid_and_name_their_run_directories():
    grid = expand_sweep(["direct.lr=1e-3,5e-4", "stages=[direct],[direct,conservative]"])
    assert grid == [
        ["direct.lr=1e-3", "stages=[direct]"],
        ["direct.lr=1e-3", "stages=[direct,conservative]"],
        ["direct.lr=5e-4", "stages=[direct]"],
        ["direct.lr=5e-4", "stages=[direct,conservative]"],
    ]
    assert expand_sweep([]) == [[]]
    assert sweep_dir_name(1, grid[1]) == "001-direct.lr=1e-3_stages=-direct-conservative-"
    with pytest.raises(ProfileError, match="training keys only; 'nodes'"):
        expand_sweep(["nodes=1,2"])
    with pytest.raises(ProfileError, match="KEY=V1,V2"):
        expand_sweep(["direct.lr"])


# ----- profiles ----------------------------------------------------------------------------


def test_shipped_profiles_load():
    assert {"local", "local-slurm", "example-gpu"} <= set(available_profiles())
    gpu = load_profile("example-gpu")
    assert (gpu.partition, gpu.gpus_per_node, gpu.tasks_per_node, gpu.sbatch_args) == ("gpu", 8, 8, {"exclusive": True})
    local_slurm = load_profile("local-slurm", {"nodes": "1", "tasks_per_node": "2"})
    assert (local_slurm.executor, local_slurm.nodes, local_slurm.tasks_per_node) == ("slurm", 1, 2)
    assert load_profile("local").executor == "local"


def test_tasks_per_node_defaults_to_one_per_gpu(tmp_path):
    path = write_profile(tmp_path, VALID_PROFILE.replace("tasks_per_node: 2\n", "gpus_per_node: 4\n"))
    assert load_profile(path).tasks_per_node == 4


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        (VALID_PROFILE + "partitoin: gpu\n", {}, r"unknown key\(s\) 'partitoin'"),
        (VALID_PROFILE.replace("cpus_per_task: 1\n", ""), {}, r"missing required field\(s\) cpus_per_task"),
        (VALID_PROFILE.replace("partition: debug\n", ""), {}, "missing required field 'partition'"),
        (VALID_PROFILE.replace("nodes: 1", "nodes: two"), {}, "key 'nodes'"),
        (VALID_PROFILE, {"time_min": "soon"}, r"launch keys \(profile .*\): key 'time_min'"),
        (VALID_PROFILE + "gpus_per_node: 4\n", {}, r"tasks_per_node \(2\) must equal gpus_per_node \(4\)"),
        (VALID_PROFILE.replace("executor: slurm", "executor: local"), {"nodes": "2"}, "nodes must be 1"),
        (VALID_PROFILE.replace("executor: slurm", "executor: pbs"), {}, "executor must be one of slurm, local"),
        (VALID_PROFILE, {"nodes": "0"}, "nodes must be at least 1"),
        (VALID_PROFILE + "sbatch_args:\n  time: 5\n", {}, "sbatch_args time are set by esen-launch"),
    ],
)
def test_bad_profiles_are_refused_with_the_field_named(tmp_path, text, overrides, message):
    path = write_profile(tmp_path, text)
    with pytest.raises(ProfileError, match=message) as error:
        load_profile(path, overrides)
    assert "profile.yaml" in str(error.value)


def test_unknown_profile_lists_the_available_ones():
    with pytest.raises(ProfileError, match="cluster profile 'nowhere' not found.*local-slurm"):
        load_profile("nowhere")


def test_resources_are_checked_against_the_partitions_nodes():
    cluster = ClusterInfo(
        partitions={"gpu": PartitionInfo("gpu", max_time_min=60, node_names=["g1", "g2"])},
        nodes={"g1": NodeInfo("g1", cpus=32, memory_mb=256_000, gpus=4), "g2": NodeInfo("g2", cpus=32, memory_mb=256_000, gpus=4)},
    )
    fits = ClusterProfile(executor="slurm", partition="gpu", nodes=2, gpus_per_node=4, tasks_per_node=4, cpus_per_task=8, time_min=60, mem_gb=200)
    check_against_cluster(fits, cluster, "p")
    for change, message in (
        ({"partition": "cpu"}, "unknown partition 'cpu'; this cluster has gpu"),
        ({"time_min": 61}, "exceeds partition 'gpu'.s limit of 60 minutes"),
        ({"nodes": 3}, "needs 3 node"),
        ({"gpus_per_node": 8, "tasks_per_node": 8, "cpus_per_task": 4}, "8 GPUs.*but only 0 of its 2"),
        ({"cpus_per_task": 9}, r"36 CPUs \(tasks_per_node=4 x cpus_per_task=9\)"),
        ({"mem_gb": 300}, "300 GB memory"),
    ):
        bad = ClusterProfile(**{**fits.__dict__, **change})
        with pytest.raises(ProfileError, match=message):
            check_against_cluster(bad, cluster, "p")


def test_scontrol_output_is_parsed():
    line = (
        "NodeName=gpu-07 Arch=x86_64 CoresPerSocket=16 CPUAlloc=0 CPUEfctv=64 CPUTot=64 CPULoad=0.01 "
        "Gres=gpu:a100:4(S:0-1) NodeAddr=gpu-07 OS=Linux 5.14.0 #1 SMP PREEMPT RealMemory=512000 "
        "Partitions=gpu,preempt State=IDLE"
    )
    record = parse_record(line)
    assert record["OS"] == "Linux 5.14.0 #1 SMP PREEMPT"
    assert (record["CPUEfctv"], record["RealMemory"], record["Partitions"]) == ("64", "512000", "gpu,preempt")
    assert count_gpus(record["Gres"]) == 4
    assert count_gpus("gpu:a100:2,gpu:v100:2(S:0),shard:8") == 4
    assert count_gpus("(null)") == 0
    assert [parse_time_limit(t) for t in ("UNLIMITED", "1-00:00:00", "02:30:00", "00:00:30")] == [None, 1440, 150, 1]


# ----- dry runs (no cluster needed) --------------------------------------------------------


@pytest.fixture
def no_slurm(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "no-cluster" / "slurm.conf"))


def test_dry_run_prints_the_profiles_sbatch_script(no_slurm, tmp_path, capsys):
    run_dir = tmp_path / "run"
    status = main([TINY, "cluster=example-gpu", "nodes=4", "time_min=600", f"run_dir={run_dir}", "--dry-run"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "not checked against a cluster" in err
    for line in (
        "#SBATCH --partition=gpu", "#SBATCH --account=my-project", "#SBATCH --qos=normal",
        "#SBATCH --constraint='a100|h100'", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=491520M",
        "#SBATCH --time=600", "#SBATCH --signal=USR2@300", "#SBATCH --exclusive", "#SBATCH --job-name=esen-tiny",
        f"#SBATCH --output={run_dir}/submitit/%j_0_log.out", "module load cuda/12.4",
    ):
        assert line in out.splitlines(), line
    assert re.search(r"^srun --unbuffered .* -u -m submitit.core._submit " + re.escape(str(run_dir / "submitit")) + "$", out, re.M)
    # 32 tasks: the single-process strategy of tiny.yaml becomes DDP.
    assert f"# each task runs: esen-train fit {TINY} strategy.name=ddp run_dir={run_dir}" in out
    assert not run_dir.exists()  # nothing written, nothing submitted


def test_dry_run_of_a_sweep_is_one_job_array(no_slurm, tmp_path, capsys):
    status = main([TINY, "cluster=example-gpu", f"run_dir={tmp_path}", "--sweep", "direct.lr=1e-3,5e-4", "--dry-run"])
    out, _ = capsys.readouterr()
    assert status == 0
    assert "#SBATCH --array=0-1%2" in out
    assert f"run_dir={tmp_path}/000-direct.lr=1e-3" in out and f"run_dir={tmp_path}/001-direct.lr=5e-4" in out


def test_the_points_of_a_sweep_share_one_wandb_group(tmp_path):
    plan = plan_launch(TINY, ["cluster=local", f"run_dir={tmp_path / 'lr-sweep'}"], ["direct.lr=1e-3,5e-4"])
    assert [run.config.logging.wandb.group for run in plan.runs] == ["lr-sweep", "lr-sweep"]
    chosen = plan_launch(TINY, ["cluster=local", f"run_dir={tmp_path}", "logging.wandb.group=mine"], ["seed=0,1"])
    assert [run.config.logging.wandb.group for run in chosen.runs] == ["mine", "mine"]
    assert plan_launch(TINY, ["cluster=local", f"run_dir={tmp_path}"], []).runs[0].config.logging.wandb.group == ""


def test_bad_training_override_is_refused_before_launch(no_slurm, tmp_path, capsys):
    status = main([TINY, "cluster=local", "direct.lrr=1e-3", f"run_dir={tmp_path}/run", "--dry-run"])
    assert status == 2
    assert "direct.lrr" in capsys.readouterr().err


def test_single_strategy_named_for_several_tasks_is_refused(no_slurm, tmp_path, capsys):
    status = main([TINY, "cluster=example-gpu", "strategy.name=single", f"run_dir={tmp_path}/run", "--dry-run"])
    assert status == 2
    assert "strategy.name=single runs one process, but the job has 16 tasks" in capsys.readouterr().err


def test_missing_cluster_is_refused(capsys):
    assert main([TINY, "--dry-run"]) == 2
    assert "choose a cluster profile with cluster=NAME" in capsys.readouterr().err


def test_checkpoint_requeues_the_same_run():
    job = TrainingJob(TINY, ["stages=[direct]", "run_dir=/runs/a"])
    resubmission = job.checkpoint()
    assert resubmission.function is job
    assert (resubmission.function.config, resubmission.function.overrides) == (TINY, ["stages=[direct]", "run_dir=/runs/a"])


# ----- real training jobs: submitit's local executor and the local SLURM cluster ----------

# A short DDP run of the tiny model on built-in EMT data; checkpoints every 2 steps.
TRAINING = [
    "stages=[direct]", "data.emt_structures=40", "direct.max_atoms=64", "direct.warmup_steps=2",
    "direct.log_every=2", "direct.checkpoint_every=2",
]
MAX_STEPS = 12
# The same training with checkpoints only at validation (every MAX_STEPS // 2 steps): a job
# stopped between them can only resume where it stopped if the stop saved a checkpoint.
ONLY_STOP_CHECKPOINTS = [o for o in TRAINING if not o.startswith("direct.checkpoint_every=")] + ["direct.checkpoint_every=1000"]


@pytest.fixture(scope="module")
def cluster():
    return require_slurm_cluster()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """The same training without SLURM: `esen-train fit --nproc 2` on this machine."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    command = [
        sys.executable, "-m", "esen_train.cli", "fit", TINY, *TRAINING, f"direct.max_steps={MAX_STEPS}",
        f"direct.val_every={MAX_STEPS // 2}", "logging.wandb.mode=disabled", f"run_dir={run_dir}", "--nproc", "2",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def read_metrics(run_dir: Path) -> dict[tuple[str, int], dict]:
    """The last row logged for each (split, step): a resumed run logs the repeated steps again."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(row["split"], row["step"]): row for row in rows}


def assert_same_training(run_dir: Path, reference: Path) -> None:
    ours, theirs = read_metrics(run_dir), read_metrics(reference)
    assert sorted(ours) == sorted(theirs)
    for key, row in theirs.items():
        for metric in ("loss", "energy_mae_mev_per_atom", "force_mae_mev_per_A", "stress_mae_mev_per_A3"):
            if row.get(metric) is not None:
                assert ours[key][metric] == pytest.approx(row[metric], rel=1e-6), (key, metric)


def last_step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "direct" / "last" / "model.pt", weights_only=True)["step"]


def assert_same_final_weights(run_dir: Path, reference: Path) -> None:
    ours, theirs = (torch.load(run / "checkpoints" / "direct" / "last" / "model.pt", weights_only=True)
                    for run in (run_dir, reference))
    assert ours["step"] == theirs["step"]
    for kind in ("model", "ema"):
        assert ours[kind].keys() == theirs[kind].keys()
        for name, value in theirs[kind].items():
            torch.testing.assert_close(ours[kind][name], value, rtol=1e-6, atol=1e-7, msg=f"{kind}.{name}")


def logged_train_steps(run_dir: Path) -> list[int]:
    """Steps of the train rows in metrics.jsonl so far (a line being written is skipped)."""
    path = run_dir / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row["split"] == "train":
            steps.append(row["step"])
    return steps


def stops_and_resumes(run_dir: Path, job_id: str) -> tuple[list[tuple[int, str]], list[int]]:
    """(step, signal) of each stop rank 0 logged, and the step each later start resumed at."""
    log = (run_dir / "submitit" / f"{job_id}_0_log.out").read_text()
    stops = re.findall(r"^direct preempted after step (\d+) \((SIG\w+)\)", log, re.M)
    resumes = re.findall(r"resumed from .*step_(\d+) at step (\d+)", log)
    assert all(int(directory) == int(step) for directory, step in resumes)
    return [(int(step), name) for step, name in stops], [int(step) for _, step in resumes]


def send_when_trained(job_id: str, run_dir: Path, step: int, command: list[str]) -> float:
    """Run `command` (a signal or requeue for the job) as soon as step `step` is logged;
    returns when it was sent."""
    wait_for(lambda: max(logged_train_steps(run_dir), default=0) >= step, 300, f"training step {step}")
    sent = time.time()
    subprocess.run(command, check=True, timeout=30)
    return sent


def launched_job_id(out: str) -> str:
    match = re.search(r"^job (\d+): ", out, re.M)
    assert match, out
    return match.group(1)


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.2)


def scontrol_job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    return parse_record(out)


def task_starts(run_dir: Path, job_id: str) -> int:
    """How many times rank 0 of the job started (1 + requeues)."""
    log = run_dir / "submitit" / f"{job_id}_0_log.out"
    return log.read_text().count("Starting with JobEnvironment") if log.exists() else 0


@pytest.mark.slow
def test_local_executor_runs_the_same_training(reference_run, tmp_path, capsys, monkeypatch):
    # The same thread count as the torchrun reference, so the float32 sums agree to 1e-6.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # A MASTER_PORT left in the environment that something already listens on: submitit would
    # reuse it, rank 0 would fail to listen and rank 1 would wait for it for 30 minutes.
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    monkeypatch.setenv("MASTER_PORT", str(busy.getsockname()[1]))
    run_dir = tmp_path / "run"
    with busy:
        status = main([TINY, "cluster=local", "tasks_per_node=2", *TRAINING, f"direct.max_steps={MAX_STEPS}",
                       f"direct.val_every={MAX_STEPS // 2}", "logging.wandb.mode=disabled", f"run_dir={run_dir}", "--wait"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert re.search(r"^job \d+: completed$", out, re.M)
    assert f"  status:        esen-train status {run_dir}\n" in out
    assert_same_training(run_dir, reference_run)
    assert last_step(run_dir) == MAX_STEPS
    assert read_status(run_dir)["state"] == "finished"


@pytest.mark.slurm
@pytest.mark.parametrize(
    "launch_keys, message",
    [
        (["partition=gpu"], "unknown partition 'gpu'; this cluster has debug"),
        (["cpus_per_task=3"], r"impossible resources on partition 'debug'.*3 CPUs"),
        (["nodes=3"], "needs 3 node"),
        (["mem_gb=64"], "64 GB memory"),
    ],
)
def test_bad_profile_fails_before_anything_is_submitted(cluster, tmp_path, capsys, launch_keys, message):
    config = tmp_path / f"refused{tmp_path.name[-8:]}.yaml"  # a job name no other test uses
    config.write_text(Path(TINY).read_text())
    run_dir = tmp_path / "run"
    status = main([str(config), "cluster=local-slurm", *launch_keys, f"run_dir={run_dir}"])
    assert status == 2
    assert re.search(message, capsys.readouterr().err)
    assert not run_dir.exists()
    assert jobs_named(f"esen-{config.stem}") == []


@pytest.mark.slurm
@pytest.mark.slow
def test_two_node_ddp_job_matches_a_local_two_process_run(cluster, reference_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = [TINY, "cluster=local-slurm", *TRAINING, f"direct.max_steps={MAX_STEPS}", f"direct.val_every={MAX_STEPS // 2}",
            "logging.wandb.mode=offline", f"run_dir={run_dir}"]
    assert main([*args, "--dry-run"]) == 0
    dry_run = capsys.readouterr().out

    assert main([*args, "--wait"]) == 0
    out = capsys.readouterr().out
    job_id = launched_job_id(out)
    assert f"job {job_id}: completed" in out
    assert f"run directory: {run_dir}" in out
    assert f"{run_dir}/submitit/{job_id}_0_log.out" in out
    # The script submitted is the one the dry run printed.
    submitted_script = (run_dir / "submitit" / f"{job_id}_submission.sh").read_text()
    assert dry_run.startswith(submitted_script)
    assert "#SBATCH --nodes=2" in submitted_script and "#SBATCH --partition=debug" in submitted_script

    assert_same_training(run_dir, reference_run)
    assert last_step(run_dir) == MAX_STEPS
    wandb_id = (run_dir / "wandb_run_id").read_text().strip()
    assert [p.name.endswith(wandb_id) for p in (run_dir / "wandb").glob("offline-run-*")] == [True]
    (run_file,) = find_run_files(run_dir)
    cluster_config = read_offline_run(run_file)["config"]["cluster"]
    assert cluster_config["slurm_job_id"] == job_id and cluster_config["nodes"] == 2 and cluster_config["world_size"] == 2
    assert job_state(job_id) == "COMPLETED"


@pytest.mark.slurm
@pytest.mark.slow
def test_scontrol_requeue_loses_no_step(cluster, reference_run, tmp_path, capsys):
    """The requeue's SIGTERM reaches both ranks; they save the step they are at (there is no
    periodic checkpoint to fall back on) within SLURM's KillWait, and the requeued job goes on."""
    run_dir = tmp_path / "run"
    status = main([TINY, "cluster=local-slurm", *ONLY_STOP_CHECKPOINTS, f"direct.max_steps={MAX_STEPS}",
                   f"direct.val_every={MAX_STEPS // 2}", "logging.wandb.mode=offline", f"run_dir={run_dir}"])
    assert status == 0
    job_id = launched_job_id(capsys.readouterr().out)
    send_when_trained(job_id, run_dir, 2, ["scontrol", "requeue", job_id])

    job = submitit.SlurmJob(folder=run_dir / "submitit", job_id=job_id, tasks=[0, 1])
    job.results()  # raises if the stopped run's exit were taken for the job's outcome
    assert task_starts(run_dir, job_id) == 2
    stops, resumes = stops_and_resumes(run_dir, job_id)
    assert len(stops) == 1 and stops[0][1] == "SIGTERM" and 2 <= stops[0][0] < MAX_STEPS
    assert resumes == [stops[0][0]]  # the requeued run starts at the step after the last one done
    assert last_step(run_dir) == MAX_STEPS
    assert_same_training(run_dir, reference_run)  # the requeued run ends exactly like an uninterrupted one
    assert_same_final_weights(run_dir, reference_run)
    wandb_id = (run_dir / "wandb_run_id").read_text().strip()
    offline_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(p.name.endswith(wandb_id) for p in offline_runs)  # one wandb run, resumed
    # The requeued run's curves go on from the step it resumed at, on the global_step axis.
    requeued = read_offline_run(offline_runs[1] / f"run-{wandb_id}.wandb")
    assert {"name": "", "glob_name": "*", "step_metric": "global_step"} in requeued["metrics"]
    steps = [row["global_step"] for row in requeued["history"] if "direct/train/loss" in row]
    assert steps == [step for step in range(resumes[0] + 1, MAX_STEPS + 1) if step % 2 == 0]  # direct.log_every=2


# USR2 during a validation long enough (400 structures) for the signal to land in it;
# checkpoints only at validation and stops.
USR2_STEPS = 8
USR2_TRAINING = [
    "stages=[direct]", "direct.max_atoms=64", "direct.warmup_steps=2", "direct.log_every=1",
    f"direct.max_steps={USR2_STEPS}", f"direct.val_every={USR2_STEPS // 2}", "direct.checkpoint_every=1000",
    "logging.wandb.mode=disabled",
]


@pytest.fixture(scope="module")
def usr2_reference(tmp_path_factory) -> tuple[list[str], Path]:
    """The data and overrides of the USR2 test, and the same training by torchrun on this machine."""
    from esen_train.data.emt import generate_emt_dataset

    data = tmp_path_factory.mktemp("usr2-data")
    generate_emt_dataset(data / "train", num=40, seed=0)
    generate_emt_dataset(data / "val", num=400, seed=1)
    overrides = [*USR2_TRAINING, f"data.train=[{data / 'train'}]", f"data.val=[{data / 'val'}]"]
    run_dir = data / "reference"
    command = [sys.executable, "-m", "esen_train.cli", "fit", TINY, *overrides, f"run_dir={run_dir}", "--nproc", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return overrides, run_dir


@pytest.mark.slurm
@pytest.mark.slow
def test_usr2_during_validation_saves_raw_weights_and_loses_no_step(cluster, usr2_reference, tmp_path, capsys):
    """`scancel --signal=USR2`, as SLURM's preemption and time-limit warnings, while the EMA
    weights are swapped in for validation: both ranks finish the validation, save the step
    with the raw weights, and the job requeues itself and goes on from the next step."""
    overrides, reference = usr2_reference
    run_dir = tmp_path / "run"
    assert main([TINY, "cluster=local-slurm", *overrides, f"run_dir={run_dir}"]) == 0
    job_id = launched_job_id(capsys.readouterr().out)
    # The train row of the validation step is written just before the validation starts, and
    # the step's checkpoint just after it ends.
    sent = send_when_trained(job_id, run_dir, USR2_STEPS // 2, ["scancel", "--signal=USR2", job_id])

    submitit.SlurmJob(folder=run_dir / "submitit", job_id=job_id, tasks=[0, 1]).results()
    assert task_starts(run_dir, job_id) == 2
    stops, resumes = stops_and_resumes(run_dir, job_id)
    assert stops == [(USR2_STEPS // 2, "SIGUSR2")] and resumes == [USR2_STEPS // 2]
    assert sent < (run_dir / "checkpoints" / "direct" / f"step_{USR2_STEPS // 2:08d}" / "model.pt").stat().st_mtime
    assert last_step(run_dir) == USR2_STEPS
    assert_same_training(run_dir, reference)
    assert_same_final_weights(run_dir, reference)
    assert job_state(job_id) == "COMPLETED"


@pytest.mark.slurm
@pytest.mark.slow
def test_job_reaching_its_time_limit_is_requeued_and_finishes(cluster, tmp_path, capsys):
    """SLURM checks time limits every 30 s and sends USR2 once less than signal_delay_s + 30 s
    is left. The job starts with 10 minutes; once training has checkpointed, the test shortens
    the limit so that less than that is left: at its next check SLURM warns the job, which
    checkpoints and requeues itself. While the job waits to restart the test gives it back its
    10 minutes, so the resumed run is not warned again and finishes."""
    # The stage ends by its clock, not a step count: it must still be training when SLURM's
    # warning comes (up to about 60 s after the limit is shortened), and a job's step time under
    # SLURM varied 6x between runs on the same machine. The time used is kept in the
    # checkpoint, so the resumed run trains only the rest of the 2 minutes.
    run_dir = tmp_path / "run"
    status = main([TINY, "cluster=local-slurm", "time_min=10", "signal_delay_s=120", "max_requeues=2", *TRAINING,
                   "direct.max_steps=1000000", "direct.max_minutes=2", "direct.val_every=1000000",
                   "direct.checkpoint_every=5", "logging.wandb.mode=disabled", f"run_dir={run_dir}"])
    assert status == 0
    job_id = launched_job_id(capsys.readouterr().out)
    wait_for(lambda: (run_dir / "checkpoints" / "direct" / "step_00000005").exists(), 300, "the first checkpoint")

    elapsed_s = int(subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-o", "ElapsedRaw"], capture_output=True,
                                   text=True, timeout=30).stdout.split()[0])
    limit_min = math.ceil((elapsed_s + 60) / 60)  # leaves 60 to 120 s: under signal_delay_s + 30
    subprocess.run(["scontrol", "update", f"JobId={job_id}", f"TimeLimit={limit_min}"], check=True, timeout=30)
    wait_for(lambda: scontrol_job(job_id).get("Restarts", "0") != "0", 90, "SLURM's time-out warning and the requeue")
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=10"], check=True, timeout=30)

    submitit.SlurmJob(folder=run_dir / "submitit", job_id=job_id, tasks=[0, 1]).results()
    log = (run_dir / "submitit" / f"{job_id}_0_log.out").read_text()
    assert "Caught signal SIGUSR2" in log and "this job is timed-out" in log
    run_status = read_status(run_dir)
    assert run_status["state"] == "finished"
    assert run_status["stages"]["direct"]["end_reason"] == "max_minutes"
    assert task_starts(run_dir, job_id) == 2
    stops, resumes = stops_and_resumes(run_dir, job_id)  # the warning saved the step reached
    assert [name for _, name in stops] == ["SIGUSR2"] and resumes == [stops[0][0]]
    assert last_step(run_dir) > stops[0][0]  # the resumed run trained on
    assert job_state(job_id) == "COMPLETED"
