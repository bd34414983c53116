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

// This lane's 4 elements (flat group t = elements 4t..4t+4, block t/4): dequantize with the old
// tensor scale and update. Loads are float4 / u16, contiguous across the warp.
__device__ __forceinline__ void kiln_adamw_lane(const u8* packed, const u8* scales, float ts,
        const float* grad, const float* m, const float* v, u64 t, const KilnAdamW& h,
        float w2[4], float m2[4], float v2[4]) {
    u32 codes = reinterpret_cast<const u16*>(packed)[t];
    float s = kiln_e4m3_to_f32(scales[t >> 2]);
    float4 g4 = reinterpret_cast<const float4*>(grad)[t];
    float4 m4 = reinterpret_cast<const float4*>(m)[t];
    float4 v4 = reinterpret_cast<const float4*>(v)[t];
    float g[4] = {g4.x, g4.y, g4.z, g4.w}, mm[4] = {m4.x, m4.y, m4.z, m4.w}, vv[4] = {v4.x, v4.y, v4.z, v4.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float w = __fmul_rn(__fmul_rn(kiln_e2m1_to_f32((codes >> (4 * i)) & 0xFu), s), ts);
        kiln_adamw_update(h, w, g[i], mm[i], vv[i], w2[i], m2[i], v2[i]);
    }
}

// Launch (both passes): nblocks * 4 threads, 256 per CUDA block.
extern "C" __global__ void __launch_bounds__(256)
kiln_adamw_nvfp4_amax(const u8* __restrict__ packed, const u8* __restrict__ scales,
                      const float* __restrict__ tensor_scale, const float* __restrict__ grad,
                      const float* __restrict__ m, const float* __restrict__ v, u64 nblocks,
                      KilnAdamW h, u32* amax_bits) {
    u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    float a = 0.0f;
    if (t < nblocks * 4) {
        float w2[4], m2[4], v2[4];
        kiln_adamw_lane(packed, scales, *tensor_scale, grad, m, v, t, h, w2, m2, v2);
#pragma unroll
        for (int i = 0; i < 4; i++) a = isfinite(w2[i]) ? fmaxf(a, fabsf(w2[i])) : __uint_as_float(0x7F800000u);
    }
    // a NaN/inf update makes the amax infinite, which the host reports
    a = kiln_warp_max(a);
    if ((threadIdx.x & 31) == 0) atomicMax(amax_bits, __float_as_uint(a));
}

extern "C" __global__ void __launch_bounds__(256)
kiln_adamw_nvfp4_apply(u8* __restrict__ packed, u8* __restrict__ scales,
                       const float* __restrict__ tensor_scale, const float* __restrict__ grad,
                       float* __restrict__ m, float* __restrict__ v, u64 nblocks, KilnAdamW h,
                       const u32* amax_bits, u64 seed, u64 first_block) {
    u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    bool live = t < nblocks * 4;
    float w2[4] = {0.0f, 0.0f, 0.0f, 0.0f}, m2[4], v2[4];
    if (live) {
        kiln_adamw_lane(packed, scales, *tensor_scale, grad, m, v, t, h, w2, m2, v2);
        reinterpret_cast<float4*>(m)[t] = make_float4(m2[0], m2[1], m2[2], m2[3]);
        reinterpret_cast<float4*>(v)[t] = make_float4(v2[0], v2[1], v2[2], v2[3]);
    }
    float ws2 = kiln_tensor_scale(__uint_as_float(*amax_bits));
    u8 sb;
    u32 codes = kiln_quantize_lane<4>(w2, ws2, 1, seed, first_block * 16ull + t * 4, &sb);
    if (!live) return;
    reinterpret_cast<u16*>(packed)[t] = (u16)codes;
    if ((t & 3) == 0) scales[t >> 2] = sb;
}
