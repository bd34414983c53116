#!/usr/bin/env python3
"""HF transformers bf16 anchor for `kiln bench engine --device cuda`.

Random-weight Qwen2.5-0.5B and Qwen2.5-7B shapes (no download), on one GPU:
- decode tokens/s at batch 1: a StaticCache and the decode step captured manually as a CUDA
  graph (the strongest HF setting; the next token is fed back on the device, no host read per
  token), after a prompt of --prompt tokens, --new tokens;
- prefill: one eager forward (sdpa) of 512 and 2,048 prompt tokens, logits of the last position
  only, as time to first token.
Prints a table; with --json FILE writes what `kiln bench engine --anchor FILE` reads.
"""
import argparse
import json
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

SHAPES = {
    "qwen2.5-0.5b-shape": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                               num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                               tie_word_embeddings=True),
    "qwen2.5-7b-shape": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                             num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                             tie_word_embeddings=False),
}


def build(shape):
    cfg = Qwen2Config(max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                      attn_implementation="sdpa", **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()
    return cfg, model


def static_cache(cfg, max_len):
    from transformers import StaticCache
    try:
        return StaticCache(config=cfg, max_cache_len=max_len)
    except TypeError:
        return StaticCache(config=cfg, max_batch_size=1, max_cache_len=max_len,
                           device="cuda", dtype=torch.bfloat16)


@torch.inference_mode()
def decode_rate(cfg, model, prompt, new):
    cache = static_cache(cfg, prompt + new + 8)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt), device="cuda")
    pos = torch.arange(prompt, device="cuda")
    out = model(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True,
                logits_to_keep=1)
    tok = out.logits[:, -1].argmax(-1).view(1, 1)
    tok_s = tok.clone()
    pos_s = torch.tensor([prompt], device="cuda")

    def step():
        o = model(input_ids=tok_s, past_key_values=cache, cache_position=pos_s,
                  position_ids=pos_s.view(1, 1), use_cache=True)
        return o.logits[:, -1].argmax(-1).view(1, 1)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        nxt = step()
    pos_s.fill_(prompt)
    # warm-up replays, then the timed ones (the token and position fed back on the device)
    for _ in range(4):
        g.replay()
        tok_s.copy_(nxt)
        pos_s.add_(1)
    pos_s.fill_(prompt)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(new):
        g.replay()
        tok_s.copy_(nxt)
        pos_s.add_(1)
    torch.cuda.synchronize()
    return new / (time.perf_counter() - t)


@torch.inference_mode()
def prefill_ms(cfg, model, n):
    ids = torch.randint(0, cfg.vocab_size, (1, n), device="cuda")
    best = float("inf")
    for _ in range(4):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
        out.logits[:, -1].argmax(-1).item()
        best = min(best, (time.perf_counter() - t) * 1e3)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--skip-7b", action="store_true")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    rows = []
    for shape in SHAPES:
        if a.skip_7b and "7b" in shape:
            continue
        cfg, model = build(shape)
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        rate = decode_rate(cfg, model, a.prompt, a.new)
        pre = [(n, prefill_ms(cfg, model, n)) for n in (512, 2048)]
        rows.append(dict(model=shape, decode_tok_s=rate, prefill_ms=pre, param_bytes=params))
        print(f"{shape}: HF bf16 decode {rate:.1f} tok/s (static cache + CUDA graph); "
              f"prefill " + ", ".join(f"{n} tokens {ms:.2f} ms" for n, ms in pre)
              + f"; parameters {params / 1e9:.2f} GB", flush=True)
        del model
        torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
