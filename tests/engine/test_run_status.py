"""Watching real training runs: the progress lines in a log file, RUN/status.json and
`esen-train status` for runs that finished, stopped early, failed, were preempted, are still
running or were killed; `--quiet`; early stopping and the reason each stage ended."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from esen_train.cli.train import main as esen_train
from esen_train.data.manifest import DatasetError
from esen_train.engine import preemption
from esen_train.engine.config import load_train_config
from esen_train.engine.early_stopping import end_reason, record_validation
from esen_train.engine.fit import fit
from esen_train.engine.status import read_status
from esen_train.engine.tracking import read_metrics
from esen_train.engine.trainer import Progress, StageTrainer

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
SHORT = ["data.emt_structures=40", "stages=[direct]", "direct.max_atoms=64", "logging.wandb.mode=disabled"]
# lr = 0: the weights never change, so every validation after the first brings no new best.
# lr 1e-30 moves no float32 weight (the update rounds away), so no validation after the first
# is a new best and patience 2 stops the stage at step 6.
EARLY_STOPPING = [*SHORT, "direct.max_steps=20", "direct.lr=1e-30", "direct.log_every=2", "direct.val_every=2",
                  "direct.checkpoint_every=2", "direct.patience=2"]
TRAIN_LINE = (r"^direct (\d+)/20 steps \(\d+%\) \| loss \S+  E MAE \S+ meV/atom  F MAE \S+ meV/Å  S MAE \S+ meV/Å³  "
              r"lr \S+  grad norm \S+  \S+ atoms/s \| \S+ steps/s \| elapsed \d+:\d\d:\d\d \| left \d+:\d\d:\d\d$")


def fit_command(run_dir: Path, overrides: list[str], *options: str) -> list[str]:
    return [sys.executable, "-m", "esen_train.cli", "fit", str(TINY), *overrides, f"run_dir={run_dir}", *options]


def status_text(run_dir: Path, capsys) -> str:
    capsys.readouterr()
    assert esen_train(["status", str(run_dir)]) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def early_stopped_run(tmp_path_factory) -> tuple[Path, str]:
    """`esen-train fit` with its output going to a file, as in a SLURM log."""
    run_dir = tmp_path_factory.mktemp("early") / "run"
    log = run_dir.parent / "log.out"
    with log.open("w") as stream:
        subprocess.run(fit_command(run_dir, EARLY_STOPPING), stdout=stream, stderr=subprocess.STDOUT, check=True,
                       timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return run_dir, log.read_text()


@pytest.mark.slow
def test_a_log_file_gets_one_plain_line_per_log_step_and_validation(early_stopped_run):
    _, log = early_stopped_run
    assert "\r" not in log
    assert [int(m.group(1)) for m in re.finditer(TRAIN_LINE, log, re.M)] == [2, 4, 6]
    validations = re.findall(r"^direct validation at step (\d+)/20 \| E MAE \S+ meV/atom  F MAE \S+ meV/Å  "
                             r"S MAE \S+ meV/Å³  F cos \S+ \| best force_mae_mev_per_A \S+ at step 2$", log, re.M)
    assert validations == ["2", "4", "6"]
    assert re.search(r"^direct ended at step 6/20: early stopping: no better force_mae_mev_per_A in the last 2 "
                     r"validations \(patience 2\) \| best force_mae_mev_per_A \S+ at step 2 \| elapsed \d+:\d\d:\d\d$",
                     log, re.M)


@pytest.mark.slow
def test_early_stopping_ends_the_stage_and_says_why(early_stopped_run, capsys):
    run_dir, _ = early_stopped_run
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows if row["split"] == "train"] == [2, 4, 6]
    end = [row for row in rows if row["split"] == "end"]
    assert end == [{"stage": "direct", "split": "end", "step": 6, "global_step": 6, "reason": "early_stopping",
                    "best_metric": "force_mae_mev_per_A", "best_value": end[0]["best_value"], "best_step": 2}]
    status = read_status(run_dir)
    assert status["state"] == "finished" and status["error"] is None
    direct = status["stages"]["direct"]
    assert (direct["state"], direct["end_reason"], direct["step"], direct["max_steps"]) == ("ended", "early_stopping", 6, 20)
    best = run_dir / "checkpoints" / "direct" / "best"
    assert direct["best"] == {"metric": "force_mae_mev_per_A", "value": end[0]["best_value"], "step": 2,
                              "checkpoint": str(best.resolve())}
    assert status["last_checkpoint"] == str((run_dir / "checkpoints" / "direct" / "last").resolve())
    text = status_text(run_dir, capsys)
    assert re.search(r"^state +finished$", text, re.M)
    assert re.search(rf"^best direct +force_mae_mev_per_A \S+ at step 2: {re.escape(str(best.resolve()))}$", text, re.M)
    assert "direct ended at step 6/20 (early stopping)" in text


@pytest.mark.slow
def test_a_stage_that_stopped_early_stays_stopped_when_started_again(early_stopped_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(early_stopped_run[0], run_dir, symlinks=True)
    fit(load_train_config(TINY, [*EARLY_STOPPING, f"run_dir={run_dir}"]))
    rows = read_metrics(run_dir)
    assert max(row["step"] for row in rows) == 6
    assert [row["reason"] for row in rows if row["split"] == "end"] == ["early_stopping"]  # ended once, not twice
    assert read_status(run_dir)["stages"]["direct"]["end_reason"] == "early_stopping"


@pytest.mark.slow
def test_a_run_in_progress_then_killed_and_quiet(tmp_path, capsys):
    """A run still training: `status` says running, with steps and time left; then SIGKILL:
    `status` says its process is gone. With --quiet its log has no progress lines."""
    run_dir, log = tmp_path / "run", tmp_path / "log.out"
    overrides = [*SHORT, "direct.max_steps=1000", "direct.val_every=1000", "direct.log_every=1", "direct.checkpoint_every=2"]
    with log.open("w") as stream:
        process = subprocess.Popen(fit_command(run_dir, overrides, "--quiet"), stdout=stream, stderr=subprocess.STDOUT,
                                   start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            status = read_status(run_dir) if (run_dir / "status.json").is_file() else {}
            if status and status["stages"]["direct"]["step"] >= 3 and status["last_checkpoint"]:
                break
            time.sleep(0.2)
        assert process.poll() is None, log.read_text()[-3000:]
        status = read_status(run_dir)
        direct = status["stages"]["direct"]
        assert status["state"] == "running" and status["process_alive"] is True and status["pid"] != os.getpid()
        assert direct["state"] == "running" and direct["max_steps"] == 1000 and direct["time_left_s"] > 0
        assert direct["train"]["step"] == direct["step"] and direct["train"]["loss"] > 0
        text = status_text(run_dir, capsys)
        assert re.search(r"^state +running \(updated \d+:\d\d:\d\d ago; pid \d+ on ", text, re.M)
        assert re.search(r"^time left +\d+:\d\d:\d\d in this stage$", text, re.M)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    status = read_status(run_dir)
    assert status["state"] == "running" and status["process_alive"] is False
    assert "is gone (killed?); start the same command again to resume" in status_text(run_dir, capsys)
    assert not re.search(r"^direct ", log.read_text(), re.M)  # --quiet: no progress lines


def test_an_error_during_training_fails_the_run_with_the_message(tmp_path, monkeypatch, capsys):
    """A bad config or data path is refused before the run directory exists (tests/engine/test_config_checks.py);
    what goes wrong later (a shard that cannot be read, a crash) marks the run failed."""
    run_dir = tmp_path / "run"
    train_step = StageTrainer._train_step

    def unreadable_after_step_2(self):
        if self.progress.step == 2:
            raise DatasetError("shard_00000.lmdb record 7: checksum mismatch")
        train_step(self)

    monkeypatch.setattr(StageTrainer, "_train_step", unreadable_after_step_2)
    with pytest.raises(DatasetError):
        fit(load_train_config(TINY, [*SHORT, f"run_dir={run_dir}"]))
    status = read_status(run_dir)
    assert status["state"] == "failed" and status["error"] == "DatasetError: shard_00000.lmdb record 7: checksum mismatch"
    assert status["stages"]["direct"]["end_reason"] == "failed"
    assert re.search(r"^state +failed: DatasetError: shard_00000\.lmdb record 7", status_text(run_dir, capsys), re.M)


def test_preemption_is_recorded_and_the_requeued_run_finishes(tmp_path, monkeypatch, capsys):
    """What SLURM's warning does in a task (esen_train.launch.job): the signal asks for a stop
    during step 3; the trainer saves step 3 and stops."""
    overrides = [*SHORT, "direct.max_steps=6", "direct.val_every=6", "direct.checkpoint_every=100", "direct.log_every=2",
                 f"run_dir={tmp_path}"]
    train_step = StageTrainer._train_step

    def preempted_in_step_3(self):
        if self.progress.step == 2:
            preemption.request_stop("SIGUSR2")  # what the signal handler does
        train_step(self)

    monkeypatch.setattr(StageTrainer, "_train_step", preempted_in_step_3)
    try:
        with pytest.raises(preemption.Preempted):
            fit(load_train_config(TINY, overrides))
    finally:
        preemption.reset()
    assert "direct preempted after step 3 (SIGUSR2)" in capsys.readouterr().out
    status = read_status(tmp_path)
    assert status["state"] == "preempted" and status["error"] is None
    assert status["stages"]["direct"]["end_reason"] == "preempted"
    assert status["stages"]["direct"]["step"] == 3  # the step saved, though the last one logged is 2
    assert status["last_checkpoint"] == str(tmp_path / "checkpoints" / "direct" / "step_00000003")
    text = status_text(tmp_path, capsys)
    assert "start the same command again to resume" in text  # not in a SLURM job
    assert "direct ended at step 3/6 (stopped by a signal, with its step saved" in text

    monkeypatch.setattr(StageTrainer, "_train_step", train_step)
    fit(load_train_config(TINY, overrides))
    status = read_status(tmp_path)
    assert status["state"] == "finished"
    assert status["stages"]["direct"]["end_reason"] == "max_steps" and status["stages"]["direct"]["step"] == 6
    assert [row["step"] for row in read_metrics(tmp_path) if row["split"] == "train"] == [2, 4, 6]


def test_status_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert esen_train(["status", str(tmp_path / "not-yet")]) == 2
    assert "status.json not found" in capsys.readouterr().err


def test_best_and_patience_counting():
    progress = Progress()
    for step, value, best in ((2, 5.0, True), (4, 5.0, False), (6, 4.0, True), (8, 4.5, False), (10, 6.0, False)):
        progress.step = step
        assert record_validation(progress, {"force_mae_mev_per_A": value, "energy_mae_mev_per_atom": 1.0},
                                 "force_mae_mev_per_A") is best
    assert (progress.best_value, progress.best_step, progress.validations_since_best) == (4.0, 6, 2)
    assert end_reason(progress, max_steps=100, patience=0) is None  # off by default
    assert end_reason(progress, max_steps=100, patience=3) is None
    assert end_reason(progress, max_steps=100, patience=2) == "early_stopping"
    assert end_reason(progress, max_steps=10, patience=2) == "max_steps"
