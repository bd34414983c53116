// quantize_nvfp4.cu — f32 or bf16 [rows, cols] -> NVFP4 (ModelOpt semantics, bit-identical to
// Nvfp4Tensor::quantize on the CPU; stochastic variant identical to quantize_stochastic).
//
// Layout: rows*cols elements are nblocks = rows*cols/16 consecutive blocks of 16 (cols % 16 == 0,
// so a block never straddles rows). Block b writes packed[8b .. 8b+8) (even element in the low
// nibble) and scales[b] (E4M3 bits).
// Round to nearest (kiln_quantize_nvfp4_{f32,bf16}): one thread per block of 16, so the block
// scale is computed once per block (measured faster on the H100 than 2 or 4 lanes per block
// sharing the amax by shuffles). Stochastic (..._sr_...): each thread owns E = 8 (bf16) or 4
// (f32) elements. Both use IEEE division, exactly as the CPU.
// Tensor scale: ws2 = kiln_tensor_scale(amax) read from *amax_bits (written by amax.cu), or the
// host value fixed_ws2 when amax_bits is null.
// SR: element i of block b draws kiln_sr_uniform(seed, (first_block + b) * 16 + i).
// Launch: nblocks threads (round to nearest) or nblocks * 16 / E threads (stochastic), 256 per
// CUDA block. reverse != 0 runs the CUDA blocks from
// the end, so that right after the amax pass the tail of the input is still in L2.

template <typename T> __device__ __forceinline__ void kiln_load16(const T* x, u64 b, float v[16]);

template <> __device__ __forceinline__ void kiln_load16<float>(const float* x, u64 b, float v[16]) {
    const float4* p = reinterpret_cast<const float4*>(x) + b * 4;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        float4 f = __ldg(p + j);
        v[4 * j] = f.x; v[4 * j + 1] = f.y; v[4 * j + 2] = f.z; v[4 * j + 3] = f.w;
    }
}

template <> __device__ __forceinline__ void kiln_load16<u16>(const u16* x, u64 b, float v[16]) {
    const uint4* p = reinterpret_cast<const uint4*>(x) + b * 2;
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

// Round to nearest: one thread per block of 16.
template <typename T>
__device__ __forceinline__ void kiln_quantize_rn_body(const T* __restrict__ x, u64 nblocks,
        const u32* amax_bits, float fixed_ws2, int reverse, u8* __restrict__ packed,
        u8* __restrict__ scales, float* tensor_scale_out) {
    u64 cta = reverse ? (u64)(gridDim.x - 1 - blockIdx.x) : (u64)blockIdx.x;
    u64 b = cta * blockDim.x + threadIdx.x;
    float ws2 = amax_bits ? kiln_tensor_scale(__uint_as_float(*amax_bits)) : fixed_ws2;
    if (b == 0 && tensor_scale_out) *tensor_scale_out = ws2;
    if (b >= nblocks) return;
    float v[16];
    kiln_load16<T>(x, b, v);
    u32 out[2];
    u8 sb = kiln_quantize_block16_rn(v, ws2, out);
    reinterpret_cast<uint2*>(packed)[b] = make_uint2(out[0], out[1]);
    scales[b] = sb;
}

// Stochastic rounding: each thread owns E consecutive elements (E = 8 for bf16, 4 for f32) and
// the 16/E lanes of a block share their amax with shuffles.
template <typename T> struct KilnLane;
template <> struct KilnLane<float> {
    static constexpr int E = 4;
    static __device__ __forceinline__ void load(const float* x, u64 t, float v[4]) {
        float4 f = __ldg(reinterpret_cast<const float4*>(x) + t);
        v[0] = f.x; v[1] = f.y; v[2] = f.z; v[3] = f.w;
    }
    static __device__ __forceinline__ void store(u8* packed, u64 t, u32 codes) {
        reinterpret_cast<u16*>(packed)[t] = (u16)codes;
    }
};
template <> struct KilnLane<u16> {
    static constexpr int E = 8;
    static __device__ __forceinline__ void load(const u16* x, u64 t, float v[8]) {
        uint4 q = __ldg(reinterpret_cast<const uint4*>(x) + t);
        u32 w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            v[2 * k] = __uint_as_float(w[k] << 16);
            v[2 * k + 1] = __uint_as_float(w[k] & 0xFFFF0000u);
        }
    }
    static __device__ __forceinline__ void store(u8* packed, u64 t, u32 codes) {
        reinterpret_cast<u32*>(packed)[t] = codes;
    }
};

template <typename T>
__device__ __forceinline__ void kiln_quantize_sr_body(const T* __restrict__ x, u64 nblocks,
        const u32* amax_bits, float fixed_ws2, int reverse, u64 seed, u64 first_block,
        u8* __restrict__ packed, u8* __restrict__ scales, float* tensor_scale_out) {
    constexpr int E = KilnLane<T>::E;
    u64 cta = reverse ? (u64)(gridDim.x - 1 - blockIdx.x) : (u64)blockIdx.x;
    u64 t = cta * blockDim.x + threadIdx.x;
    u64 nthreads = nblocks * (16 / E);
    float ws2 = amax_bits ? kiln_tensor_scale(__uint_as_float(*amax_bits)) : fixed_ws2;
    if (t == 0 && tensor_scale_out) *tensor_scale_out = ws2;
    bool live = t < nthreads;
    float v[E];
    if (live) KilnLane<T>::load(x, t, v);
    else
#pragma unroll
        for (int i = 0; i < E; i++) v[i] = 0.0f;
    u8 sb;
    u32 codes = kiln_quantize_lane<E>(v, ws2, 1, seed, first_block * 16ull + t * E, &sb);
    if (!live) return;
    KilnLane<T>::store(packed, t, codes);
    if ((t & (16 / E - 1)) == 0) scales[t / (16 / E)] = sb;
}

#define KILN_QUANT(NAME, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(256) NAME(const T* __restrict__ x, u64 nblocks, \
            const u32* amax_bits, float fixed_ws2, int reverse, u64 seed, u64 first_block,   \
            u8* __restrict__ packed, u8* __restrict__ scales, float* tensor_scale_out) {      \
        kiln_quantize_rn_body<T>(x, nblocks, amax_bits, fixed_ws2, reverse, packed, scales,  \
                                 tensor_scale_out);                                          \
    }
#define KILN_QUANT_SR(NAME, T)                                                                \
    extern "C" __global__ void __launch_bounds__(256) NAME(const T* __restrict__ x, u64 nblocks, \
            const u32* amax_bits, float fixed_ws2, int reverse, u64 seed, u64 first_block,   \
            u8* __restrict__ packed, u8* __restrict__ scales, float* tensor_scale_out) {      \
        kiln_quantize_sr_body<T>(x, nblocks, amax_bits, fixed_ws2, reverse, seed,            \
                                 first_block, packed, scales, tensor_scale_out);             \
    }

KILN_QUANT(kiln_quantize_nvfp4_f32, float)
KILN_QUANT(kiln_quantize_nvfp4_bf16, u16)
KILN_QUANT_SR(kiln_quantize_nvfp4_sr_f32, float)
KILN_QUANT_SR(kiln_quantize_nvfp4_sr_bf16, u16)
