"""Train the stages of a config: `esen-train fit CONFIG [key=value ...] [--nproc N] [--quiet]`.

With --nproc N (N > 1) the command starts N local processes through torch.distributed.run,
each running this same command; a config that is wrong stops it before any process starts.

Ctrl-C (SIGINT) or SIGTERM stops training at the end of the step in progress, with that step
saved, and exits with 128 + the signal's number; the same command resumes it. In a single
process a second Ctrl-C quits at once (the steps since the last checkpoint are lost).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from esen_train.cli.common import fail, positive_int
from esen_train.engine import preemption
from esen_train.engine.config import (
    ConfigError,
    check_against_data,
    check_resume,
    load_train_config,
    strategy_for_processes,
)
from esen_train.engine.config_keys import config_keys_help
from esen_train.engine.run_lock import check_run_directory_free

HELP = "train the stages of a config"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = config_keys_help()
    parser.add_argument("config", help="a YAML path (configs/tiny.yaml) or a shipped config by name (tiny)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. direct.max_steps=100")
    parser.add_argument("--nproc", type=positive_int, default=1, help="start N local processes (torch.distributed.run)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines (same as logging.progress=false)")


def run(args: argparse.Namespace) -> int:
    if args.quiet:
        args.overrides = [*args.overrides, "logging.progress=false"]
    try:
        config = load_train_config(args.config, args.overrides)
        if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
            strategy = strategy_for_processes(config.strategy.name, args.overrides, f"--nproc asks for {args.nproc}")
            check_against_data(config)  # once here, rather than once per process
            check_resume(config)
            check_run_directory_free(Path(config.run_dir))
            return _launch_local_processes(args, config.run_dir, strategy)
        run_dir = _fit_until_stopped(config)
    except ConfigError as error:
        return fail("esen-train fit", error)
    if run_dir is None:
        received = preemption.stop_requested()
        _say_stopped(received or "another process's signal")
        return 128 + signal.Signals[received] if received in signal.Signals.__members__ else 1
    print(f"run directory: {run_dir}")
    return 0


def _fit_until_stopped(config):
    """`fit(config)`, with Ctrl-C and SIGTERM asking it to stop at a step boundary (the trainer
    saves that step); returns None when it stopped so. torch.distributed.run forwards the
    signal to every process; on its own, a second Ctrl-C quits at once."""
    from esen_train.engine.fit import fit

    preemption.reset()
    replaced = preemption.catch_signals((signal.SIGINT, signal.SIGTERM))
    if "WORLD_SIZE" not in os.environ:
        signal.signal(signal.SIGINT, _stop_then_quit)
    try:
        return fit(config)
    except preemption.Preempted:
        return None
    finally:
        for signum, handler in replaced.items():
            signal.signal(signum, handler)


def _stop_then_quit(signum: int, frame) -> None:
    if preemption.stop_requested():
        raise KeyboardInterrupt
    preemption.request_stop(signal.Signals(signum).name)
    print("\nesen-train fit: stopping after the step in progress, with it saved (Ctrl-C again quits now)",
          file=sys.stderr, flush=True)


def _launch_local_processes(args: argparse.Namespace, run_dir: str, strategy: list[str]) -> int:
    """Re-run this command under torch's launcher with N processes on this machine, with the
    `strategy` overrides of `strategy_for_processes`. The run directory is fixed here so every
    process agrees on it."""
    overrides = [o for o in args.overrides if not o.startswith("run_dir=")] + [f"run_dir={run_dir}"] + strategy
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
        "-m", "esen_train.cli", "fit", args.config, *overrides,
    ]
    launcher = subprocess.Popen(command)
    received = []  # the stop signals this process got

    def pass_on(signum: int, frame) -> None:  # `kill PID` reaches this process alone
        received.append(signal.Signals(signum).name)
        launcher.send_signal(signum)  # torch.distributed.run passes it to every process

    previous = signal.signal(signal.SIGTERM, pass_on)
    try:
        while True:
            try:
                code = launcher.wait()
                break
            except KeyboardInterrupt:  # Ctrl-C reached the processes too: wait while they save their step
                received.append("SIGINT")
    finally:
        signal.signal(signal.SIGTERM, previous)
    if received:  # torch.distributed.run reports the signal as its own failure
        _say_stopped(received[0])
        return 128 + signal.Signals[received[0]]
    return code


def _say_stopped(reason: str) -> None:
    print(f"esen-train fit: stopped by {reason}; every completed step is saved: the same command resumes",
          file=sys.stderr)
