#!/usr/bin/env bash
# Our eSEN's figures on a GPU: benchmarks/model_vs_fairchem.py in float32 and in bf16.
#
#   bash benchmarks/gpu_figures.sh prepare                  # here, with a package index: fills .whl/
#   bash benchmarks/gpu_figures.sh run OUT [ARGS...]        # on the GPU machine, with .whl/ carried
#
# The GPU machines lent to this project run an image that has CUDA torch, e3nn,
# torch-geometric, numba and scipy, and reaches no package index. `prepare` downloads the
# wheels our side needs beyond that image (ase, omegaconf, vesin, at the versions of
# requirements/lock.txt) into .whl/ (git ignores it) and copies the rMD17 aspirin molecules
# there; `run` installs the wheels into a private directory and writes OUT/fp32.json and
# OUT/bf16.json (the eight cases, our side, the spec's small model, `--device cuda`) and
# OUT/gpu.txt (nvidia-smi). ARGS go to both runs after the script's own (argparse keeps the
# last of a repeated option): `--device cpu --model tiny` checks the script on a CPU.
#
# fairchem's side stays on the CPU: fairchem-core 2.24 pins torch 2.13 (the image has another)
# and imports warp-lang and wandb at import time, whose wheels alone are larger than the
# 64 MiB that travels to the machine.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=.whl
PACKAGES=(ase omegaconf vesin)

prepare() {
    mkdir -p "$WHEELS/data/rmd17"
    local pins=()
    for package in "${PACKAGES[@]}"; do
        pins+=("$(grep -i "^${package}==" requirements/lock.txt)")
    done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "${pins[@]}"
    install -m 0644 "${ESEN_SHARED_DATA:-../shared/data}/rmd17/aspirin_train.xyz" "$WHEELS/data/rmd17/"
    ls -l "$WHEELS" "$WHEELS/data/rmd17"
}

run() {
    local out=$1
    shift
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/esen-site \
        "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/esen-site ESEN_SHARED_DATA="$PWD/$WHEELS/data"
    (nvidia-smi || echo "no nvidia-smi") > "$out/gpu.txt" 2>&1
    for precision in fp32 bf16; do
        python3 benchmarks/model_vs_fairchem.py --sides ours --device cuda --precision "$precision" \
            --repeats 5 --warmup 2 --output "$out/$precision.json" "$@" > /dev/null
    done
    ls -l "$out"
}

case "${1:-}" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    *) echo "usage: $0 prepare | run OUT [ARGS...]" >&2; exit 2 ;;
esac
