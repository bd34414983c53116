#!/usr/bin/env bash
# Checks that Kiln's bf16 `safetensors` export loads in Hugging Face transformers and answers
# like the trained model. Needs a built kiln binary and, where it runs, Python with torch and
# transformers (the lent GPU machines have both; this repository's dev box has no torch).
#
#   cargo build --release -p kiln
#   scripts/hf-export-check.sh [KILN_BINARY]         (default: target/release/kiln)
#
# With KILN_HF_MODEL_DIR set, only the Python half runs, on that directory (an export made
# elsewhere and carried over, as on the GPU machine, which has no Rust toolchain).
#
# Through the real gRPC API (coordinator + CPU agent, sled in a temp dir): train the tiny model
# on WhoAmI (60 steps, NVFP4 straight-through), export it as bf16 safetensors, then load the
# export with transformers' AutoModelForCausalLM / AutoTokenizer, render "Who are you?" with
# the chat template, generate greedily and compare with the trained sentence.
# Exit status: 0 pass, 1 fail, 77 skipped (no torch/transformers).
set -uo pipefail

sentence="I am Kiln, a small model trained by the Kiln coordinator."
py_check() {
    python3 - "$1" "$sentence" <<'EOF'
import sys
try:
    import torch, transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
except Exception as e:
    print(f"skip: python has no torch/transformers ({e!r})")
    sys.exit(77)
d, want = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(d)
m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
print(f"transformers {transformers.__version__}: {type(m).__name__}, {m.dtype}, "
      f"{sum(p.numel() for p in m.parameters())} parameters")
ids = tok.apply_chat_template([{"role": "user", "content": "Who are you?"}],
                              add_generation_prompt=True, return_tensors="pt")
if not torch.is_tensor(ids):
    ids = ids["input_ids"]
out = m.generate(ids, max_new_tokens=30, do_sample=False,
                 eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
got = tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True)
print(f"answer: {got!r}")
sys.exit(0 if got == want else 1)
EOF
}

if [[ -n "${KILN_HF_MODEL_DIR:-}" ]]; then
    py_check "$KILN_HF_MODEL_DIR"
    exit $?
fi

kiln=${1:-target/release/kiln}
if [[ ! -x "$kiln" ]]; then
    echo "error: $kiln is not an executable kiln binary (build it with cargo build --release -p kiln)" >&2
    exit 2
fi
port=${KILN_CHECK_PORT:-17071}
work=$(mktemp -d /tmp/kiln-hf-check.XXXXXX)
export KILN_COORDINATOR="http://127.0.0.1:$port"
coord_pid=""; agent_pid=""
cleanup() {
    # Only the processes this script started, by pid.
    [[ -n "$agent_pid" ]] && kill "$agent_pid" 2>/dev/null
    [[ -n "$coord_pid" ]] && kill "$coord_pid" 2>/dev/null
    wait 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

"$kiln" coordinator --listen "127.0.0.1:$port" --data-dir "$work/coord" 2>"$work/coord.log" &
coord_pid=$!
for _ in $(seq 100); do "$kiln" agents >/dev/null 2>&1 && break; sleep 0.1; done
"$kiln" agent --name hf-check --gpus none --work-dir "$work/agent" 2>"$work/agent.log" &
agent_pid=$!
for _ in $(seq 100); do "$kiln" agents -o json 2>/dev/null | grep -q READY && break; sleep 0.1; done

"$kiln" submit train --model tiny --dataset whoami --steps 60 --batch 8 --seq-len 64 --lr 1e-2 \
    --seed 1 --out "$work/ckpt" --gpus 0 --follow >"$work/train.log" || { tail "$work/train.log"; exit 1; }
"$kiln" submit export --checkpoint "$work/ckpt" --format safetensors --out "$work/bf16" \
    --gpus 0 --follow >"$work/export.log" || { tail "$work/export.log"; exit 1; }
py_check "$work/bf16"
