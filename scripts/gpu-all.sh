#!/usr/bin/env bash
# Every GPU check of the repository in one go, from prebuilt binaries (the GPU machine has no
# Rust toolchain). On a dev machine, from the repository root:
#
#   cargo build --release -p kiln
#   cargo test --release -p kiln --test agent_gpu_guard --no-run
#   cargo test --release -p kiln-kernels --features bench --no-run
#   cargo build --release -p kiln-kernels --features bench --bin kiln-kernel-bench
#   scripts/gpu-kernels.sh --collect target target-carry
#   cp target/release/kiln target-carry/ && strip target-carry/kiln
#   cp "$(ls -t target/release/deps/agent_gpu_guard-* | grep -v '\.d$' | head -1)" target-carry/test-agent_gpu_guard
#   cargo test --release -p kiln-engine --test gpu_generation --no-run
#   cargo test --release -p kiln-kernels --test gpu_decode --no-run
#   cp "$(ls -t target/release/deps/gpu_generation-* | grep -v '\.d$' | head -1)" target-carry/test-gpu_generation
#   cp "$(ls -t target/release/deps/gpu_decode-* | grep -v '\.d$' | head -1)" target-carry/test-gpu_decode
#   strip target-carry/test-gpu_generation target-carry/test-gpu_decode
#   (and the train kernels' test binary as in scripts/gpu-train.sh's header)
#
# then on the GPU machine: scripts/gpu-all.sh [BIN_DIR] (default target-carry). Runs the
# kernels' GPU tests and benchmark, the agent's GPU guard test, the guard end to end through
# the binary, exec jobs with PyTorch, and the GPU engine (scripts/gpu-engine.sh: its tests,
# the HF anchor, `kiln bench engine --device cuda`, `kiln demo`) and the train path
# (scripts/gpu-train.sh); prints a line per part last.
# Output under $OUT.
set -uo pipefail
# bin (first argument, default target-carry), out ($OUT, default out/), result, summary
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "$0")/lib.sh"

OUT="$out/gpu-kernels" timeout 420 scripts/gpu-kernels.sh "$bin" > "$out/gpu-kernels.txt" 2>&1
result[kernels]=$?
tail -60 "$out/gpu-kernels.txt"

echo "== agent GPU guard test"
KILN_JOB_EXEC="$(realpath "$bin/kiln")" timeout 300 "$bin/test-agent_gpu_guard" --ignored --nocapture \
    > "$out/agent-gpu-guard.txt" 2>&1
result[agent_guard_test]=$?
tail -5 "$out/agent-gpu-guard.txt"

echo "== guard end to end"
OUT="$out/gpu-agent-check" timeout 300 scripts/gpu-agent-check.sh "$bin/kiln" > "$out/gpu-agent-check.txt" 2>&1
result[agent_check]=$?
tail -15 "$out/gpu-agent-check.txt"

echo "== exec jobs with PyTorch"
OUT="$out/gpu-exec-check" timeout 400 scripts/gpu-exec-check.sh "$bin/kiln" > "$out/gpu-exec-check.txt" 2>&1
result[exec_check]=$?
tail -40 "$out/gpu-exec-check.txt"

echo "== GPU engine"
OUT="$out/gpu-engine" timeout 900 scripts/gpu-engine.sh "$bin" > "$out/gpu-engine.txt" 2>&1
result[engine]=$?
tail -60 "$out/gpu-engine.txt"

echo "== GPU train path"
OUT="$out/gpu-train" timeout 400 scripts/gpu-train.sh "$bin" > "$out/gpu-train.txt" 2>&1
result[train]=$?
tail -30 "$out/gpu-train.txt"

summary 20 kernels agent_guard_test agent_check exec_check engine train
