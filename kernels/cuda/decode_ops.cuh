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
