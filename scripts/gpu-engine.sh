#!/usr/bin/env bash
# The GPU engine's checks and benchmark in one go, from prebuilt binaries (the GPU machine has
# no Rust toolchain). On a dev machine, from the repository root:
#
#   scripts/build-carry.sh gpu_decode gpu_generation
#
# then on the GPU machine: scripts/gpu-engine.sh [BIN_DIR] (default target-carry). Runs the
# decode kernels' GPU tests, the engine's GPU tests (GPU vs CPU reference, cache vs replay, graph vs plain launches, session
# restore, the fused decode GEMVs against the separate kernels), the HF transformers anchor,
# `kiln bench engine --device cuda --short-prompts 8,16,32` with the anchor's ratios (short
# prompts through GEMV batches against the GEMMs; FUSED=1 adds the fused decode GEMVs against
# the default, PERSISTENT=1 the persistent decode kernel), and `kiln demo` (which generates on the GPU). LOAD_BENCH=1 adds the model-load
# benchmark on a random bf16 directory (LOAD_SHAPE, default qwen2.5-7b: 15 GB written first);
# SLABS=32,128 also times the longest prompt with the weights dequantized in slabs of those MiB
# (and the default size), each serially and overlapped with the GEMMs.
# Output under $OUT (default out/).
set -uo pipefail
# bin (first argument, default target-carry), out ($OUT, default out/), result, summary
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "$0")/lib.sh"
export KILN_CACHE_DIR="$out/cache"

echo "== decode kernels' GPU tests"
timeout 200 "$bin/test-gpu_decode" --ignored --nocapture > "$out/gpu-decode-tests.txt" 2>&1
result[kernel_tests]=$?
grep -E "attention|test |panicked|result" "$out/gpu-decode-tests.txt" | tail -12

echo "== engine GPU tests"
timeout 400 "$bin/test-gpu_generation" --ignored --nocapture --test-threads=1 > "$out/gpu-tests.txt" 2>&1
result[gpu_tests]=$?
grep -E "teacher-forced|prefill of|cache vs replay|fused|test |panicked|result" "$out/gpu-tests.txt" | tail -40

echo "== HF transformers anchor"
timeout 400 python3 scripts/anchors/hf_decode.py ${SKIP_7B:+--skip-7b} --json "$out/hf.json" > "$out/hf.txt" 2>&1
result[anchor]=$?
tail -5 "$out/hf.txt"

echo "== kiln bench engine --device cuda"
anchor=()
[[ -s "$out/hf.json" ]] && anchor=(--anchor "$out/hf.json")
timeout 400 "$bin/kiln" bench engine --device cuda ${FUSED:+--fused-decode} \
    ${PERSISTENT:+--persistent-decode} --short-prompts 8,16,32 \
    ${SKIP_7B:+--skip-7b} ${SLABS:+--prefill-slab-mib "$SLABS"} "${anchor[@]}" > "$out/bench-engine.txt" 2> "$out/bench-engine.err"
result[bench]=$?
cat "$out/bench-engine.txt"; tail -5 "$out/bench-engine.err"

if [[ -n "${LOAD_BENCH:-}" ]]; then
    # loading a bf16 directory: float linears quantized by the host's cores vs the GPU's kernel
    echo "== kiln bench engine --device cuda --load-model (random bf16 ${LOAD_SHAPE:-qwen2.5-7b})"
    model="$out/load-${LOAD_SHAPE:-qwen2.5-7b}-bf16"
    [[ -f "$model/config.json" ]] || "$bin/kiln" random-model --shape "${LOAD_SHAPE:-qwen2.5-7b}" \
        --format bf16 --out "$model" > /dev/null
    timeout 400 "$bin/kiln" bench engine --device cuda --load-model "$model" --load-runs 2 \
        > "$out/bench-load.txt" 2> "$out/bench-load.err"
    result[load_bench]=$?
    cat "$out/bench-load.txt"; tail -4 "$out/bench-load.err"
fi

echo "== kiln demo (generates on the GPU)"
timeout 300 "$bin/kiln" demo > "$out/demo.txt" 2>&1
result[demo]=$?
tail -30 "$out/demo.txt"

summary 12 kernel_tests gpu_tests anchor bench ${LOAD_BENCH:+load_bench} demo
