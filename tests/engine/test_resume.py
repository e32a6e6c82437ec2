"""Nothing lost: a run killed, crashed, stopped by a signal or left with damaged files
continues where it stopped and ends with the weights of a run that was never interrupted.

- A real training process killed with SIGKILL mid-run, started again; one stopped with Ctrl-C
  (SIGINT) or SIGTERM, which saves the step it was at.
- A crash after the step-8 checkpoint, then: the `last` link lost (a copy tool that drops
  symlinks), checkpoints damaged in the ways files get damaged (truncated, overwritten with
  garbage, an unparsable JSON file), a torn last line in metrics.jsonl.
- A real SIGUSR2 during validation, and during a training step, in one process: the trainer
  stops at the next step boundary with that step saved (the raw weights, not the EMA weights
  that validation swaps in). Several processes under SLURM: tests/launch/test_launch.py.
- A damaged training state raises an error naming the file.
- A checkpoint save that raises, or is killed with SIGKILL, half-way leaves the checkpoint
  before it intact and nothing that looks like a checkpoint.
"""
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from esen_train.cli.train import main as train_main
from esen_train.engine import preemption
from esen_train.engine.checkpoint import CheckpointManager, damage_in
from esen_train.engine.config import load_train_config
from esen_train.engine.ema import ExponentialMovingAverage
from esen_train.engine.fit import fit
from esen_train.engine.tracking import read_metrics
from esen_train.engine.trainer import StageTrainer
from esen_train.model.config import load_model_config
from esen_train.model.model_file import CheckpointError, read_model_file
from tests.strategy_harness import Scenario, build, save_checkpoint, save_then_die, single_process_dist, write_training_state

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
STEPS = 12
OVERRIDES = [
    "data.emt_structures=40", "stages=[direct]", f"direct.max_steps={STEPS}", "direct.max_atoms=64",
    "direct.checkpoint_every=2", "direct.val_every=4", "direct.log_every=1", "logging.wandb.mode=disabled",
]
# In-process runs keep every checkpoint, to compare any step with the reference's.
KEEP_ALL = OVERRIDES + ["direct.keep_last=100"]


def fit_command(run_dir: Path, nproc: int) -> list[str]:
    return [sys.executable, "-m", "esen_train.cli", "fit", str(TINY), *OVERRIDES, f"run_dir={run_dir}", f"--nproc={nproc}"]


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run_uninterrupted(run_dir: Path, nproc: int) -> None:
    subprocess.run(fit_command(run_dir, nproc), check=True, env=environment(), capture_output=True)


def run_killed_then_resumed(run_dir: Path, nproc: int) -> int:
    """Start, SIGKILL the whole process group a random moment after the checkpoint of a
    random step (4, 6 or 8) exists, start again. Returns the step the resumed run started
    from. The delay is short next to the 4 steps that remain, so the kill always lands
    mid-run, however fast the machine."""
    process = subprocess.Popen(fit_command(run_dir, nproc), env=environment(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after = random.choice([4, 6, 8])
    checkpoint = run_dir / "checkpoints" / "direct" / f"step_{kill_after:08d}"
    deadline = time.time() + 300
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.1))
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert checkpoint.exists(), f"the run never reached its step-{kill_after} checkpoint"
    resumed_from = int(os.readlink(run_dir / "checkpoints" / "direct" / "last").split("_")[-1])
    assert resumed_from < STEPS, "the run finished before it was killed"
    run_uninterrupted(run_dir, nproc)
    return resumed_from


def weights_at(run_dir: Path, checkpoint: str = "last", step: int = STEPS) -> dict:
    payload = read_model_file(run_dir / "checkpoints" / "direct" / checkpoint / "model.pt")
    assert payload["step"] == step
    return {**{f"model.{k}": v for k, v in payload["model"].items()}, **{f"ema.{k}": v for k, v in payload["ema"].items()}}


def assert_bitwise_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def assert_each_step_logged_once(run_dir: Path) -> None:
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows if row["split"] == "train"] == list(range(1, STEPS + 1))
    assert [row["step"] for row in rows if row["split"] == "val"] == list(range(4, STEPS + 1, 4))


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, nproc):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    run_uninterrupted(reference, nproc)
    resumed_from = run_killed_then_resumed(interrupted, nproc)
    expected, actual = weights_at(reference), weights_at(interrupted)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), f"{name} differs after resume from step {resumed_from}"
    assert_each_step_logged_once(interrupted)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_saves_the_step_in_progress_and_the_same_command_resumes(tmp_path, signum):
    """`esen-train fit`, one process, no periodic checkpoint in reach: Ctrl-C (or SIGTERM) once
    a few steps are logged stops it at the end of a step with that step saved and exit code 128
    + the signal; the same command then ends with the uninterrupted run's weights."""
    steps = 40

    def command(run_dir: Path) -> list[str]:
        return [sys.executable, "-m", "esen_train.cli", "fit", str(TINY), *OVERRIDES, f"direct.max_steps={steps}",
                "direct.checkpoint_every=1000", f"run_dir={run_dir}"]

    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    subprocess.run(command(reference), check=True, env=environment(), capture_output=True)
    process = subprocess.Popen(command(stopped), env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        if (stopped / "metrics.jsonl").exists() and len(read_metrics(stopped)) >= 3:
            break
        time.sleep(0.01)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, stderr[-2000:]
    assert "every completed step is saved: the same command resumes" in stderr
    saved = int(os.readlink(stopped / "checkpoints" / "direct" / "last").split("_")[-1])
    assert 0 < saved < steps and max(row["step"] for row in read_metrics(stopped)) == saved

    subprocess.run(command(stopped), check=True, env=environment(), capture_output=True)
    assert_bitwise_equal(weights_at(stopped, step=steps), weights_at(reference, step=steps))


def test_sigterm_to_the_command_alone_stops_every_process_of_nproc_2(tmp_path):
    """`kill PID` (or `timeout`) signals `esen-train fit --nproc 2` itself, not its process
    group: the command passes SIGTERM on, every process saves the step it is at and exits,
    and none is left training."""
    run_dir = tmp_path / "run"
    command = [*fit_command(run_dir, 2), "direct.max_steps=200", "direct.checkpoint_every=1000"]
    process = subprocess.Popen(command, env=environment(), start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 3:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "stopped by SIGTERM; every completed step is saved" in stderr
    saved = int(os.readlink(run_dir / "checkpoints" / "direct" / "last").split("_")[-1])
    assert 0 < saved < 200 and max(row["step"] for row in read_metrics(run_dir)) == saved
    with pytest.raises(ProcessLookupError):  # nothing of the command's process group is left
        os.killpg(process.pid, 0)


# ----- in one process: crashes, lost links, damaged files, signals ---------------------------


def fit_here(run_dir: Path) -> None:
    fit(load_train_config(TINY, KEEP_ALL + [f"run_dir={run_dir}"]))


class Crash(Exception):
    """Stands in for a process dying between two steps."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    fit_here(run_dir)
    return run_dir


@pytest.fixture(scope="module")
def crashed_run(tmp_path_factory) -> Path:
    """A run that died while training step 9: its newest checkpoint is step 8."""
    run_dir = tmp_path_factory.mktemp("crashed")
    original = StageTrainer._train_step

    def crash_at_step_9(self):
        if self.progress.step == 8:
            raise Crash
        original(self)

    StageTrainer._train_step = crash_at_step_9
    try:
        with pytest.raises(Crash):
            fit_here(run_dir)
    finally:
        StageTrainer._train_step = original
    return run_dir


@pytest.fixture
def crashed_copy(crashed_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(crashed_run, copy, symlinks=True)
    return copy


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / "direct" / f"step_{step:08d}"


def test_lost_last_link_resumes_from_the_newest_checkpoint(crashed_copy, reference, capsys):
    (crashed_copy / "checkpoints" / "direct" / "last").unlink()
    fit_here(crashed_copy)
    assert f"resumed from {checkpoint_dir(crashed_copy, 8)} at step 8" in capsys.readouterr().out
    assert_bitwise_equal(weights_at(crashed_copy), weights_at(reference))
    assert_each_step_logged_once(crashed_copy)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def break_json(path: Path) -> None:
    path.write_text(path.read_text()[:-3])


def test_damaged_checkpoints_are_passed_over_with_a_warning_naming_the_file(crashed_copy, reference):
    damaged = {
        8: ("train_state/state.pt", truncate),
        6: ("train_state/extra_rank0.pt", garbage),
        4: ("train_state/strategy.json", break_json),
    }
    for step, (name, damage) in damaged.items():
        damage(checkpoint_dir(crashed_copy, step) / name)
    with pytest.warns(UserWarning) as warned:
        fit_here(crashed_copy)
    messages = [str(w.message) for w in warned if "is damaged" in str(w.message)]
    assert len(messages) == 3
    for message, (step, (name, _)) in zip(messages, damaged.items()):
        assert str(checkpoint_dir(crashed_copy, step) / name) in message
    # Resumed from step 2; each damaged checkpoint is kept aside, and an intact one of that
    # step written anew.
    for step, (name, _) in damaged.items():
        [aside] = checkpoint_dir(crashed_copy, step).parent.glob(f"step_{step:08d}.damaged-*")
        assert (aside / name).read_bytes() != (checkpoint_dir(crashed_copy, step) / name).read_bytes()
        assert damage_in(checkpoint_dir(crashed_copy, step)) is None
    assert_bitwise_equal(weights_at(crashed_copy), weights_at(reference))
    assert_each_step_logged_once(crashed_copy)


def test_torn_last_metrics_line_is_dropped_with_a_warning(crashed_copy, reference):
    metrics = crashed_copy / "metrics.jsonl"
    with metrics.open("a") as stream:
        stream.write('{"stage": "direct", "split": "train", "step": 9, "lo')
    with pytest.warns(UserWarning, match=f"{metrics}: dropped the torn last line"):
        fit_here(crashed_copy)
    assert_each_step_logged_once(crashed_copy)
    assert_bitwise_equal(weights_at(crashed_copy), weights_at(reference))


def test_a_bad_metrics_line_before_the_last_is_an_error_naming_file_and_line(crashed_copy):
    metrics = crashed_copy / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:2] + ["not json\n"] + lines[2:]))
    with pytest.raises(ValueError, match=f"{metrics}: line 3 is not JSON"):
        read_metrics(crashed_copy)


def test_a_checkpoint_is_never_written_over(crashed_copy):
    """A save into a step directory that exists is refused before anything is written."""
    stage_dir = crashed_copy / "checkpoints" / "direct"
    manager = CheckpointManager(stage_dir, keep_last=2, elements=[29])
    strategy = build(Scenario("single", conservative=False), single_process_dist(), seed=0)
    before = (checkpoint_dir(crashed_copy, 8) / "model.pt").read_bytes()
    with pytest.raises(CheckpointError, match="step_00000008 already exists: a checkpoint is never written over"):
        manager.save(strategy, load_model_config("tiny"), "direct", 8, {}, extra={}, is_best=False)
    assert (checkpoint_dir(crashed_copy, 8) / "model.pt").read_bytes() == before


# ----- a save that fails or is killed half-way -------------------------------------------------
class _FailsWhilePickled:
    def __reduce__(self):
        raise RuntimeError("disk full (simulated)")


def esen_strategy(seed: int):
    return build(Scenario("single", conservative=False, model="esen"), single_process_dist(), seed=seed)


def assert_only_checkpoint_is_step_1(run_dir: Path) -> None:
    """Step 1 is intact and is where the stage resumes; the broken save left nothing that
    looks like a checkpoint, only a hidden temporary directory."""
    stage_dir = run_dir / "checkpoints" / "direct"
    manager = CheckpointManager(stage_dir, keep_last=2, elements=[28, 29])
    assert manager.find_resume_point(torch.device("cpu")) == checkpoint_dir(run_dir, 1)
    assert sorted(path.name for path in stage_dir.iterdir() if not path.name.startswith(".")) == ["last", "step_00000001"]
    strategy = esen_strategy(seed=3)
    assert manager.load(strategy, checkpoint_dir(run_dir, 1))["step"] == 1
    hidden = list(stage_dir.glob(".*"))
    assert [path.name for path in hidden] == [".step_00000002.tmp"]
    assert "contents.json is missing" in damage_in(hidden[0])
    with pytest.raises(FileNotFoundError, match="not a training-state directory"):
        manager.load(strategy, hidden[0])


def test_exception_mid_save_keeps_the_previous_checkpoint(tmp_path):
    stage_dir = tmp_path / "checkpoints" / "direct"
    manager = CheckpointManager(stage_dir, keep_last=2, elements=[28, 29])
    strategy = esen_strategy(seed=0)
    save_checkpoint(manager, strategy, 1, extra={"step": 1})
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(manager, strategy, 2, extra={"step": 2, "payload": _FailsWhilePickled()})
    assert_only_checkpoint_is_step_1(tmp_path)


def test_sigkill_mid_save_keeps_the_previous_checkpoint(tmp_path):
    stage_dir = tmp_path / "checkpoints" / "direct"
    process = mp.get_context("fork").Process(target=save_then_die, args=(stage_dir,))
    process.start()
    process.join(timeout=120)
    assert process.exitcode == -9
    assert_only_checkpoint_is_step_1(tmp_path)


# ----- signals in one process ----------------------------------------------------------------


@contextmanager
def stop_on_sigusr2():
    """What launch/job.py does in a SLURM task: USR2 only asks the trainer to stop."""
    preemption.reset()
    replaced = preemption.catch_signals([signal.SIGUSR2])
    try:
        yield
    finally:
        for signum, handler in replaced.items():
            signal.signal(signum, handler)
        preemption.reset()


def test_signal_during_validation_saves_the_raw_weights(tmp_path, reference, monkeypatch, capsys):
    swapped_in = ExponentialMovingAverage.swapped_in

    @contextmanager
    def swapped_in_then_signalled(self):
        with swapped_in(self):  # the EMA weights are in the parameters now
            os.kill(os.getpid(), signal.SIGUSR2)
            yield

    monkeypatch.setattr(ExponentialMovingAverage, "swapped_in", swapped_in_then_signalled)
    run_dir = tmp_path / "run"
    with stop_on_sigusr2(), pytest.raises(preemption.Preempted, match=r"preempted after step 4 \(SIGUSR2\)"):
        fit_here(run_dir)
    assert_bitwise_equal(weights_at(run_dir, "step_00000004", step=4), weights_at(reference, "step_00000004", step=4))
    monkeypatch.undo()
    fit_here(run_dir)
    assert f"resumed from {checkpoint_dir(run_dir, 4)} at step 4" in capsys.readouterr().out
    assert_bitwise_equal(weights_at(run_dir), weights_at(reference))
    assert_each_step_logged_once(run_dir)


def test_signal_during_a_training_step_saves_that_step(tmp_path, reference, monkeypatch, capsys):
    train_step = StageTrainer._train_step

    def signalled_in_step_5(self):
        if self.progress.step == 4:
            os.kill(os.getpid(), signal.SIGUSR2)
        train_step(self)

    monkeypatch.setattr(StageTrainer, "_train_step", signalled_in_step_5)
    run_dir = tmp_path / "run"
    with stop_on_sigusr2(), pytest.raises(preemption.Preempted, match=r"preempted after step 5 \(SIGUSR2\)"):
        fit_here(run_dir)
    assert not checkpoint_dir(run_dir, 6).exists()
    monkeypatch.undo()
    fit_here(run_dir)
    assert f"resumed from {checkpoint_dir(run_dir, 5)} at step 5" in capsys.readouterr().out
    assert_bitwise_equal(weights_at(run_dir), weights_at(reference))
    assert_each_step_logged_once(run_dir)


# ----- errors name the file ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, damage, message",
    [
        ("state.pt", truncate, "state.pt: not a readable torch file"),
        ("state.pt", Path.unlink, "state.pt is missing"),
        ("extra_rank0.pt", garbage, "extra_rank0.pt: not a readable torch file"),
        ("strategy.json", break_json, "strategy.json: not a valid strategy record"),
    ],
)
def test_damaged_training_state_errors_name_the_file(tmp_path, name, damage, message):
    strategy = build(Scenario("single", conservative=False), single_process_dist(), seed=0)
    directory = tmp_path / "train_state"
    write_training_state(strategy, directory, extra={"step": 1})
    damage(directory / name)
    with pytest.raises(CheckpointError, match=message) as error:
        strategy.load_from(directory)
    assert str(directory / name) in str(error.value)


def test_a_second_fit_in_a_running_run_directory_is_refused(tmp_path, capsys):
    """Two fits in one directory would resume from each other's checkpoints and interleave
    their metrics: the second is refused, naming the first, and the first trains on."""
    run_dir = tmp_path / "run"
    command = [*fit_command(run_dir, 1), "direct.max_steps=200", "direct.checkpoint_every=1000"]
    process = subprocess.Popen(command, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while process.poll() is None and time.time() < deadline:
            if (run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 2:
                break
            time.sleep(0.01)
        for nproc in ("1", "2"):
            assert train_main(["fit", str(TINY), *OVERRIDES, f"run_dir={run_dir}", "--nproc", nproc]) == 2
            error = capsys.readouterr().err
            assert f"{run_dir} is in use by another esen-train fit (pid {process.pid} on " in error, error
        assert process.poll() is None, "the first run is still training"
    finally:
        process.kill()
        process.wait()
    steps = [row["step"] for row in read_metrics(run_dir) if row["split"] == "train"]
    assert steps == list(range(1, len(steps) + 1))
