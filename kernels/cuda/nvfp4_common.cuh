// nvfp4_common.cuh — device helpers shared by every Kiln NVFP4 kernel (prepended to each .cu
// file by the Rust loader; NVRTC sees one translation unit per kernel file).
//
// These are the CUDA twins of kernels/src/nvfp4/codec.rs and tensor.rs. Every float operation
// that must match the CPU bit for bit uses an explicit round-to-nearest intrinsic
// (__fmul_rn, __fdiv_rn, ...) so the compiler cannot contract it into an FMA.
// No headers: bf16/f16 are handled as raw bits.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define KILN_E4M3_MIN_SUBNORMAL 0.001953125f  // 2^-9
#define KILN_TENSOR_SCALE_DIVISOR 2688.0f     // 6 * 448
#define KILN_MIN_TENSOR_SCALE 7.888609052210118e-31f  // 2^-100

// f32 -> E4M3 (e4m3fn), round to nearest even, saturating at +-448 (never NaN for finite x).
__device__ __forceinline__ u8 kiln_f32_to_e4m3(float x) {
    u32 bits = __float_as_uint(x);
    u8 sign = (u8)((bits >> 24) & 0x80);
    float a = fabsf(x);
    if (a != a) return sign | 0x7F;
    if (a >= 448.0f) return sign | 0x7E;
    if (a < 0.015625f) {  // subnormal range: m * 2^-9, m in 0..=8 (8 is the smallest normal)
        return sign | (u8)rintf(__fmul_rn(a, 512.0f));
    }
    u32 ab = __float_as_uint(a);
    int exp = (int)(ab >> 23) - 127;
    u32 mant = ab & 0x7FFFFF;
    u32 m3 = mant >> 20;
    u32 rem = mant & 0xFFFFF;
    if (rem > 0x80000u || (rem == 0x80000u && (m3 & 1u))) m3 += 1;
    int e = exp + 7;
    if (m3 == 8) { m3 = 0; e += 1; }
    if (e > 15 || (e == 15 && m3 == 7)) return sign | 0x7E;
    return sign | (u8)(e << 3) | (u8)m3;
}

// f16 bits (low 16 bits of h) -> f32, exact.
__device__ __forceinline__ float kiln_f16bits_to_f32(u32 h) {
    float f;
    asm("{.reg .b16 t;\n\tcvt.u16.u32 t, %1;\n\tcvt.f32.f16 %0, t;}" : "=f"(f) : "r"(h));
    return f;
}

// E4M3 -> f32 without tables or branches: the 7 magnitude bits shifted into an f16 are the
// value times 2^-8 exactly (subnormals included); 0x7F/0xFF are NaN.
__device__ __forceinline__ float kiln_e4m3_to_f32(u8 b) {
    u32 v = b;
    float mag = __fmul_rn(kiln_f16bits_to_f32((v & 0x7Fu) << 7), 256.0f);
    if ((v & 0x7Fu) == 0x7Fu) mag = __uint_as_float(0x7FC00000u);
    return (v & 0x80u) ? -mag : mag;
}

// Magnitude code (0..7) of |q| rounded to nearest even on the E2M1 grid, saturating at 6.
// Equivalent to the CPU's boundary chain (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5) for finite q:
// below 1 the grid has step 0.5 (rint(2a) with ties to even), from 1 up it is a float with one
// mantissa bit (round the f32 bits to one mantissa bit, ties to even), capped at 6.
__device__ __forceinline__ u32 kiln_e2m1_mag(float a) {
    // below 1: rint(2a) without a float-to-int conversion: adding 2^22 (whose ulp is 0.5)
    // rounds a to a multiple of 0.5, ties to even, and the bits count the halves
    if (a < 1.0f) return __float_as_uint(__fadd_rn(a, 4194304.0f)) - 0x4A800000u;
    u32 b = __float_as_uint(a);
    b += 0x1FFFFFu + ((b >> 22) & 1u);
    u32 code = (b >> 22) - 252u;  // (E - 126) * 2 + m
    return code > 7u ? 7u : code;
}

// 4-bit code: sign from the sign bit of w, magnitude from |q|.
__device__ __forceinline__ u32 kiln_f32_to_e2m1(float q, float w) {
    u32 s = (__float_as_uint(w) >> 28) & 8u;
    return s | kiln_e2m1_mag(fabsf(q));
}

// E2M1 magnitude code (0..7) -> its value, exactly, without a table (a per-thread index into
// __constant__ memory would serialise): the code placed in f16 bits 9..11 is value * 2^-14.
__device__ __forceinline__ float kiln_e2m1_mag_value(u32 idx) {
    return __fmul_rn(kiln_f16bits_to_f32((idx & 7u) << 9), 16384.0f);
}

// Stochastic rounding: pick the upper neighbour with probability (|q| - lo) / (hi - lo).
__device__ __forceinline__ u32 kiln_e2m1_sr(float q, float w, float u) {
    u32 s = (__float_as_uint(w) >> 28) & 8u;
    float a = fabsf(q);
    if (a != a) return s;
    if (a >= 6.0f) return s | 7u;
    u32 lo_idx = a < 0.5f ? 0u : a < 1.0f ? 1u : a < 1.5f ? 2u : a < 2.0f ? 3u
               : a < 3.0f ? 4u : a < 4.0f ? 5u : 6u;
    float lo = kiln_e2m1_mag_value(lo_idx), hi = kiln_e2m1_mag_value(lo_idx + 1u);
    float p = __fdiv_rn(__fsub_rn(a, lo), __fsub_rn(hi, lo));
    return s | (u < p ? lo_idx + 1u : lo_idx);
}

__device__ __forceinline__ float kiln_e2m1_to_f32(u32 c) {
    return __fmul_rn(kiln_f16bits_to_f32(((c & 8u) << 12) | ((c & 7u) << 9)), 16384.0f);
}

// SplitMix64 finaliser of (seed, index): a uniform in [0, 1) with 24 bits (as codec.rs).
__device__ __forceinline__ float kiln_sr_uniform(u64 seed, u64 index) {
    u64 z = seed + (index + 1ull) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return __fmul_rn((float)(u32)(z >> 40), 5.9604644775390625e-08f);  // 2^-24
}

// amax -> tensor scale (ModelOpt weight_scale_2), as tensor_scale_for_amax() on the CPU.
__device__ __forceinline__ float kiln_tensor_scale(float amax) {
    float ws2 = __fdiv_rn(amax, KILN_TENSOR_SCALE_DIVISOR);
    return ws2 >= KILN_MIN_TENSOR_SCALE ? ws2 : 1.0f;
}

__device__ __forceinline__ u8 kiln_block_scale_code(float block_amax, float ws2) {
    float s = __fdiv_rn(block_amax, __fmul_rn(6.0f, ws2));
    if (s == 0.0f) s = 1.0f;
    return kiln_f32_to_e4m3(fmaxf(s, KILN_E4M3_MIN_SUBNORMAL));
}

// Round-to-nearest quantize of one whole block of 16 values held by one thread: returns the
// scale byte and the 16 codes in out[0] (elements 0..7) and out[1] (8..15).
__device__ __forceinline__ u8 kiln_quantize_block16_rn(const float v[16], float ws2, u32 out[2]) {
    float bamax = 0.0f;
#pragma unroll
    for (int i = 0; i < 16; i++) bamax = fmaxf(bamax, fabsf(v[i]));
    u8 sb = kiln_block_scale_code(bamax, ws2);
    float d = __fmul_rn(kiln_e4m3_to_f32(sb), ws2);
    // v / d without a division per element (Markstein): with r the correctly rounded 1/d,
    // q1 = RN(v r), the exact remainder v - q1 d (one fma) and q = RN(q1 + rem r) is the
    // correctly rounded quotient whenever nothing underflows. d is normal (>= 2^-109) and the
    // E2M1 code only depends on q where q >= 0.25, i.e. v normal, so the codes equal the
    // CPU's IEEE division (kernels/tests/quantize_division.rs checks this on adversarial
    // inputs; below 0.25 a last-bit difference of q cannot change the code).
    const float r = __frcp_rn(d);
    out[0] = 0u;
    out[1] = 0u;
#pragma unroll
    for (int i = 0; i < 16; i++) {
        const float q1 = __fmul_rn(v[i], r);
        const float q = __fmaf_rn(__fmaf_rn(-q1, d, v[i]), r, q1);
        u32 c = kiln_f32_to_e2m1(q, v[i]);
        out[i >> 3] |= c << ((i & 7) * 4);
    }
    return sb;
}

// Quantize this lane's E consecutive values of a 16-element block whose other 16/E - 1 parts
// are held by the neighbouring lanes (lanes of a block are consecutive and aligned; every
// lane of the warp must call this). Returns the E 4-bit codes (element i in bits 4i..4i+3)
// and the block's scale byte in *sb. stochastic != 0 draws kiln_sr_uniform(seed,
// first_index + i) for element i of this lane.
template <int E>
__device__ __forceinline__ u32 kiln_quantize_lane(const float v[E], float ws2, int stochastic,
                                                  u64 seed, u64 first_index, u8* sb) {
    float bamax = 0.0f;
#pragma unroll
    for (int i = 0; i < E; i++) bamax = fmaxf(bamax, fabsf(v[i]));
#pragma unroll
    for (int o = 1; o < 16 / E; o <<= 1) bamax = fmaxf(bamax, __shfl_xor_sync(0xFFFFFFFFu, bamax, o));
    u8 s = kiln_block_scale_code(bamax, ws2);
    *sb = s;
    float denom = __fmul_rn(kiln_e4m3_to_f32(s), ws2);
    u32 out = 0u;
#pragma unroll
    for (int i = 0; i < E; i++) {
        float q = __fdiv_rn(v[i], denom);
        u32 c = stochastic ? kiln_e2m1_sr(q, v[i], kiln_sr_uniform(seed, first_index + (u64)i))
                           : kiln_f32_to_e2m1(q, v[i]);
        out |= c << (4 * i);
    }
    return out;
}

__device__ __forceinline__ float kiln_bf16_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }

__device__ __forceinline__ u16 kiln_f32_to_bf16(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (u16)((x >> 16) | 0x40u);  // quiet NaN
    x += 0x7FFFu + ((x >> 16) & 1u);
    return (u16)(x >> 16);
}

// Stochastic rounding to bf16 bits (kiln_kernels::nvfp4::codec::f32_to_bf16_stochastic): the
// top 16 bits of u (24 random bits) are added below the kept 16. NaN and ±inf round to nearest.
__device__ __forceinline__ u16 kiln_f32_to_bf16_sr(float x, float u) {
    const u32 b = __float_as_uint(x);
    if ((b & 0x7F800000u) == 0x7F800000u) return kiln_f32_to_bf16(x);
    return (u16)((b + (u32)(u * 65536.0f)) >> 16);
}

// Warp-wide max / min helpers.
__device__ __forceinline__ float kiln_warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
    return v;
}
__device__ __forceinline__ u64 kiln_warp_min_u64(u64 v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        u64 w = __shfl_xor_sync(0xFFFFFFFFu, v, o);
        v = w < v ? w : v;
    }
    return v;
}

// ---- Memory and launch helpers shared by the GEMV kernels and the benchmark's read kernel ----

// 16 bytes of a weight stream, not kept in L1 (read once), so that x stays in L1.
__device__ __forceinline__ uint4 kiln_ld_stream(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// Programmatic dependent launch (sm_90+; both are no-ops on older GPUs and when the kernel was
// launched without the attribute). launch_dependents lets the next kernel on the stream start
// its blocks as this grid's blocks leave; wait blocks until the previous kernel on the stream has
// finished and its writes are visible: a kernel launched with the attribute may read, before
// its wait, only memory that previous kernel does not write.
__device__ __forceinline__ void kiln_pdl_launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void kiln_pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Ask the L2 to fetch the 128-byte line holding p (no registers, no wait).
__device__ __forceinline__ void kiln_prefetch_l2(const void* p) {
    asm volatile("prefetch.global.L2 [%0];" :: "l"(p));
}
