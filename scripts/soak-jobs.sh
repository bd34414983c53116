#!/usr/bin/env bash
# Soak run of the control plane at a scale the test suite does not reach: one coordinator, two
# CPU agents, thousands of short memtests submitted by concurrent clients, with the coordinator
# and an agent killed (-9) and restarted while jobs run. Nothing is built here:
#
#   cargo build --release -p kiln
#   scripts/soak-jobs.sh [KILN_BINARY]          (default: target/release/kiln)
#
# Knobs (environment): SOAK_JOBS (default 3000), SOAK_CLIENTS (3), SOAK_RESTARTS (2: how many
# coordinator kill -9 + restart rounds, each followed by an agent kill -9 + restart),
# SOAK_AGENT_MEM_GB (8: host memory each agent offers; 0.1 GiB per job, so 80 jobs at once per
# agent), SOAK_PORT (17170), OUT (logs; default ./out/soak-jobs).
#
# Invariants checked at the end (exit status 0 only when all hold):
#   1. every job whose submit was acknowledged (an id came back) exists and is in exactly one
#      terminal state (SUCCEEDED, FAILED, CANCELLED, KILLED or LOST);
#   2. no job is FAILED without a cause, and none is FAILED "without reporting a result"
#      (a job that did its work and exited 0 is SUCCEEDED);
#   3. every job's event log is gap-free: sequence numbers 1..n with none missing or repeated;
#   4. with no faults of the jobs' own, every job SUCCEEDED (a LOST job is one whose agent was
#      killed under it and whose attempts ran out; it is reported, and allowed).
set -uo pipefail

kiln=${1:-target/release/kiln}
jobs=${SOAK_JOBS:-3000}
clients=${SOAK_CLIENTS:-3}
restarts=${SOAK_RESTARTS:-2}
agent_mem_gb=${SOAK_AGENT_MEM_GB:-8}
port=${SOAK_PORT:-17170}
out=${OUT:-out/soak-jobs}
mkdir -p "$out"
work=$(mktemp -d /tmp/kiln-soak.XXXXXX)
export KILN_COORDINATOR="http://127.0.0.1:$port"

if [[ ! -x "$kiln" ]]; then
    echo "error: $kiln is not an executable kiln binary (build it with cargo build --release -p kiln)" >&2
    exit 2
fi
command -v python3 >/dev/null || { echo "error: the checks need python3" >&2; exit 2; }

coord_pid=""
declare -A agent_pid
cleanup() {
    for p in "$coord_pid" "${agent_pid[@]}"; do
        [[ -n "$p" ]] && kill -9 "$p" 2>/dev/null
    done
    wait 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

start_coordinator() {
    "$kiln" coordinator --listen "127.0.0.1:$port" --data-dir "$work/coord" --lease-secs 3 \
        >>"$out/coordinator.log" 2>&1 &
    coord_pid=$!
    for _ in $(seq 100); do "$kiln" agents -o json >/dev/null 2>&1 && return; sleep 0.1; done
    echo "error: the coordinator did not come up; see $out/coordinator.log" >&2
    exit 1
}

start_agent() {
    "$kiln" agent --name "$1" --gpus none --mem-limit-gb "$agent_mem_gb" --work-dir "$work/$1" \
        >>"$out/agent-$1.log" 2>&1 &
    agent_pid[$1]=$!
}

start_coordinator
start_agent soak-a
start_agent soak-b

# Clients submit in parallel; each acknowledged id is appended to its own file.
per_client=$(( (jobs + clients - 1) / clients ))
submit_loop() {
    local n=$1 file=$2 i=0
    while (( i < n )); do
        local said
        # "submitted job ID (QUEUED)"
        if said=$("$kiln" submit memtest --gib 0.01 --steps 2 --step-pause-secs 0.3 --hold-secs 1.5 \
            --budget-gb 0.1 --gpus 0 --max-attempts 3 2>>"$file.err"); then
            read -r _ _ id _ <<<"$said"
            echo "$id" >>"$file"
            i=$((i + 1))
        else
            sleep 0.2 # coordinator down (restarting): try again
        fi
    done
}
start=$(date +%s)
client_pids=()
for c in $(seq "$clients"); do
    : >"$out/acked-$c.txt"
    submit_loop "$per_client" "$out/acked-$c.txt" &
    client_pids+=($!)
done

# Faults while the clients submit and the agents run.
for r in $(seq "$restarts"); do
    sleep 8
    echo "round $r: kill -9 coordinator"
    kill -9 "$coord_pid"; wait "$coord_pid" 2>/dev/null
    sleep 1
    start_coordinator
    sleep 5
    echo "round $r: kill -9 agent soak-b"
    kill -9 "${agent_pid[soak-b]}"; wait "${agent_pid[soak-b]}" 2>/dev/null
    sleep 1
    start_agent soak-b
done
for p in "${client_pids[@]}"; do wait "$p"; done
echo "all clients done after $(( $(date +%s) - start )) s; waiting for the queue to drain"

cat "$out"/acked-*.txt >"$out/acked.txt"
while :; do
    "$kiln" jobs --limit 1000000 -o json >"$out/jobs.json" 2>/dev/null || { sleep 1; continue; }
    open=$(python3 -c '
import json,sys
jobs=json.load(open(sys.argv[1]))
print(sum(1 for j in jobs if j["state"] not in ("SUCCEEDED","FAILED","CANCELLED","KILLED","LOST")))
' "$out/jobs.json")
    [[ "$open" == 0 ]] && break
    echo "  $open jobs not final yet"
    sleep 3
done
echo "queue drained after $(( $(date +%s) - start )) s; reading every job's event log"

mkdir -p "$out/watch"
export kiln out
xargs -P 4 -I{} sh -c '"$kiln" watch {} -o json >"$out/watch/{}.jsonl" 2>&1' <"$out/acked.txt"

python3 - "$out" <<'EOF'
import json, sys, collections
out = sys.argv[1]
acked = [int(x) for x in open(f"{out}/acked.txt").read().split()]
jobs = {j["id"]: j for j in json.load(open(f"{out}/jobs.json"))}
def watched(i):
    seqs, final = [], None
    for line in open(f"{out}/watch/{i}.jsonl"):
        try:
            v = json.loads(line)
        except ValueError:
            return {"seqs": seqs, "state": f"unreadable watch output: {line.strip()}"}
        if "seq" in v:
            seqs.append(v["seq"])
        else:
            final = v
    return {"seqs": seqs, "state": final and final["state"]}
terminal = {"SUCCEEDED", "FAILED", "CANCELLED", "KILLED", "LOST"}
bad = []
states = collections.Counter()
for i in acked:
    j = jobs.get(i)
    if j is None:
        bad.append(f"job {i}: acknowledged but unknown to the coordinator"); continue
    states[j["state"]] += 1
    if j["state"] not in terminal:
        bad.append(f"job {i}: not final ({j['state']})")
    if j["state"] == "FAILED" and (not j["error"] or "without reporting a result" in j["error"]):
        bad.append(f"job {i}: FAILED without a cause: {j['error']!r}")
    e = watched(i)
    if e["state"] != j["state"]:
        bad.append(f"job {i}: watch ended in {e['state']}, the job record says {j['state']}")
    elif e["seqs"] != list(range(1, len(e["seqs"]) + 1)):
        bad.append(f"job {i}: event sequence has gaps or repeats: {e['seqs']}")
if len(set(acked)) != len(acked):
    bad.append("the same id was acknowledged twice")
print(f"\n{'jobs acknowledged':<28}{len(acked):>8}")
for s in sorted(states):
    print(f"{s:<28}{states[s]:>8}")
print(f"{'invariant violations':<28}{len(bad):>8}")
for b in bad[:50]:
    print("  " + b)
sys.exit(1 if bad else 0)
EOF
