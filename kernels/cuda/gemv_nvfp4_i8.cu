// gemv_nvfp4_i8.cu — decode-time fused dequantize + GEMV for M = 1 on the integer tensor cores
// (v8): y[n] = sum_k x[k] * W[n, k], W in NVFP4 [N, K] (K % 128 == 0). Same blocks, K slices,
// weight loads and split-K finish as the v5 kernel (gemv_nvfp4_tc5.cu, read that header first);
// what differs is the arithmetic, which needs about half the instructions per weight:
//
// - A (weights): each E2M1 code becomes the integer 2 * value + 12 (0..24) as u8 by two PRMT
//   table lookups per four codes (PRMT's selector nibbles are the codes themselves: the three
//   magnitude bits index an 8-byte table, the sign bit switches that byte to its replicated
//   sign bit, i.e. 0 — so one lookup yields the positive codes, another on the codes with the
//   sign flipped the negative ones, and an OR joins them). No per-weight scale multiply.
// - B (x): each 16-element block of x becomes integers x_int = rint(x * 2^(13 - E)) (E = the
//   exponent of the block's largest |x|, so |x_int| <= 2^14) split into two s8 digits,
//   x_int = 256 hi + lo. mma.m16n8k32 (u8 x s8 -> s32, exact) gets, per MMA, 8 weights of one
//   block from each lane j of a row group: lane j's k slots hold its own block, and B's
//   columns 2j / 2j + 1 hold the hi / lo digits of that block's x, zero in every other lane's
//   slots — so D column pair j is block j's exact integer dot product, two MMAs per block.
// - Per block and row: t = 256 D_hi + D_lo - 12 sum(x_int) (the +12 offset of A removed; the
//   correction starts in the accumulator), exact in s32 and in f32 (|t| <= 3 * 2^20); then
//   acc += t * (E4M3 scale * 2^(E - 13)), one f32 rounding per block, as the f32 kernels.
//   The x quantization error is <= 2^-15 of the block's largest |x| per element.
// Limits: x blocks whose largest |x| is below ~2^-135 lose precision (the per-block factor
// underflows); a non-finite x gives NaN outputs.
//
// Shared memory per super-tile (128 k): digits [4 j][4 word][2 digit] uint2 (256 B) and per block
// (x factor * 256, correction) float2 (64 B); then an 8-byte zero B fragment and the "last
// block" word: 320 * (super-tiles per slice) + 16 bytes (i8_smem_bytes in gemv_tc5.rs).

__device__ __forceinline__ u32 kiln_prmt(u32 a, u32 b, u32 sel) {
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}

// Four E2M1 codes (the low 16 bits of q; qx = q ^ 0x8888...) -> 2 * value + 12 as four u8.
__device__ __forceinline__ u32 kiln_e2m1x4_u8(u32 q, u32 qx) {
    // positive codes: 12 + {0,1,2,3,4,6,8,12}; negative: 12 - the same
    return kiln_prmt(0x0F0E0D0Cu, 0x18141210u, q) | kiln_prmt(0x090A0B0Cu, 0x00040608u, qx);
}

__device__ __forceinline__ void kiln_mma_u8s8(int c[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0,
                                              u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Stage nsl super-tiles of x (f32, from x) as digits and per-block factors, all threads taking
// part (one thread per 16-element block).
__device__ __forceinline__ void kiln_i8_stage_x(const float* __restrict__ x, uint2* xd, float2* xb,
                                                int nsl) {
    for (int b = threadIdx.x; b < nsl * 8; b += blockDim.x) {
        const float4* xp = reinterpret_cast<const float4*>(x + 16 * b);
        float v[16];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const float4 f = __ldg(xp + i);
            v[4 * i] = f.x; v[4 * i + 1] = f.y; v[4 * i + 2] = f.z; v[4 * i + 3] = f.w;
        }
        float amax = 0.0f;
        bool finite = true;  // (fmaxf drops NaNs: test the bits)
#pragma unroll
        for (int i = 0; i < 16; i++) {
            amax = fmaxf(amax, fabsf(v[i]));
            finite &= (__float_as_uint(v[i]) & 0x7F800000u) != 0x7F800000u;
        }
        int e = 0;
        if (amax > 0.0f) frexpf(amax, &e);  // amax = f 2^e, f in [0.5, 1): E = e - 1
        const int sh = 14 - e;              // 13 - E
        u32 hi[4] = {0, 0, 0, 0}, lo[4] = {0, 0, 0, 0};
        int sum = 0;
#pragma unroll
        for (int i = 0; i < 16; i++) {
            const int xi = finite ? (int)rintf(ldexpf(v[i], sh)) : 0;
            const int h = (xi + 128) >> 8, l = xi - 256 * h;
            sum += xi;
            hi[i >> 2] |= (u32)(h & 0xFF) << (8 * (i & 3));
            lo[i >> 2] |= (u32)(l & 0xFF) << (8 * (i & 3));
        }
        // block b of super-tile s is lane j = (b % 8) / 2's, words 2 (b % 2) and 2 (b % 2) + 1
        const int s = b >> 3, jj = (b & 7) >> 1, w0 = 2 * (b & 1);
#pragma unroll
        for (int hq = 0; hq < 2; hq++) {
            uint2* dst = xd + ((size_t)(s * 4 + jj) * 4 + w0 + hq) * 2;
            dst[0] = make_uint2(hi[2 * hq], hi[2 * hq + 1]);
            dst[1] = make_uint2(lo[2 * hq], lo[2 * hq + 1]);
        }
        const float f = finite ? ldexpf(1.0f, 8 - sh) : __int_as_float(0x7FC00000);
        xb[b] = make_float2(f, __int_as_float(12 * sum));
    }
}

// One super-tile: lane j owns blocks 2j (words 0, 1 of its loads) and 2j + 1 (words 2, 3).
template <int T>
__device__ __forceinline__ void kiln_i8_supertile(float (&acc)[T][2], const uint4 (&w)[T][2],
        const u32 (&s)[T][2], const uint2* xl, int wstep, const float2* xb, int j) {
    float sc[T][2][2];  // [tile][row g / g + 8][block]: E4M3 scale * 2^-8
#pragma unroll
    for (int tt = 0; tt < T; tt++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const u32 p = s[tt][h];
            sc[tt][h][0] = kiln_f16bits_to_f32(((p & 0x7Fu) << 7) | ((p & 0x80u) << 8));
            sc[tt][h][1] = kiln_f16bits_to_f32(((p & 0x7F00u) >> 1) | (p & 0x8000u));
        }
#pragma unroll
    for (int blk = 0; blk < 2; blk++) {
        const float2 xf = xb[2 * j + blk];
        const int corr = __float_as_int(xf.y);
        int c[T][4];
#pragma unroll
        for (int tt = 0; tt < T; tt++) {
            c[tt][0] = 0;
            c[tt][1] = -corr;
            c[tt][2] = 0;
            c[tt][3] = -corr;
        }
#pragma unroll
        for (int hq = 0; hq < 2; hq++) {
            const int wi = 2 * blk + hq;
            const uint2 bv = xl[wi * wstep];
#pragma unroll
            for (int tt = 0; tt < T; tt++) {
                const uint4 wa = w[tt][0], wc = w[tt][1];
                const u32 qa = wi == 0 ? wa.x : wi == 1 ? wa.y : wi == 2 ? wa.z : wa.w;
                const u32 qc = wi == 0 ? wc.x : wi == 1 ? wc.y : wi == 2 ? wc.z : wc.w;
                const u32 xa = qa ^ 0x88888888u, xc = qc ^ 0x88888888u;
                kiln_mma_u8s8(c[tt], kiln_e2m1x4_u8(qa, xa), kiln_e2m1x4_u8(qc, xc),
                              kiln_e2m1x4_u8(qa >> 16, xa >> 16), kiln_e2m1x4_u8(qc >> 16, xc >> 16),
                              bv.x, bv.y);
            }
        }
#pragma unroll
        for (int tt = 0; tt < T; tt++) {
            const int t0 = c[tt][0] * 256 + c[tt][1], t1 = c[tt][2] * 256 + c[tt][3];
            acc[tt][0] = fmaf((float)t0, sc[tt][0][blk] * xf.x, acc[tt][0]);
            acc[tt][1] = fmaf((float)t1, sc[tt][1][blk] * xf.x, acc[tt][1]);
        }
    }
}

template <int T, int D, int LATE>
__device__ __forceinline__ void kiln_gemv_i8_body(const float* __restrict__ x,
        const u8* __restrict__ packed, const u8* __restrict__ scales,
        const float* __restrict__ tensor_scale, float* __restrict__ y, int N, int K,
        float* __restrict__ partial, u32* __restrict__ counters, int flags) {
    extern __shared__ uint4 kiln_i8_smem[];
    kiln_pdl_launch_dependents();
    const int nsup = K >> 7;
    const int per = (nsup + gridDim.y - 1) / gridDim.y;
    const int s_begin = min(nsup, (int)blockIdx.y * per), s_end = min(nsup, s_begin + per);
    const int nsl = s_end - s_begin;
    uint2* xd = reinterpret_cast<uint2*>(kiln_i8_smem);            // [per][4 j][4 word][2]
    float2* xb = reinterpret_cast<float2*>(xd + (size_t)per * 32);  // [per][8 blocks]
    uint2* zero = reinterpret_cast<uint2*>(xb + (size_t)per * 8);   // one zero B fragment
    u32* last = reinterpret_cast<u32*>(zero + 1);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, j = lane & 3;
    const int tile0 = (blockIdx.x * 8 + warp) * T;
    const uint4* wbase = reinterpret_cast<const uint4*>(packed);
    const u16* sbase = reinterpret_cast<const u16*>(scales);
    u32 roff[T][2];
    kiln_tc_row_offsets<T>(roff, tile0, g, j, N, K);

    if (flags & 1) {  // as in the v5 kernel
        for (int U = ((s_begin + D) & ~1) + 2 * j; U < s_end; U += 8)
#pragma unroll
            for (int tt = 0; tt < T; tt++)
#pragma unroll
                for (int h = 0; h < 2; h++) kiln_prefetch_l2(wbase + (roff[tt][h] - j) + (size_t)U * 4);
    }
    uint4 wb[D][T][2];
    u32 sb[D][T][2];
#pragma unroll
    for (int d = 0; d < D; d++)
        kiln_tc_load_supertile<T>(wb[d], sb[d], wbase, sbase, roff, s_begin + d, s_begin + d < s_end);
    // everything below may depend on the previous kernel on the stream
    kiln_pdl_wait();

    kiln_i8_stage_x(x + 128 * s_begin, xd, xb, nsl);
    if (threadIdx.x == 0) *zero = make_uint2(0u, 0u);
    __syncthreads();

    float acc[T][2];
#pragma unroll
    for (int tt = 0; tt < T; tt++) acc[tt][0] = acc[tt][1] = 0.0f;
    // B: lane (g, j) holds column g = digit g % 2 of lane g / 2's block, nonzero only in the k
    // slots of that lane: its own digits when g / 2 == j, the zero fragment otherwise
    const bool mine = (g >> 1) == j;
    const uint2* xl = mine ? xd + (size_t)j * 8 + (g & 1) : zero;
    const int wstep = mine ? 2 : 0;
    const size_t sstep = mine ? 32 : 0;

    for (int U0 = s_begin; U0 < s_end; U0 += D) {
#pragma unroll
        for (int d = 0; d < D; d++) {
            const int U = U0 + d;
            if (U < s_end) {
                uint4 w[T][2];
                u32 sw[T][2];
#pragma unroll
                for (int tt = 0; tt < T; tt++)
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        w[tt][h] = wb[d][tt][h];
                        sw[tt][h] = sb[d][tt][h];
                    }
                if (!LATE && U + D < s_end)
                    kiln_tc_load_supertile<T>(wb[d], sb[d], wbase, sbase, roff, U + D, true);
                kiln_i8_supertile<T>(acc, w, sw, xl + (size_t)(U - s_begin) * sstep, wstep,
                                     xb + (size_t)(U - s_begin) * 8, j);
                if (LATE && U + D < s_end)
                    kiln_tc_load_supertile<T>(wb[d], sb[d], wbase, sbase, roff, U + D, true);
            }
        }
    }
    // each lane summed its own blocks: add the four lanes of a row group
    float v[T][2];
#pragma unroll
    for (int tt = 0; tt < T; tt++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            float a = acc[tt][h];
            a += __shfl_xor_sync(0xFFFFFFFFu, a, 1);
            a += __shfl_xor_sync(0xFFFFFFFFu, a, 2);
            v[tt][h] = a;
        }
    const float post = __ldg(tensor_scale) * 0.5f;  // A held 2 * value
    kiln_splitk_finish<1, T>(v, j == 0, 0, tile0, g, post, y, N, partial, counters, last);
}

#define KILN_GEMV_I8(TT, DD, LATE, MINB)                                                        \
    extern "C" __global__ void __launch_bounds__(256, MINB)                                     \
            kiln_gemv_nvfp4_i8_t##TT##_d##DD##_l##LATE##_b##MINB(                               \
            const float* __restrict__ x, const u8* __restrict__ packed,                         \
            const u8* __restrict__ scales, const float* __restrict__ tensor_scale,              \
            float* __restrict__ y, int N, int K, float* __restrict__ partial,                   \
            u32* __restrict__ counters, int flags) {                                            \
        kiln_gemv_i8_body<TT, DD, LATE>(x, packed, scales, tensor_scale, y, N, K, partial,     \
                                        counters, flags);                                       \
    }

// (tiles T, depth D in super-tiles, LATE loads, blocks per SM): keep in sync with I8_KERNELS in
// gemv_tc5.rs.
KILN_GEMV_I8(2, 2, 0, 2)
KILN_GEMV_I8(2, 3, 1, 2)
KILN_GEMV_I8(2, 3, 0, 2)
KILN_GEMV_I8(1, 4, 1, 2)
KILN_GEMV_I8(1, 3, 1, 3)
KILN_GEMV_I8(2, 4, 1, 2)
