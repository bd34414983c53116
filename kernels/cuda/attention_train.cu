// attention_train.cu — the train step's causal attention, flash-attention style (FA2), forward
// and backward: no [B·nh][T][T] scores or probabilities exist; the backward recomputes P from
// each query row's log-sum-exp saved by the forward.
//
// Layouts (N = B·T tokens, h = g·rep + r the query heads of KV head g):
//   q      bf16 [B][nh][T][HD]   (the group layout: [B][kvh][rep·T][HD])
//   k, v   bf16 [B][kvh][T][HD]
//   out    bf16 [N][nh·HD]       (tokens: the O projection's input)
//   lse    f32  [B][nh][T]       (max + log2(sum) of the scaled log2 scores)
//   dout_g bf16 as q              (the output's gradient in the group layout)
//   dq     f32  as q, dk and dv f32 as k and v (the q/k/v epilogue's backward reads them)
// Query t sees keys 0 ..= t of its own sequence.

#include "flash_attention.cuh"

// Forward: grid (nh, ceil(T / 64), B), block 128, KILN_FA_SMEM(HD) bytes of dynamic shared
// memory (flash_attention.cuh).
#define KILN_TRAIN_FLASH_FWD(HD)                                                                  \
    extern "C" __global__ void __launch_bounds__(128, 2) kiln_train_flash_fwd_hd##HD(             \
        const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,         \
        u16* __restrict__ out, float* __restrict__ lse, int T, int nh, int kvh,                   \
        float scale_log2) {                                                                       \
        const long b = blockIdx.z;                                                                \
        const KilnFlashLayout lay = {HD, (long)T * HD, (long)T * HD, (long)nh * HD, HD};         \
        kiln_flash_fwd<HD, u16>(q + b * nh * T * HD, k + b * kvh * T * HD, v + b * kvh * T * HD, \
                                out + b * T * nh * HD, lse + b * nh * T, lay, T, nh, kvh, 0,     \
                                scale_log2);                                                      \
    }

KILN_TRAIN_FLASH_FWD(32)
KILN_TRAIN_FLASH_FWD(64)
KILN_TRAIN_FLASH_FWD(128)

// dd[row] = Σ_c dout_g[row, c] · out[n, h·HD + c] for each query row row = (b·nh + h)·T + t
// (token n = b·T + t): the softmax backward's row term D = rowsum(dO ⊙ O), from the same bf16
// dO the backward's dP = dO·Vᵀ reads. One warp per row: grid ceil(B·nh·T / 8), block 256.
extern "C" __global__ void kiln_train_attn_dot(const u16* __restrict__ dout_g,
                                               const u16* __restrict__ out,
                                               float* __restrict__ dd, int T, int nh, int hd,
                                               long rows) {
    const long row = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const long t = row % T, bh = row / T, h = bh % nh, b = bh / nh;
    const u16* a = dout_g + row * hd;
    const u16* o = out + ((b * T + t) * nh + h) * hd;
    float s = 0.0f;
    for (int c = lane; c < hd; c += 32) s += kiln_bf16_to_f32(a[c]) * kiln_bf16_to_f32(o[c]);
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, d);
    if (lane == 0) dd[row] = s;
}

// Backward. Block (key tile blockIdx.x of 64 keys, b·kvh + g = blockIdx.y), 128 threads: warp
// w owns keys 16w .. 16w+15 of the tile and accumulates their dK and dV in registers over
// every query head of the group and every tile of 32 queries that sees them (so dK and dV are
// written once, no atomics); low key tiles (which see the most queries) are dispatched first.
// Per query tile, with K, V (the block's), Q and dO in shared memory:
//   Sᵀ = K_w·Qᵀ;  Pᵀ = exp2(Sᵀ·scale_log2 − lse) (0 where masked);  dV_w += Pᵀ·dO;
//   dPᵀ = V_w·dOᵀ;  dSᵀ = scale · Pᵀ ⊙ (dPᵀ − D);  dK_w += dSᵀ·Q;
// dS goes to shared memory ([query][key], bf16) and the four warps make dQ = dS·K for the
// tile's 32 queries × HD (warp w: queries 16·(w & 1).., columns (w >> 1)·HD/2..), added to
// dq with f32 atomics (dq must be zero before the launch).
// mma.m16n8k16 bf16 → f32 throughout; P and dS rounded to bf16 as GEMM inputs.
#define KILN_FB_KEYS 64
#define KILN_FB_ROWS 32
// dynamic shared memory: K, V (64 rows), Q, dO (32 rows) of HD + 8 bf16; dS 32 × 72 bf16;
// lse and D of the 32 queries (f32)
#define KILN_FB_SMEM(HD) \
    ((2 * KILN_FB_KEYS + 2 * KILN_FB_ROWS) * ((HD) + 8) * 2 + KILN_FB_ROWS * (KILN_FB_KEYS + 8) * 2 + 2 * KILN_FB_ROWS * 4)

// acc[j] (16 × 8, j < 4) = A·Bᵀ over HD: A the warp's 16 rows at `a` (stride HD + 8), B the
// tile's 32 rows at `b` (their n) — Sᵀ = K_w·Qᵀ and dPᵀ = V_w·dOᵀ.
template <int HD>
__device__ __forceinline__ void kiln_fb_abt(float acc[KILN_FB_ROWS / 8][4], const u16* a, const u16* b, int lane) {
    constexpr int S = HD + 8;
    const int mi = lane >> 3;
#pragma unroll
    for (int j = 0; j < KILN_FB_ROWS / 8; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk += 2) {
        u32 a0[4], a1[4];
        kiln_ldmatrix_x4(a0, a + ((mi & 1) * 8 + (lane & 7)) * S + kk * 16 + (mi >> 1) * 8);
        kiln_ldmatrix_x4(a1, a + ((mi & 1) * 8 + (lane & 7)) * S + (kk + 1) * 16 + (mi >> 1) * 8);
#pragma unroll
        for (int j = 0; j < KILN_FB_ROWS / 8; j++) {
            u32 bb[4];
            kiln_ldmatrix_x4(bb, b + (j * 8 + (lane & 7)) * S + (kk + (mi >> 1)) * 16 + (mi & 1) * 8);
            kiln_mma_bf16_16816(acc[j], a0, bb[0], bb[1]);
            kiln_mma_bf16_16816(acc[j], a1, bb[2], bb[3]);
        }
    }
}

// acc (16 × HD) += F·B: F the bf16 A fragments of a 16 × 32 product (k = the tile's queries),
// B the tile's 32 rows of HD at `b` (ldmatrix.trans) — dV_w += Pᵀ·dO and dK_w += dSᵀ·Q.
template <int HD>
__device__ __forceinline__ void kiln_fb_acc(float acc[HD / 8][4], const u32 f[KILN_FB_ROWS / 16][4], const u16* b, int lane) {
    constexpr int S = HD + 8;
    const int mi = lane >> 3;
#pragma unroll
    for (int kk = 0; kk < KILN_FB_ROWS / 16; kk++) {
#pragma unroll
        for (int n = 0; n < HD / 8; n += 2) {
            u32 bb[4];
            kiln_ldmatrix_x4_trans(bb, b + (kk * 16 + (mi & 1) * 8 + (lane & 7)) * S + n * 8 + (mi >> 1) * 8);
            kiln_mma_bf16_16816(acc[n], f[kk], bb[0], bb[1]);
            kiln_mma_bf16_16816(acc[n + 1], f[kk], bb[2], bb[3]);
        }
    }
}

template <int HD>
__device__ __forceinline__ void kiln_train_flash_bwd(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
    const u16* __restrict__ dout_g, const float* __restrict__ lse, const float* __restrict__ dd,
    float* __restrict__ dq, float* __restrict__ dk, float* __restrict__ dv, int T, int nh,
    int kvh, float scale_log2, float scale) {
    static_assert(HD % 32 == 0 && HD <= 128, "head_dim a multiple of 32, at most 128");
    constexpr int S = HD + 8;                // shared row stride of K, V, Q, dO (bf16)
    constexpr int DS = KILN_FB_KEYS + 8;     // shared row stride of dS (bf16)
    constexpr int NT = HD / 8;               // n-tiles over HD
    constexpr int QN = KILN_FB_ROWS / 8;     // n-tiles over the tile's queries
    extern __shared__ __align__(16) u16 kiln_fb_smem[];
    u16* ks = kiln_fb_smem;
    u16* vs = ks + KILN_FB_KEYS * S;
    u16* qs = vs + KILN_FB_KEYS * S;
    u16* os = qs + KILN_FB_ROWS * S;
    u16* dss = os + KILN_FB_ROWS * S;
    float* lse_s = reinterpret_cast<float*>(dss + KILN_FB_ROWS * DS);
    float* dd_s = lse_s + KILN_FB_ROWS;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, mi = lane >> 3;
    const int bg = blockIdx.y, b = bg / kvh, g = bg % kvh, rep = nh / kvh;
    const int k0 = blockIdx.x * KILN_FB_KEYS;
    const int kw = warp * 16;  // the warp's first key within the tile
    const int key_lo = k0 + kw + (lane >> 2), key_hi = key_lo + 8;
    const long kv_off = (long)bg * T * HD;

    for (int i = threadIdx.x; i < KILN_FB_KEYS * HD / 8; i += blockDim.x) {
        const int r = i / (HD / 8), c = (i % (HD / 8)) * 8;
        if (k0 + r < T) {
            kiln_cp_async16(ks + r * S + c, k + kv_off + (long)(k0 + r) * HD + c);
            kiln_cp_async16(vs + r * S + c, v + kv_off + (long)(k0 + r) * HD + c);
        } else {
            *reinterpret_cast<uint4*>(ks + r * S + c) = make_uint4(0u, 0u, 0u, 0u);
            *reinterpret_cast<uint4*>(vs + r * S + c) = make_uint4(0u, 0u, 0u, 0u);
        }
    }
    kiln_cp_async_commit();  // waited for with the first query tile

    float dk_acc[NT][4], dv_acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk_acc[n][e] = dv_acc[n][e] = 0.0f;

    for (int r = 0; r < rep; r++) {
        const long row0 = ((long)b * nh + g * rep + r) * T;  // row of query 0 of this head
        for (int q0 = (k0 / KILN_FB_ROWS) * KILN_FB_ROWS; q0 < T; q0 += KILN_FB_ROWS) {
            __syncthreads();  // every warp is done with the previous tile's Q, dO and dS
            for (int i = threadIdx.x; i < KILN_FB_ROWS * HD / 8; i += blockDim.x) {
                const int rr = i / (HD / 8), c = (i % (HD / 8)) * 8;
                if (q0 + rr < T) {
                    kiln_cp_async16(qs + rr * S + c, q + (row0 + q0 + rr) * HD + c);
                    kiln_cp_async16(os + rr * S + c, dout_g + (row0 + q0 + rr) * HD + c);
                } else {
                    *reinterpret_cast<uint4*>(qs + rr * S + c) = make_uint4(0u, 0u, 0u, 0u);
                    *reinterpret_cast<uint4*>(os + rr * S + c) = make_uint4(0u, 0u, 0u, 0u);
                }
            }
            kiln_cp_async_commit();
            if (threadIdx.x < KILN_FB_ROWS) {
                const int t = q0 + threadIdx.x;
                lse_s[threadIdx.x] = t < T ? lse[row0 + t] : 0.0f;
                dd_s[threadIdx.x] = t < T ? dd[row0 + t] : 0.0f;
            }
            kiln_cp_async_wait<0>();
            __syncthreads();
            // some query of the tile sees some key of the warp
            if (k0 + kw < T && q0 + KILN_FB_ROWS - 1 >= k0 + kw) {
                // Sᵀ = K_w·Qᵀ (Q rows are its n)
                float st[QN][4];
                kiln_fb_abt<HD>(st, ks + kw * S, qs, lane);
                // Pᵀ, masked (key ≤ query < T), and as bf16 A fragments (k = queries)
                u32 pa[QN / 2][4];
#pragma unroll
                for (int j = 0; j < QN; j++) {
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int qc = j * 8 + (lane & 3) * 2 + e, t = q0 + qc;
                        const float l2 = lse_s[qc];
                        st[j][e] = key_lo <= t && t < T ? exp2f(st[j][e] * scale_log2 - l2) : 0.0f;
                        st[j][2 + e] = key_hi <= t && t < T ? exp2f(st[j][2 + e] * scale_log2 - l2) : 0.0f;
                    }
                    pa[j >> 1][(j & 1) * 2] = kiln_pack_bf16x2(st[j][0], st[j][1]);
                    pa[j >> 1][(j & 1) * 2 + 1] = kiln_pack_bf16x2(st[j][2], st[j][3]);
                }
                // dV_w += Pᵀ·dO
                kiln_fb_acc<HD>(dv_acc, pa, os, lane);
                // dPᵀ = V_w·dOᵀ
                float dpt[QN][4];
                kiln_fb_abt<HD>(dpt, vs + kw * S, os, lane);
                // dSᵀ = scale · Pᵀ ⊙ (dPᵀ − D): to A fragments, and to shared memory as dS
                u32 da[QN / 2][4];
                const int kl = kw + (lane >> 2);
#pragma unroll
                for (int j = 0; j < QN; j++) {
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int qc = j * 8 + (lane & 3) * 2 + e;
                        const float d = dd_s[qc];
                        dpt[j][e] = scale * st[j][e] * (dpt[j][e] - d);
                        dpt[j][2 + e] = scale * st[j][2 + e] * (dpt[j][2 + e] - d);
                        dss[qc * DS + kl] = kiln_f32_to_bf16(dpt[j][e]);
                        dss[qc * DS + kl + 8] = kiln_f32_to_bf16(dpt[j][2 + e]);
                    }
                    da[j >> 1][(j & 1) * 2] = kiln_pack_bf16x2(dpt[j][0], dpt[j][1]);
                    da[j >> 1][(j & 1) * 2 + 1] = kiln_pack_bf16x2(dpt[j][2], dpt[j][3]);
                }
                // dK_w += dSᵀ·Q
                kiln_fb_acc<HD>(dk_acc, da, qs, lane);
            } else {
                // no query of the tile sees these keys: their dS columns are zero
                for (int i = lane; i < KILN_FB_ROWS * 16; i += 32)
                    dss[(i >> 4) * DS + kw + (i & 15)] = 0;
            }
            __syncthreads();  // dS complete
            // dQ (32 queries × HD) += dS·K: A = dS rows, B = K [key][HD] (k = keys: trans)
            {
                const int qr = (warp & 1) * 16, c0 = (warp >> 1) * (HD / 2);
                float dqa[NT / 2][4];
#pragma unroll
                for (int n = 0; n < NT / 2; n++) dqa[n][0] = dqa[n][1] = dqa[n][2] = dqa[n][3] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < KILN_FB_KEYS / 16; kk++) {
                    u32 a[4];
                    kiln_ldmatrix_x4(a, dss + (qr + (mi & 1) * 8 + (lane & 7)) * DS + kk * 16 + (mi >> 1) * 8);
#pragma unroll
                    for (int n = 0; n < NT / 2; n += 2) {
                        u32 bb[4];
                        kiln_ldmatrix_x4_trans(bb, ks + (kk * 16 + (mi & 1) * 8 + (lane & 7)) * S + c0 + n * 8 + (mi >> 1) * 8);
                        kiln_mma_bf16_16816(dqa[n], a, bb[0], bb[1]);
                        kiln_mma_bf16_16816(dqa[n + 1], a, bb[2], bb[3]);
                    }
                }
                const int t_lo = q0 + qr + (lane >> 2), t_hi = t_lo + 8;
#pragma unroll
                for (int n = 0; n < NT / 2; n++) {
                    const int c = c0 + n * 8 + (lane & 3) * 2;
                    if (t_lo < T) {
                        atomicAdd(dq + (row0 + t_lo) * HD + c, dqa[n][0]);
                        atomicAdd(dq + (row0 + t_lo) * HD + c + 1, dqa[n][1]);
                    }
                    if (t_hi < T) {
                        atomicAdd(dq + (row0 + t_hi) * HD + c, dqa[n][2]);
                        atomicAdd(dq + (row0 + t_hi) * HD + c + 1, dqa[n][3]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int n = 0; n < NT; n++) {
        const int c = n * 8 + (lane & 3) * 2;
        if (key_lo < T) {
            *reinterpret_cast<float2*>(dk + kv_off + (long)key_lo * HD + c) = make_float2(dk_acc[n][0], dk_acc[n][1]);
            *reinterpret_cast<float2*>(dv + kv_off + (long)key_lo * HD + c) = make_float2(dv_acc[n][0], dv_acc[n][1]);
        }
        if (key_hi < T) {
            *reinterpret_cast<float2*>(dk + kv_off + (long)key_hi * HD + c) = make_float2(dk_acc[n][2], dk_acc[n][3]);
            *reinterpret_cast<float2*>(dv + kv_off + (long)key_hi * HD + c) = make_float2(dv_acc[n][2], dv_acc[n][3]);
        }
    }
}

#define KILN_TRAIN_FLASH_BWD(HD)                                                                  \
    extern "C" __global__ void __launch_bounds__(128, 1) kiln_train_flash_bwd_hd##HD(             \
        const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,         \
        const u16* __restrict__ dout_g, const float* __restrict__ lse,                            \
        const float* __restrict__ dd, float* __restrict__ dq, float* __restrict__ dk,             \
        float* __restrict__ dv, int T, int nh, int kvh, float scale_log2, float scale) {          \
        kiln_train_flash_bwd<HD>(q, k, v, dout_g, lse, dd, dq, dk, dv, T, nh, kvh, scale_log2,   \
                                 scale);                                                          \
    }

KILN_TRAIN_FLASH_BWD(32)
KILN_TRAIN_FLASH_BWD(64)
KILN_TRAIN_FLASH_BWD(128)
