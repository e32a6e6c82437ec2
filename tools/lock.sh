#!/usr/bin/env bash
# Rewrite requirements/lock.txt: resolve pyproject's dependencies (dev extra included) to
# today's newest releases in a brand-new virtual environment, and record the exact versions.
# torch is not in the lock (tools/install.sh installs requirements/torch-cpu.txt only where no
# torch is present, so a CUDA build stays). Run the tests against the new lock before
# committing it: bash tools/run_tests.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -r requirements/torch-cpu.txt
"$venv/bin/python" -m pip install --quiet ".[dev]"
python_version=$("$venv/bin/python" -c 'import platform; print(platform.python_version())')
{
    echo "# Exact versions tested with esen-train: the default install (tools/install.sh uses this"
    echo "# file as pip constraints). Made by tools/lock.sh from pyproject.toml on Python"
    echo "# $python_version, $(uname -s) $(uname -m); tests/integration/test_packaging.py checks it against pyproject."
    "$venv/bin/python" -m pip freeze --all --exclude pip --exclude esen-train --exclude torch | LC_ALL=C sort -f
} > requirements/lock.txt.tmp
mv requirements/lock.txt.tmp requirements/lock.txt
echo "wrote requirements/lock.txt ($(grep -vc '^#' requirements/lock.txt) packages)"
