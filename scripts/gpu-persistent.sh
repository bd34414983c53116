#!/usr/bin/env bash
# Where the persistent decode kernel's time goes, from prebuilt binaries. On a dev machine:
#
#   scripts/build-carry.sh gpu_generation
#
# then on the GPU machine: scripts/gpu-persistent.sh [BIN_DIR] (default target-carry). For each
# variant (a KILN_PERSISTENT value; VARIANTS="barrier=0 barrier=1 barrier=2" by default, e.g.
# VARIANTS="barrier=1,fold=0 barrier=1,fold=1"): the engine GPU test
# that checks the persistent kernel against the separate kernels bit for bit, then
# `kiln bench engine --device cuda --persistent-decode --skip-7b`, whose tables give the decode
# rate against the default (captured separate kernels, same run), the kernel's stages in one
# traced step (span, median block, barrier after) and grid barriers alone by kind and blocks
# per SM. Output under $OUT.
set -uo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "$0")/lib.sh"
export KILN_CACHE_DIR="$out/cache"
parts=()
n=0
for variant in ${VARIANTS:-barrier=0 barrier=1 barrier=2}; do
    export KILN_PERSISTENT="$variant"
    kind=$n
    n=$((n + 1))
    echo "== variant $kind ($variant): the persistent kernel against the separate kernels"
    timeout 300 "$bin/test-gpu_generation" --ignored --nocapture --test-threads=1 \
        fused_decode_steps_equal_the_separate_kernels > "$out/test-variant$kind.txt" 2>&1
    result[test$kind]=$?
    grep -E "persistent|test |panicked|result" "$out/test-variant$kind.txt" | tail -8
    echo "== variant $kind ($variant): kiln bench engine --device cuda --persistent-decode --skip-7b"
    timeout 300 "$bin/kiln" bench engine --device cuda --persistent-decode --skip-7b \
        > "$out/bench-variant$kind.txt" 2> "$out/bench-variant$kind.err"
    result[bench$kind]=$?
    sed -n '/persistent kernel/,$p' "$out/bench-variant$kind.txt" | head -80
    tail -3 "$out/bench-variant$kind.err"
    parts+=("test$kind" "bench$kind")
done
summary 8 "${parts[@]}"
