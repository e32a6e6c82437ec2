"""The function each SLURM (or local) task runs: `esen-train fit` in-process, requeueable.

submitit pickles a `TrainingJob` at submission and calls it once per task. Every task exports
the torch.distributed environment from SLURM's (MASTER_ADDR is the first host of the job's
node list), then runs the trainer, which joins the process group from that environment.

On a time-out or preemption SLURM sends USR2 (submitit's signal) to every task; on rank 0
submitit calls `checkpoint()`, which asks the running trainer to save a checkpoint and returns
this same job for submitit to requeue. The requeued job runs the same config with the same
run_dir, so the trainer resumes from `checkpoints/<stage>/last` and the same wandb run
(RUN/wandb_run_id).
"""
from __future__ import annotations

import logging

import submitit

from esen_train.cli import main as esen_train_main
from esen_train.engine import preemption

log = logging.getLogger(__name__)


class TrainingJob(submitit.helpers.Checkpointable):
    def __init__(self, config: str, overrides: list[str]) -> None:
        self.config = config
        self.overrides = list(overrides)  # training overrides, including run_dir=<absolute path>

    def __call__(self) -> None:
        # overwrite=True: SLURM copies the submitting shell's environment into the job, and a
        # stale RANK or MASTER_ADDR from there must not win over this job's own.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        status = esen_train_main(["fit", self.config, *self.overrides])
        if status:
            raise RuntimeError(f"esen-train fit {self.config} {' '.join(self.overrides)} exited with status {status}")

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        saved = preemption.checkpoint_now()
        log.warning("time-out or preemption: %s; requeueing", "checkpoint saved" if saved else "no trainer running yet")
        return submitit.helpers.DelayedSubmission(self)
