#!/usr/bin/env bash
# GPU check of exec jobs, end to end through the real binary (nothing is built here). Build
# first: `cargo build --release -p kiln` (strip target/release/kiln to carry it), then on the GPU
# machine, from the repository root:
#
#   scripts/gpu-exec-check.sh [KILN_BINARY]        (default: target/release/kiln)
#
# Starts a coordinator and an NVML agent with --allow-exec on GPU ${KILN_CHECK_GPU:-0}, then runs
# examples/pytorch_train.py (PyTorch, reporting phases with python/kiln_phase.py) as exec jobs:
#   1. hidden 4096 within a 6 GiB budget                       → SUCCEEDED, phases with NVML pid_mem
#   2. hidden 8192 (≈ 2.5 GiB with AdamW) under 1.5 GiB, --on-kill grow=3 → attempt 1 KILLED by the
#      guard, attempt 2 (4.5 GiB) SUCCEEDED, both attempts in the job's record
# Prints both jobs, their phases and a short table; logs go to $OUT (or ./out/gpu-exec-check).
set -uo pipefail

kiln=${1:-target/release/kiln}
gpu=${KILN_CHECK_GPU:-0}
port=${KILN_CHECK_PORT:-17370}
out=${OUT:-out/gpu-exec-check}
mkdir -p "$out"
work=$(mktemp -d /tmp/kiln-exec-check.XXXXXX)
export KILN_COORDINATOR="http://127.0.0.1:$port"
repo=$(pwd)

[[ -x "$kiln" ]] || { echo "error: $kiln is not an executable kiln binary" >&2; exit 2; }
python3 -c 'import torch' 2>/dev/null || { echo "error: this check needs PyTorch in python3" >&2; exit 2; }

coord_pid=""; agent_pid=""
cleanup() {
    [[ -n "$agent_pid" ]] && kill "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null
    [[ -n "$coord_pid" ]] && kill "$coord_pid" 2>/dev/null && wait "$coord_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

"$kiln" coordinator --listen "127.0.0.1:$port" --data-dir "$work/data" >"$out/coordinator.log" 2>&1 &
coord_pid=$!
for _ in $(seq 100); do "$kiln" agents -o json >/dev/null 2>&1 && break; sleep 0.1; done
"$kiln" agent --name exec-check --gpus "$gpu" --allow-exec --work-dir "$work/agent" \
    >"$out/agent.log" 2>&1 &
agent_pid=$!
for _ in $(seq 150); do
    "$kiln" agents -o json 2>/dev/null | grep -q '"allow_exec": true' && break
    sleep 0.2
done

run() { # BUDGET_GB HIDDEN [extra submit flags…] → job id
    local budget=$1 hidden=$2; shift 2
    "$kiln" submit exec --gpus 1 --budget-gb "$budget" --poll-secs 0.1 --max-attempts 2 "$@" \
        --env "PYTHONPATH=$repo/python" -o json -- \
        python3 "$repo/examples/pytorch_train.py" --steps 10 --hidden "$hidden" --device cuda \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'
}
ok=$(run 6 4096)
echo "== job $ok: hidden 4096 within 6 GiB"
"$kiln" watch "$ok" 2>&1 | tail -25 | tee "$out/job-$ok.watch"
grow=$(run 1.5 8192 --on-kill grow=3)
echo "== job $grow: hidden 8192 under 1.5 GiB, grow ×3 after a kill"
"$kiln" watch "$grow" 2>&1 | tail -25 | tee "$out/job-$grow.watch"
for id in "$ok" "$grow"; do
    "$kiln" job "$id" | tee "$out/job-$id.txt"
    "$kiln" job "$id" -o json >"$out/job-$id.json"
    "$kiln" telemetry "$id" -o json >"$out/telemetry-$id.json"
    "$kiln" telemetry "$id" | head -12
done

python3 - "$out/job-$ok.json" "$out/job-$grow.json" "$out/telemetry-$ok.json" <<'PY'
import json, sys
ok, grow, tel = (json.load(open(p)) for p in sys.argv[1:4])
gib = 1 << 30
phases = [r for r in tel if r["source"] == "phase"]
att = grow.get("attempts", [])
checks = [
    ("job 1 SUCCEEDED", ok["state"] == "SUCCEEDED"),
    ("job 1 reported phases from inside", {"model_loaded", "optimizer_done"} <= {r["phase"] for r in phases}),
    ("job 1 phases carry NVML pid_mem > 0", phases and all(r["pid_mem"] > 0 for r in phases)),
    ("job 1 phases carry CUDA allocator bytes", any(r["tensor_bytes"].get("allocated", 0) > 0 for r in phases)),
    ("job 2 attempt 1 KILLED by the guard", len(att) >= 1 and att[0]["state"] == "KILLED" and att[0].get("kill", {}).get("pid_mem", 0) > att[0]["budget_bytes"]),
    ("job 2 attempt 2 SUCCEEDED with 3× the budget", grow["state"] == "SUCCEEDED" and len(att) == 2 and att[1]["budget_bytes"] == 3 * att[0]["budget_bytes"]),
]
print()
for name, good in checks:
    print(f"{'PASS' if good else 'FAIL'}  {name}")
if att:
    k = att[0].get("kill", {})
    print(f"kill: pid_mem {k.get('pid_mem', 0) / gib:.2f} GiB > limit {k.get('limit', 0) / gib:.2f} GiB in phase {k.get('phase')}")
print(f"job 1 peak {ok['peak_mem'] / gib:.2f} GiB; job 2 final peak {grow['peak_mem'] / gib:.2f} GiB")
sys.exit(0 if all(g for _, g in checks) else 1)
PY
