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
