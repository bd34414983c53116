// adamw_nvfp4.cu — the chunked AdamW step on packed NVFP4 weights, fused: no f32 copy of the
// weights is ever made (the scratch is one 4-byte amax), identical arithmetic to
// kiln_kernels::cpu::adamw_step_nvfp4 (AdamWScalars::update, same order, no FMA contraction).
//
// Layout: packed [rows, cols/2], scales [rows, cols/16], grad/m/v f32 [rows, cols]; the host
// launches both passes over each chunk of rows (block range [first_block, first_block+nblocks),
// pointers already offset to the chunk; SR indexes by the whole tensor).
// Pass 1 (kiln_adamw_nvfp4_amax): dequantize with the old tensor scale, update, atomicMax |w'|.
// Pass 2 (kiln_adamw_nvfp4_apply): same update, write m and v, requantize each block with the new
// tensor scale from the pass-1 amax (stochastic rounding). Then kiln_tensor_scale_from_amax
// (amax.cu) stores the new tensor scale, after every chunk's pass 2 has read the old one.
// Launch: one thread per block of 16 elements, 256 threads per CUDA block.

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

__device__ __forceinline__ void kiln_adamw_block(const u8* packed, const u8* scales, float ts,
        const float* grad, const float* m, const float* v, u64 b, const KilnAdamW& h,
        float w2[16], float m2[16], float v2[16]) {
    uint2 p = reinterpret_cast<const uint2*>(packed)[b];
    u32 pw[2] = {p.x, p.y};
    float s = kiln_e4m3_to_f32(scales[b]);
#pragma unroll
    for (int i = 0; i < 16; i++) {
        float w = __fmul_rn(__fmul_rn(kiln_e2m1_to_f32((pw[i >> 3] >> ((i & 7) * 4)) & 0xFu), s), ts);
        u64 e = b * 16 + i;
        kiln_adamw_update(h, w, grad[e], m[e], v[e], w2[i], m2[i], v2[i]);
    }
}

extern "C" __global__ void __launch_bounds__(256)
kiln_adamw_nvfp4_amax(const u8* __restrict__ packed, const u8* __restrict__ scales,
                      const float* __restrict__ tensor_scale, const float* __restrict__ grad,
                      const float* __restrict__ m, const float* __restrict__ v, u64 nblocks,
                      KilnAdamW h, u32* amax_bits) {
    u64 b = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    float a = 0.0f;
    if (b < nblocks) {
        float w2[16], m2[16], v2[16];
        kiln_adamw_block(packed, scales, *tensor_scale, grad, m, v, b, h, w2, m2, v2);
#pragma unroll
        for (int i = 0; i < 16; i++) a = fmaxf(a, fabsf(w2[i]));
        // a NaN/inf update makes the amax non-finite, which the host reports
        bool bad = false;
#pragma unroll
        for (int i = 0; i < 16; i++) bad |= !isfinite(w2[i]);
        if (bad) a = __uint_as_float(0x7F800000u);
    }
    a = kiln_warp_max(a);
    if ((threadIdx.x & 31) == 0) atomicMax(amax_bits, __float_as_uint(a));
}

extern "C" __global__ void __launch_bounds__(256)
kiln_adamw_nvfp4_apply(u8* __restrict__ packed, u8* __restrict__ scales,
                       const float* __restrict__ tensor_scale, const float* __restrict__ grad,
                       float* __restrict__ m, float* __restrict__ v, u64 nblocks, KilnAdamW h,
                       const u32* amax_bits, u64 seed, u64 first_block) {
    u64 b = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= nblocks) return;
    float w2[16], m2[16], v2[16];
    kiln_adamw_block(packed, scales, *tensor_scale, grad, m, v, b, h, w2, m2, v2);
#pragma unroll
    for (int i = 0; i < 16; i++) { m[b * 16 + i] = m2[i]; v[b * 16 + i] = v2[i]; }
    float ws2 = kiln_tensor_scale(__uint_as_float(*amax_bits));
    u32 out[2];
    u8 sb = kiln_quantize_block16(w2, ws2, 1, seed, (first_block + b) * 16ull, out);
    reinterpret_cast<uint2*>(packed)[b] = make_uint2(out[0], out[1]);
    scales[b] = sb;
}
