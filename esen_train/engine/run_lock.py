"""One `esen-train fit` per run directory at a time.

Two runs in one directory would resume from each other's checkpoints, refuse to write over
them and interleave their metrics. So rank 0 holds an exclusive lock on RUN/fit.lock for the
whole run (`flock`: the kernel releases it when the process ends, however it ends, so a killed
run never leaves a stale lock), and a second start is refused with the holder's host and pid.
On a file system without locks the run goes on unlocked, with a warning.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from esen_train.engine.config import ConfigError

LOCK_FILE = "fit.lock"
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


class RunDirectoryInUse(ConfigError):
    """Another `esen-train fit` holds the run directory."""


@contextmanager
def exclusive_run(run_dir: Path) -> Iterator[None]:
    """Hold RUN/fit.lock while the block runs; raise RunDirectoryInUse if another process does."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, "a+") as handle:
        locked = _try_lock(handle, run_dir)
        if locked:
            holder = {"host": socket.gethostname(), "pid": os.getpid(),
                      "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(holder) + "\n")
            handle.flush()
        try:
            yield
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)


def check_run_directory_free(run_dir: Path) -> None:
    """Raise RunDirectoryInUse now if a run holds `run_dir` (a launcher's early check: the
    processes it starts take the lock themselves)."""
    if (run_dir / LOCK_FILE).is_file():
        with exclusive_run(run_dir):
            pass


def _try_lock(handle, run_dir: Path) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        handle.seek(0)
        raise RunDirectoryInUse(
            f"{run_dir} is in use by another esen-train fit ({_describe_holder(handle.read())}); two runs in "
            f"one directory would write over each other's checkpoints and metrics: wait for it to end, "
            f"or stop it (`esen-train status {run_dir}` says where it runs)"
        ) from None
    except OSError as error:
        if error.errno not in _NO_LOCKS:
            raise
        warnings.warn(f"{run_dir / LOCK_FILE}: this file system has no locks ({error.strerror}); nothing stops a "
                      "second esen-train fit in the same run directory", stacklevel=3)
        return False


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "its process did not say which"
