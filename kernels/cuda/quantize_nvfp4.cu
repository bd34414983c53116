// quantize_nvfp4.cu — f32 or bf16 [rows, cols] -> NVFP4 (ModelOpt semantics, bit-identical to
// Nvfp4Tensor::quantize on the CPU; stochastic variant identical to quantize_stochastic).
//
// Layout: rows*cols elements are nblocks = rows*cols/16 consecutive blocks of 16 (cols % 16 == 0,
// so a block never straddles rows). Block b writes packed[8b .. 8b+8) (even element in the low
// nibble) and scales[b] (E4M3 bits).
// Tensor scale: ws2 = kiln_tensor_scale(amax) read from *amax_bits (written by amax.cu), or the
// host value fixed_ws2 when amax_bits is null.
// SR: element i of block b draws kiln_sr_uniform(seed, (first_block + b) * 16 + i).
// Launch: one thread per block, 256 threads per CUDA block. reverse != 0 walks the blocks from
// the end, so that right after the amax pass the tail of the input is still in L2.

template <typename T> __device__ __forceinline__ void kiln_load16(const T* x, u64 b, float v[16]);

template <> __device__ __forceinline__ void kiln_load16<float>(const float* x, u64 b, float v[16]) {
    const float4* p = reinterpret_cast<const float4*>(x + b * 16);
#pragma unroll
    for (int j = 0; j < 4; j++) {
        float4 f = __ldg(p + j);
        v[4 * j] = f.x; v[4 * j + 1] = f.y; v[4 * j + 2] = f.z; v[4 * j + 3] = f.w;
    }
}

template <> __device__ __forceinline__ void kiln_load16<u16>(const u16* x, u64 b, float v[16]) {
    const uint4* p = reinterpret_cast<const uint4*>(x + b * 16);
#pragma unroll
    for (int j = 0; j < 2; j++) {
        uint4 q = __ldg(p + j);
        u32 w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            v[8 * j + 2 * k] = __uint_as_float(w[k] << 16);
            v[8 * j + 2 * k + 1] = __uint_as_float(w[k] & 0xFFFF0000u);
        }
    }
}

template <typename T, bool SR>
__device__ __forceinline__ void kiln_quantize_body(const T* __restrict__ x, u64 nblocks,
        const u32* amax_bits, float fixed_ws2, int reverse, u64 seed, u64 first_block,
        u8* __restrict__ packed, u8* __restrict__ scales, float* tensor_scale_out) {
    u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    float ws2 = amax_bits ? kiln_tensor_scale(__uint_as_float(*amax_bits)) : fixed_ws2;
    if (t == 0 && tensor_scale_out) *tensor_scale_out = ws2;
    if (t >= nblocks) return;
    u64 b = reverse ? nblocks - 1 - t : t;
    float v[16];
    kiln_load16<T>(x, b, v);
    u32 out[2];
    u8 sb = kiln_quantize_block16(v, ws2, SR ? 1 : 0, seed, (first_block + b) * 16ull, out);
    reinterpret_cast<uint2*>(packed)[b] = make_uint2(out[0], out[1]);
    scales[b] = sb;
}

#define KILN_QUANT(NAME, T, SR)                                                               \
    extern "C" __global__ void __launch_bounds__(256) NAME(const T* __restrict__ x, u64 nblocks, \
            const u32* amax_bits, float fixed_ws2, int reverse, u64 seed, u64 first_block,   \
            u8* __restrict__ packed, u8* __restrict__ scales, float* tensor_scale_out) {      \
        kiln_quantize_body<T, SR>(x, nblocks, amax_bits, fixed_ws2, reverse, seed,           \
                                  first_block, packed, scales, tensor_scale_out);            \
    }

KILN_QUANT(kiln_quantize_nvfp4_f32, float, false)
KILN_QUANT(kiln_quantize_nvfp4_bf16, u16, false)
KILN_QUANT(kiln_quantize_nvfp4_sr_f32, float, true)
KILN_QUANT(kiln_quantize_nvfp4_sr_bf16, u16, true)
