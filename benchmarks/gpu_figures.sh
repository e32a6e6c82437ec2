#!/usr/bin/env bash
# On a GPU: benchmarks/model_vs_fairchem.py in float32 and bf16, and short bf16 trainings
# with the DDP and FSDP2 strategies, in one prepared run.
#
#   bash benchmarks/gpu_figures.sh prepare      # here, with a package index: fills .whl/
#   bash benchmarks/gpu_figures.sh run OUT      # on the GPU machine, with .whl/ carried
#
# The GPU machines lent to this project run an image that has CUDA torch, e3nn,
# torch-geometric, numba, scipy and matplotlib, and reaches no package index. `prepare`
# downloads the wheels the project needs beyond that image (WHEELS below, at the versions of
# requirements/lock.txt) into .whl/ (git ignores it) and copies the rMD17 aspirin molecules
# there. `run` installs the wheels into a private directory and writes into OUT:
#   gpu.txt             nvidia-smi
#   fp32.json bf16.json model_vs_fairchem.py's eight cases, our side, the spec's small model,
#                       with each step's matmuls timed alone (how matmul-bound the GPU step is)
#   fit_ddp.txt fit_fsdp.txt
#                       `esen-train fit configs/tiny.yaml` with precision bf16 in both stages,
#                       one process: the run's status, then its metrics.jsonl (atoms/s,
#                       gpu_mem_gb). The lent machines have one GPU, so no NCCL group forms
#                       (a process group needs two ranks, and NCCL two GPUs).
#   eval_md.txt         the DDP run's model on the GPU in float64 and float32: `esen-train
#                       eval --json` on its validation data, `esen-train md --json` (NVE drift)
#   log.txt             everything the commands printed
# DEVICE (default cuda) is where everything runs; BENCH_ARGS and FIT_ARGS are appended to the
# benchmark's and fit's arguments (the last of a repeated setting wins). On a CPU,
#   DEVICE=cpu BENCH_ARGS="--model tiny ..." FIT_ARGS="direct.max_steps=4 ..." bash ... run OUT
# checks the script itself.
#
# fairchem's side stays on the CPU: fairchem-core 2.24 pins torch 2.13 (the image has another)
# and imports warp-lang and wandb at import time, whose wheels together exceed the 64 MiB that
# travels to the machine.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEEL_DIR=.whl
DEVICE=${DEVICE:-cuda}
# What `esen-train fit` and the benchmark import that the GPU image lacks (wandb and its needs
# included: the tracking module imports it whatever the mode).
WHEELS=(ase lmdb omegaconf vesin wandb protobuf pydantic pydantic_core annotated-types typing-inspection
        platformdirs googleapis-common-protos opentelemetry-api opentelemetry-sdk opentelemetry-proto
        opentelemetry-semantic-conventions opentelemetry-exporter-otlp-proto-http
        opentelemetry-exporter-otlp-proto-common opentelemetry-exporter-otlp-common
        opentelemetry-exporter-http-transport)

prepare() {
    mkdir -p "$WHEEL_DIR/data/rmd17"
    local pins=()
    for package in "${WHEELS[@]}"; do
        pins+=("$(grep -i "^${package}==" requirements/lock.txt)")
    done
    # The image's Python is 3.12; WHEEL_PYTHON=3.11 fills .whl/ for a check on a 3.11 machine.
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEEL_DIR" "${pins[@]}"
    install -m 0644 "${ESEN_SHARED_DATA:-../shared/data}/rmd17/aspirin_train.xyz" "$WHEEL_DIR/data/rmd17/"
    du -sh "$WHEEL_DIR"
}

fit() {
    local strategy=$1 out=$2 run_dir=$3
    # shellcheck disable=SC2086  # FIT_ARGS is a list of key=value words
    python3 -m esen_train.cli fit configs/tiny.yaml \
        strategy.name="$strategy" direct.precision=bf16 conservative.precision=bf16 \
        logging.wandb.mode=disabled run_dir="$run_dir" ${FIT_ARGS:-} --quiet
    python3 -m esen_train.cli status "$run_dir" --json > "$out/fit_$strategy.txt"
    cat "$run_dir/metrics.jsonl" >> "$out/fit_$strategy.txt"
}

evaluate_on_gpu() {
    local run_dir=$1 out=$2 structure
    structure=$(mktemp --suffix=.extxyz)
    python3 -c 'import sys; from esen_train.cli.data import main; sys.exit(main())' \
        export "$run_dir/data/val" --out "$structure" --overwrite
    for dtype in float64 float32; do
        python3 -m esen_train.cli eval "$run_dir" --data "$run_dir/data/val" --device "$DEVICE" --dtype "$dtype" \
            --json --quiet --out "$(mktemp -d)"
        python3 -m esen_train.cli md "$run_dir" --structure "$structure" --steps 200 --timestep 2 --temperature 300 \
            --device "$DEVICE" --dtype "$dtype" --json --quiet --out "$(mktemp -d)"
    done > "$out/eval_md.txt"
}

run() {
    local out=$1
    mkdir -p "$out"
    exec > >(tee "$out/log.txt") 2>&1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/esen-site \
        "$WHEEL_DIR"/*.whl
    export PYTHONPATH="/tmp/esen-site:$PWD" ESEN_SHARED_DATA="$PWD/$WHEEL_DIR/data"
    (nvidia-smi || echo "no nvidia-smi") > "$out/gpu.txt" 2>&1
    for precision in fp32 bf16; do
        # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
        python3 benchmarks/model_vs_fairchem.py --sides ours --device "$DEVICE" --precision "$precision" \
            --repeats 5 --warmup 2 --matmuls-alone --output "$out/$precision.json" ${BENCH_ARGS:-} > /dev/null
    done
    local ddp_run fsdp_run
    ddp_run=$(mktemp -d) fsdp_run=$(mktemp -d)
    fit ddp "$out" "$ddp_run"
    fit fsdp "$out" "$fsdp_run"
    evaluate_on_gpu "$ddp_run" "$out"
    ls -l "$out"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run "$2" ;;
    *) echo "usage: $0 prepare | run OUT" >&2; exit 2 ;;
esac
