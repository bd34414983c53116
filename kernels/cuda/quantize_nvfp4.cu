// quantize_nvfp4.cu — f32 or bf16 [rows, cols] -> NVFP4 (ModelOpt semantics, bit-identical to
// Nvfp4Tensor::quantize on the CPU; stochastic variant identical to quantize_stochastic).
//
// Layout: rows*cols elements are nblocks = rows*cols/16 consecutive blocks of 16 (cols % 16 == 0,
// so a block never straddles rows). Block b writes packed[8b .. 8b+8) (even element in the low
// nibble) and scales[b] (E4M3 bits).
// Each thread owns E consecutive elements (E = 8 for bf16: one 16-byte load; E = 4 for f32: one
// float4), so a warp reads 512 contiguous bytes per load and writes contiguous packed bytes; the
// 16/E lanes of a block exchange their amax with shuffles.
// Tensor scale: ws2 = kiln_tensor_scale(amax) read from *amax_bits (written by amax.cu), or the
// host value fixed_ws2 when amax_bits is null.
// SR: element i of block b draws kiln_sr_uniform(seed, (first_block + b) * 16 + i).
// Launch: nblocks * 16 / E threads, 256 per CUDA block. reverse != 0 runs the CUDA blocks from
// the end, so that right after the amax pass the tail of the input is still in L2.

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

template <typename T, bool SR>
__device__ __forceinline__ void kiln_quantize_body(const T* __restrict__ x, u64 nblocks,
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
    u32 codes = kiln_quantize_lane<E>(v, ws2, SR ? 1 : 0, seed, first_block * 16ull + t * E, &sb);
    if (!live) return;
    KilnLane<T>::store(packed, t, codes);
    if ((t & (16 / E - 1)) == 0) scales[t / (16 / E)] = sb;
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
