#!/usr/bin/env bash
# Where a GPU train step's time goes, kernel by kernel, measured with Nsight Compute on the GPU
# machine (ncu works there with --clock-control none), from a prebuilt kiln (see gpu-train.sh's
# header for the build). Profiles `kiln bench train --steps 1` (two warm-up steps and one timed:
# three steps) with one metric per kernel, then sums the kernels by name per step.
#
#   scripts/ncu-train.sh [BIN_DIR]    settings: MODEL (qwen2.5-0.5b), QUANT (nvfp4-ste), OUT (out)
set -uo pipefail
# bin (first argument, default target-carry), out ($OUT, default out/)
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "$0")/lib.sh"
export KILN_CACHE_DIR="$out/cache"
model=${MODEL:-qwen2.5-0.5b}
quant=${QUANT:-nvfp4-ste}
# compile the kernels outside the profile
"$bin/kiln" bench train --device cuda --model "$model" --quant "$quant" --steps 1 > /dev/null 2>&1
ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
    --log-file "$out/ncu-train-$model-$quant.csv" \
    "$bin/kiln" bench train --device cuda --model "$model" --quant "$quant" --steps 1 \
    > "$out/ncu-train-bench.txt" 2>&1 || { tail -20 "$out/ncu-train-bench.txt"; exit 1; }
python3 "$(dirname "$0")/ncu_summary.py" "$out/ncu-train-$model-$quant.csv" 3 \
    | tee "$out/ncu-train-$model-$quant.txt"
