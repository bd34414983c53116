// adamw_nvfp4.cu — the chunked AdamW step on packed NVFP4 weights, fused: no f32 copy of the
// weights is ever made (the scratch is one 4-byte amax), identical arithmetic to
// kiln_kernels::cpu::adamw_step_nvfp4 (AdamWScalars::update, same order, no FMA contraction).
//
// Layout: packed [rows, cols/2], scales [rows, cols/16], grad/m/v f32 [rows, cols]. The host may
// launch the passes over row ranges (block range [first_block, first_block+nblocks), pointers
// offset to it; SR indexes by the whole tensor); it launches each pass once over the whole
// tensor, since the fused kernels hold no per-chunk buffer.
// Pass 1 (kiln_adamw_nvfp4_amax): dequantize with the old tensor scale, update, atomicMax |w'|.
// Pass 2 (kiln_adamw_nvfp4_apply): same update, write m and v, requantize each block with the new
// tensor scale from the pass-1 amax (stochastic rounding). Then kiln_tensor_scale_from_amax
// (amax.cu) stores the new tensor scale, after every chunk's pass 2 has read the old one.
// Launch: four threads per block of 16 elements (each owns 4 consecutive elements), 256 threads
// per CUDA block.

struct KilnAdamW {
    float beta1, beta2, eps, decay, step_size, bc2_sqrt;
};

__device__ __forceinline__ void kiln_adamw_update(const KilnAdamW& h, float w, float g, float m,
                                                  float v, float& w2, float& m2, float& v2) {
    m2 = __fadd_rn(__fmul_rn(h.beta1, m), __fmul_rn(__fsub_rn(1.0f, h.beta1), g));
    v2 = __fadd_rn(__fmul_rn(h.beta2, v), __fmul_rn(__fsub_rn(1.0f, h.beta2), __fmul_rn(g, g)));
    float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v2), h.bc2_sqrt), h.eps);
    w2 = __fsub_rn(__fmul_rn(w, h.decay), __fmul_rn(h.step_size, __fdiv_rn(m2, denom)));
}

// Moments stored as f32, or as bf16 bits (u16) written back with stochastic rounding.
struct KilnMoment4 { float x[4]; };
__device__ __forceinline__ KilnMoment4 kiln_load4(const float* p, u64 t) {
    float4 a = reinterpret_cast<const float4*>(p)[t];
    return {{a.x, a.y, a.z, a.w}};
}
__device__ __forceinline__ KilnMoment4 kiln_load4(const u16* p, u64 t) {
    uint2 a = reinterpret_cast<const uint2*>(p)[t];
    return {{kiln_bf16_to_f32((u16)(a.x & 0xFFFFu)), kiln_bf16_to_f32((u16)(a.x >> 16)),
             kiln_bf16_to_f32((u16)(a.y & 0xFFFFu)), kiln_bf16_to_f32((u16)(a.y >> 16))}};
}
__device__ __forceinline__ void kiln_store4(float* p, u64 t, const float x[4], u64) {
    reinterpret_cast<float4*>(p)[t] = make_float4(x[0], x[1], x[2], x[3]);
}
// Element e = 4t + i draws kiln_sr_uniform(seed, e), as MomentVec::update_f32 on the host.
__device__ __forceinline__ void kiln_store4(u16* p, u64 t, const float x[4], u64 seed) {
    u32 b[4];
#pragma unroll
    for (int i = 0; i < 4; i++) b[i] = kiln_f32_to_bf16_sr(x[i], kiln_sr_uniform(seed, 4 * t + i));
    reinterpret_cast<uint2*>(p)[t] = make_uint2(b[0] | (b[1] << 16), b[2] | (b[3] << 16));
}

// The clip factor of kiln_kernels' train steps: max_norm / ‖g‖ when ‖g‖ > max_norm (f32, as
// ParamStore::adamw_step), else 1; sumsq null means no clipping.
__device__ __forceinline__ float kiln_clip_factor(const double* sumsq, float max_norm) {
    if (sumsq == nullptr || max_norm <= 0.0f) return 1.0f;
    const float norm = (float)sqrt(*sumsq);
    return norm > max_norm ? max_norm / norm : 1.0f;
}

// This lane's 4 elements (flat group t = elements 4t..4t+4, block t/4): dequantize with the old
// tensor scale and update (the gradient times `clip` when it is not 1). Loads are contiguous
// across the warp.
template <typename M>
__device__ __forceinline__ void kiln_adamw_lane(const u8* packed, const u8* scales, float ts,
        const float* grad, const M* m, const M* v, u64 t, const KilnAdamW& h, float clip,
        float w2[4], float m2[4], float v2[4]) {
    u32 codes = reinterpret_cast<const u16*>(packed)[t];
    float s = kiln_e4m3_to_f32(scales[t >> 2]);
    float4 g4 = reinterpret_cast<const float4*>(grad)[t];
    KilnMoment4 mm = kiln_load4(m, t), vv = kiln_load4(v, t);
    float g[4] = {g4.x, g4.y, g4.z, g4.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float w = __fmul_rn(__fmul_rn(kiln_e2m1_to_f32((codes >> (4 * i)) & 0xFu), s), ts);
        float gi = clip == 1.0f ? g[i] : __fmul_rn(g[i], clip);
        kiln_adamw_update(h, w, gi, mm.x[i], vv.x[i], w2[i], m2[i], v2[i]);
    }
}

template <typename M>
__device__ __forceinline__ void kiln_adamw_amax_body(const u8* packed, const u8* scales,
        const float* tensor_scale, const float* grad, const M* m, const M* v, u64 nblocks,
        const KilnAdamW& h, float clip, u32* amax_bits) {
    u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    float a = 0.0f;
    if (t < nblocks * 4) {
        float w2[4], m2[4], v2[4];
        kiln_adamw_lane(packed, scales, *tensor_scale, grad, m, v, t, h, clip, w2, m2, v2);
#pragma unroll
        for (int i = 0; i < 4; i++) a = isfinite(w2[i]) ? fmaxf(a, fabsf(w2[i])) : __uint_as_float(0x7F800000u);
    }
    // a NaN/inf update makes the amax infinite, which the host reports
    a = kiln_warp_max(a);
    if ((threadIdx.x & 31) == 0) atomicMax(amax_bits, __float_as_uint(a));
}

template <typename M>
__device__ __forceinline__ void kiln_adamw_apply_body(u8* packed, u8* scales,
        const float* tensor_scale, const float* grad, M* m, M* v, u64 nblocks,
        const KilnAdamW& h, float clip, const u32* amax_bits, u64 seed, u64 first_block,
        u64 m_seed, u64 v_seed, bool moments_only) {
    u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    bool live = t < nblocks * 4;
    float w2[4] = {0.0f, 0.0f, 0.0f, 0.0f}, m2[4], v2[4];
    if (live) {
        kiln_adamw_lane(packed, scales, *tensor_scale, grad, m, v, t, h, clip, w2, m2, v2);
        kiln_store4(m, t, m2, m_seed);
        kiln_store4(v, t, v2, v_seed);
    }
    if (moments_only) return;  // uniform over the grid
    float ws2 = kiln_tensor_scale(__uint_as_float(*amax_bits));
    u8 sb;
    u32 codes = kiln_quantize_lane<4>(w2, ws2, 1, seed, first_block * 16ull + t * 4, &sb);
    if (!live) return;
    reinterpret_cast<u16*>(packed)[t] = (u16)codes;
    if ((t & 3) == 0) scales[t >> 2] = sb;
}

// Launch (both passes): nblocks * 4 threads, 256 per CUDA block.
extern "C" __global__ void __launch_bounds__(256)
kiln_adamw_nvfp4_amax(const u8* __restrict__ packed, const u8* __restrict__ scales,
                      const float* __restrict__ tensor_scale, const float* __restrict__ grad,
                      const float* __restrict__ m, const float* __restrict__ v, u64 nblocks,
                      KilnAdamW h, u32* amax_bits) {
    kiln_adamw_amax_body<float>(packed, scales, tensor_scale, grad, m, v, nblocks, h, 1.0f, amax_bits);
}

extern "C" __global__ void __launch_bounds__(256)
kiln_adamw_nvfp4_apply(u8* __restrict__ packed, u8* __restrict__ scales,
                       const float* __restrict__ tensor_scale, const float* __restrict__ grad,
                       float* __restrict__ m, float* __restrict__ v, u64 nblocks, KilnAdamW h,
                       const u32* amax_bits, u64 seed, u64 first_block) {
    kiln_adamw_apply_body<float>(packed, scales, tensor_scale, grad, m, v, nblocks, h, 1.0f,
                                 amax_bits, seed, first_block, 0, 0, false);
}

// The train step's variants (GPU nvfp4-full): the gradient clipped by the step's global norm
// (sumsq of every gradient, max_norm 0 = off), moments f32 (_f32m) or bf16 (_bf16m; m_seed and
// v_seed seed their stochastic rounding). A non-finite norm leaves everything as it was (the
// host reports the divergence): the amax pass records nothing and the apply pass returns.
// moments_only (lr 0) writes the moments and leaves the packed weight untouched (requantizing
// unchanged values would still move codes: the tensor scale comes from the dequantized amax).
#define KILN_ADAMW_TRAIN_VARIANTS(SUFFIX, M)                                                     \
extern "C" __global__ void __launch_bounds__(256)                                               \
kiln_adamw_nvfp4_amax_##SUFFIX(const u8* __restrict__ packed, const u8* __restrict__ scales,   \
        const float* __restrict__ tensor_scale, const float* __restrict__ grad,                 \
        const M* __restrict__ m, const M* __restrict__ v, u64 nblocks, KilnAdamW h,             \
        const double* __restrict__ sumsq, float max_norm, u32* amax_bits) {                     \
    if (!isfinite(*sumsq)) return;                                                              \
    kiln_adamw_amax_body<M>(packed, scales, tensor_scale, grad, m, v, nblocks, h,               \
                            kiln_clip_factor(sumsq, max_norm), amax_bits);                      \
}                                                                                               \
extern "C" __global__ void __launch_bounds__(256)                                               \
kiln_adamw_nvfp4_apply_##SUFFIX(u8* __restrict__ packed, u8* __restrict__ scales,              \
        const float* __restrict__ tensor_scale, const float* __restrict__ grad,                 \
        M* __restrict__ m, M* __restrict__ v, u64 nblocks, KilnAdamW h,                         \
        const double* __restrict__ sumsq, float max_norm, const u32* amax_bits, u64 seed,       \
        u64 m_seed, u64 v_seed, int moments_only) {                                             \
    if (!isfinite(*sumsq)) return;                                                              \
    kiln_adamw_apply_body<M>(packed, scales, tensor_scale, grad, m, v, nblocks, h,              \
                             kiln_clip_factor(sumsq, max_norm), amax_bits, seed, 0, m_seed,     \
                             v_seed, moments_only != 0);                                        \
}

KILN_ADAMW_TRAIN_VARIANTS(f32m, float)
KILN_ADAMW_TRAIN_VARIANTS(bf16m, u16)

// The new tensor scale from the amax pass (kiln_tensor_scale_from_amax), unless the step's
// gradient norm is non-finite (then the apply pass changed nothing and neither does this).
extern "C" __global__ void kiln_adamw_nvfp4_commit_scale(const double* sumsq, const u32* amax_bits,
                                                         float* tensor_scale) {
    if (threadIdx.x == 0 && blockIdx.x == 0 && isfinite(*sumsq))
        *tensor_scale = kiln_tensor_scale(__uint_as_float(*amax_bits));
}
