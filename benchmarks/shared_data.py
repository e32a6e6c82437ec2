"""Where the benchmarks find the real DFT data: `ESEN_SHARED_DATA`, else `shared/data` beside
the checkout (the same rule as tests/conftest.py)."""
import os
from pathlib import Path

SHARED_DATA = Path(os.environ.get("ESEN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
ASPIRIN = SHARED_DATA / "rmd17" / "aspirin_train.xyz"
