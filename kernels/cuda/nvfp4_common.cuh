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

// ---- Tensor-core GEMV helpers (gemv_nvfp4_tc.cu, gemv_nvfp4_tc2.cu, gemv_nvfp4_tc5.cu) ----
// Hopper has no FP4 MMA: each lane decodes E2M1 in software into bf16 pairs (the sign and
// the three magnitude bits of a nibble moved into a bf16 bit pattern give value * 2^-126
// exactly), multiplies them by its block's E4M3 scale * 2^117 (exact: the product has at most
// 5 significant bits) and feeds mma.sync.m16n8k16 (bf16 in, f32 accumulate); x goes in as
// bf16 hi + lo parts, so the result keeps f32-level accuracy.

// 16 bytes of a weight stream, not kept in L1 (read once).
__device__ __forceinline__ uint4 kiln_tc_ld_stream(const uint4* p) {
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

// Two f32 -> bf16x2 (round to nearest even), lo in the low half.
__device__ __forceinline__ u32 kiln_pack_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// The top nibble of each 16-bit half of q as a bf16 pair: e2m1 value * 2^-126.
__device__ __forceinline__ u32 kiln_e2m1_pair_bf16(u32 q) {
    return (q & 0x80008000u) | ((q >> 6) & 0x01C001C0u);
}

// a * b exactly (both halves), via fma with -0.
__device__ __forceinline__ u32 kiln_bf16x2_mul(u32 a, u32 b) {
    u32 r;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(0x80008000u));
    return r;
}

// E4M3 byte -> bf16x2 (both halves) holding scale * 2^117, sign included (exact: <= 4
// significant bits; subnormal scales become normal bf16).
__device__ __forceinline__ u32 kiln_scale_bf16x2(u32 b) {
    float s = __fmul_rn(kiln_f16bits_to_f32((b & 0x7Fu) << 7), 4.2535295865117308e37f);  // *2^8*2^117
    u32 h = (__float_as_uint(s) >> 16) | ((b & 0x80u) << 8);
    return h | (h << 16);
}

__device__ __forceinline__ void kiln_mma_bf16(float c[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Stage x f32 [M, K] (rows row_stride apart) into shared memory for the v2/v5 tensor-core
// GEMVs, all threads of the block taking part: xs[s][t][j][2M] uint2 = B fragment (b0, b1) of k-tile t of super-tile s
// for lane j, column 2m = x row m's bf16 hi part, 2m + 1 its lo part. Item (m, s, jj, t2) is
// the 8 elements 8 t2 .. +8 of lane jj's 32-element chunk of super-tile s (k0 = 128 s + 32 jj)
// -> k-tiles 2 t2 and 2 t2 + 1, in the order the nibble decode produces pairs.
template <int M>
__device__ __forceinline__ void kiln_tc_stage_x(const float* __restrict__ x, uint2* xs, int K,
                                                int row_stride) {
    constexpr int C = 2 * M;
    const int nsup = K >> 7, total = M * nsup * 16;
    // 4 items per thread and pass, all loads issued before any is used (x comes from L2 while
    // the weight stream fills the memory queues: one round trip per pass, not per item)
    for (int c0 = threadIdx.x; c0 < total; c0 += 4 * blockDim.x) {
        float4 f[4][2];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int c = c0 + u * blockDim.x;
            if (c < total) {
                const int m = c / (nsup * 16), r = c % (nsup * 16);
                const int s = r >> 4, jj = (r >> 2) & 3, t2 = r & 3;
                const int k0 = 128 * s + 32 * jj;
                const float4* xp = reinterpret_cast<const float4*>(x + (size_t)m * row_stride + k0 + 8 * t2);
                f[u][0] = __ldg(xp);
                f[u][1] = __ldg(xp + 1);
            }
        }
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int c = c0 + u * blockDim.x;
            if (c >= total) break;
            const int m = c / (nsup * 16), r = c % (nsup * 16);
            const int s = r >> 4, jj = (r >> 2) & 3, t2 = r & 3;
            const float v[8] = {f[u][0].x, f[u][0].y, f[u][0].z, f[u][0].w,
                                f[u][1].x, f[u][1].y, f[u][1].z, f[u][1].w};
#pragma unroll
            for (int odd = 0; odd < 2; odd++) {
                const int p0 = odd ? 1 : 3;  // pair 0 = elements (p0, p0 + 4), pair 1 = (p0 - 1, p0 + 3)
                const float e[4] = {v[p0], v[p0 + 4], v[p0 - 1], v[p0 + 3]};
                const u32 hi01 = kiln_pack_bf16x2(e[0], e[1]), hi23 = kiln_pack_bf16x2(e[2], e[3]);
                const float r0 = e[0] - __uint_as_float(hi01 << 16), r1 = e[1] - __uint_as_float(hi01 & 0xFFFF0000u);
                const float r2 = e[2] - __uint_as_float(hi23 << 16), r3 = e[3] - __uint_as_float(hi23 & 0xFFFF0000u);
                const int t = 2 * t2 + odd;
                uint2* dst = xs + ((size_t)(s * 8 + t) * 4 + jj) * C + 2 * m;
                dst[0] = make_uint2(hi01, hi23);
                dst[1] = make_uint2(kiln_pack_bf16x2(r0, r1), kiln_pack_bf16x2(r2, r3));
            }
        }
    }
}

// ---- The v2 / v5 weight stream and super-tile step (gemv_nvfp4_tc2.cu, gemv_nvfp4_tc5.cu) ----
// A warp owns T 16-row tiles; lane (g, j) reads, for tile tt and half h, the 16 bytes at
// k = 128 U + 32 j of row 16 (tile0 + tt) + g + 8 h (clamped to N - 1) and that row's scale pair
// for the same 32 k, for each super-tile U.

// Per (tile, half): the row's first uint4 of W for this lane, also its first u16 scale pair
// (both arrays have K / 32 entries per row); super-tile U's are at + 4 U.
template <int T>
__device__ __forceinline__ void kiln_tc_row_offsets(u32 (&roff)[T][2], int tile0, int g, int j,
                                                    int N, int K) {
    const u32 rstride = (u32)(K >> 5);
#pragma unroll
    for (int tt = 0; tt < T; tt++)
#pragma unroll
        for (int h = 0; h < 2; h++)
            roff[tt][h] = (u32)min((tile0 + tt) * 16 + g + 8 * h, N - 1) * rstride + (u32)j;
}

// Super-tile U's weights and scale pairs for every (tile, half), or zeros when !valid.
template <int T>
__device__ __forceinline__ void kiln_tc_load_supertile(uint4 (&w)[T][2], u32 (&s)[T][2],
        const uint4* __restrict__ wbase, const u16* __restrict__ sbase, const u32 (&roff)[T][2],
        int U, bool valid) {
#pragma unroll
    for (int tt = 0; tt < T; tt++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            if (valid) {
                w[tt][h] = kiln_tc_ld_stream(wbase + roff[tt][h] + (size_t)U * 4);
                s[tt][h] = __ldg(sbase + roff[tt][h] + (size_t)U * 4);
            } else {
                w[tt][h] = make_uint4(0, 0, 0, 0);
                s[tt][h] = 0;
            }
        }
}

// Decode one super-tile (w, s) and run its 8 k-steps: one mma.m16n8k16 per tile and step, B
// from xt (this lane's column of the staged x, kiln_tc_stage_x order). With TWO (M = 5..8:
// C = 2M > 8 columns) the same decoded A also feeds a second MMA per tile and step, B columns
// 8..15 (x rows 4..7) from xt2 into acc2. PROBE bit 1 (benchmark diagnostics only) replaces
// the MMA by folding the decoded words into acc.
template <int M, int T, int PROBE, bool TWO>
__device__ __forceinline__ void kiln_tc_supertile_mma_n(float (&acc)[T][4], float (&acc2)[T][4],
        const uint4 (&w)[T][2], const u32 (&s)[T][2], const uint2* xt, const uint2* xt2) {
    constexpr int C = 2 * M;
    u32 sc[T][2][2];
#pragma unroll
    for (int tt = 0; tt < T; tt++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            sc[tt][h][0] = kiln_scale_bf16x2(s[tt][h] & 0xFFu);
            sc[tt][h][1] = kiln_scale_bf16x2((s[tt][h] >> 8) & 0xFFu);
        }
#pragma unroll
    for (int t = 0; t < 8; t++) {
        const uint2 bv = xt[t * 4 * C];
        const uint2 bv2 = TWO ? xt2[t * 4 * C] : bv;
        const int wi = t >> 1, blk = t >> 2, sh = 8 * (t & 1);
#pragma unroll
        for (int tt = 0; tt < T; tt++) {
            const uint4 wa = w[tt][0], wc = w[tt][1];
            const u32 q0 = (wi == 0 ? wa.x : wi == 1 ? wa.y : wi == 2 ? wa.z : wa.w) << sh;
            const u32 q1 = (wi == 0 ? wc.x : wi == 1 ? wc.y : wi == 2 ? wc.z : wc.w) << sh;
            const u32 a0 = kiln_bf16x2_mul(kiln_e2m1_pair_bf16(q0), sc[tt][0][blk]);
            const u32 a2 = kiln_bf16x2_mul(kiln_e2m1_pair_bf16(q0 << 4), sc[tt][0][blk]);
            const u32 a1 = kiln_bf16x2_mul(kiln_e2m1_pair_bf16(q1), sc[tt][1][blk]);
            const u32 a3 = kiln_bf16x2_mul(kiln_e2m1_pair_bf16(q1 << 4), sc[tt][1][blk]);
            if (PROBE & 2) {
                acc[tt][0] = __uint_as_float(__float_as_uint(acc[tt][0]) ^ q0 ^ q1 ^ bv.x ^ sc[tt][0][blk]);
            } else {
                kiln_mma_bf16(acc[tt], a0, a1, a2, a3, bv.x, bv.y);
                if (TWO) kiln_mma_bf16(acc2[tt], a0, a1, a2, a3, bv2.x, bv2.y);
            }
        }
    }
}

// One MMA per tile and step (M <= 4).
template <int M, int T, int PROBE>
__device__ __forceinline__ void kiln_tc_supertile_mma(float (&acc)[T][4], const uint4 (&w)[T][2],
                                                      const u32 (&s)[T][2], const uint2* xt) {
    kiln_tc_supertile_mma_n<M, T, PROBE, false>(acc, acc, w, s, xt, xt);
}

// The row sums a lane holds after kiln_tc_supertile_mma_n: D fragment acc[0..1] = (row g,
// columns 2j, 2j + 1) = x row j's hi and lo parts, acc[2..3] the same for row g + 8; acc2 the
// same for x row 4 + j (R = 2, M = 5..8). v[r][tt] = (row g, row g + 8) of x row 4 r + j.
template <int T, int R>
__device__ __forceinline__ void kiln_tc_row_sums(const float (&acc)[T][4], const float (&acc2)[T][4],
                                                 float (&v)[R][T][2]) {
#pragma unroll
    for (int r = 0; r < R; r++) {
        const float(&a)[T][4] = r == 0 ? acc : acc2;
#pragma unroll
        for (int tt = 0; tt < T; tt++) {
            v[r][tt][0] = a[tt][0] + a[tt][1];
            v[r][tt][1] = a[tt][2] + a[tt][3];
        }
    }
}

// ---- Split-K finish (gemv_nvfp4_tc5.cu) ----
// Every thread of the block calls this after its main loop. A lane holds, for each r < R with
// has[r], and each of its T tiles, the sums v[r][tt][0] / v[r][tt][1] of rows
// n0 = 16 (tile0 + tt) + g and n0 + 8 for x row mrow[r]. One K slice (gridDim.y == 1):
// y = v * post. Otherwise the sums go to partial[slice][M][N]; the last block of the row range
// to finish (a counter per row range, reset by that block for the next launch) adds the slices
// in order — deterministic — and writes y. `last` is one word of shared memory.
template <int M, int T, int R>
__device__ __forceinline__ void kiln_splitk_finish(const float (&v)[R][T][2], const int (&mrow)[R],
        const bool (&has)[R], int tile0, int g, float post, float* __restrict__ y, int N,
        float* __restrict__ partial, u32* __restrict__ counters, u32* last) {
    const bool one = gridDim.y == 1;
    float* dst = one ? y : partial + (size_t)blockIdx.y * M * N;
    const float f = one ? post : 1.0f;
#pragma unroll
    for (int r = 0; r < R; r++) {
        if (!has[r]) continue;
#pragma unroll
        for (int tt = 0; tt < T; tt++) {
            const int n0 = (tile0 + tt) * 16 + g;
            if (n0 < N) dst[(size_t)mrow[r] * N + n0] = v[r][tt][0] * f;
            if (n0 + 8 < N) dst[(size_t)mrow[r] * N + n0 + 8] = v[r][tt][1] * f;
        }
    }
    if (one) return;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) *last = atomicAdd(counters + blockIdx.x, 1u) == gridDim.y - 1;
    __syncthreads();
    if (!*last) return;
    __threadfence();
    const int rows = 8 * T * 16, r0 = blockIdx.x * rows;
    for (int i = threadIdx.x; i < rows * M; i += blockDim.x) {
        const int mm = i / rows, n = r0 + i % rows;
        if (n >= N) continue;
        float a = 0.0f;
        for (int s = 0; s < (int)gridDim.y; s++) a += __ldcg(partial + ((size_t)s * M + mm) * N + n);
        y[(size_t)mm * N + n] = a * post;
    }
    if (threadIdx.x == 0) counters[blockIdx.x] = 0u;  // ready for the next launch
}
