// gemv_nvfp4_tc3.cu — decode-time fused dequantize + GEMV, v3: the weights stream into shared
// memory through the Hopper bulk-copy engine (cp.async.bulk + mbarrier), so each DRAM request
// is one long contiguous piece of a row instead of 16 bytes per lane, and no registers hold
// loads in flight. y[m, n] = sum_k x[m, k] * W[n, k] for M = 1..4, W in NVFP4 [N, K]
// (K % 256 == 0); sm_90 and newer (the body is empty below, and the host never launches it).
//
// Decode and MMA are those of the v2 kernel (gemv_nvfp4_tc2.cu, G = 1): lane (g, j) decodes
// the 16 bytes at k = 128 s + 32 j of rows g and g + 8 of a 16-row tile, B's columns 2m / 2m + 1
// hold x row m's bf16 hi / lo parts, one mma.m16n8k16 per tile and 16-k step.
//
// Work: a block of W warps is persistent (grid <= SMs x blocks per SM) and walks 16-row tiles
// in rounds: round r gives warp group `slot` (W / KSPLIT groups of KSPLIT warps) tile
// (r * gridDim.x + blockIdx.x) * groups + slot; the KSPLIT warps of a group split the tile's
// K chunks (KC k each, the last one shorter when KC does not divide K). Each warp owns a ring
// of P shared-memory stages (16 rows x KC k of codes and scales) and keeps the copies for its
// next P (tile, chunk) tasks in flight: its 32 lanes each issue one bulk copy per stage (lanes
// 0-15 a row's codes, 16-31 a row's scales) onto the stage's mbarrier. At the end of a round
// the group's partial sums meet in shared memory (one __syncthreads, double-buffered) and
// y is written. x is staged once per block (persistent blocks stage it ~4x less often than v2).
//
// Shared memory (tc3_smem_bytes in gemv.rs): W * P stages of 16 * (KC / 2 + 64) code bytes
// (rows padded by 64 B: lanes g, g + 1 hit different banks) + 16 * (KC / 16 + 16) scale bytes,
// W * P mbarriers, x (4 M K bytes), a zero area (512 M bytes), 2 * W * 16 * M floats.

#define KILN_TC3_CODE_STRIDE(KC) ((KC) / 2 + 64)
#define KILN_TC3_SCALE_STRIDE(KC) ((KC) / 16 + 16)
#define KILN_TC3_STAGE(KC) (16 * (KILN_TC3_CODE_STRIDE(KC) + KILN_TC3_SCALE_STRIDE(KC)))

__device__ __forceinline__ u32 kiln_smem_u32(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

#if __CUDA_ARCH__ >= 900
__device__ __forceinline__ void kiln_mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void kiln_mbar_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void kiln_mbar_wait(u32 bar, u32 parity) {
    u32 done = 0;
    while (!done) {
        asm volatile(
            "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
            : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    }
}

// bytes (a multiple of 16, both addresses 16-byte aligned) from global to shared memory; the
// completion is counted on the mbarrier.
__device__ __forceinline__ void kiln_bulk_g2s(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
        ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
#endif

template <int M, int KC, int P, int W>
__device__ __forceinline__ void kiln_gemv_tc3_body(const float* __restrict__ x,
        const u8* __restrict__ packed, const u8* __restrict__ scales,
        const float* __restrict__ tensor_scale, float* __restrict__ y, int N, int K, int ksplit) {
#if __CUDA_ARCH__ >= 900
    static_assert(KC % 256 == 0, "a chunk is a whole number of 256-k pieces");
    constexpr int C = 2 * M;
    constexpr int CS = KILN_TC3_CODE_STRIDE(KC), SS = KILN_TC3_SCALE_STRIDE(KC);
    constexpr int STAGE = KILN_TC3_STAGE(KC);
    extern __shared__ __align__(128) unsigned char kiln_tc3_smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, j = lane & 3;
    unsigned char* ring = kiln_tc3_smem + (size_t)warp * P * STAGE;
    u64* bars = reinterpret_cast<u64*>(kiln_tc3_smem + (size_t)W * P * STAGE) + warp * P;
    uint2* xs = reinterpret_cast<uint2*>(kiln_tc3_smem + (size_t)W * P * STAGE + W * P * 8);
    const int nsup = K >> 7;
    uint2* zeros = xs + (size_t)nsup * 32 * C;
    float* red = reinterpret_cast<float*>(zeros + 32 * C);  // [2][W][16][M]

    const int groups = W / ksplit;
    const int slot = warp / ksplit, kp = warp % ksplit;
    const int nch = (K + KC - 1) / KC;
    const int per = (nch + ksplit - 1) / ksplit;
    const int c_begin = min(nch, kp * per), c_end = min(nch, c_begin + per);
    const int nc = c_end - c_begin;
    const int ntiles = (N + 15) / 16;
    const int stride_tiles = gridDim.x * groups;
    const int rounds = (ntiles - blockIdx.x * groups + stride_tiles - 1) / stride_tiles;
    const int my_rounds = (ntiles - (blockIdx.x * groups + slot) + stride_tiles - 1) / stride_tiles;
    const int ntasks = nc > 0 && my_rounds > 0 ? nc * my_rounds : 0;

    if (lane == 0) {
        for (int p = 0; p < P; p++) kiln_mbar_init(kiln_smem_u32(bars + p), 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncwarp();

    // task q = (round q / nc, chunk c_begin + q % nc) goes to stage q % P
    auto issue = [&](int q) {
        const int r = q / nc, c = c_begin + q % nc;
        const int tile = (r * gridDim.x + blockIdx.x) * groups + slot;
        const int k0 = c * KC, kc = min(KC, K - k0);
        const int st = q % P;
        const u32 bar = kiln_smem_u32(bars + st);
        if (lane == 0) kiln_mbar_expect_tx(bar, 16u * (u32)(kc / 2 + kc / 16));
        __syncwarp();
        const int row = min(tile * 16 + (lane & 15), N - 1);
        unsigned char* stage = ring + (size_t)st * STAGE;
        if (lane < 16)
            kiln_bulk_g2s(kiln_smem_u32(stage + (lane & 15) * CS),
                          packed + (size_t)row * (size_t)(K >> 1) + (k0 >> 1), (u32)(kc >> 1), bar);
        else
            kiln_bulk_g2s(kiln_smem_u32(stage + 16 * CS + (lane & 15) * SS),
                          scales + (size_t)row * (size_t)(K >> 4) + (k0 >> 4), (u32)(kc >> 4), bar);
    };
    for (int q = 0; q < P && q < ntasks; q++) issue(q);

    kiln_tc_stage_x<M, 1>(x, xs, K, K);
    for (int c = threadIdx.x; c < 32 * C; c += blockDim.x) zeros[c] = make_uint2(0u, 0u);
    __syncthreads();

    const uint2* xl = g < C ? xs + j * C + g : zeros;
    const size_t xstep = g < C ? (size_t)32 * C : 0;
    const float post = __ldg(tensor_scale) * 512.0f;  // undo the 2^-9 of the scaled A
    int q = 0;
    for (int r = 0; r < rounds; r++) {
        // two accumulators (even / odd k-tiles) halve the chain of dependent MMAs
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, acc2[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (r < my_rounds) {
            for (int ci = 0; ci < nc; ci++, q++) {
                const int st = q % P;
                const int k0 = (c_begin + ci) * KC, kc = min(KC, K - k0);
                kiln_mbar_wait(kiln_smem_u32(bars + st), (u32)(q / P) & 1u);
                const unsigned char* stage = ring + (size_t)st * STAGE;
                const unsigned char* cw0 = stage + g * CS + 16 * j;
                const unsigned char* cw1 = cw0 + 8 * CS;
                const unsigned char* sc0 = stage + 16 * CS + g * SS + 2 * j;
                const unsigned char* sc1 = sc0 + 8 * SS;
                const uint2* xc = xl + (size_t)(k0 >> 7) * xstep;
                for (int sl = 0; sl < (kc >> 7); sl++) {
                    const uint4 w0 = *reinterpret_cast<const uint4*>(cw0 + 64 * sl);
                    const uint4 w1 = *reinterpret_cast<const uint4*>(cw1 + 64 * sl);
                    const u32 p0 = *reinterpret_cast<const u16*>(sc0 + 8 * sl);
                    const u32 p1 = *reinterpret_cast<const u16*>(sc1 + 8 * sl);
                    const u32 s00 = kiln_scale_bf16x2(p0 & 0xFFu), s01 = kiln_scale_bf16x2(p0 >> 8);
                    const u32 s10 = kiln_scale_bf16x2(p1 & 0xFFu), s11 = kiln_scale_bf16x2(p1 >> 8);
                    const u32 wa[4] = {w0.x, w0.y, w0.z, w0.w}, wc[4] = {w1.x, w1.y, w1.z, w1.w};
                    const uint2* xt = xc + (size_t)sl * xstep;
#pragma unroll
                    for (int t = 0; t < 8; t++) {
                        const uint2 bv = xt[t * 4 * C];
                        const int wi = t >> 1, sh = 8 * (t & 1);
                        const u32 q0 = wa[wi] << sh, q1 = wc[wi] << sh;
                        const u32 sa = t < 4 ? s00 : s01, sb = t < 4 ? s10 : s11;
                        const u32 a0 = kiln_bf16x2_mul(kiln_e2m1_pair_bf16(q0), sa);
                        const u32 a2 = kiln_bf16x2_mul(kiln_e2m1_pair_bf16(q0 << 4), sa);
                        const u32 a1 = kiln_bf16x2_mul(kiln_e2m1_pair_bf16(q1), sb);
                        const u32 a3 = kiln_bf16x2_mul(kiln_e2m1_pair_bf16(q1 << 4), sb);
                        kiln_mma_bf16(t & 1 ? acc2 : acc, a0, a1, a2, a3, bv.x, bv.y);
                    }
                }
                // every lane is done with this stage before it is refilled
                __syncwarp();
                if (q + P < ntasks) issue(q + P);
            }
        }
        // D fragment: acc[0..1] = (row g, columns 2j, 2j + 1) = x row j hi and lo parts;
        // acc[2..3] the same for row g + 8. Lanes with j < M hold results.
        float* rw = red + ((size_t)(r & 1) * W + warp) * 16 * M;
        if (j < M) {
            rw[g * M + j] = (acc[0] + acc2[0]) + (acc[1] + acc2[1]);
            rw[(g + 8) * M + j] = (acc[2] + acc2[2]) + (acc[3] + acc2[3]);
        }
        __syncthreads();
        const float* rr = red + (size_t)(r & 1) * W * 16 * M;
        for (int i = threadIdx.x; i < groups * 16 * M; i += blockDim.x) {
            const int gg = i / (16 * M), row = (i / M) % 16, m = i % M;
            const int n = ((r * gridDim.x + blockIdx.x) * groups + gg) * 16 + row;
            float v = 0.0f;
            for (int k = 0; k < ksplit; k++) v += rr[(size_t)(gg * ksplit + k) * 16 * M + row * M + m];
            if (n < N) y[(size_t)m * N + n] = v * post;
        }
    }
#else
    __trap();  // the host launches v3 only on sm_90 and newer
#endif
}

#define KILN_GEMV_TC3(MM, KC, P, W, MINB)                                                      \
    extern "C" __global__ void __launch_bounds__(32 * W, MINB)                                  \
            kiln_gemv_nvfp4_tc3_m##MM##_k##KC##_p##P##_w##W(                                   \
            const float* __restrict__ x, const u8* __restrict__ packed,                         \
            const u8* __restrict__ scales, const float* __restrict__ tensor_scale,              \
            float* __restrict__ y, int N, int K, int ksplit) {                                  \
        kiln_gemv_tc3_body<MM, KC, P, W>(x, packed, scales, tensor_scale, y, N, K, ksplit);     \
    }

// (M, k per chunk KC, stages per warp P, warps per block W, min blocks per SM): keep in sync
// with TC3_KERNELS in gemv.rs.
KILN_GEMV_TC3(1, 1024, 2, 8, 1)
KILN_GEMV_TC3(1, 512, 4, 8, 1)
KILN_GEMV_TC3(1, 512, 2, 8, 1)
KILN_GEMV_TC3(1, 512, 2, 4, 2)
KILN_GEMV_TC3(1, 256, 4, 8, 1)
KILN_GEMV_TC3(1, 512, 2, 16, 1)
KILN_GEMV_TC3(2, 512, 2, 8, 1)
KILN_GEMV_TC3(4, 512, 2, 8, 1)
