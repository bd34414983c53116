// dequantize_nvfp4.cu — NVFP4 -> f32 or bf16, value = (e2m1 * e4m3_scale) * tensor_scale in f32
// (bit-identical to Nvfp4Tensor::dequantize; bf16 output rounds that f32 to nearest even).
//
// Layout: nblocks blocks of 16 elements; packed [nblocks*8] bytes, scales [nblocks], out
// [nblocks*16]. tensor_scale is a device pointer to one f32.
// Each thread owns E consecutive elements: bf16 out E = 8 (reads 4 packed bytes, writes one
// 16-byte vector), f32 out E = 4 (reads 2 packed bytes, writes one float4); warps touch
// contiguous memory on every load and store.
// Launch: nblocks * 16 / E threads, 256 per CUDA block.

template <bool BF16>
__device__ __forceinline__ void kiln_dequant_body(const u8* __restrict__ packed,
        const u8* __restrict__ scales, const float* __restrict__ tensor_scale, u64 nblocks,
        void* __restrict__ out) {
    constexpr int E = BF16 ? 8 : 4;
    u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= nblocks * (16 / E)) return;
    u32 codes = BF16 ? __ldg(reinterpret_cast<const u32*>(packed) + t)
                     : (u32)__ldg(reinterpret_cast<const u16*>(packed) + t);
    float s = kiln_e4m3_to_f32(__ldg(scales + t / (16 / E)));
    float ts = __ldg(tensor_scale);
    float v[E];
#pragma unroll
    for (int i = 0; i < E; i++) v[i] = __fmul_rn(__fmul_rn(kiln_e2m1_to_f32((codes >> (4 * i)) & 0xFu), s), ts);
    if (BF16) {
        u32 h[4];
#pragma unroll
        for (int i = 0; i < 4; i++)
            h[i] = (u32)kiln_f32_to_bf16(v[2 * i]) | ((u32)kiln_f32_to_bf16(v[2 * i + 1]) << 16);
        reinterpret_cast<uint4*>(out)[t] = make_uint4(h[0], h[1], h[2], h[3]);
    } else {
        reinterpret_cast<float4*>(out)[t] = make_float4(v[0], v[1], v[2], v[3]);
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
