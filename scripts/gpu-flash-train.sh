#!/usr/bin/env bash
# The flash train attention's checks and numbers in one GPU call, from prebuilt binaries (the GPU
# machine has no Rust toolchain). On a dev machine, from the repository root:
#
#   scripts/build-carry.sh gpu_train gpu_decode gpu_training
#
# then on the GPU machine: scripts/gpu-flash-train.sh [BIN_DIR] (default target-carry). Runs
# the flash kernels against the f64 reference (forward output and log-sum-exp, dq / dk / dv),
# the prompt path's flash kernel (it shares flash_attention.cuh), the trainer with flash
# attention against the CPU trainer (first-step gradients, 20-step curve, plan = bytes), then
# `kiln bench train --attention materialized,flash` at 8 × 512 and a long sequence the
# materialized form cannot hold. Output under $OUT (default out/).
set -uo pipefail
# bin (first argument, default target-carry), out ($OUT, default out/), result
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "$0")/lib.sh"
export KILN_CACHE_DIR="$out/cache"

echo "== flash train attention kernels vs the f64 reference"
timeout 120 "$bin/test-gpu_train" --ignored --nocapture --test-threads=1 flash > "$out/flash-kernel-tests.txt" 2>&1
result[kernels]=$?
grep -E "max \|Δ\||test |panicked|result" "$out/flash-kernel-tests.txt" | tail -40

echo "== prompt-path flash kernel (shares flash_attention.cuh)"
timeout 60 "$bin/test-gpu_decode" --ignored --nocapture --test-threads=1 flash_prefill > "$out/flash-prefill-test.txt" 2>&1
result[prefill]=$?
grep -E "max|test |panicked|result" "$out/flash-prefill-test.txt" | tail -8

echo "== GPU trainer with flash attention against the CPU trainer"
timeout 150 "$bin/test-gpu_training" --ignored --nocapture --test-threads=1 flash_attention > "$out/flash-trainer-tests.txt" 2>&1
result[trainer]=$?
grep -E "CPU|GPU|flash|test |panicked|result" "$out/flash-trainer-tests.txt" | tail -30

echo "== kiln bench train --attention materialized,flash (8 × 512)"
timeout 150 "$bin/kiln" bench train --device cuda --quant none,nvfp4-ste --attention materialized,flash \
    > "$out/bench-flash.txt" 2> "$out/bench-flash.err"
result[bench]=$?
cat "$out/bench-flash.txt"; tail -3 "$out/bench-flash.err"

echo "== long sequences: Qwen2.5-0.5B shape, 1 × ${LONG_SEQ:-16384}, nvfp4-ste, budget 100 GiB"
for att in materialized flash; do
    timeout 120 "$bin/kiln" bench train --device cuda --model qwen2.5-0.5b --quant nvfp4-ste \
        --batch 1 --seq "${LONG_SEQ:-16384}" --steps 3 --budget-gb 100 --attention "$att" \
        > "$out/bench-long-$att.txt" 2> "$out/bench-long-$att.err"
    # the materialized form is expected to be refused by the plan (its exit is not a result)
    result[long_$att]=$?
    echo "$att: exit ${result[long_$att]}"
    grep -E "qwen|budget|fit" "$out/bench-long-$att.txt" "$out/bench-long-$att.err" | tail -3
done

summary 12 kernels prefill trainer bench long_flash
