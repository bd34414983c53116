#!/usr/bin/env bash
# Generate jobs on bf16 model directories through the whole job path on a GPU agent, to see
# where a float model's load goes now that its linears are quantized by the GPU's kernel: the
# job's `model_loaded` load_ms and its log line, for each binary directory given (e.g. the
# current build and one from before, whose jobs quantized on the host's cores), on the same
# directories in the same run. From prebuilt binaries (the GPU machine has no Rust toolchain):
#
#   cargo build --release -p kiln && mkdir -p target-carry && cp target/release/kiln target-carry/
#   strip target-carry/kiln
#
# then on the GPU machine: scripts/gpu-load-check.sh BIN_DIR [BIN_DIR...]. Settings
# (environment): SHAPES ("qwen2.5-0.5b qwen2.5-7b"), RUNS (2 per binary and shape), PORT
# (7191). Output under $OUT (default out/): load-check.txt, the jobs' logs.
set -uo pipefail
out=$(realpath -m "${OUT:-out}")
shapes=${SHAPES:-"qwen2.5-0.5b qwen2.5-7b"}
runs=${RUNS:-2}
port=${PORT:-7191}
work="$out/load-check"
mkdir -p "$work"
export KILN_COORDINATOR="http://127.0.0.1:$port"
export KILN_CACHE_DIR="$out/cache"
table="$out/load-check.txt"
printf '%-28s %-14s %4s %-10s %9s\n' binary shape run state "load ms" > "$table"
first=$(realpath "${1:-target-carry}")
for shape in $shapes; do
    model="$work/$shape-bf16"
    [[ -f "$model/config.json" ]] || "$first/kiln" random-model --shape "$shape" --format bf16 \
        --out "$model" || exit 1
done
for dir in "${@:-target-carry}"; do
    bin=$(realpath "$dir")
    kiln="$bin/kiln"
    rm -rf "$work/data" "$work/agent"
    "$kiln" coordinator --listen "127.0.0.1:$port" --data-dir "$work/data" > "$work/coordinator.log" 2>&1 &
    coord=$!
    "$kiln" agent --work-dir "$work/agent" --gpus all > "$work/agent.log" 2>&1 &
    agent=$!
    for _ in $(seq 1 60); do
        "$kiln" agents 2>/dev/null | grep -q READY && break
        sleep 0.5
    done
    for shape in $shapes; do
        for run in $(seq 1 "$runs"); do
            id=$("$kiln" submit generate --model "$work/$shape-bf16" --prompt "Hello" \
                --max-tokens 8 --device cuda --budget-gb 40 -o json |
                python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
            timeout 600 "$kiln" watch "$id" > "$work/watch-$(basename "$bin")-$shape-$run.txt" 2>&1
            "$kiln" job "$id" -o json > "$work/job.json"
            "$kiln" telemetry "$id" -o json > "$work/telemetry.json"
            python3 - "$work/job.json" "$work/telemetry.json" "$bin" "$shape" "$run" >> "$table" <<'PY'
import json, sys
job, tel = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
ms = [t.get("metrics", {}).get("load_ms") for t in tel
      if t["source"] == "phase" and t["phase"] == "model_loaded"]
ms = next((m for m in ms if m is not None), float("nan"))
print(f'{sys.argv[3][-28:]:<28} {sys.argv[4]:<14} {sys.argv[5]:>4} {job["state"]:<10} {ms:9.0f}')
PY
            tail -1 "$table"
            grep -h "generating on\|quantiz" "$work/watch-$(basename "$bin")-$shape-$run.txt" | head -3
        done
    done
    kill $agent $coord 2>/dev/null
    wait 2>/dev/null
done
echo
cat "$table"
