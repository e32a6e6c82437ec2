"""The function each SLURM (or local) task runs: what `esen-train fit` runs, in-process, requeueable.

submitit pickles a `TrainingJob` at submission and calls it once per task. Every task exports
the torch.distributed environment from SLURM's (MASTER_ADDR is the first host of the job's
node list), then runs the trainer, which joins the process group from that environment.
A job for the local executor carries its own rendezvous instead: loopback and a port that was
free at submission, because submitit's choice (this machine's host name and a port drawn from
the job id) can name a port already in use, and then rank 0 fails while the other ranks wait
for it until the process-group timeout.

On a time-out or preemption SLURM sends USR2 (submitit's signal) to every task; a requeue
(`scontrol requeue`) or cancel sends SIGTERM. Both only ask the trainer to stop
(engine/preemption.py): at the next step boundary the ranks agree, save that step together
and stop. Only then does each task run the handler submitit installed for the signal: for
USR2, on rank 0, it calls `checkpoint()`, which returns this same job, and requeues the job;
a SIGTERM'd job is requeued (or cancelled) by SLURM itself. The requeued job runs the same
config with the same run_dir, so the trainer resumes at the step after the saved one, and
logs to the same wandb run (RUN/wandb_run_id).

A run that SLURM is stopping must not leave a result behind: submitit writes every task's
exception to a result file, and a client waiting on the job (`esen-launch --wait`) would take
it for the job's outcome although the requeued job is about to run. So once USR2 or SIGTERM
has arrived, the task ends without a result, also when the trainer fails (a dead peer, a
killed wandb process); the requeued run, or SLURM's accounting, tells the real outcome.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

import submitit

from esen_train.engine import preemption
from esen_train.engine.config import load_train_config
from esen_train.engine.fit import fit

log = logging.getLogger(__name__)


class TrainingJob(submitit.helpers.Checkpointable):
    def __init__(self, config: str, overrides: list[str], local_master_port: int | None = None) -> None:
        self.config = config
        self.overrides = list(overrides)  # training overrides, including run_dir=<absolute path>
        self.local_master_port = local_master_port  # set for the local executor only

    def __call__(self) -> None:
        preemption.reset()
        # USR2: submitit's time-out/preemption signal (sbatch --signal=USR2@signal_delay_s).
        submitit_handlers = preemption.catch_signals((signal.SIGUSR2, signal.SIGTERM))
        # overwrite=True: SLURM copies the submitting shell's environment into the job, and a
        # stale RANK or MASTER_ADDR from there must not win over this job's own.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if self.local_master_port is not None:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(self.local_master_port))
        try:
            run_dir = fit(load_train_config(self.config, self.overrides))
        except preemption.Preempted:  # the trainer saved the step it was at and said so
            _run_submitit_handler(submitit_handlers)
            sys.exit(1)  # no result: the requeued job, or SLURM's accounting, tells the outcome
        except Exception:
            if not preemption.stop_requested():
                raise
            log.exception("training stopped by SLURM; leaving no result for this run")
            sys.exit(1)
        print(f"run directory: {run_dir}")

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """What submitit requeues: this same job (the trainer has saved its checkpoint)."""
        return submitit.helpers.DelayedSubmission(self)


def _run_submitit_handler(handlers: dict) -> None:
    """Run the handler that submitit installed for the signal that stopped training, as if the
    signal arrived now. For USR2 on rank 0 it calls `checkpoint()`, requeues the job and exits
    (or raises UncompletedJobError when the job timed out too often: that result must reach
    the client); on other ranks, and for SIGTERM, it only logs. A task that got no signal
    itself (another rank's stopped training) has none to run."""
    received = preemption.stop_requested()
    signum = signal.Signals[received] if received in signal.Signals.__members__ else None
    handler = handlers.get(signum)
    if callable(handler):
        handler(signum, None)
