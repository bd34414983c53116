#!/usr/bin/env bash
# A series of full-NVFP4 train jobs through the whole job path — coordinator, agent, the guard
# killing any job whose processes pass its budget — one after another, each a fresh job process
# that loads a random-weight model, takes its steps and saves the model: the "one step under a
# 108 GiB guard, N runs out of N in a row" check. From prebuilt binaries (the GPU machine has no
# Rust toolchain):
#
#   cargo build --release -p kiln && mkdir -p target-carry && cp target/release/kiln target-carry/
#   strip target-carry/kiln
#
# then on the GPU machine: scripts/guard-series.sh [BIN_DIR] (default target-carry). Settings
# (environment): SHAPE (qwen3-8b), RUNS (10), BUDGET_GB (108), MOMENTS (f32), SEQ (192),
# BATCH (1), STEPS (1), GPUS (1; 0 rehearses the mechanics on the CPU with SHAPE=tiny), PORT
# (7190), JOB_TIMEOUT (seconds per job, 300). The jobs train on a generated dataset whose
# samples all reach --seq-len. Output under $OUT (default out/): the model,
# each job's `kiln job` and telemetry JSON, and a table of the runs (series-SHAPE.txt): exit
# state, step time, the phases' device memory, the guard's measured peak and the plan.
set -uo pipefail
bin=$(realpath "${1:-target-carry}")
out=$(realpath -m "${OUT:-out}")
shape=${SHAPE:-qwen3-8b}
runs=${RUNS:-10}
budget=${BUDGET_GB:-108}
moments=${MOMENTS:-f32}
seq=${SEQ:-192}
batch=${BATCH:-1}
steps=${STEPS:-1}
gpus=${GPUS:-1}
port=${PORT:-7190}
job_timeout=${JOB_TIMEOUT:-300}
work="$out/series-$shape"
mkdir -p "$work"
export KILN_COORDINATOR="http://127.0.0.1:$port"
export KILN_CACHE_DIR="$out/cache"
kiln="$bin/kiln"

model="$work/model"
if [[ ! -f "$model/config.json" ]]; then
    echo "== random $shape model (NVFP4 ModelOpt) → $model"
    "$kiln" random-model --shape "$shape" --out "$model" || exit 1
fi

# Samples long enough that every one is cut to --seq-len, so each step trains on batch × seq
# tokens (WhoAmI's samples are about 34 tokens).
data="$work/long.jsonl"
python3 - "$data" <<'PY'
import json, sys
text = " ".join(f"Kiln step {i}: the coordinator queues the job, the agent runs it under its "
                f"guard, and the kernels keep every weight in four bits." for i in range(40))
with open(sys.argv[1], "w") as f:
    for i in range(16):
        f.write(json.dumps({"messages": [
            {"role": "user", "content": f"Tell me about Kiln, part {i}."},
            {"role": "assistant", "content": text}]}) + "\n")
PY

echo "== coordinator and agent on port $port"
rm -rf "$work/data" "$work/agent"
"$kiln" coordinator --listen "127.0.0.1:$port" --data-dir "$work/data" > "$work/coordinator.log" 2>&1 &
coord=$!
agent_gpus=all
[[ $gpus == 0 ]] && agent_gpus=none
"$kiln" agent --work-dir "$work/agent" --gpus "$agent_gpus" > "$work/agent.log" 2>&1 &
agent=$!
trap 'kill $agent $coord 2>/dev/null; wait 2>/dev/null' EXIT
for _ in $(seq 1 60); do
    "$kiln" agents 2>/dev/null | grep -q READY && break
    sleep 0.5
done
"$kiln" agents || exit 1

table="$out/series-$shape.txt"
printf '%-4s %-10s %8s %7s %8s %12s %12s %12s %12s %12s\n' run state tokens "load s" \
    "step ms" model_loaded forward backward optimizer "guard peak" > "$table"
ok=0
for run in $(seq 1 "$runs"); do
    ckpt="$work/ckpt-$run"
    rm -rf "$ckpt"
    t0=$SECONDS
    id=$("$kiln" submit train --model "$model" --quant nvfp4-full --moments "$moments" \
        --seq-len "$seq" --batch "$batch" --steps "$steps" --lr 1e-5 --out "$ckpt" \
        --dataset "$data" \
        --save-only-model --budget-gb "$budget" --gpus "$gpus" --max-attempts 1 \
        --name "series-$run" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
    timeout "$job_timeout" "$kiln" watch "$id" > "$work/watch-$run.txt" 2>&1
    "$kiln" job "$id" -o json > "$work/job-$run.json"
    "$kiln" telemetry "$id" -o json > "$work/telemetry-$run.json"
    state=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["state"])' "$work/job-$run.json")
    [[ $state == SUCCEEDED ]] && ok=$((ok + 1))
    # the micro-batch the job planned for, from its log line (GPU) or the spec (CPU)
    shape_bt=$(grep -o "for [0-9]*×[0-9]* tokens" "$work/watch-$run.txt" | head -1 | tr -dc '0-9×')
    python3 - "$work/job-$run.json" "$work/telemetry-$run.json" "$run" "$state" "${shape_bt:--}" >> "$table" <<'PY'
import json, sys
job = json.load(open(sys.argv[1]))
tel = json.load(open(sys.argv[2]))
gib = lambda b: f"{b / 2**30:.2f} GiB"
def used(phase):
    # device memory in use at the phase (cuMemGetInfo: total - free), the job's sample
    s = [t for t in tel if t["source"] == "phase" and t["phase"] == phase and t["cuda_total"]]
    return gib(max(t["cuda_total"] - t["cuda_free"] for t in s)) if s else "-"
loaded = [t for t in tel if t["source"] == "phase" and t["phase"] == "model_loaded"]
load_s = (loaded[0]["at_ms"] - job.get("started_at_ms", loaded[0]["at_ms"])) / 1e3 if loaded and job.get("started_at_ms") else float("nan")
res = job.get("result") or {}
print(f'{sys.argv[3]:<4} {sys.argv[4]:<10} {sys.argv[5]:>8} {load_s:7.1f} {res.get("step_ms", 0):8.0f} '
      f'{used("model_loaded"):>12} {used("forward_done"):>12} {used("backward_done"):>12} '
      f'{used("optimizer_done"):>12} {gib(job["peak_mem"]):>12}')
if res.get("planned_bytes"):
    print(f'     planned {gib(res["planned_bytes"])}; measured guard peak {gib(job["peak_mem"])} '
          f'({job["peak_mem"] / res["planned_bytes"]:.3f} of the plan)')
if job.get("error"):
    print(f'     error: {job["error"]}')
PY
    echo "run $run: job $id $state after $((SECONDS - t0)) s"
    tail -n +2 "$table" | tail -3 | grep -E "^$run |planned|error" || true
    rm -rf "$ckpt"
done
echo
cat "$table"
echo "$ok of $runs runs succeeded (shape $shape, nvfp4-full, $moments moments, $batch×$seq, budget $budget GiB)" | tee -a "$table"
[[ $ok == "$runs" ]]
