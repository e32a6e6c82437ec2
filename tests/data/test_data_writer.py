"""What a killed conversion leaves behind: its hidden `.NAME.partial-*` directory, which the
next conversion into the same directory removes once its writer is gone (a real
`esen-data convert` killed with SIGKILL), while the partial outputs of running writers stay."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from esen_train.data.emt import write_emt_extxyz
from esen_train.data.manifest import Manifest
from esen_train.data.writer import STALE_PARTIAL_AGE_S, remove_stale_partials


def convert_command(source: Path, out: Path) -> list[str]:
    esen_data = "import sys; from esen_train.cli.data import main; sys.exit(main())"
    return [sys.executable, "-c", esen_data, "convert", str(source), "--out", str(out)]


def test_partial_output_of_a_killed_convert_is_removed_by_the_next(tmp_path):
    small = tmp_path / "small.xyz"
    write_emt_extxyz(small, num=20, seed=0)
    big = tmp_path / "big.xyz"
    big.write_text(small.read_text() * 500)  # 10,000 structures: seconds of converting
    out = tmp_path / "data" / "mine"
    out.parent.mkdir()
    process = subprocess.Popen(convert_command(big, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(".mine.partial-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    [leftover] = out.parent.glob(".mine.partial-*")
    assert leftover.name.startswith(f".mine.partial-{socket.gethostname()}-{process.pid}-")

    result = subprocess.run(convert_command(small, out), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"removed {leftover}: the unfinished output of a writer that is gone" in result.stderr
    assert sorted(path.name for path in out.parent.iterdir()) == ["mine"]
    assert Manifest.load(out).num_structures == 20


def partial(parent: Path, host: str, pid: int) -> Path:
    directory = parent / f".mine.partial-{host}-{pid}-k3x_9a"
    directory.mkdir()
    (directory / "shard_00000.lmdb").write_bytes(b"\0" * 64)
    return directory


def age(directory: Path, seconds: float) -> None:
    then = time.time() - seconds
    for path in [directory, *directory.iterdir()]:
        os.utime(path, (then, then))


def test_partials_of_running_writers_stay_until_nothing_changed_for_a_day(tmp_path):
    here = socket.gethostname()
    running = partial(tmp_path, here, os.getpid())
    elsewhere = partial(tmp_path, "other-node-07", 12345)  # a process this host cannot look up
    abandoned = partial(tmp_path, "other-node-08", 12345)
    age(abandoned, STALE_PARTIAL_AGE_S + 60)
    age(running, STALE_PARTIAL_AGE_S - 60)
    assert remove_stale_partials(tmp_path) == [abandoned]
    assert running.is_dir() and elsewhere.is_dir() and not abandoned.exists()


@pytest.mark.parametrize("name", [".mine.partial-abc123", ".mine.partial-host-12-ab_c"])
def test_a_partial_in_which_nothing_changed_for_a_day_is_removed_whatever_its_name(tmp_path, name):
    directory = tmp_path / name
    directory.mkdir()
    age(directory, STALE_PARTIAL_AGE_S + 60)
    assert remove_stale_partials(tmp_path) == [directory]
