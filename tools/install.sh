#!/usr/bin/env bash
# Install esen-train and its dependencies into the current Python environment.
# On a machine without a GPU we pin the CPU build of torch first; on a GPU cluster,
# install the CUDA build of torch yourself first: pyproject only sets a lower bound, so
# pip keeps whatever torch is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --upgrade pip
if ! python3 -c "import torch" 2>/dev/null; then
    python3 -m pip install --quiet "torch==2.13.0"
fi
python3 -m pip install --quiet -e ".[dev]"
# Compile the periodic neighbour list now (numba, about 10 s per shift dtype, kept in
# __pycache__), so the first training run, and every dataloader worker it starts, loads it
# instead of compiling: int64 shifts for the calculator, float32/float64 for the reader.
python3 -c "import numpy as np
from esen_train.data.neighbors import build_neighbor_list
for dtype in (np.int64, np.float32, np.float64):
    build_neighbor_list(np.zeros((1, 3)), 3.0 * np.eye(3), [True] * 3, 5.0, dtype)"
