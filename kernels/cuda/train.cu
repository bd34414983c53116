// train.cu — the kernels of a GPU train step other than the GEMMs (cuBLAS does those, bf16
// inputs, f32 accumulation and f32 outputs): embedding gather / scatter-add, RMSNorm forward
// and backward, the q/k/v epilogue (bias + RoPE into the attention layout) and its backward,
// Qwen3's per-head q/k RMSNorm and its backward, the causal softmax of attention scores and its
// backward, the head merge / split around the output projection, SwiGLU forward and backward,
// cross-entropy over a chunk of logits (loss and dlogits in one pass), the straight-through
// NVFP4 fake-quant of a master weight, and AdamW as one multi-tensor kernel with the
// global-norm clip computed on the device.
//
// Layouts (N = B·T tokens, row-major):
// - the residual stream h and its gradient dh: f32 [N, H];
// - GEMM inputs (normed activations, attention probabilities, SwiGLU output, gradients fed to
//   the backward GEMMs): bf16 (u16 bits); GEMM outputs: f32;
// - attention runs as strided-batched GEMMs per (sequence b, KV head g): queries in "group"
//   layout [B][kvh][rep][T][hd] (the rep = nh / kvh query heads sharing KV head g, their T rows
//   stacked, so one GEMM covers them and dK / dV sum over them for free), keys and values
//   [B][kvh][T][hd], scores and probabilities [B][kvh][rep·T][T]. Row r of a group's scores
//   is the query at position r % T.
// - q/k/v projections: one GEMM over the stacked q, k, v rows gives f32 [N, (nh + 2·kvh)·hd].
//
// Plain launches (no PDL), no atomics except the documented scatter-adds and sums (their order
// varies between runs, so those outputs agree with a reference to rounding, not bit for bit).

#include "block_reduce.cuh"

// ---------------------------------------------------------------------------------------------
// Embedding

// h[n, :] = table[ids[n], :] (f32 master table). Grid N, any block size.
extern "C" __global__ void kiln_train_embed_fwd(const int* __restrict__ ids,
                                                const float* __restrict__ table,
                                                float* __restrict__ h, int H) {
    const size_t n = blockIdx.x;
    const float* row = table + (size_t)ids[n] * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x) h[n * H + i] = row[i];
}

// dtable[ids[n], :] += dh[n, :] (atomic: repeated ids add up). Grid N, any block size.
extern "C" __global__ void kiln_train_embed_bwd(const int* __restrict__ ids,
                                                const float* __restrict__ dh,
                                                float* __restrict__ dtable, int H) {
    const size_t n = blockIdx.x;
    float* row = dtable + (size_t)ids[n] * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x) atomicAdd(row + i, dh[n * H + i]);
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: y = h · r · w with r = 1 / sqrt(mean(h²) + eps)

// y[n, :] (bf16) and r[n]. Grid N, block a multiple of 32.
extern "C" __global__ void kiln_train_rmsnorm_fwd(const float* __restrict__ h,
                                                  const float* __restrict__ w,
                                                  u16* __restrict__ y, float* __restrict__ rstd,
                                                  int H, float eps) {
    __shared__ float red[32];
    const size_t base = (size_t)blockIdx.x * H;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        const float v = h[base + i];
        ss += v * v;
    }
    const float r = rsqrtf(kiln_block_sum(ss, red) / (float)H + eps);
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
    for (int i = threadIdx.x; i < H; i += blockDim.x) y[base + i] = kiln_f32_to_bf16(h[base + i] * r * w[i]);
}

// Backward of y = h·r·w given dy (f32, a GEMM's output):
//   dh[n, i] += r·w_i·dy_i − h_i · r³ · (Σ_j dy_j w_j h_j) / H   (added: the residual's gradient
//   flows past the norm), dw_i += Σ_n dy_i · h_i · r.
// Each block takes rows_per_block rows; dw is summed in registers over them and added once per
// block (atomic). Grid ceil(N / rows_per_block), block a multiple of 32 with H ≤ 8 · blockDim.
#define KILN_NORM_COLS_PER_THREAD 8
extern "C" __global__ void __launch_bounds__(1024) kiln_train_rmsnorm_bwd(const float* __restrict__ h,
                                                  const float* __restrict__ w,
                                                  const float* __restrict__ rstd,
                                                  const float* __restrict__ dy,
                                                  float* __restrict__ dh, float* __restrict__ dw,
                                                  int N, int H, int rows_per_block) {
    __shared__ float red[32];
    float dw_acc[KILN_NORM_COLS_PER_THREAD];
#pragma unroll
    for (int k = 0; k < KILN_NORM_COLS_PER_THREAD; ++k) dw_acc[k] = 0.0f;
    const int n0 = blockIdx.x * rows_per_block;
    const int n1 = min(N, n0 + rows_per_block);
    for (int n = n0; n < n1; ++n) {
        const size_t base = (size_t)n * H;
        const float r = rstd[n];
        float dot = 0.0f;
        for (int i = threadIdx.x; i < H; i += blockDim.x) dot += dy[base + i] * w[i] * h[base + i];
        dot = kiln_block_sum(dot, red);
        const float c = r * r * r * dot / (float)H;
#pragma unroll
        for (int k = 0; k < KILN_NORM_COLS_PER_THREAD; ++k) {
            const int i = threadIdx.x + k * blockDim.x;
            if (i < H) {
                const float g = dy[base + i], x = h[base + i];
                dh[base + i] += r * w[i] * g - x * c;
                dw_acc[k] += g * x * r;
            }
        }
    }
#pragma unroll
    for (int k = 0; k < KILN_NORM_COLS_PER_THREAD; ++k) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < H) atomicAdd(dw + i, dw_acc[k]);
    }
}

// ---------------------------------------------------------------------------------------------
// q/k/v epilogue: bias, RoPE (rotate-half, position t = n % T), into the attention layout

__device__ __forceinline__ void kiln_rope_pair(float& a, float& b, float angle, float sign) {
    float s, c;
    sincosf(angle, &s, &c);
    s *= sign;
    const float x = a, y = b;
    a = x * c - y * s;
    b = y * c + x * s;
}

// Where a column pair of head `head` (of the stacked q, k, v heads) of token (b, t) lives in the
// attention layouts: which buffer (0 q, 1 k, 2 v) and the offset of its head_dim row there.
__device__ __forceinline__ size_t kiln_qkv_slot(int head, int b, int t, int T, int nh, int kvh,
                                                int hd, int* which) {
    const int rep = nh / kvh;
    if (head < nh) {
        *which = 0;
        return ((((size_t)b * kvh + head / rep) * rep + head % rep) * T + t) * hd;
    }
    *which = head < nh + kvh ? 1 : 2;
    return (((size_t)b * kvh + (head - nh - (*which == 2 ? kvh : 0))) * T + t) * hd;
}

// Forward. qkv f32 [N, (nh + 2·kvh)·hd] (+ bias f32 [(nh + 2·kvh)·hd], or null) →
// q bf16 [B][kvh][rep][T][hd] (RoPE), k bf16 [B][kvh][T][hd] (RoPE), v bf16 [B][kvh][T][hd].
// Grid N, any block size (its threads stride over the (nh + 2·kvh)·hd/2 rotation pairs).
extern "C" __global__ void kiln_train_qkv_fwd(const float* __restrict__ qkv,
                                              const float* __restrict__ bias,
                                              const float* __restrict__ inv_freq,
                                              u16* __restrict__ q, u16* __restrict__ k,
                                              u16* __restrict__ v, int T, int nh, int kvh,
                                              int hd) {
    const int n = blockIdx.x, b = n / T, t = n % T;
    const int half = hd / 2, heads = nh + 2 * kvh;
    const size_t row = (size_t)n * heads * hd;
    for (int e = threadIdx.x; e < heads * half; e += blockDim.x) {
        const int head = e / half, i = e % half;
        const int c0 = head * hd + i, c1 = c0 + half;
        float a = qkv[row + c0], c = qkv[row + c1];
        if (bias) {
            a += bias[c0];
            c += bias[c1];
        }
        int which;
        const size_t dst = kiln_qkv_slot(head, b, t, T, nh, kvh, hd, &which);
        if (which < 2) kiln_rope_pair(a, c, (float)t * inv_freq[i], 1.0f);
        u16* out = which == 0 ? q : (which == 1 ? k : v);
        out[dst + i] = kiln_f32_to_bf16(a);
        out[dst + i + half] = kiln_f32_to_bf16(c);
    }
}

// Backward: dq / dk / dv f32 in the attention layouts (GEMM outputs) → dqkv bf16
// [N, (nh + 2·kvh)·hd] (the inverse rotation), and dbias += Σ_n dqkv (null: no bias). Each block
// takes rows_per_block tokens; each thread owns at most KILN_QKV_PAIRS_PER_THREAD rotation pairs
// (block ≥ pairs / 4) and sums their bias gradient in registers over the block's tokens, adding
// it once per block (atomic).
// Grid ceil(N / rows_per_block), block a multiple of 32 with (nh + 2·kvh)·hd/2 ≤ 4·blockDim.
#define KILN_QKV_PAIRS_PER_THREAD 4
extern "C" __global__ void __launch_bounds__(1024)
kiln_train_qkv_bwd(const float* __restrict__ dq, const float* __restrict__ dk,
                   const float* __restrict__ dv, const float* __restrict__ inv_freq,
                   u16* __restrict__ dqkv, float* __restrict__ dbias, int N, int T, int nh,
                   int kvh, int hd, int rows_per_block) {
    const int half = hd / 2, heads = nh + 2 * kvh, pairs = heads * half;
    float acc[2 * KILN_QKV_PAIRS_PER_THREAD];
#pragma unroll
    for (int j = 0; j < 2 * KILN_QKV_PAIRS_PER_THREAD; ++j) acc[j] = 0.0f;
    const int n0 = blockIdx.x * rows_per_block, n1 = min(N, n0 + rows_per_block);
    for (int n = n0; n < n1; ++n) {
        const int b = n / T, t = n % T;
        const size_t row = (size_t)n * heads * hd;
#pragma unroll
        for (int j = 0; j < KILN_QKV_PAIRS_PER_THREAD; ++j) {
            const int e = threadIdx.x + j * blockDim.x;
            if (e >= pairs) break;
            const int head = e / half, i = e % half;
            const int c0 = head * hd + i, c1 = c0 + half;
            int which;
            const size_t src = kiln_qkv_slot(head, b, t, T, nh, kvh, hd, &which);
            const float* g = which == 0 ? dq : (which == 1 ? dk : dv);
            float a = g[src + i], c = g[src + i + half];
            if (which < 2) kiln_rope_pair(a, c, (float)t * inv_freq[i], -1.0f);
            dqkv[row + c0] = kiln_f32_to_bf16(a);
            dqkv[row + c1] = kiln_f32_to_bf16(c);
            acc[2 * j] += a;
            acc[2 * j + 1] += c;
        }
    }
    if (!dbias) return;
#pragma unroll
    for (int j = 0; j < KILN_QKV_PAIRS_PER_THREAD; ++j) {
        const int e = threadIdx.x + j * blockDim.x;
        if (e >= pairs) break;
        const int c0 = (e / half) * hd + e % half;
        atomicAdd(dbias + c0, acc[2 * j]);
        atomicAdd(dbias + c0 + half, acc[2 * j + 1]);
    }
}

// ---------------------------------------------------------------------------------------------
// Per-head q/k RMSNorm (Qwen3), on the q/k/v GEMM output before the epilogue

#define KILN_HEAD_MAX_PER_LANE 8  // head_dim ≤ 32 · 8 = 256

// In place on qkv f32 [N, (nh + 2·kvh)·hd] for the first nh + kvh heads of each token (the q
// heads, then the k heads): x = that head's hd values, r = 1/sqrt(mean(x²) + eps),
// x_i ← x_i·r·w_i with w = qw for a q head, kw for a k head. Saves x̂ = x·r (bf16,
// [N][nh + kvh][hd]) and r (f32, [N][nh + kvh]) for the backward. One warp per (token, head).
// Grid ceil(N·(nh + kvh) / (blockDim / 32)), block a multiple of 32.
extern "C" __global__ void kiln_train_head_norm_fwd(float* __restrict__ qkv,
                                                    const float* __restrict__ qw,
                                                    const float* __restrict__ kw,
                                                    u16* __restrict__ xhat,
                                                    float* __restrict__ rstd, int N, int nh,
                                                    int kvh, int hd, float eps) {
    const int lane = threadIdx.x & 31, heads = nh + kvh;
    const size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (size_t)N * heads) return;
    const int n = (int)(row / heads), j = (int)(row % heads);
    float* x = qkv + (size_t)n * (nh + 2 * kvh) * hd + (size_t)j * hd;
    const float* w = j < nh ? qw : kw;
    float v[KILN_HEAD_MAX_PER_LANE];
    float ss = 0.0f;
#pragma unroll
    for (int e = 0; e < KILN_HEAD_MAX_PER_LANE; ++e) {
        const int i = lane + 32 * e;
        v[e] = i < hd ? x[i] : 0.0f;
        ss += v[e] * v[e];
    }
    const float r = rsqrtf(kiln_warp_sum(ss) / (float)hd + eps);
#pragma unroll
    for (int e = 0; e < KILN_HEAD_MAX_PER_LANE; ++e) {
        const int i = lane + 32 * e;
        if (i >= hd) break;
        const float xh = v[e] * r;
        xhat[row * hd + i] = kiln_f32_to_bf16(xh);
        x[i] = xh * w[i];
    }
    if (lane == 0) rstd[row] = r;
}

// Backward, in place on dqkv bf16 [N, (nh + 2·kvh)·hd] (the epilogue backward's output: the
// gradient of the normed q and k): per (token, head) with g = w·dy,
// dx = r·(g − x̂·mean(g·x̂)); dqw / dkw += Σ dy·x̂ over the tokens and heads of that kind.
// Each block takes rows_per_block tokens, its warps striding over the heads; the weight
// gradients are summed in registers, then in shared memory, and added once per block (atomic).
// Grid ceil(N / rows_per_block), block a multiple of 32.
extern "C" __global__ void __launch_bounds__(1024)
kiln_train_head_norm_bwd(u16* __restrict__ dqkv, const u16* __restrict__ xhat,
                         const float* __restrict__ rstd, const float* __restrict__ qw,
                         const float* __restrict__ kw, float* __restrict__ dqw,
                         float* __restrict__ dkw, int N, int nh, int kvh, int hd,
                         int rows_per_block) {
    __shared__ float dw_sum[2 * 32 * KILN_HEAD_MAX_PER_LANE];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int heads = nh + kvh, cols = (nh + 2 * kvh) * hd;
    for (int t = threadIdx.x; t < 2 * hd; t += blockDim.x) dw_sum[t] = 0.0f;
    __syncthreads();
    float aq[KILN_HEAD_MAX_PER_LANE], ak[KILN_HEAD_MAX_PER_LANE];
#pragma unroll
    for (int e = 0; e < KILN_HEAD_MAX_PER_LANE; ++e) aq[e] = ak[e] = 0.0f;
    const int n0 = blockIdx.x * rows_per_block, n1 = min(N, n0 + rows_per_block);
    for (int n = n0; n < n1; ++n) {
        for (int j = warp; j < heads; j += warps) {
            const size_t row = (size_t)n * heads + j;
            u16* dy = dqkv + (size_t)n * cols + (size_t)j * hd;
            const float* w = j < nh ? qw : kw;
            const float r = rstd[row];
            float d[KILN_HEAD_MAX_PER_LANE], x[KILN_HEAD_MAX_PER_LANE];
            float dot = 0.0f;
#pragma unroll
            for (int e = 0; e < KILN_HEAD_MAX_PER_LANE; ++e) {
                const int i = lane + 32 * e;
                d[e] = i < hd ? kiln_bf16_to_f32(dy[i]) : 0.0f;
                x[e] = i < hd ? kiln_bf16_to_f32(xhat[row * hd + i]) : 0.0f;
                dot += (i < hd ? w[i] : 0.0f) * d[e] * x[e];
            }
            const float mean = kiln_warp_sum(dot) / (float)hd;
#pragma unroll
            for (int e = 0; e < KILN_HEAD_MAX_PER_LANE; ++e) {
                const int i = lane + 32 * e;
                if (i >= hd) break;
                dy[i] = kiln_f32_to_bf16(r * (w[i] * d[e] - x[e] * mean));
                if (j < nh) {
                    aq[e] += d[e] * x[e];
                } else {
                    ak[e] += d[e] * x[e];
                }
            }
        }
    }
#pragma unroll
    for (int e = 0; e < KILN_HEAD_MAX_PER_LANE; ++e) {
        const int i = lane + 32 * e;
        if (i >= hd) break;
        atomicAdd(dw_sum + i, aq[e]);
        atomicAdd(dw_sum + hd + i, ak[e]);
    }
    __syncthreads();
    for (int t = threadIdx.x; t < 2 * hd; t += blockDim.x)
        atomicAdd(t < hd ? dqw + t : dkw + (t - hd), dw_sum[t]);
}

// ---------------------------------------------------------------------------------------------
// Attention around the GEMMs

// p = softmax(scale · s) over the causal prefix of each row (row r of a group is position
// r % T; columns past it get probability 0). s f32 [rows, T] → p bf16 [rows, T].
// Grid rows (all groups), block a multiple of 32.
extern "C" __global__ void kiln_train_causal_softmax(const float* __restrict__ s,
                                                     u16* __restrict__ p, int T, float scale) {
    __shared__ float red[32];
    const size_t base = (size_t)blockIdx.x * T;
    const int len = (int)(blockIdx.x % T) + 1;
    float mx = KILN_NEG_INF;
    for (int j = threadIdx.x; j < len; j += blockDim.x) mx = fmaxf(mx, s[base + j] * scale);
    mx = kiln_block_max(mx, red);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < len; j += blockDim.x) sum += __expf(s[base + j] * scale - mx);
    const float inv = 1.0f / kiln_block_sum(sum, red);
    for (int j = threadIdx.x; j < T; j += blockDim.x)
        p[base + j] = j < len ? kiln_f32_to_bf16(__expf(s[base + j] * scale - mx) * inv) : (u16)0;
}

// ds = scale · p ⊙ (dp − Σ_j p_j dp_j) per row: the softmax's backward (its scale folded in).
// p bf16, dp f32 (dO·Vᵀ), ds bf16, all [rows, T]; masked columns (p = 0) get 0.
// Grid rows, block a multiple of 32.
extern "C" __global__ void kiln_train_softmax_bwd(const u16* __restrict__ p,
                                                  const float* __restrict__ dp,
                                                  u16* __restrict__ ds, int T, float scale) {
    __shared__ float red[32];
    const size_t base = (size_t)blockIdx.x * T;
    float dot = 0.0f;
    for (int j = threadIdx.x; j < T; j += blockDim.x) dot += kiln_bf16_to_f32(p[base + j]) * dp[base + j];
    dot = kiln_block_sum(dot, red);
    for (int j = threadIdx.x; j < T; j += blockDim.x) {
        const float pj = kiln_bf16_to_f32(p[base + j]);
        ds[base + j] = kiln_f32_to_bf16(scale * pj * (dp[base + j] - dot));
    }
}

// Attention output from the group layout to tokens: o f32 [B][kvh][rep][T][hd] →
// out bf16 [N, nh·hd] with head = g·rep + r (the O projection's input). Grid N.
extern "C" __global__ void kiln_train_merge_heads(const float* __restrict__ o,
                                                  u16* __restrict__ out, int T, int nh, int kvh,
                                                  int hd) {
    const int n = blockIdx.x, b = n / T, t = n % T, rep = nh / kvh;
    for (int e = threadIdx.x; e < nh * hd; e += blockDim.x) {
        const int head = e / hd, i = e % hd, g = head / rep, r = head % rep;
        out[(size_t)n * nh * hd + e] =
            kiln_f32_to_bf16(o[((((size_t)b * kvh + g) * rep + r) * T + t) * hd + i]);
    }
}

// The inverse, for the gradient: d f32 [N, nh·hd] → dst bf16 [B][kvh][rep][T][hd]. Grid N.
extern "C" __global__ void kiln_train_split_heads(const float* __restrict__ d,
                                                  u16* __restrict__ dst, int T, int nh, int kvh,
                                                  int hd) {
    const int n = blockIdx.x, b = n / T, t = n % T, rep = nh / kvh;
    for (int e = threadIdx.x; e < nh * hd; e += blockDim.x) {
        const int head = e / hd, i = e % hd, g = head / rep, r = head % rep;
        dst[((((size_t)b * kvh + g) * rep + r) * T + t) * hd + i] =
            kiln_f32_to_bf16(d[(size_t)n * nh * hd + e]);
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU: a = silu(g) · u, gu = [g | u] per row (f32 [N, 2·I], the stacked gate/up GEMM)

__device__ __forceinline__ float kiln_sigmoid(float x) { return 1.0f / (1.0f + __expf(-x)); }

// a bf16 [N, I]. Grid (ceil(I / blockDim), min(N, 65535)): column i of rows blockIdx.y,
// blockIdx.y + gridDim.y, … (no 64-bit division per element).
extern "C" __global__ void kiln_train_swiglu_fwd(const float* __restrict__ gu, u16* __restrict__ a,
                                                 int I, int N) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= I) return;
    for (int n = blockIdx.y; n < N; n += gridDim.y) {
        const size_t row = (size_t)n * 2 * I;
        const float g = gu[row + i], u = gu[row + I + i];
        a[(size_t)n * I + i] = kiln_f32_to_bf16(g * kiln_sigmoid(g) * u);
    }
}

// Given da f32 [N, I]: dg = da·u·σ(g)·(1 + g·(1 − σ(g))), du = da·g·σ(g) → dgu bf16 [N, 2·I].
// Grid (ceil(I / block), min(N, 65535)), as the forward.
extern "C" __global__ void kiln_train_swiglu_bwd(const float* __restrict__ gu,
                                                 const float* __restrict__ da,
                                                 u16* __restrict__ dgu, int I, int N) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= I) return;
    for (int n = blockIdx.y; n < N; n += gridDim.y) {
        const size_t row = (size_t)n * 2 * I;
        const float g = gu[row + i], u = gu[row + I + i], d = da[(size_t)n * I + i];
        const float sg = kiln_sigmoid(g);
        dgu[row + i] = kiln_f32_to_bf16(d * u * sg * (1.0f + g * (1.0f - sg)));
        dgu[row + I + i] = kiln_f32_to_bf16(d * g * sg);
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy over a chunk of rows of logits (the vocabulary GEMM's f32 output, one chunk of
// tokens at a time so [tokens × vocab] is never held whole).

// Row n: loss_n = logsumexp(logits[n]) − logits[n, target[n]], weighted by weight[n] (0 for a
// token outside the loss, 1/total-loss-tokens inside). loss_sum += Σ weight·loss (atomic, f64);
// dlogits[n] = weight · (softmax(logits[n]) − onehot(target[n])) as bf16 (zeros where weight
// is 0). Grid rows, block a multiple of 32.
extern "C" __global__ void kiln_train_cross_entropy(const float* __restrict__ logits,
                                                    const int* __restrict__ target,
                                                    const float* __restrict__ weight,
                                                    u16* __restrict__ dlogits,
                                                    double* __restrict__ loss_sum, int V) {
    __shared__ float red[32];
    const size_t base = (size_t)blockIdx.x * V;
    const float wt = weight[blockIdx.x];
    if (wt == 0.0f) {
        for (int j = threadIdx.x; j < V; j += blockDim.x) dlogits[base + j] = 0;
        return;
    }
    float mx = KILN_NEG_INF;
    for (int j = threadIdx.x; j < V; j += blockDim.x) mx = fmaxf(mx, logits[base + j]);
    mx = kiln_block_max(mx, red);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) sum += __expf(logits[base + j] - mx);
    sum = kiln_block_sum(sum, red);
    const int tgt = target[blockIdx.x];
    const float inv = 1.0f / sum;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        const float pj = __expf(logits[base + j] - mx) * inv;
        dlogits[base + j] = kiln_f32_to_bf16(wt * (pj - (j == tgt ? 1.0f : 0.0f)));
    }
    if (threadIdx.x == 0) {
        const float loss = (mx + logf(sum)) - logits[base + tgt];
        atomicAdd(loss_sum, (double)wt * (double)loss);
    }
}

// ---------------------------------------------------------------------------------------------
// Straight-through NVFP4 fake-quant: the bf16 weight the forward multiplies by is the master
// weight quantized (round to nearest, tensor scale from its amax, as the CPU quantizer) and
// dequantized. amax_bits is the f32 bits of max |w| (kiln_amax_f32 over the same tensor).
// Launch count/4 threads (count a multiple of 16), 256 per block.
extern "C" __global__ void __launch_bounds__(256)
kiln_train_fakequant_bf16(const float* __restrict__ w, const u32* __restrict__ amax_bits,
                          u16* __restrict__ out, long long count) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const bool live = t * 4 < count;
    float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (live) {
        const float4 x = reinterpret_cast<const float4*>(w)[t];
        v[0] = x.x;
        v[1] = x.y;
        v[2] = x.z;
        v[3] = x.w;
    }
    const float ws2 = kiln_tensor_scale(__uint_as_float(*amax_bits));
    u8 sb;
    const u32 codes = kiln_quantize_lane<4>(v, ws2, 0, 0ull, 0ull, &sb);
    if (!live) return;
    const float s = kiln_e4m3_to_f32(sb);
#pragma unroll
    for (int i = 0; i < 4; ++i)
        out[t * 4 + i] = kiln_f32_to_bf16(__fmul_rn(__fmul_rn(kiln_e2m1_to_f32((codes >> (4 * i)) & 0xFu), s), ws2));
}

// ---------------------------------------------------------------------------------------------
// AdamW over many tensors in one launch, f32 master weights

// One tensor of a multi-tensor launch: its buffers and element count. Moments are f32, or
// bf16 in the *_bf16m kernel.
struct KilnTrainTensor {
    float* w;
    const float* g;
    void* m;
    void* v;
    long long n;
};

#define KILN_TRAIN_CHUNK 4096

// The tensor a block's chunk belongs to: chunk_start[i] is the first chunk of tensor i
// (ascending, chunk_start[count] = total chunks).
__device__ __forceinline__ int kiln_train_tensor_of(const int* chunk_start, int count, int chunk) {
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (chunk_start[mid] <= chunk) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// sumsq += Σ g² over every tensor (f64, atomic once per block). Grid = total chunks, 256 threads.
extern "C" __global__ void __launch_bounds__(256)
kiln_train_grad_sumsq(const KilnTrainTensor* __restrict__ tensors,
                      const int* __restrict__ chunk_start, int count,
                      double* __restrict__ sumsq) {
    __shared__ float red[32];
    const int ti = kiln_train_tensor_of(chunk_start, count, blockIdx.x);
    const KilnTrainTensor tt = tensors[ti];
    const long long e0 = (long long)(blockIdx.x - chunk_start[ti]) * KILN_TRAIN_CHUNK;
    const long long e1 = min(tt.n, e0 + KILN_TRAIN_CHUNK);
    float s = 0.0f;
    for (long long e = e0 + threadIdx.x; e < e1; e += blockDim.x) s += tt.g[e] * tt.g[e];
    s = kiln_block_sum(s, red);
    if (threadIdx.x == 0) atomicAdd(sumsq, (double)s);
}

struct KilnTrainAdamW {
    float beta1, beta2, eps, decay, step_size, bc2_sqrt, max_norm;
    // Stochastic-rounding seeds of the two moments when they are stored as bf16.
    u64 m_seed, v_seed;
};

__device__ __forceinline__ float kiln_load_moment(const float* p, long long e) { return p[e]; }
__device__ __forceinline__ float kiln_load_moment(const u16* p, long long e) { return kiln_bf16_to_f32(p[e]); }
__device__ __forceinline__ void kiln_store_moment(float* p, long long e, float x, u64) { p[e] = x; }
// bf16 moments are stored with stochastic rounding: round to nearest would freeze them (a
// second moment moves by 0.1% a step, under half a bf16 step).
__device__ __forceinline__ void kiln_store_moment(u16* p, long long e, float x, u64 seed) {
    p[e] = kiln_f32_to_bf16_sr(x, kiln_sr_uniform(seed, (u64)e));
}

// The same update as kiln_kernels::cpu::AdamWScalars::update (and adamw_nvfp4.cu), on the
// gradient times the clip factor max_norm / ‖g‖ when ‖g‖ > max_norm (max_norm 0: no clipping).
// Moment element e of a tensor draws kiln_sr_uniform(seed, e) when stored as bf16.
template <typename M>
__device__ __forceinline__ void kiln_train_adamw_body(const KilnTrainTensor* tensors,
                                                      const int* chunk_start, int count,
                                                      const double* sumsq, KilnTrainAdamW h) {
    const int ti = kiln_train_tensor_of(chunk_start, count, blockIdx.x);
    const KilnTrainTensor tt = tensors[ti];
    const long long e0 = (long long)(blockIdx.x - chunk_start[ti]) * KILN_TRAIN_CHUNK;
    const long long e1 = min(tt.n, e0 + KILN_TRAIN_CHUNK);
    const float norm = (float)sqrt(*sumsq);
    // A non-finite gradient leaves everything as it was (the host reports the divergence).
    if (!isfinite(norm)) return;
    const float clip = (h.max_norm > 0.0f && norm > h.max_norm) ? h.max_norm / norm : 1.0f;
    M* m = static_cast<M*>(tt.m);
    M* v = static_cast<M*>(tt.v);
    for (long long e = e0 + threadIdx.x; e < e1; e += blockDim.x) {
        const float g = clip == 1.0f ? tt.g[e] : __fmul_rn(tt.g[e], clip);
        const float mo = kiln_load_moment(m, e), vo = kiln_load_moment(v, e);
        const float m2 = __fadd_rn(__fmul_rn(h.beta1, mo), __fmul_rn(__fsub_rn(1.0f, h.beta1), g));
        const float v2 = __fadd_rn(__fmul_rn(h.beta2, vo), __fmul_rn(__fsub_rn(1.0f, h.beta2), __fmul_rn(g, g)));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v2), h.bc2_sqrt), h.eps);
        tt.w[e] = __fsub_rn(__fmul_rn(tt.w[e], h.decay), __fmul_rn(h.step_size, __fdiv_rn(m2, denom)));
        kiln_store_moment(m, e, m2, h.m_seed);
        kiln_store_moment(v, e, v2, h.v_seed);
    }
}

// Grid = total chunks, 256 threads; sumsq from kiln_train_grad_sumsq of the same gradients.
extern "C" __global__ void __launch_bounds__(256)
kiln_train_adamw_f32m(const KilnTrainTensor* __restrict__ tensors,
                      const int* __restrict__ chunk_start, int count,
                      const double* __restrict__ sumsq, KilnTrainAdamW h) {
    kiln_train_adamw_body<float>(tensors, chunk_start, count, sumsq, h);
}

extern "C" __global__ void __launch_bounds__(256)
kiln_train_adamw_bf16m(const KilnTrainTensor* __restrict__ tensors,
                       const int* __restrict__ chunk_start, int count,
                       const double* __restrict__ sumsq, KilnTrainAdamW h) {
    kiln_train_adamw_body<u16>(tensors, chunk_start, count, sumsq, h);
}
