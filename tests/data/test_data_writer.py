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
from esen_train.data.manifest import DatasetError, Manifest
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
    assert f"removed {leftover}: left unfinished by a writer that is gone" in result.stderr
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


# A command run in a child process with one function of esen_train.data patched to SIGKILL the
# process at a chosen point: a real kill, at a moment timing alone would rarely hit.
KILLED_AT = """
import os, signal, sys
from esen_train.data import writer
{patch}
from esen_train.cli.data import main
sys.exit(main(sys.argv[1:]))
"""


def run_killed(patch: str, *argv: str) -> subprocess.CompletedProcess:
    script = KILLED_AT.format(patch=patch)
    return subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=300)


def run_esen_data(*argv: str) -> subprocess.CompletedProcess:
    return run_killed("", *argv)


def emt_dataset(tmp_path: Path, num: int) -> tuple[Path, Path]:
    """TMP/emt.xyz of `num` EMT structures, converted to the dataset TMP/data."""
    source, out = tmp_path / "emt.xyz", tmp_path / "data"
    write_emt_extxyz(source, num=num, seed=0)
    assert run_esen_data("convert", str(source), "--out", str(out), "--quiet").returncode == 0
    return source, out


def test_an_overwrite_killed_halfway_loses_nothing(tmp_path):
    """Where directories cannot be exchanged atomically, the old dataset is renamed aside
    first; killed right after that, the next writer beside it puts the old one back."""
    _, out = emt_dataset(tmp_path, 12)
    patch = (
        "writer.exchange_paths = lambda first, second: False\n"
        "real_replace = os.replace\n"
        "def replace(source, target):\n"
        "    real_replace(source, target)\n"
        "    if str(target).endswith('/dataset'): os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.replace = replace\n"
    )
    smaller = tmp_path / "smaller.xyz"
    write_emt_extxyz(smaller, num=5, seed=1)
    killed = run_killed(patch, "convert", str(smaller), "--out", str(out), "--overwrite", "--quiet")
    assert killed.returncode == -signal.SIGKILL
    with pytest.raises(DatasetError, match="a writer replacing it died halfway and left the previous dataset in"):
        Manifest.load(out)

    other = run_esen_data("convert", str(smaller), "--out", str(tmp_path / "other"), "--quiet")
    assert other.returncode == 0, other.stderr
    assert f"restored {out}: a writer replacing it died before the new dataset was in place" in other.stderr
    assert Manifest.load(out).num_structures == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "emt.xyz", "other", "smaller.xyz"]


def test_an_overwrite_replaces_the_dataset_in_one_exchange(tmp_path):
    source, out = emt_dataset(tmp_path, 6)
    patch = (
        "real_exchange = writer.exchange_paths\n"
        "def exchange(first, second):\n"
        "    assert real_exchange(first, second)\n"
        "    print('exchanged', flush=True)\n"
        "    return True\n"
        "writer.exchange_paths = exchange\n"
    )
    result = run_killed(patch, "convert", str(source), "--out", str(out), "--overwrite", "--quiet")
    assert result.returncode == 0 and "exchanged" in result.stdout, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "emt.xyz"]


def test_a_split_killed_before_its_last_part_is_written_changes_no_part(tmp_path):
    _, data = emt_dataset(tmp_path, 30)
    prefix = tmp_path / "part"
    assert run_esen_data("split", str(data), "--out", str(prefix), "--seed", "0").returncode == 0
    patch = (
        "real_seal, sealed = writer.DatasetWriter.seal, []\n"
        "def seal(self):\n"
        "    sealed.append(self)\n"
        "    if len(sealed) == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real_seal(self)\n"
        "writer.DatasetWriter.seal = seal\n"
    )
    killed = run_killed(patch, "split", str(data), "--out", str(prefix), "--seed", "1", "--overwrite")
    assert killed.returncode == -signal.SIGKILL
    seeds = {name: Manifest.load(f"{prefix}_{name}").provenance["options"]["seed"] for name in ("train", "val", "test")}
    assert seeds == {"train": 0, "val": 0, "test": 0}


def test_conversion_workers_end_with_a_killed_conversion(tmp_path):
    small = tmp_path / "small.xyz"
    write_emt_extxyz(small, num=20, seed=0)
    big = tmp_path / "big.xyz"
    big.write_text(small.read_text() * 500)
    command = [*convert_command(big, tmp_path / "data")[:-1], str(tmp_path / "data"), "--workers", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    workers = []
    while len(workers) < 2 and process.poll() is None and time.monotonic() < deadline:
        workers = children_of(process.pid)
        time.sleep(0.01)
    assert len(workers) == 2
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in workers)


def children_of(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"
