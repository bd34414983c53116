// The transformer kernels of the GPU engine other than the GEMVs: embedding lookup, residual
// add + RMSNorm, the q/k/v epilogue (tensor scales, bias, q/k norm, RoPE, KV-cache append),
// attention split over the context (flash-decoding) and its combine, SwiGLU, and the greedy
// pick that also advances the position. Activations are f32; the KV cache is bf16, per layer
// `[kv_heads][capacity][head_dim]`.
//
// `pos` (one int in device memory) is the position of the first token of the forward: a
// decode step captured in a CUDA graph reads it at replay time, and the pick kernel advances
// it, so the same graph serves every step. Query t of a forward of T tokens sees positions
// 0..=pos+t (causal).

// Every kernel here is queued as a programmatic dependent launch: it waits for the previous
// kernel on the stream before touching anything (all its inputs may come from it), then lets
// the next kernel start launching (a chained GEMV issues its weight loads meanwhile; whatever
// reads this kernel's outputs waits for its completion).
#define KILN_PDL_ENTER()                  \
    do {                                  \
        kiln_pdl_wait();                  \
        kiln_pdl_launch_dependents();     \
    } while (0)

#include "block_reduce.cuh"
#include "decode_ops.cuh"

// x[t, :] = table[ids[t], :] (bf16 → f32). Grid T, any block size.
extern "C" __global__ void kiln_embed_bf16(const u32* __restrict__ ids, const u16* __restrict__ table,
                                           float* __restrict__ x, int H) {
    KILN_PDL_ENTER();
    const int t = blockIdx.x;
    const u16* row = table + (size_t)ids[t] * H;
    float* out = x + (size_t)t * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x) out[i] = kiln_bf16_to_f32(row[i]);
}

// Per row (grid = rows): with d, x += d first (the residual add); then
// h = x / sqrt(mean(x²) + eps) · w, as f32 (OUT = float) or bf16 bits (OUT = u16: the prompt
// path's GEMM input, written directly instead of converted afterwards). Block size a multiple
// of 32.
__device__ __forceinline__ void kiln_store_act(float* p, float v) { *p = v; }
__device__ __forceinline__ void kiln_store_act(u16* p, float v) { *p = kiln_f32_to_bf16(v); }

template <typename OUT>
__device__ __forceinline__ void kiln_add_rmsnorm_body(float* __restrict__ x, const float* __restrict__ d,
                                                      const float* __restrict__ w, OUT* __restrict__ h,
                                                      int H, float eps) {
    KILN_PDL_ENTER();
    __shared__ float red[32];
    const size_t base = (size_t)blockIdx.x * H;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        float v = x[base + i];
        if (d) {
            v += d[base + i];
            x[base + i] = v;
        }
        ss += v * v;
    }
    ss = kiln_block_sum(ss, red);
    const float r = kiln_rms_scale(ss, H, eps);
    for (int i = threadIdx.x; i < H; i += blockDim.x) kiln_store_act(h + base + i, x[base + i] * r * w[i]);
}

extern "C" __global__ void kiln_add_rmsnorm(float* __restrict__ x, const float* __restrict__ d,
                                            const float* __restrict__ w, float* __restrict__ h,
                                            int H, float eps) {
    kiln_add_rmsnorm_body<float>(x, d, w, h, H, eps);
}
extern "C" __global__ void kiln_add_rmsnorm_bf16(float* __restrict__ x, const float* __restrict__ d,
                                                 const float* __restrict__ w, u16* __restrict__ h,
                                                 int H, float eps) {
    kiln_add_rmsnorm_body<u16>(x, d, w, h, H, eps);
}

// The prompt path's add + RMSNorm (rows > 8, bf16 out): as kiln_add_rmsnorm_bf16, but each
// thread moves float4s (H a multiple of 4, at most 8·4·256 = 8192) and keeps them in registers
// for the second pass — 16-byte accesses and every load of a row in flight at once, where the
// scalar kernel had one 4-byte load of x and of d in flight per thread. Grid rows, block 256.
#define KILN_NORM_X4_MAX 8
extern "C" __global__ void __launch_bounds__(256) kiln_add_rmsnorm_bf16_x4(
        float* __restrict__ x, const float* __restrict__ d, const float* __restrict__ w,
        u16* __restrict__ h, int H, float eps) {
    KILN_PDL_ENTER();
    __shared__ float red[32];
    const size_t base = (size_t)blockIdx.x * H;
    float4* xr = reinterpret_cast<float4*>(x + base);
    const float4* dr = d ? reinterpret_cast<const float4*>(d + base) : nullptr;
    const int nv = H >> 2;
    float4 v[KILN_NORM_X4_MAX];
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < KILN_NORM_X4_MAX; j++) {
        const int c = threadIdx.x + j * blockDim.x;
        if (c < nv) {
            float4 a = xr[c];
            if (d) {
                const float4 b = dr[c];
                a.x += b.x;
                a.y += b.y;
                a.z += b.z;
                a.w += b.w;
                xr[c] = a;
            }
            v[j] = a;
            ss += a.x * a.x;
            ss += a.y * a.y;
            ss += a.z * a.z;
            ss += a.w * a.w;
        }
    }
    ss = kiln_block_sum(ss, red);
    const float r = kiln_rms_scale(ss, H, eps);
    const float4* wr = reinterpret_cast<const float4*>(w);
    uint2* hr = reinterpret_cast<uint2*>(h + base);
#pragma unroll
    for (int j = 0; j < KILN_NORM_X4_MAX; j++) {
        const int c = threadIdx.x + j * blockDim.x;
        if (c < nv) {
            const float4 ww = wr[c];
            const u32 lo = (u32)kiln_f32_to_bf16(v[j].x * r * ww.x) |
                           ((u32)kiln_f32_to_bf16(v[j].y * r * ww.y) << 16);
            const u32 hi = (u32)kiln_f32_to_bf16(v[j].z * r * ww.z) |
                           ((u32)kiln_f32_to_bf16(v[j].w * r * ww.w) << 16);
            hr[c] = make_uint2(lo, hi);
        }
    }
}

// The q/k/v epilogue. qkv is [T, (nh + 2·kvh)·hd]: one GEMV over the concatenated q, k, v rows
// with tensor scale 1, so each part is multiplied here by its own tensor scale (scale[0..3]).
// Then the bias (if any), the per-head RMSNorm of q and k (Qwen3, if qn), RoPE ("rotate half",
// angle (pos + t) · inv_freq[i mod hd/2]) on q and k; q goes to q_out [T, nh·hd], k and v are
// appended to the layer's cache at position pos + t.
// Grid (nh + 2·kvh, T), block hd threads (hd even, a multiple of 32, at most 256).
extern "C" __global__ void kiln_qkv_post(const float* __restrict__ qkv, const float* __restrict__ scale,
                                         const float* __restrict__ bias, const float* __restrict__ qn,
                                         const float* __restrict__ kn,
                                         const float* __restrict__ inv_freq,
                                         const int* __restrict__ pos, float* __restrict__ q_out,
                                         u16* __restrict__ kc, u16* __restrict__ vc, int nh, int kvh,
                                         int hd, int cap, float eps) {
    KILN_PDL_ENTER();
    __shared__ float v[256];
    __shared__ float red[32];
    const int head = blockIdx.x, t = blockIdx.y, i = threadIdx.x;
    const int width = (nh + 2 * kvh) * hd;
    const int kind = head < nh ? 0 : (head < nh + kvh ? 1 : 2);
    float val = kiln_qkv_value(qkv[(size_t)t * width + head * hd + i], scale[kind], bias, head * hd + i);
    const int p = *pos + t;
    if (kind == 2) {
        const int kv = head - nh - kvh;
        vc[((size_t)kv * cap + p) * hd + i] = kiln_f32_to_bf16(val);
        return;
    }
    if (qn) {
        const float ss = kiln_block_sum(val * val, red);
        val = kiln_head_norm(val, ss, hd, eps, kind == 0 ? qn[i] : kn[i]);
    }
    v[i] = val;
    __syncthreads();
    const int half = hd >> 1;
    const int j = i < half ? i : i - half;
    const float ang = (float)p * inv_freq[j];
    float s, c;
    sincosf(ang, &s, &c);
    const float out = kiln_rope(v[i], i < half ? v[i + half] : v[i - half], c, s, i < half);
    if (kind == 0) {
        q_out[(size_t)t * nh * hd + head * hd + i] = out;
    } else {
        kc[((size_t)(head - nh) * cap + p) * hd + i] = kiln_f32_to_bf16(out);
    }
}

// The prompt path's q/k/v epilogue (batches over 8 rows): the same work as kiln_qkv_post, but
// U = hd / 8 lanes per (head, token) unit, each owning the float4 at c = 4·lane of the first
// half of the head and the one at c + hd/2 — the two halves RoPE mixes — so accesses are 16
// bytes, one sincosf serves both halves, and a 128-thread block holds 128 / U units. Qwen3's
// per-head norm reduces over the unit's lanes by shuffles. Grid ceil(T·(nh + 2·kvh) / (128 /
// U)), block 128; U a power of two up to 32 (hd = 8, 16, 32, 64, 128 or 256), so a unit's
// lanes are aligned inside one warp and a block holds whole units.
__device__ __forceinline__ void kiln_f4_scale_add(float4& a, float s, const float* bias) {
    a.x *= s;
    a.y *= s;
    a.z *= s;
    a.w *= s;
    if (bias) {
        const float4 b = *reinterpret_cast<const float4*>(bias);
        a.x += b.x;
        a.y += b.y;
        a.z += b.z;
        a.w += b.w;
    }
}

__device__ __forceinline__ uint2 kiln_f4_to_bf16x4(float4 a) {
    return make_uint2((u32)kiln_f32_to_bf16(a.x) | ((u32)kiln_f32_to_bf16(a.y) << 16),
                      (u32)kiln_f32_to_bf16(a.z) | ((u32)kiln_f32_to_bf16(a.w) << 16));
}

// a / sqrt(ms + eps) · w, element by element (the per-head norm's last step).
__device__ __forceinline__ float4 kiln_f4_norm(float4 a, float d, const float* w) {
    const float4 ww = *reinterpret_cast<const float4*>(w);
    return make_float4(a.x / d * ww.x, a.y / d * ww.y, a.z / d * ww.z, a.w / d * ww.w);
}

extern "C" __global__ void __launch_bounds__(128) kiln_qkv_post_x4(
        const float* __restrict__ qkv, const float* __restrict__ scale,
        const float* __restrict__ bias, const float* __restrict__ qn,
        const float* __restrict__ kn, const float* __restrict__ inv_freq,
        const int* __restrict__ pos, float* __restrict__ q_out, u16* __restrict__ kc,
        u16* __restrict__ vc, int nh, int kvh, int hd, int cap, float eps, int T) {
    KILN_PDL_ENTER();
    const int U = hd >> 3, heads = nh + 2 * kvh, half = hd >> 1;
    const long unit = (long)blockIdx.x * (blockDim.x / U) + threadIdx.x / U;
    const int lane = threadIdx.x % U;
    // every lane of a unit takes the same branches; units past the end sit out together
    // (a whole unit's lanes, so the shuffles below stay within live lanes of the group)
    const bool live = unit < (long)T * heads;
    const int head = live ? (int)(unit % heads) : 0;
    const int t = live ? (int)(unit / heads) : 0;
    const int c = 4 * lane;
    const int kind = head < nh ? 0 : (head < nh + kvh ? 1 : 2);
    const size_t at = (size_t)t * heads * hd + (size_t)head * hd;
    float4 a = make_float4(0.f, 0.f, 0.f, 0.f), b = a;
    if (live) {
        a = *reinterpret_cast<const float4*>(qkv + at + c);
        b = *reinterpret_cast<const float4*>(qkv + at + c + half);
        const float sc = scale[kind];
        kiln_f4_scale_add(a, sc, bias ? bias + head * hd + c : nullptr);
        kiln_f4_scale_add(b, sc, bias ? bias + head * hd + c + half : nullptr);
    }
    const int p = (live ? *pos : 0) + t;
    if (qn) {  // the same for every thread: the whole warp shuffles
        float ss = a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w + b.x * b.x + b.y * b.y +
                   b.z * b.z + b.w * b.w;
        for (int o = U >> 1; o > 0; o >>= 1) ss += __shfl_xor_sync(0xFFFFFFFFu, ss, o);
        if (live && kind != 2) {
            const float d = sqrtf(ss / (float)hd + eps);
            const float* w = kind == 0 ? qn : kn;
            a = kiln_f4_norm(a, d, w + c);
            b = kiln_f4_norm(b, d, w + c + half);
        }
    }
    if (!live) return;
    if (kind == 2) {
        const size_t row = ((size_t)(head - nh - kvh) * cap + p) * hd;
        *reinterpret_cast<uint2*>(vc + row + c) = kiln_f4_to_bf16x4(a);
        *reinterpret_cast<uint2*>(vc + row + c + half) = kiln_f4_to_bf16x4(b);
        return;
    }
    const float4 f = *reinterpret_cast<const float4*>(inv_freq + c);
    const float fr[4] = {f.x, f.y, f.z, f.w};
    float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
    float o1[4], o2[4];
#pragma unroll
    for (int e = 0; e < 4; e++) {
        float sn, cs;
        sincosf((float)p * fr[e], &sn, &cs);
        o1[e] = av[e] * cs - bv[e] * sn;
        o2[e] = bv[e] * cs + av[e] * sn;
    }
    const float4 lo = make_float4(o1[0], o1[1], o1[2], o1[3]);
    const float4 hi = make_float4(o2[0], o2[1], o2[2], o2[3]);
    if (kind == 0) {
        float* q = q_out + (size_t)t * nh * hd + (size_t)head * hd;
        *reinterpret_cast<float4*>(q + c) = lo;
        *reinterpret_cast<float4*>(q + c + half) = hi;
    } else {
        const size_t row = ((size_t)(head - nh) * cap + p) * hd;
        *reinterpret_cast<uint2*>(kc + row + c) = kiln_f4_to_bf16x4(lo);
        *reinterpret_cast<uint2*>(kc + row + c + half) = kiln_f4_to_bf16x4(hi);
    }
}

// (KILN_ATTN_WARPS_FOR / KILN_ATTN_GROUP_FOR, the attention block's shape, kiln_load_bf16 and
// the split's loop and warp combine, kiln_attention_split: decode_ops.cuh.)

// Attention of one KV head's query group over one chunk of the context. Grid (kvh, splits, T),
// block 32·KILN_ATTN_WARPS_FOR(HD, REP). Split s covers positions [s·chunk, (s+1)·chunk) ∩ [0, len), len =
// pos + t + 1; a split past len does nothing (the combine reads only the splits below len).
// Each warp takes GROUP consecutive positions of every 32 (WARPS · GROUP); lane l
// holds elements l·E .. l·E+E-1 of a row. Writes the unnormalised output, the running max and the sum of the chunk:
// part_o [T][nh][splits][HD], part_ml [T][nh][splits][2].
template <int HD, int REP>
__device__ __forceinline__ void kiln_attention_body(const float* __restrict__ q,
                                                    const u16* __restrict__ kc,
                                                    const u16* __restrict__ vc,
                                                    const int* __restrict__ pos,
                                                    float* __restrict__ part_o,
                                                    float* __restrict__ part_ml, int nh, int kvh,
                                                    int cap, int chunk, float softmax_scale) {
    KILN_PDL_ENTER();
    constexpr int E = HD / 32;
    const int kv = blockIdx.x, s = blockIdx.y, t = blockIdx.z, splits = gridDim.y;
    const int rep = nh / kvh;
    const int len = *pos + t + 1;
    const int start = s * chunk;
    if (start >= len) return;
    const int end = min(start + chunk, len);
    const int lane = threadIdx.x & 31;
    float qr[REP][E];
#pragma unroll
    for (int r = 0; r < REP; ++r) {
#pragma unroll
        for (int e = 0; e < E; ++e) {
            qr[r][e] = r < rep ? q[(size_t)t * nh * HD + (kv * rep + r) * HD + lane * E + e] *
                                     softmax_scale
                               : 0.0f;
        }
    }
    kiln_attention_split<HD, REP, false>(qr, kc + (size_t)kv * cap * HD + lane * E,
                                         vc + (size_t)kv * cap * HD + lane * E, start, end, rep,
                                         part_o, part_ml, (size_t)t * nh + kv * rep, splits, s);
}

#define KILN_ATTENTION(HD, REP)                                                                   \
    extern "C" __global__ void __launch_bounds__(32 * KILN_ATTN_WARPS_FOR(HD, REP))              \
        kiln_attention_hd##HD##_rep##REP(const float* __restrict__ q, const u16* __restrict__ kc,  \
                                         const u16* __restrict__ vc, const int* __restrict__ pos,  \
                                         float* __restrict__ part_o, float* __restrict__ part_ml,  \
                                         int nh, int kvh, int cap, int chunk, float scale) {       \
        kiln_attention_body<HD, REP>(q, kc, vc, pos, part_o, part_ml, nh, kvh, cap, chunk, scale); \
    }

KILN_ATTENTION(32, 2)
KILN_ATTENTION(32, 4)
KILN_ATTENTION(32, 8)
KILN_ATTENTION(64, 2)
KILN_ATTENTION(64, 4)
KILN_ATTENTION(64, 8)
KILN_ATTENTION(64, 16)
KILN_ATTENTION(128, 2)
KILN_ATTENTION(128, 4)
KILN_ATTENTION(128, 8)
KILN_ATTENTION(128, 16)
KILN_ATTENTION(256, 2)
KILN_ATTENTION(256, 4)
KILN_ATTENTION(256, 8)

// The splits of each (query, head) into its output: out[t, h·hd + e] = Σ o·w / Σ l·w with
// w = exp(m - max m), over the splits that hold positions (len = pos + t + 1).
// Grid (nh, T), block a multiple of 32 (hd threads are enough).
extern "C" __global__ void kiln_attention_combine(const float* __restrict__ part_o,
                                                  const float* __restrict__ part_ml,
                                                  const int* __restrict__ pos,
                                                  float* __restrict__ out, int nh, int hd,
                                                  int splits, int chunk) {
    KILN_PDL_ENTER();
    const int h = blockIdx.x, t = blockIdx.y;
    const int ns = kiln_combine_splits(*pos + t + 1, splits, chunk);
    const size_t row0 = ((size_t)t * nh + h) * splits;
    float mx, sum;
    kiln_combine_stats(part_ml, row0, ns, mx, sum);
    for (int e = threadIdx.x; e < hd; e += blockDim.x)
        out[(size_t)t * nh * hd + h * hd + e] = kiln_combine_elem(part_o, part_ml, row0, ns, hd, e, mx, sum);
}

// The prefill attention's softmax (tensor-core path: S = Q·Kᵀ and O = P·V are cuBLAS GEMMs):
// row (b, t) of S [B][T][L] f32 (already scaled) over its causal prefix 0..=pos+t into P
// [B][T][L] bf16, zeros past the prefix. Grid (T, B), block 256.
extern "C" __global__ void kiln_causal_softmax_bf16(const float* __restrict__ S, u16* __restrict__ P,
                                                    int L, int T, const int* __restrict__ pos) {
    KILN_PDL_ENTER();
    __shared__ float red[32];
    const size_t row = ((size_t)blockIdx.y * T + blockIdx.x) * L;
    const int valid = min(L, *pos + (int)blockIdx.x + 1);
    float mx = KILN_NEG_INF;
    for (int j = threadIdx.x; j < valid; j += blockDim.x) mx = fmaxf(mx, S[row + j]);
    mx = kiln_block_max(mx, red);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < valid; j += blockDim.x) sum += expf(S[row + j] - mx);
    sum = kiln_block_sum(sum, red);
    const float inv = 1.0f / sum;
    for (int j = threadIdx.x; j < L; j += blockDim.x)
        P[row + j] = j < valid ? kiln_f32_to_bf16(expf(S[row + j] - mx) * inv) : (u16)0;
}

// act[t, i] = silu(g) · u with g = gu[t, i]·scale[0], u = gu[t, I + i]·scale[1] (one GEMV over the
// concatenated gate and up rows, tensor scale 1). n = T·I. f32 in and out, or (_bf16: the
// prompt path, between its bf16 GEMMs) bf16 bits in and out.
__device__ __forceinline__ float kiln_load_act(const float* p) { return *p; }
__device__ __forceinline__ float kiln_load_act(const u16* p) { return kiln_bf16_to_f32(*p); }

template <typename T>
__device__ __forceinline__ void kiln_swiglu_body(const T* __restrict__ gu, const float* __restrict__ scale,
                                                 T* __restrict__ act, int I, int n) {
    KILN_PDL_ENTER();
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n) return;
    const int t = idx / I, i = idx - t * I;
    const float g = kiln_load_act(gu + (size_t)t * 2 * I + i) * scale[0];
    const float u = kiln_load_act(gu + (size_t)t * 2 * I + I + i) * scale[1];
    kiln_store_act(act + idx, kiln_silu_mul(g, u));
}

extern "C" __global__ void kiln_swiglu(const float* __restrict__ gu, const float* __restrict__ scale,
                                       float* __restrict__ act, int I, int n) {
    kiln_swiglu_body<float>(gu, scale, act, I, n);
}
extern "C" __global__ void kiln_swiglu_bf16(const u16* __restrict__ gu, const float* __restrict__ scale,
                                            u16* __restrict__ act, int I, int n) {
    kiln_swiglu_body<u16>(gu, scale, act, I, n);
}

// The prompt path's SwiGLU over bf16 (rows > 8): eight consecutive elements a thread, with
// 16-byte loads and stores, token t = blockIdx.y (no division per element), I a multiple of 8.
// The same arithmetic per element as kiln_swiglu_bf16, so the same bits; the scalar kernel
// spent most of its time on 2-byte accesses, an integer division and too few bytes in flight.
// Grid (ceil(I / 2048), T), block 256.
__device__ __forceinline__ u16 kiln_swiglu_one(u32 g_bits, u32 u_bits, float s0, float s1) {
    const float g = kiln_bf16_to_f32((u16)g_bits) * s0;
    const float u = kiln_bf16_to_f32((u16)u_bits) * s1;
    return kiln_f32_to_bf16(kiln_silu_mul(g, u));
}

extern "C" __global__ void __launch_bounds__(256) kiln_swiglu_bf16_x8(const u16* __restrict__ gu,
                                                                      const float* __restrict__ scale,
                                                                      u16* __restrict__ act, int I) {
    KILN_PDL_ENTER();
    const int i0 = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i0 >= I) return;
    const size_t t = blockIdx.y;
    const uint4 gq = *reinterpret_cast<const uint4*>(gu + t * 2 * I + i0);
    const uint4 uq = *reinterpret_cast<const uint4*>(gu + t * 2 * I + I + i0);
    const float s0 = scale[0], s1 = scale[1];
    const u32 gw[4] = {gq.x, gq.y, gq.z, gq.w};
    const u32 uw[4] = {uq.x, uq.y, uq.z, uq.w};
    u32 out[4];
#pragma unroll
    for (int k = 0; k < 4; k++)
        out[k] = (u32)kiln_swiglu_one(gw[k] & 0xFFFFu, uw[k] & 0xFFFFu, s0, s1) |
                 ((u32)kiln_swiglu_one(gw[k] >> 16, uw[k] >> 16, s0, s1) << 16);
    *reinterpret_cast<uint4*>(act + t * I + i0) = make_uint4(out[0], out[1], out[2], out[3]);
}

// The warp's largest value and, on ties, its smallest index: every lane gets both.
__device__ __forceinline__ void kiln_warp_argmax(float& best, int& bi) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xFFFFFFFFu, best, o);
        const int oi = __shfl_xor_sync(0xFFFFFFFFu, bi, o);
        if (ov > best || (ov == best && oi < bi)) {
            best = ov;
            bi = oi;
        }
    }
}

// The first index of the largest logit (NaN never wins): every block reduces its stride of the
// vocabulary into (part_val, part_idx); the last block to finish (a counter, reset by it for the
// next launch) reduces those, writes the token to *token and, with advance, adds 1 to *pos.
// Block 256.
extern "C" __global__ void __launch_bounds__(256)
    kiln_argmax_advance(const float* __restrict__ logits, int V, float* __restrict__ part_val,
                        int* __restrict__ part_idx, u32* __restrict__ counter,
                        u32* __restrict__ token, int* __restrict__ pos, int advance) {
    KILN_PDL_ENTER();
    __shared__ float sv[8];
    __shared__ int si[8];
    __shared__ bool last;
    float best = KILN_NEG_INF;
    int bi = 0x7FFFFFFF;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < V; i += gridDim.x * blockDim.x) {
        const float v = logits[i];
        if (v > best || (v == best && i < bi)) {
            best = v;
            bi = i;
        }
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    kiln_warp_argmax(best, bi);
    if (lane == 0) {
        sv[warp] = best;
        si[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < 8; ++w) {
            if (sv[w] > best || (sv[w] == best && si[w] < bi)) {
                best = sv[w];
                bi = si[w];
            }
        }
        part_val[blockIdx.x] = best;
        part_idx[blockIdx.x] = bi;
        __threadfence();
        last = atomicAdd(counter, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    // the last block reduces the blocks' picks with all its threads
    best = KILN_NEG_INF;
    bi = 0x7FFFFFFF;
    for (int b = threadIdx.x; b < (int)gridDim.x; b += blockDim.x) {
        const float v = __ldcg(part_val + b);
        const int i = __ldcg(part_idx + b);
        if (v > best || (v == best && i < bi)) {
            best = v;
            bi = i;
        }
    }
    kiln_warp_argmax(best, bi);
    __syncthreads();
    if (lane == 0) {
        sv[warp] = best;
        si[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    for (int w = 1; w < 8; ++w) {
        if (sv[w] > best || (sv[w] == best && si[w] < bi)) {
            best = sv[w];
            bi = si[w];
        }
    }
    // all-NaN logits: token 0, as the CPU's argmax
    *token = bi == 0x7FFFFFFF ? 0u : (u32)bi;
    if (advance) *pos += 1;
    *counter = 0u;
}

// ---- Sampling on the GPU ----

// SplitMix64's finalizer: a 64-bit hash (the sampler's noise, the random weights).
__device__ __forceinline__ u64 kiln_mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// An order-preserving u32 key of a float (NaN sorts below everything).
__device__ __forceinline__ u32 kiln_float_key(float v) {
    if (v != v) return 0u;
    const u32 b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Radix select (6 bits per pass, 6 passes): the key of the element at which the running weight,
// taken in descending key order over the keys >= kmin, first reaches `target`. Weights: 1 per
// element (mode 0: counts, the top-k bound) or the element's probability in fixed point, 2^48
// for 1 (mode 1: the top-p bound; integers keep the sums exact, so the pick is reproducible).
// Each warp fills its own histogram (most logits share the high digits: one shared histogram
// would serialise the whole block on one counter), then the histograms are added.
__device__ u32 kiln_radix_cross(const float* __restrict__ logits, int V, u32 kmin, float lmax,
                                float inv_t, float inv_z, int mode, u64 target) {
    __shared__ unsigned long long hist[32][64];
    __shared__ unsigned long long total[64];
    __shared__ u32 s_prefix;
    __shared__ unsigned long long s_above;
    const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    u32 prefix = 0u, mask = 0u;
    u64 above = 0ull;
    for (int shift = 26;; shift -= 6) {
        int bits = 6;
        if (shift < 0) {
            bits = 6 + shift;
            shift = 0;
        }
        const u32 dmask = (1u << bits) - 1u;
        for (int b = threadIdx.x; b < 32 * 64; b += blockDim.x) hist[b >> 6][b & 63] = 0ull;
        __syncthreads();
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
            const float l = logits[i];
            if (l != l) continue;
            const u32 key = kiln_float_key(l);
            if (key < kmin || (key & mask) != prefix) continue;
            const u64 w = mode == 0 ? 1ull
                                    : (u64)(expf((l - lmax) * inv_t) * inv_z * 281474976710656.0f);
            atomicAdd(&hist[warp][(key >> shift) & dmask], (unsigned long long)w);
        }
        __syncthreads();
        if (threadIdx.x < 64) {
            u64 t = 0ull;
            for (int w = 0; w < nwarps; ++w) t += hist[w][threadIdx.x];
            total[threadIdx.x] = t;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            u64 cum = above;
            int d = (int)dmask;
            for (; d > 0; --d) {
                if (cum + total[d] >= target) break;
                cum += total[d];
            }
            s_prefix = prefix | ((u32)d << shift);
            s_above = cum;
        }
        __syncthreads();
        prefix = s_prefix;
        above = s_above;
        mask |= dmask << shift;
        if (shift == 0) break;
    }
    return prefix;
}

// Sample the next token from softmax(logits / temperature), restricted to the top_k largest
// logits (0: all) and then to the smallest prefix, in descending order, whose probability
// reaches top_p (1: all) — the CPU sampler's rules —, by the Gumbel-max trick: the token is the
// argmax of logit/temperature + Gumbel noise over the kept set, the noise a hash of (seed,
// *step, index); *step advances. Ties at a top-k or top-p boundary keep every tied logit. The
// token goes to *token; with advance, *pos += 1. One block of 1024 threads; about a dozen
// passes over the logits (radix selects for the bounds).
extern "C" __global__ void __launch_bounds__(1024)
    kiln_sample_advance(const float* __restrict__ logits, int V, float temperature, int top_k,
                        float top_p, u64 seed, u32* __restrict__ step, u32* __restrict__ token,
                        int* __restrict__ pos, int advance) {
    KILN_PDL_ENTER();
    __shared__ float red[32];
    float lmax = KILN_NEG_INF;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const float l = logits[i];
        if (l == l) lmax = fmaxf(lmax, l);
    }
    lmax = kiln_block_max(lmax, red);
    const float inv_t = 1.0f / temperature;
    // the top-k bound: the key of the k-th largest logit
    u32 kmin = 0u;
    if (top_k > 0 && top_k < V)
        kmin = kiln_radix_cross(logits, V, 0u, lmax, inv_t, 0.0f, 0, (u64)top_k);
    // the top-p bound: the key of the logit at which the descending mass reaches top_p
    u32 pmin = kmin;
    if (top_p < 1.0f) {
        float z = 0.0f;
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
            const float l = logits[i];
            if (l == l && kiln_float_key(l) >= kmin) z += expf((l - lmax) * inv_t);
        }
        z = kiln_block_sum(z, red);
        const u64 target = (u64)((double)top_p * 281474976710656.0);
        const u32 k0 = kiln_radix_cross(logits, V, kmin, lmax, inv_t, 1.0f / z, 1, target);
        pmin = k0 > kmin ? k0 : kmin;
    }
    const u32 st = *step;
    float best = KILN_NEG_INF;
    int bi = 0x7FFFFFFF;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const float l = logits[i];
        if (l != l || kiln_float_key(l) < pmin) continue;
        const u64 h = kiln_mix64(seed * 0x9E3779B97F4A7C15ull ^ ((u64)st << 32) ^ (u64)i);
        const float u = ((float)(h >> 40) + 0.5f) * (1.0f / 16777216.0f);  // (0, 1)
        const float g = (l - lmax) * inv_t - logf(-logf(u));
        if (g > best || (g == best && i < bi)) {
            best = g;
            bi = i;
        }
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    kiln_warp_argmax(best, bi);
    __shared__ float sv[32];
    __shared__ int si[32];
    if (lane == 0) {
        sv[warp] = best;
        si[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w) {
        if (sv[w] > best || (sv[w] == best && si[w] < bi)) {
            best = sv[w];
            bi = si[w];
        }
    }
    *token = bi == 0x7FFFFFFF ? 0u : (u32)bi;
    *step = st + 1u;
    if (advance) *pos += 1;
}

// ---- Seeded random weights (benchmarks of model shapes without a checkpoint) ----


// NVFP4 codes: every byte a hash of (seed, index) (all 16 E2M1 values, both signs); block
// scales: E4M3 codes uniform in [scale_lo, scale_hi].
extern "C" __global__ void kiln_random_nvfp4(u8* __restrict__ packed, u64 npacked,
                                             u8* __restrict__ scales, u64 nscales, u64 seed,
                                             u32 scale_lo, u32 scale_hi) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < npacked; i += stride)
        packed[i] = (u8)kiln_mix64(seed * 0x9E3779B97F4A7C15ull + i);
    const u32 span = scale_hi - scale_lo + 1;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < nscales; i += stride)
        scales[i] = (u8)(scale_lo + (u32)(kiln_mix64(~seed * 0x9E3779B97F4A7C15ull + i) % span));
}

// bf16 values uniform in [-a, a] from a hash of (seed, index).
extern "C" __global__ void kiln_random_bf16(u16* __restrict__ out, u64 n, u64 seed, float a) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float u = (float)(kiln_mix64(seed * 0x9E3779B97F4A7C15ull + i) >> 40) * (1.0f / 16777216.0f);
        out[i] = kiln_f32_to_bf16((2.0f * u - 1.0f) * a);
    }
}
