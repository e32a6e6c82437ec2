"""Kill a real training process with SIGKILL mid-run, start the same command again, and
end with the same weights as a run that was never interrupted."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from esen_train.engine.tracking import read_metrics
from esen_train.evaluation.checkpoint import read_model_file

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
STEPS = 12
OVERRIDES = [
    "data.emt_structures=40", "stages=[direct]", f"direct.max_steps={STEPS}", "direct.max_atoms=64",
    "direct.checkpoint_every=2", "direct.val_every=4", "direct.log_every=1", "logging.wandb.mode=disabled",
]


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


def final_weights(run_dir: Path) -> dict:
    payload = read_model_file(run_dir / "checkpoints" / "direct" / "last" / "model.pt")
    assert payload["step"] == STEPS
    return {**{f"model.{k}": v for k, v in payload["model"].items()}, **{f"ema.{k}": v for k, v in payload["ema"].items()}}


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, nproc):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    run_uninterrupted(reference, nproc)
    resumed_from = run_killed_then_resumed(interrupted, nproc)
    expected, actual = final_weights(reference), final_weights(interrupted)
    assert expected.keys() == actual.keys()
    for name in expected:
        if nproc == 1:
            assert torch.equal(expected[name], actual[name]), f"{name} differs after resume from step {resumed_from}"
        else:
            torch.testing.assert_close(actual[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)
    # Steps repeated after the resume are logged once, not twice.
    steps = [row["step"] for row in read_metrics(interrupted) if row["split"] == "train"]
    assert steps == list(range(1, STEPS + 1))
