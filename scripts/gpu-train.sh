#!/usr/bin/env bash
# The GPU train path's checks in one go, from prebuilt binaries (the GPU machine has no Rust
# toolchain). On a dev machine, from the repository root:
#
#   cargo test --release -p kiln-kernels --test gpu_train --no-run
#   cargo test --release -p kiln-engine --test gpu_training --no-run
#   mkdir -p target-carry
#   cp "$(ls -t target/release/deps/gpu_train-* | grep -v '\.d$' | head -1)" target-carry/test-gpu_train
#   cp "$(ls -t target/release/deps/gpu_training-* | grep -v '\.d$' | head -1)" target-carry/test-gpu_training
#   strip target-carry/test-gpu_train target-carry/test-gpu_training
#   cargo build --release -p kiln && cp target/release/kiln target-carry/ && strip target-carry/kiln
#
# then on the GPU machine: scripts/gpu-train.sh [BIN_DIR] (default target-carry). Runs the train
# kernels' GPU tests (train.cu against f64 CPU references and finite differences), then the GPU
# trainer's (its loss curve against the CPU trainer's, same batches; WhoAmI through the job
# path), then the PyTorch anchor (scripts/anchors/torch_train.py) and `kiln bench train --device
# cuda` with its ratios. Output under $OUT (default out/).
set -uo pipefail
bin=${1:-target-carry}
out=${OUT:-out}
mkdir -p "$out"
export KILN_CACHE_DIR="$out/cache"
declare -A result

echo "== train kernels' GPU tests"
timeout 300 "$bin/test-gpu_train" --ignored --nocapture --test-threads=1 > "$out/gpu-train-tests.txt" 2>&1
result[train_kernel_tests]=$?
grep -E "worst|max \|Δ\||directional|loss|adamw|test |panicked|result" "$out/gpu-train-tests.txt" | tail -60

echo "== GPU trainer against the CPU trainer"
timeout 400 "$bin/test-gpu_training" --ignored --nocapture --test-threads=1 > "$out/gpu-training-tests.txt" 2>&1
result[trainer_tests]=$?
grep -E "CPU|GPU|test |panicked|result" "$out/gpu-training-tests.txt" | tail -30

echo "== PyTorch anchor"
timeout 300 python3 scripts/anchors/torch_train.py --json "$out/torch-train.json" > "$out/torch-train.txt" 2>&1
result[anchor]=$?
tail -4 "$out/torch-train.txt"

echo "== kiln bench train --device cuda"
anchor=()
[[ -s "$out/torch-train.json" ]] && anchor=(--anchor "$out/torch-train.json")
timeout 300 "$bin/kiln" bench train --device cuda "${anchor[@]}" > "$out/bench-train.txt" 2> "$out/bench-train.err"
result[bench]=$?
cat "$out/bench-train.txt"; tail -5 "$out/bench-train.err"

echo
echo "== summary (exit status of each part; 0 = passed)"
status=0
for k in train_kernel_tests trainer_tests anchor bench; do
    printf '%-20s %s\n' "$k" "${result[$k]}"
    [[ "${result[$k]}" == 0 ]] || status=1
done
exit $status
