#!/usr/bin/env bash
# The GPU checks of everything written without a GPU and not yet run on one — correctness
# first, fastest first, then the two benchmarks that decide the defaults — in one device call,
# from prebuilt binaries (the GPU machine has no Rust toolchain). On a dev machine, from the
# repository root:
#
#   scripts/build-carry.sh gpu_decode gpu_generation gpu_train gpu_training
#
# then on the GPU machine: scripts/gpu-pending.sh [BIN_DIR] (default target-carry). Output
# under $OUT (default out/), a line per part last. What each part decides:
#   fused_kernels, fused_engine  the fused decode GEMVs give the separate kernels' bits
#                                (else DECODE_FUSION stays Off)
#   prompt_kernels, prompts      the prompt path's norm / SwiGLU / q/k/v kernels (in the default
#                                path for prompts over 64 tokens: if these fail, revert their
#                                launcher branches in kernels/src/cuda/decode.rs)
#   flash_kernels, flash_trainer the flash train attention (else TRAIN_FLASH_ATTENTION stays
#                                false)
#   bench_engine                 0.5B decode with each fused form against the default, time to
#                                first token by weight-slab size, short prompts through GEMV
#                                batches vs GEMMs (SHORT_PROMPT) (no 7B: scripts/gpu-engine.sh)
#   bench_train                  the train step with flash attention against the materialized
set -uo pipefail
# bin (first argument, default target-carry), out ($OUT, default out/), result, summary
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "$0")/lib.sh"
export KILN_CACHE_DIR="$out/cache"

# part NAME LIMIT_S COMMAND… — run it, keep its output, show the lines that matter
part() {
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    result[$name]=$?
    grep -E "test |panicked|max|fused|bit|result:" "$out/$name.txt" | tail -15
}

part fused_kernels 120 "$bin/test-gpu_decode" --ignored --nocapture --test-threads=1 fused_decode
part prompt_kernels 120 "$bin/test-gpu_decode" --ignored --nocapture --test-threads=1 prompt_
part flash_kernels 120 "$bin/test-gpu_train" --ignored --nocapture --test-threads=1 flash
part fused_engine 200 "$bin/test-gpu_generation" --ignored --nocapture --test-threads=1 fused_decode
part prompts 200 "$bin/test-gpu_generation" --ignored --nocapture --test-threads=1 gpu_matches
part flash_trainer 200 "$bin/test-gpu_training" --ignored --nocapture --test-threads=1 flash_attention
part bench_engine 200 "$bin/kiln" bench engine --device cuda --skip-7b --fused-decode \
    --prefill-slab-mib "${SLABS:-8,16,32}" --short-prompts 16,32,64
cat "$out/bench_engine.txt"
part bench_train 150 "$bin/kiln" bench train --device cuda --quant nvfp4-ste \
    --attention materialized,flash
cat "$out/bench_train.txt"

summary 14 fused_kernels prompt_kernels flash_kernels fused_engine prompts flash_trainer \
    bench_engine bench_train
