// Per-element math of the decode step shared by its separate kernels (decode.cu) and by the
// GEMVs that fold those kernels into their x load (gemv_cuda_core.cu's fused decode GEMVs):
// one definition of each, so that the fused and the separate forms compute the same bits.
// Include after block_reduce.cuh (KILN_NEG_INF). Activations are read through L2 (__ldcg): the
// persistent decode kernel's other blocks write them in the same launch.

// Warps per attention block and positions per warp load: 8 warps of 4 for small query groups
// (HD·REP ≤ 512: shorter chains per warp), else 4 of 8 (the shared arrays stay within 48 KiB).
// Either way a block takes 32 positions per pass. Keep in step with attention_warps() in
// decode.rs.
#define KILN_ATTN_WARPS_FOR(HD, REP) ((HD) * (REP) <= 512 ? 8 : 4)
#define KILN_ATTN_GROUP_FOR(HD, REP) (32 / KILN_ATTN_WARPS_FOR(HD, REP))

// RMSNorm's scale from the sum of squares of a row of H: 1 / sqrt(mean(x²) + eps).
__device__ __forceinline__ float kiln_rms_scale(float sum_sq, int H, float eps) {
    return 1.0f / sqrtf(sum_sq / (float)H + eps);
}

// SwiGLU of one element: silu(g) · u.
__device__ __forceinline__ float kiln_silu_mul(float g, float u) {
    return g / (1.0f + expf(-g)) * u;
}

// The decode attention's splits that hold positions, for a query that sees `len` positions.
__device__ __forceinline__ int kiln_combine_splits(int len, int splits, int chunk) {
    return min(splits, (len + chunk - 1) / chunk);
}

// The combine's per-(token, head) statistics over its `ns` splits (rows row0.. of part_ml, each
// (max, sum of exp) of its split): the largest max and Σ l·exp(m - max).
__device__ __forceinline__ void kiln_combine_stats(const float* __restrict__ part_ml, size_t row0,
                                                   int ns, float& mx, float& sum) {
    mx = KILN_NEG_INF;
    for (int s = 0; s < ns; ++s) mx = fmaxf(mx, __ldcg(part_ml + (row0 + s) * 2));
    sum = 0.0f;
    for (int s = 0; s < ns; ++s) {
        const float m = __ldcg(part_ml + (row0 + s) * 2);
        sum += __ldcg(part_ml + (row0 + s) * 2 + 1) * (m == KILN_NEG_INF ? 0.0f : expf(m - mx));
    }
}

// Element e of the combined output of one (token, head): Σ o·exp(m - max) / sum. (The fused o
// GEMV's KilnXCombine does the same operations with exp(m - max) cached per split.)
__device__ __forceinline__ float kiln_combine_elem(const float* __restrict__ part_o,
                                                   const float* __restrict__ part_ml, size_t row0,
                                                   int ns, int hd, int e, float mx, float sum) {
    float o = 0.0f;
    for (int s = 0; s < ns; ++s) {
        const float m = __ldcg(part_ml + (row0 + s) * 2);
        if (m != KILN_NEG_INF) o += __ldcg(part_o + (row0 + s) * hd + e) * expf(m - mx);
    }
    return o / sum;
}

// The q/k/v epilogue's per-element steps (kiln_qkv_post, and the persistent decode kernel's
// attention stage). The GEMV's output times its part's tensor scale, plus the bias (if any):
__device__ __forceinline__ float kiln_qkv_value(float raw, float scale, const float* bias, int idx) {
    float val = raw * scale;
    if (bias) val += bias[idx];
    return val;
}

// Qwen3's per-head RMSNorm of one element, from the head's sum of squares ss.
__device__ __forceinline__ float kiln_head_norm(float val, float ss, int hd, float eps, float w) {
    return val / sqrtf(ss / (float)hd + eps) * w;
}

// RoPE ("rotate half") of element i of a head: `self` is v[i], `partner` v[i ± hd/2], at the
// angle whose sine and cosine are s and c; `first` for i < hd/2.
__device__ __forceinline__ float kiln_rope(float self, float partner, float c, float s, bool first) {
    return first ? self * c - partner * s : self * c + partner * s;
}

// Load E consecutive bf16 as f32; CG: through L2 (__ldcg: rows the persistent kernel's other
// blocks wrote in the same launch).
template <class T, bool CG>
__device__ __forceinline__ T kiln_ld(const T* p) {
    if constexpr (CG) return __ldcg(p);
    else return *p;
}
template <int E, bool CG = false>
__device__ __forceinline__ void kiln_load_bf16(const u16* p, float out[E]) {
    if constexpr (E == 1) {
        out[0] = kiln_bf16_to_f32(kiln_ld<unsigned short, CG>(reinterpret_cast<const unsigned short*>(p)));
    } else if constexpr (E == 2) {
        const u32 w = kiln_ld<unsigned int, CG>(reinterpret_cast<const unsigned int*>(p));
        out[0] = kiln_bf16_to_f32((u16)(w & 0xFFFFu));
        out[1] = kiln_bf16_to_f32((u16)(w >> 16));
    } else if constexpr (E == 4) {
        const uint2 w = kiln_ld<uint2, CG>(reinterpret_cast<const uint2*>(p));
        out[0] = kiln_bf16_to_f32((u16)(w.x & 0xFFFFu));
        out[1] = kiln_bf16_to_f32((u16)(w.x >> 16));
        out[2] = kiln_bf16_to_f32((u16)(w.y & 0xFFFFu));
        out[3] = kiln_bf16_to_f32((u16)(w.y >> 16));
    } else {
#pragma unroll
        for (int e = 0; e < E; e += 4) kiln_load_bf16<4, CG>(p + e, out + e);
    }
}

// The decode attention of one KV head's query group over positions [start, end) of one split,
// shared by the attention kernel (decode.cu) and the persistent kernel: qr holds the group's
// queries (lane l elements l·E .. l·E+E-1, scaled; rows past rep zero), kb / vb the head's key
// and value rows at this lane's elements. Warp w < W takes GROUP consecutive positions of every
// 32 (W · GROUP), their rows loaded before any is used, and runs the online softmax; warps at or
// past W idle (every warp must call this: it syncs the block). Then the W warps' results are
// combined in warp order into the split's rows of part_o ([..][splits][HD]) and part_ml
// ([..][splits][2]): row (head0 + r) · splits + s for r < rep.
template <int HD, int REP, bool CG>
__device__ __forceinline__ void kiln_attention_split(const float (&qr)[REP][HD / 32],
                                                     const u16* __restrict__ kb,
                                                     const u16* __restrict__ vb, int start, int end, int rep,
                                                     float* __restrict__ part_o,
                                                     float* __restrict__ part_ml, size_t head0,
                                                     int splits, int s) {
    constexpr int E = HD / 32;
    constexpr int W = KILN_ATTN_WARPS_FOR(HD, REP);
    constexpr int GROUP = KILN_ATTN_GROUP_FOR(HD, REP);
    __shared__ float sm_m[W][REP], sm_l[W][REP];
    __shared__ float sm_o[W][REP][HD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (warp < W) {
        float m[REP], l[REP], acc[REP][E];
#pragma unroll
        for (int r = 0; r < REP; ++r) {
            m[r] = KILN_NEG_INF;
            l[r] = 0.0f;
#pragma unroll
            for (int e = 0; e < E; ++e) acc[r][e] = 0.0f;
        }
        for (int j0 = start + warp * GROUP; j0 < end; j0 += W * GROUP) {
            float k[GROUP][E], v[GROUP][E];
#pragma unroll
            for (int g = 0; g < GROUP; ++g) {
                const int j = min(j0 + g, end - 1);
                kiln_load_bf16<E, CG>(kb + (size_t)j * HD, k[g]);
                kiln_load_bf16<E, CG>(vb + (size_t)j * HD, v[g]);
            }
#pragma unroll
            for (int g = 0; g < GROUP; ++g) {
                if (j0 + g >= end) break;
                // every r of REP, without a branch on rep: the REP dot products and their
                // shuffle reductions are independent and interleave (heads past rep have q = 0
                // and are never written)
                float d[REP];
#pragma unroll
                for (int r = 0; r < REP; ++r) {
                    float acc_d = 0.0f;
#pragma unroll
                    for (int e = 0; e < E; ++e) acc_d = fmaf(qr[r][e], k[g][e], acc_d);
                    d[r] = acc_d;
                }
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
                    for (int r = 0; r < REP; ++r) d[r] += __shfl_xor_sync(0xFFFFFFFFu, d[r], o);
                }
#pragma unroll
                for (int r = 0; r < REP; ++r) {
                    const float mn = fmaxf(m[r], d[r]);
                    const float corr = expf(m[r] - mn);
                    const float p = expf(d[r] - mn);
                    l[r] = l[r] * corr + p;
#pragma unroll
                    for (int e = 0; e < E; ++e) acc[r][e] = fmaf(acc[r][e], corr, p * v[g][e]);
                    m[r] = mn;
                }
            }
        }
#pragma unroll
        for (int r = 0; r < REP; ++r) {
            if (lane == 0) {
                sm_m[warp][r] = m[r];
                sm_l[warp][r] = l[r];
            }
#pragma unroll
            for (int e = 0; e < E; ++e) sm_o[warp][r][lane * E + e] = acc[r][e];
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < rep * HD; idx += blockDim.x) {
        const int r = idx / HD, e = idx % HD;
        float mx = KILN_NEG_INF;
#pragma unroll
        for (int w = 0; w < W; ++w) mx = fmaxf(mx, sm_m[w][r]);
        float sum = 0.0f, o = 0.0f;
#pragma unroll
        for (int w = 0; w < W; ++w) {
            const float wt = sm_m[w][r] == KILN_NEG_INF ? 0.0f : expf(sm_m[w][r] - mx);
            sum += sm_l[w][r] * wt;
            o += sm_o[w][r][e] * wt;
        }
        const size_t row = (head0 + r) * splits + s;
        part_o[row * HD + e] = o;
        if (e == 0) {
            part_ml[row * 2] = mx;
            part_ml[row * 2 + 1] = sum;
        }
    }
}
