#!/usr/bin/env bash
# The GPU train path's checks in one go, from prebuilt binaries (the GPU machine has no Rust
# toolchain). On a dev machine, from the repository root:
#
#   scripts/build-carry.sh gpu_train gpu_training
#
# then on the GPU machine: scripts/gpu-train.sh [BIN_DIR] (default target-carry). Runs the train
# kernels' GPU tests (train.cu against f64 CPU references and finite differences), then the GPU
# trainer's (its loss curve against the CPU trainer's, same batches; WhoAmI through the job
# path), then the PyTorch anchor (scripts/anchors/torch_train.py), `kiln bench train --device
# cuda` (none, nvfp4-ste, nvfp4-full) with its ratios, and $RUNS (default 3) separate runs of a
# full-NVFP4 step of the Qwen2.5-14B shape with bf16 moments under a 108 GiB budget. Output
# under $OUT (default out/).
set -uo pipefail
# bin (first argument, default target-carry), out ($OUT, default out/), result, summary
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "$0")/lib.sh"
export KILN_CACHE_DIR="$out/cache"

echo "== train kernels' GPU tests"
timeout 90 "$bin/test-gpu_train" --ignored --nocapture --test-threads=1 > "$out/gpu-train-tests.txt" 2>&1
result[train_kernel_tests]=$?
grep -E "worst|max \|Δ\||directional|loss|adamw|test |panicked|result" "$out/gpu-train-tests.txt" | tail -60

echo "== GPU trainer against the CPU trainer"
timeout 150 "$bin/test-gpu_training" --ignored --nocapture --test-threads=1 > "$out/gpu-training-tests.txt" 2>&1
result[trainer_tests]=$?
grep -E "CPU|GPU|test |panicked|result" "$out/gpu-training-tests.txt" | tail -30

echo "== PyTorch anchor"
timeout 120 python3 scripts/anchors/torch_train.py --json "$out/torch-train.json" > "$out/torch-train.txt" 2>&1
result[anchor]=$?
tail -4 "$out/torch-train.txt"

echo "== kiln bench train --device cuda"
anchor=()
[[ -s "$out/torch-train.json" ]] && anchor=(--anchor "$out/torch-train.json")
timeout 120 "$bin/kiln" bench train --device cuda --quant none,nvfp4-ste,nvfp4-full "${anchor[@]}" \
    > "$out/bench-train.txt" 2> "$out/bench-train.err"
result[bench]=$?
cat "$out/bench-train.txt"; tail -5 "$out/bench-train.err"

echo "== full NVFP4 fine-tune step, Qwen2.5-14B shape, bf16 moments, 1 × 192, budget 108 GiB: ${RUNS:-3} runs"
result[big]=0
for run in $(seq 1 "${RUNS:-3}"); do
    # most of a run is building 14.7 B random parameters on the host (quantized there) and
    # uploading them; the load column of the table says how long
    timeout 180 "$bin/kiln" bench train --device cuda --model qwen2.5-14b --quant nvfp4-full \
        --moments bf16 --batch 1 --seq 192 --steps 3 --budget-gb 108 \
        > "$out/bench-14b-$run.txt" 2> "$out/bench-14b-$run.err"
    rc=$?
    echo "run $run: exit $rc after $SECONDS s of the script"; grep qwen2.5-14b "$out/bench-14b-$run.txt"
    [[ $rc == 0 ]] || result[big]=$rc
done

summary 20 train_kernel_tests trainer_tests anchor bench big
