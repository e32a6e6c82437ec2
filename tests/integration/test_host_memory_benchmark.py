"""benchmarks/host_memory.py: fresh processes per mode, and keeping freed memory removes the
page faults of the conservative step (Cu108, the median of five steps per mode: while the heap
grows to its steady size, two of the five steps after the warm-up can fault in 20,000-80,000
pages, 0.15-0.6x what the default faults at every step, so a median of three can be one)."""
from __future__ import annotations

import json
import sys

import pytest

from tests.benchmark_helpers import load_benchmark

HOST_MEMORY = load_benchmark("host_memory")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keeping_freed_memory_removes_most_page_faults_of_a_conservative_step(capsys):
    assert HOST_MEMORY.main(["--systems", "cu108", "--pairs", "1", "--steps", "5", "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cu = report["systems"]["cu108"]
    assert cu["keep"]["page_faults_per_step"] < 0.2 * cu["default"]["page_faults_per_step"]
    assert set(cu["keep_over_default"]) == {"step_wall_s", "step_cpu_s", "peak_rss_mb"}
