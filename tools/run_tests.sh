#!/usr/bin/env bash
# Install everything, start the local SLURM cluster, run the whole test suite.
#   bash tools/run_tests.sh [--latest] [pytest arguments]
# --latest installs the newest releases instead of the lock (run it before each release).
# Fails if pytest fails or collects no test (pytest exit code 5).
set -uo pipefail
cd "$(dirname "$0")/.."
install_args=()
if [ "${1:-}" = "--latest" ]; then install_args=(--latest); shift; fi
bash tools/install.sh "${install_args[@]}" || exit 1
# `start` prints only the export line on stdout (apt and progress go to stderr).
slurm_env=$(bash launch/local_slurm.sh start) || { echo "local SLURM cluster failed to start" >&2; exit 1; }
eval "$slurm_env"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# One pytest worker per core (pytest-xdist; most tests use one thread), each taking the next
# test when it finishes one.
python3 -m pytest --numprocesses=auto --dist=load tests "$@"
status=$?
bash launch/local_slurm.sh stop >/dev/null 2>&1 || true
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    exit 1
fi
exit "$status"
