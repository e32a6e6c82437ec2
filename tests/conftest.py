"""Shared fixtures. Tests read ../shared/data only through `shared_data`."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ESEN_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def shared_data(relative: str) -> Path:
    """Path of a file in ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real DFT data not available: {path} is absent (set ESEN_SHARED_DATA)")
    return path


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist's `--dist loadgroup` (tools/run_tests.sh), the tests of every module that
    uses the local SLURM cluster run on one worker, one after another: the cluster's two small
    nodes run one two-node job at a time, so a job of another worker would wait in the queue and
    eat into a test's time limit, and the module's fixtures (reference runs) are built once."""
    slurm_modules = {item.module.__name__ for item in items if item.get_closest_marker("slurm")}
    for item in items:
        if item.module.__name__ in slurm_modules:
            item.add_marker(pytest.mark.xdist_group("slurm"))
