"""The function each SLURM (or local) task runs: `esen-train fit` in-process, requeueable.

submitit pickles a `TrainingJob` at submission and calls it once per task. Every task exports
the torch.distributed environment from SLURM's (MASTER_ADDR is the first host of the job's
node list), then runs the trainer, which joins the process group from that environment.
A job for the local executor carries its own rendezvous instead: loopback and a port that was
free at submission, because submitit's choice (this machine's host name and a port drawn from
the job id) can name a port already in use, and then rank 0 fails while the other ranks wait
for it until the process-group timeout.

On a time-out or preemption SLURM sends USR2 (submitit's signal) to every task; on rank 0
submitit calls `checkpoint()`, which asks the running trainer to save a checkpoint and returns
this same job for submitit to requeue. The requeued job runs the same config with the same
run_dir, so the trainer resumes from `checkpoints/<stage>/last` and the same wandb run
(RUN/wandb_run_id).

A run that SLURM is stopping must not leave a result behind: submitit writes every task's
exception to a result file, and a client waiting on the job (`esen-launch --wait`) would take
it for the job's outcome although the requeued job is about to run. So once USR2 or SIGTERM
has arrived (requeue, time-out, cancel), an error in the trainer (a dead peer, a killed wandb
process) ends the task without a result; the requeued run, or SLURM's accounting, tells the
real outcome.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

import submitit
from submitit.core.utils import UncompletedJobError

from esen_train.cli import main as esen_train_main
from esen_train.engine import preemption

log = logging.getLogger(__name__)


class TrainingJob(submitit.helpers.Checkpointable):
    def __init__(self, config: str, overrides: list[str], local_master_port: int | None = None) -> None:
        self.config = config
        self.overrides = list(overrides)  # training overrides, including run_dir=<absolute path>
        self.local_master_port = local_master_port  # set for the local executor only
        self._stopping = False

    def __call__(self) -> None:
        self._stopping = False
        self._watch_stop_signals()
        # overwrite=True: SLURM copies the submitting shell's environment into the job, and a
        # stale RANK or MASTER_ADDR from there must not win over this job's own.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if self.local_master_port is not None:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(self.local_master_port))
        try:
            status = esen_train_main(["fit", self.config, *self.overrides])
        except UncompletedJobError:
            raise  # submitit's own verdict (e.g. timed out too many times): it must reach the client
        except Exception:
            if not self._stopping:
                raise
            log.exception("training stopped by SLURM; leaving no result for this run")
            sys.exit(1)
        if status:
            raise RuntimeError(f"esen-train fit {self.config} {' '.join(self.overrides)} exited with status {status}")

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        asked = preemption.checkpoint_now()
        log.warning("time-out or preemption: %s; requeueing", "asked the trainer to checkpoint" if asked else "training had not started")
        return submitit.helpers.DelayedSubmission(self)

    def _watch_stop_signals(self) -> None:
        """Note USR2 and SIGTERM, then let submitit's handlers (checkpoint, requeue, log) run."""
        # USR2: submitit's time-out/preemption signal (sbatch --signal=USR2@signal_delay_s).
        for signum in (signal.SIGUSR2, signal.SIGTERM):
            previous = signal.getsignal(signum)

            def note_and_forward(number, frame, previous=previous):
                self._stopping = True
                if callable(previous):
                    previous(number, frame)

            signal.signal(signum, note_and_forward)
