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
