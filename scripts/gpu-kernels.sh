#!/usr/bin/env bash
# Runs the kiln-kernels GPU tests and the kernel benchmark from prebuilt binaries (nothing is
# built here; the GPU machine has no Rust toolchain). Build them on a dev machine first, with
# the `bench` feature so that the GPU tests also check, and the benchmark also times, the
# experimental GEMV kernels and the probes (without it: production kernels only):
#
#   CARGO_TARGET_DIR=target-kernels cargo test --release -p kiln-kernels --features bench --no-run
#   CARGO_TARGET_DIR=target-kernels cargo build --release -p kiln-kernels --features bench --bin kiln-kernel-bench
#   scripts/gpu-kernels.sh --collect target-kernels target-kernels-carry
#
# then, on the GPU machine, from the repository root:
#
#   scripts/gpu-kernels.sh [BIN_DIR]        (default: target-kernels-carry)
#
# Logs and bench.json go to $OUT (or ./out/gpu-kernels). Prints a short table last.
set -uo pipefail

if [[ "${1:-}" == "--collect" ]]; then
    target=${2:?target dir}; dest=${3:?destination dir}
    mkdir -p "$dest"
    cp "$target/release/kiln-kernel-bench" "$dest/"
    for name in gpu kiln_kernels; do
        exe=$(ls -t "$target"/release/deps/${name}-* 2>/dev/null | grep -v '\.d$' | head -1)
        [[ -n "$exe" ]] && cp "$exe" "$dest/test-$name"
    done
    strip "$dest"/* 2>/dev/null || true   # debug info would overflow the 64 MiB carry limit
    ls -la "$dest"
    exit 0
fi

bin=${1:-target-kernels-carry}
out=${OUT:-out/gpu-kernels}
mkdir -p "$out"
export KILN_CACHE_DIR=${KILN_CACHE_DIR:-/tmp/kiln-cache}
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv 2>&1 | tee "$out/gpu.txt"

echo "== NVRTC compile check + CPU unit tests"
"$bin/test-kiln_kernels" --test-threads=4 2>&1 | tee "$out/unit-tests.log" | tail -3 || status=1
echo "== GPU tests (CUDA vs CPU reference)"
"$bin/test-gpu" --ignored --test-threads=1 --nocapture 2>&1 | tee "$out/gpu-tests.log" | grep -E "rel error|adamw|differ|panicked|test |result" || true
grep -q "test result: ok" "$out/gpu-tests.log" || status=1
grep -q " 0 passed" "$out/gpu-tests.log" && { echo "no GPU test ran"; status=1; }

echo "== benchmark"
"$bin/kiln-kernel-bench" --json "$out/bench.json" ${BENCH_ARGS:-} 2>"$out/bench.log" | tee "$out/bench.txt" || { status=1; tail -20 "$out/bench.log"; }

exit $status
