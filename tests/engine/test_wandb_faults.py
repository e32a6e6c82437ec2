"""Tracking never stops training. Real wandb runs:
- an API key but no way to reach the server (a compute node without internet), pointed at a
  closed port on the loopback: the run falls back to offline with one warning, the job
  trains, and the offline run reads back with its metrics;
- wandb's own process killed (SLURM sends SIGTERM to every process of a job it requeues):
  training goes on, with every row in metrics.jsonl.
"""
import json
import signal
from pathlib import Path

import psutil
import pytest

from esen_train.engine.config import load_train_config
from esen_train.engine.fit import fit
from esen_train.engine.tracking import RunLogger
from tests.wandb_offline import find_run_files, read_offline_run

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def test_unreachable_server_falls_back_to_offline_and_trains(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef" * 2 + "01234567")  # 40 characters, as wandb keys
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: nothing listens there
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")  # and nothing is sent anywhere else
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "run"
    config = load_train_config(TINY, [
        "data.emt_structures=20", "stages=[direct]", "direct.max_steps=2", "direct.val_every=2",
        "direct.log_every=1", "direct.max_atoms=64", "logging.wandb.mode=''", "logging.wandb.init_timeout_s=3",
        f"run_dir={run_dir}",
    ])
    with pytest.warns(UserWarning) as warned:
        fit(config)
    fallbacks = [str(w.message) for w in warned if "wandb could not start an online run" in str(w.message)]
    assert len(fallbacks) == 1 and "logging offline" in fallbacks[0]
    assert (run_dir / "checkpoints" / "direct" / "last" / "model.pt").is_file()
    # One offline run, nothing left of the failed online attempt.
    [run_file] = find_run_files(run_dir / "wandb")
    assert not list((run_dir / "wandb").glob("run-*"))
    run = read_offline_run(run_file)
    assert run["run_id"] == (run_dir / "wandb_run_id").read_text().strip()
    assert [row["direct/train/loss"] is not None for row in run["history"] if "direct/train/loss" in row] == [True, True]


def test_wandb_process_killed_mid_run_leaves_training_and_metrics_going(tmp_path):
    config = load_train_config(TINY, ["logging.wandb.mode=offline", f"run_dir={tmp_path}"])
    logger = RunLogger(tmp_path, config, world_size=1, enabled=True)
    row = {"stage": "direct", "split": "train", "global_step": 1, "loss": 1.0}
    logger.log({**row, "step": 1})
    service = [child for child in psutil.Process().children(recursive=True) if child.name() == "wandb-core"]
    assert service
    for process in service:
        process.send_signal(signal.SIGTERM)
    psutil.wait_procs(service, timeout=30)
    with pytest.warns(UserWarning, match="wandb stopped working") as warned:
        for step in (2, 3):
            logger.log({**row, "step": step})
        logger.close()
    assert len(warned) == 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
