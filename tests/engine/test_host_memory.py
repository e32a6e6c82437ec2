"""keep_freed_host_memory: large CPU tensors reuse freed memory instead of page-faulting fresh
mappings, and `fit` applies it when the config says so."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from esen_train.engine import distributed, host_memory
from esen_train.engine.config import load_train_config

fit_module = importlib.import_module("esen_train.engine.fit")

# Eight steps, each making three 64 MiB tensors (above glibc's largest mmap threshold) and
# freeing them; the minor page faults of the last four steps: a fresh mapping faults in every
# page, reused heap memory none.
PAGE_FAULTS = """
import json, resource, sys, torch
from esen_train.engine.host_memory import keep_freed_host_memory
applied = keep_freed_host_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(16 * 2**20) for _ in range(3)]
    del tensors
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": sum(faults[4:])}))
"""


def page_faults(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_host_memory_is_reused_instead_of_faulted_in_again():
    pages_per_tensor = 64 * 2**20 // 4096
    default, kept = page_faults("default"), page_faults("keep")
    assert default["faults"] >= 4 * 3 * pages_per_tensor * 0.9  # every allocation is a fresh mapping
    assert kept["applied"] is True
    assert kept["faults"] < pages_per_tensor  # freed blocks are reused


def test_the_heap_is_never_trimmed_whatever_its_size(monkeypatch):
    """The trim threshold is -1 (mallopt(3): never trim), not a positive int: the largest,
    2^31 - 1, is 2 GiB, less than esen-30m's conservative step frees at once, and with it glibc
    gives that memory back to the kernel, to be faulted in again at the next step
    (benchmarks/README.md, "The heap's trim threshold")."""
    calls = []

    def mallopt(parameter, value):
        calls.append((parameter, value))
        return 1

    glibc = type("FakeGlibc", (), {"gnu_get_libc_version": staticmethod(lambda: b"2.36")})()
    glibc.mallopt = mallopt
    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda name: glibc)
    assert host_memory.keep_freed_host_memory.__wrapped__() is True
    assert dict(calls) == {host_memory.M_MMAP_MAX: 0, host_memory.M_TRIM_THRESHOLD: -1}


@pytest.mark.parametrize("keep", [True, False])
def test_fit_applies_the_setting_before_training(tmp_path, monkeypatch, keep):
    class Joined(Exception):
        pass

    calls = []
    monkeypatch.setattr(fit_module, "keep_freed_host_memory", lambda: calls.append("kept"))
    monkeypatch.setattr(distributed, "init_distributed", lambda timeout_s: (_ for _ in ()).throw(Joined()))
    config = load_train_config("tiny", [f"run_dir={tmp_path / 'run'}", f"keep_freed_host_memory={keep}"])
    with pytest.raises(Joined):
        fit_module.fit(config)
    assert calls == (["kept"] if keep else [])
