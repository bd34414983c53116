#!/usr/bin/env python3
"""PyTorch anchor for `kiln bench train --device cuda`.

A random-init Qwen2.5-0.5B-shaped model (HF transformers, sdpa attention, no download) trained on
random tokens, batch --batch × --seq, on one GPU, two ways:
- `none`: fp32 master weights, bf16 autocast, fused AdamW (PyTorch's usual mixed precision);
- `nvfp4-ste`: the same with every decoder linear's weight fake-quantized to NVFP4 in the
  forward (tensor scale from the amax, E4M3 scale per 16 inputs, E2M1 round to nearest) and the
  gradient passed straight through to the master weight.
Reports tokens/s (median of --steps steps after two warm-ups) and the peak allocated bytes.
Prints a table; with --json FILE writes what `kiln bench train --anchor FILE` reads.
"""
import argparse
import json
import time
import types

import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

SHAPE = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def fake_quant_nvfp4(w):
    """NVFP4 quantize → dequantize of a [out, in] weight (in a multiple of 16), round to nearest."""
    grid = torch.tensor(E2M1, device=w.device, dtype=torch.float32)
    mids = (grid[1:] + grid[:-1]) / 2
    w32 = w.float()
    amax = w32.abs().max()
    ts = torch.where(amax > 0, amax / (6 * 448), torch.ones_like(amax))
    b = w32.reshape(-1, 16)
    s = (b.abs().amax(dim=1, keepdim=True) / (6 * ts)).clamp(min=2.0 ** -9)
    s = s.to(torch.float8_e4m3fn).to(torch.float32)
    q = b / (s * ts)
    idx = torch.bucketize(q.abs().clamp(max=6.0), mids)
    deq = grid[idx] * torch.sign(q) * s * ts
    return deq.reshape(w.shape).to(w.dtype)


def ste_forward(self, x):
    w = self.weight
    wq = w + (fake_quant_nvfp4(w.detach()) - w).detach()
    return F.linear(x, wq, self.bias)


def build(ste):
    cfg = Qwen2Config(max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                      attn_implementation="sdpa", **SHAPE)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).float().train()
    if ste:
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and "layers." in name:
                m.forward = types.MethodType(ste_forward, m)
    return cfg, model


def run(mode, batch, seq, steps):
    cfg, model = build(mode == "nvfp4-ste")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda", generator=g)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    times.sort()
    step_s = times[len(times) // 2]
    row = dict(model="qwen2.5-0.5b", quant=mode, tok_s=batch * seq / step_s,
               peak_bytes=int(torch.cuda.max_memory_allocated()), step_ms=step_s * 1e3,
               loss=float(loss))
    del model, opt
    torch.cuda.empty_cache()
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--json", help="write the rows for `kiln bench train --anchor`")
    a = p.parse_args()
    rows = [run(m, a.batch, a.seq, a.steps) for m in ("none", "nvfp4-ste")]
    print(f"PyTorch {torch.__version__} on {torch.cuda.get_device_name()}, "
          f"Qwen2.5-0.5B shape, {a.batch} × {a.seq} tokens per step")
    for r in rows:
        print(f"  {r['quant']:>10}: {r['step_ms']:8.1f} ms/step  {r['tok_s']:9.0f} tok/s  "
              f"peak {r['peak_bytes'] / 2**30:.1f} GiB  loss {r['loss']:.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
