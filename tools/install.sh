#!/usr/bin/env bash
# Install esen-train and its dependencies into the current Python environment (use a new
# virtual environment: python3 -m venv .venv && . .venv/bin/activate).
#   bash tools/install.sh            the exact versions of requirements/lock.txt (tested)
#   bash tools/install.sh --latest   the newest releases pyproject allows (what the lock
#                                    will be next; run the tests after it)
# torch: where none is installed, requirements/torch-cpu.txt (the CPU build on a machine
# without a GPU). On a GPU cluster install your CUDA build of torch first: pyproject only
# sets a lower bound and the lock leaves torch out, so pip keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    "") pins=(-c requirements/lock.txt) ;;
    --latest) pins=(--upgrade --upgrade-strategy eager) ;;
    *) echo "usage: bash tools/install.sh [--latest]" >&2; exit 2 ;;
esac
python3 -m pip install --quiet --upgrade pip
if ! python3 -c "import torch" 2>/dev/null; then
    python3 -m pip install --quiet -r requirements/torch-cpu.txt
fi
# Naming the installed torch keeps an eager upgrade from replacing it.
torch_version=$(python3 -c "import torch; print(torch.__version__)")
python3 -m pip install --quiet "${pins[@]}" -e ".[dev]" "torch==$torch_version"
# Compile the periodic neighbour list now (numba, about 10 s per shift dtype, kept in
# __pycache__), so the first training run, and every dataloader worker it starts, loads it
# instead of compiling: int64 shifts for the calculator, float32/float64 for the reader.
python3 -c "import numpy as np
from esen_train.data.neighbors import build_neighbor_list
for dtype in (np.int64, np.float32, np.float64):
    build_neighbor_list(np.zeros((1, 3)), 3.0 * np.eye(3), [True] * 3, 5.0, dtype)"
