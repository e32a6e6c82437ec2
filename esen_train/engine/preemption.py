"""What the trainer does when SLURM warns that the job is about to stop.

submitit calls its `checkpoint()` hook on rank 0 from a signal handler (time-out or
preemption). The launcher forwards that to `checkpoint_now()`; the running trainer has
registered a callback that saves a checkpoint when it can do so without collectives.
"""
from __future__ import annotations

from typing import Callable

_callbacks: list[Callable[[], None]] = []


def register_checkpoint_callback(callback: Callable[[], None]) -> None:
    _callbacks.append(callback)


def clear() -> None:
    _callbacks.clear()


def checkpoint_now() -> bool:
    """Run the registered callbacks; return whether there was any to run."""
    for callback in list(_callbacks):
        callback()
    return bool(_callbacks)
