#!/usr/bin/env bash
# GPU check of the agent and its guard, end to end through the real binary (nothing is built
# here; the GPU machine has no Rust toolchain). Build on a dev machine first:
#
#   cargo build --release -p kiln        (then carry target/release/kiln; strip it if large)
#
# then, on the GPU machine, from the repository root:
#
#   scripts/gpu-agent-check.sh [KILN_BINARY]        (default: target/release/kiln)
#
# It starts a coordinator (sled in a temp dir) and an NVML agent on GPU ${KILN_CHECK_GPU:-0},
# then runs two GPU memtests through the real gRPC API:
#   1. 4 GiB in 4 steps with a 8 GiB budget            → must be SUCCEEDED
#   2. 16 GiB in 8 steps with a 6 GiB budget, over 0 s → must be KILLED, with the NVML per-pid
#      memory in the kill record (pid_mem > limit), and its process gone from nvidia-smi
# KILN_CHECK_GPU=none KILN_CHECK_OK_GIB=0.25 KILN_CHECK_KILL_GIB=1 runs the same on a CPU box.
# Prints the agent, both jobs and their telemetry as JSON, then a short table. Logs go to $OUT
# (or ./out/gpu-agent-check). Exit status 0 only when every check passed.
set -uo pipefail

kiln=${1:-target/release/kiln}
gpu=${KILN_CHECK_GPU:-0}            # `none`: the same check on a CPU agent (host memory)
ok_gib=${KILN_CHECK_OK_GIB:-4}      # job 1: allocate this within a budget of 2× it
kill_gib=${KILN_CHECK_KILL_GIB:-16} # job 2: allocate this against a budget of 3/8 of it
port=${KILN_CHECK_PORT:-17070}
out=${OUT:-out/gpu-agent-check}
mkdir -p "$out"
work=$(mktemp -d /tmp/kiln-agent-check.XXXXXX)
url="http://127.0.0.1:$port"
export KILN_COORDINATOR=$url

if [[ ! -x "$kiln" ]]; then
    echo "error: $kiln is not an executable kiln binary (build it with cargo build --release -p kiln)" >&2
    exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv | tee "$out/nvidia-smi-before.csv"

coord_pid=""; agent_pid=""
cleanup() {
    # Only the processes this script started, by pid.
    [[ -n "$agent_pid" ]] && kill "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null
    [[ -n "$coord_pid" ]] && kill "$coord_pid" 2>/dev/null && wait "$coord_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

"$kiln" coordinator --listen "127.0.0.1:$port" --data-dir "$work/data" >"$out/coordinator.log" 2>&1 &
coord_pid=$!
for _ in $(seq 100); do
    "$kiln" agents -o json >/dev/null 2>&1 && break
    sleep 0.1
done
"$kiln" agent --coordinator "$url" --name gpu-check --gpus "$gpu" --work-dir "$work/agent" \
    >"$out/agent.log" 2>&1 &
agent_pid=$!

# Wait for the agent to register with its GPU.
agents_json=""
for _ in $(seq 150); do
    agents_json=$("$kiln" agents -o json 2>/dev/null)
    if echo "$agents_json" | python3 -c '
import json, sys
a = json.load(sys.stdin)
a = a if isinstance(a, list) else a.get("agents", [])
sys.exit(0 if any(x.get("name") == "gpu-check" and x.get("gpus") for x in a) else 1)' 2>/dev/null; then
        break
    fi
    sleep 0.2
done
echo "== agents"; echo "$agents_json" | tee "$out/agents.json"

slot_gpus=1
[[ "$gpu" == "none" ]] && slot_gpus=0
ok_budget=$(python3 -c "print($ok_gib * 2)")
kill_budget=$(python3 -c "print($kill_gib * 3 / 8)")

# submit GIB STEPS BUDGET_GB → prints the job id
submit() {
    "$kiln" submit memtest --gib "$1" --steps "$2" --hold-secs 2 --step-pause-secs 0.5 \
        --budget-gb "$3" --over-secs 0 --poll-secs 0.1 --max-attempts 1 --gpus "$slot_gpus" \
        -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'
}

ok_id=$(submit "$ok_gib" 4 "$ok_budget")
echo "== job $ok_id: $ok_gib GiB within a $ok_budget GiB budget"
"$kiln" watch "$ok_id" 2>&1 | tee "$out/job-$ok_id.watch"
kill_id=$(submit "$kill_gib" 8 "$kill_budget")
echo "== job $kill_id: $kill_gib GiB against a $kill_budget GiB budget"
"$kiln" watch "$kill_id" 2>&1 | tee "$out/job-$kill_id.watch"
sleep 1
command -v nvidia-smi >/dev/null && nvidia-smi --query-compute-apps=pid,used_memory --format=csv | tee "$out/nvidia-smi-after.csv"

for id in "$ok_id" "$kill_id"; do
    echo "== job $id"
    "$kiln" job "$id" -o json | tee "$out/job-$id.json"
    "$kiln" telemetry "$id" --guard -o json >"$out/telemetry-$id.json"
done

touch "$out/nvidia-smi-after.csv"
python3 - "$out/job-$ok_id.json" "$out/job-$kill_id.json" "$out/nvidia-smi-after.csv" \
    "$ok_gib" "$kill_budget" <<'EOF'
import json, sys
ok = json.load(open(sys.argv[1]))
killed = json.load(open(sys.argv[2]))
apps = open(sys.argv[3]).read()
ok_gib, kill_budget = float(sys.argv[4]), float(sys.argv[5])
gib = 1 << 30
checks = []
def check(name, cond):
    checks.append((name, bool(cond)))
check("within-budget job SUCCEEDED", ok.get("state") == "SUCCEEDED")
check(f"within-budget peak_mem >= {ok_gib} GiB (per-pid)", ok.get("peak_mem", 0) >= ok_gib * gib)
check("over-budget job KILLED", killed.get("state") == "KILLED")
k = killed.get("kill") or {}
check("kill.pid_mem > kill.limit", k.get("pid_mem", 0) > k.get("limit", 1 << 62))
check(f"kill.limit == {kill_budget} GiB", abs(k.get("limit", 0) - kill_budget * gib) < 4096)
check("kill.phase == memtest_step", k.get("phase") == "memtest_step")
check("kill.total_mem >= kill.pid_mem", k.get("total_mem", 0) >= k.get("pid_mem", 1))
check("killed pid gone from nvidia-smi", str(k.get("pid", "?")) not in [l.split(",")[0].strip() for l in apps.splitlines()[1:]])
print()
print(f"{'check':<50} result")
for name, good in checks:
    print(f"{name:<50} {'ok' if good else 'FAILED'}")
mib = 1 << 20
print(f"\nkill record: pid={k.get('pid')} pid_mem={k.get('pid_mem', 0)/mib:.1f} MiB "
      f"total_mem={k.get('total_mem', 0)/mib:.1f} MiB limit={k.get('limit', 0)/mib:.1f} MiB phase={k.get('phase')}")
print(f"within-budget peak: {ok.get('peak_mem', 0)/mib:.1f} MiB")
sys.exit(0 if all(g for _, g in checks) else 1)
EOF
