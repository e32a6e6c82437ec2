"""Stopping cleanly when the job is told to stop: SLURM's time-limit or preemption warning
(USR2), a requeue or cancel (SIGTERM).

A signal can arrive anywhere: half-way through an optimizer step, during validation (when
the EMA weights are in the parameters), on one rank while the others wait in a collective.
So its handler only records it (`request_stop`). The trainer calls `stop_agreed()` at each
step boundary: one all-reduce of the flag, so every rank sees the request at the same step
even when the signal reached only some of them. Then all ranks save a checkpoint together
(the raw weights: validation is over) and the trainer raises `Preempted`; the launcher
(launch/job.py) lets submitit requeue the job, which resumes at the next step.
"""
from __future__ import annotations

import signal
from collections.abc import Callable, Iterable

import torch

from esen_train.engine import distributed

_received: list[str] = []  # names of the stop signals received since `reset()`


class Preempted(Exception):
    """Training stopped at a step boundary because a stop was requested; the checkpoint of
    that step is saved."""


def request_stop(reason: str) -> None:
    """Ask training to stop at the next step boundary. Safe to call from a signal handler."""
    _received.append(reason)


def stop_requested() -> str | None:
    """What asked this process to stop (the first signal's name), or None."""
    return _received[0] if _received else None


def stop_agreed(device: torch.device) -> bool:
    """Collective, at a step boundary: whether any rank was asked to stop."""
    flag = torch.tensor([1.0 if _received else 0.0], device=device)
    return bool(distributed.all_reduce_max(flag).item() > 0)


def reset() -> None:
    _received.clear()


def catch_signals(signals: Iterable[signal.Signals]) -> dict[signal.Signals, Callable | int | None]:
    """Make each signal only request a stop. Returns the handlers they replace, for the
    caller to run once training has stopped."""
    replaced = {}
    for signum in signals:
        replaced[signum] = signal.getsignal(signum)
        signal.signal(signum, _record_signal)
    return replaced


def _record_signal(signum: int, frame) -> None:
    request_stop(signal.Signals(signum).name)
