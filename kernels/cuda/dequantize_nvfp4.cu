// dequantize_nvfp4.cu — NVFP4 -> f32 or bf16, value = (e2m1 * e4m3_scale) * tensor_scale in f32
// (bit-identical to Nvfp4Tensor::dequantize; bf16 output rounds that f32 to nearest even).
//
// Layout: nblocks blocks of 16 elements; block b reads packed[8b .. 8b+8), scales[b] and writes
// out[16b .. 16b+16). tensor_scale is a device pointer to one f32.
// Launch: one thread per block of 16, 256 threads per CUDA block; 16-byte stores.

template <bool BF16>
__device__ __forceinline__ void kiln_dequant_body(const u8* __restrict__ packed,
        const u8* __restrict__ scales, const float* __restrict__ tensor_scale, u64 nblocks,
        void* __restrict__ out) {
    u64 b = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= nblocks) return;
    uint2 p = __ldg(reinterpret_cast<const uint2*>(packed) + b);
    float s = kiln_e4m3_to_f32(__ldg(scales + b));
    float ts = __ldg(tensor_scale);
    float v[16];
    u32 w[2] = {p.x, p.y};
#pragma unroll
    for (int i = 0; i < 16; i++)
        v[i] = __fmul_rn(__fmul_rn(kiln_e2m1_to_f32((w[i >> 3] >> ((i & 7) * 4)) & 0xFu), s), ts);
    if (BF16) {
        uint4* o = reinterpret_cast<uint4*>(static_cast<u16*>(out) + b * 16);
        u32 h[8];
#pragma unroll
        for (int i = 0; i < 8; i++)
            h[i] = (u32)kiln_f32_to_bf16(v[2 * i]) | ((u32)kiln_f32_to_bf16(v[2 * i + 1]) << 16);
        o[0] = make_uint4(h[0], h[1], h[2], h[3]);
        o[1] = make_uint4(h[4], h[5], h[6], h[7]);
    } else {
        float4* o = reinterpret_cast<float4*>(static_cast<float*>(out) + b * 16);
#pragma unroll
        for (int j = 0; j < 4; j++) o[j] = make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
    }
}

extern "C" __global__ void __launch_bounds__(256)
kiln_dequantize_nvfp4_f32(const u8* packed, const u8* scales, const float* tensor_scale,
                          u64 nblocks, float* out) {
    kiln_dequant_body<false>(packed, scales, tensor_scale, nblocks, out);
}

extern "C" __global__ void __launch_bounds__(256)
kiln_dequantize_nvfp4_bf16(const u8* packed, const u8* scales, const float* tensor_scale,
                           u64 nblocks, u16* out) {
    kiln_dequant_body<true>(packed, scales, tensor_scale, nblocks, out);
}

// f32 <-> bf16 conversion for the large-M matmul path (n elements, grid-stride).
extern "C" __global__ void kiln_f32_to_bf16(const float* __restrict__ x, u64 n, u16* __restrict__ y) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        y[i] = kiln_f32_to_bf16(x[i]);
}

extern "C" __global__ void kiln_bf16_to_f32(const u16* __restrict__ x, u64 n, float* __restrict__ y) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        y[i] = kiln_bf16_to_f32(x[i]);
}
