// gemv_nvfp4_tc5.cu — decode-time fused dequantize + GEMV, v5: the v2 kernel's decode and
// tensor-core MMA (gemv_nvfp4_tc2.cu, read that header first) with K split across blocks
// instead of across the warps of a block. y[m, n] = sum_k x[m, k] * W[n, k], M = 1..4,
// W in NVFP4 [N, K] (K % 128 == 0).
//
// Why: Nsight Compute on the H100 (v2, 8192 x 8192, M = 1) put ~22% of all warp stall samples
// in the prologue, where every block converts and stages all of x (32 KiB at K = 8192) while
// its x loads queue behind the weight loads it has just issued. Here block (bx, by) covers
// rows [bx R, bx R + R) (R = 8 warps x T tiles x 16) and only the super-tiles of K slice by
// (of gridDim.y), so it stages 1 / gridDim.y of x. Each warp owns T tiles and walks the slice
// with D super-tiles of loads in flight, as v2 does.
//
// With gridDim.y > 1 the slices' partial sums go to scratch [gridDim.y][M][N] (f32); the last
// block of a row range to finish (a counter per row range, reset by that block for the next
// launch) adds them in slice order — deterministic — scales by the tensor scale and writes y.
// Launch: 256 threads, grid (ceil(N / R), slices); dynamic shared memory
// 4 M (K / slices rounded up to 128) + 512 M + 16 bytes (tc5_smem_bytes in gemv_tc5.rs).

template <int M, int T, int D, int LATE>
__device__ __forceinline__ void kiln_gemv_tc5_body(const float* __restrict__ x,
        const u8* __restrict__ packed, const u8* __restrict__ scales,
        const float* __restrict__ tensor_scale, float* __restrict__ y, int N, int K,
        float* __restrict__ partial, u32* __restrict__ counters) {
    extern __shared__ uint4 kiln_tc5_smem[];
    constexpr int C = 2 * M;  // B columns in use
    const int nsup = K >> 7;
    const int per = (nsup + gridDim.y - 1) / gridDim.y;
    const int s_begin = min(nsup, (int)blockIdx.y * per), s_end = min(nsup, s_begin + per);
    const int nsl = s_end - s_begin;
    uint2* xs = reinterpret_cast<uint2*>(kiln_tc5_smem);  // [per][8 t][4 j][C]
    uint2* zeros = xs + (size_t)per * 32 * C;              // [32 C]: B for unused columns
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, j = lane & 3;
    const int tile0 = (blockIdx.x * 8 + warp) * T;
    const uint4* wbase = reinterpret_cast<const uint4*>(packed);
    const u16* sbase = reinterpret_cast<const u16*>(scales);
    u32 roff[T][2];
    kiln_tc_row_offsets<T>(roff, tile0, g, j, N, K);

    // the first D super-tiles' loads go out before x is staged
    uint4 wb[D][T][2];
    u32 sb[D][T][2];
#pragma unroll
    for (int d = 0; d < D; d++)
        kiln_tc_load_supertile<T>(wb[d], sb[d], wbase, sbase, roff, s_begin + d, s_begin + d < s_end);

    // stage this slice of x (super-tiles s_begin .. s_end, stored from local index 0)
    kiln_tc_stage_x<M>(x + 128 * s_begin, xs, nsl * 128, K);
    for (int c = threadIdx.x; c < 32 * C; c += blockDim.x) zeros[c] = make_uint2(0u, 0u);
    __syncthreads();

    float acc[T][4];
#pragma unroll
    for (int tt = 0; tt < T; tt++)
#pragma unroll
        for (int q = 0; q < 4; q++) acc[tt][q] = 0.0f;
    const uint2* xl = g < C ? xs + j * C + g : zeros;
    const size_t xstep = g < C ? (size_t)32 * C : 0;

    for (int U0 = s_begin; U0 < s_end; U0 += D) {
#pragma unroll
        for (int d = 0; d < D; d++) {
            const int U = U0 + d;
            if (U < s_end) {
                // LATE: the next loads go out after this super-tile is decoded, straight into
                // the registers just consumed (no ring copies; one super-tile less in flight)
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
                kiln_tc_supertile_mma<M, T, 0>(acc, w, sw, xl + (size_t)(U - s_begin) * xstep);
                if (LATE && U + D < s_end)
                    kiln_tc_load_supertile<T>(wb[d], sb[d], wbase, sbase, roff, U + D, true);
            }
        }
    }
    // D fragment: acc[0..1] = (row g, columns 2j, 2j+1) = x row j hi and lo parts; acc[2..3]
    // the same for row g + 8. Lanes with j < M hold results.
    const float post = __ldg(tensor_scale) * 512.0f;  // undo the 2^-9 of the scaled A
    if (gridDim.y == 1) {
        if (j < M) {
#pragma unroll
            for (int tt = 0; tt < T; tt++) {
                const int n0 = (tile0 + tt) * 16 + g;
                if (n0 < N) y[(size_t)j * N + n0] = (acc[tt][0] + acc[tt][1]) * post;
                if (n0 + 8 < N) y[(size_t)j * N + n0 + 8] = (acc[tt][2] + acc[tt][3]) * post;
            }
        }
        return;
    }
    float* mine = partial + (size_t)blockIdx.y * M * N;
    if (j < M) {
#pragma unroll
        for (int tt = 0; tt < T; tt++) {
            const int n0 = (tile0 + tt) * 16 + g;
            if (n0 < N) mine[(size_t)j * N + n0] = acc[tt][0] + acc[tt][1];
            if (n0 + 8 < N) mine[(size_t)j * N + n0 + 8] = acc[tt][2] + acc[tt][3];
        }
    }
    __threadfence();
    __syncthreads();
    u32* last = reinterpret_cast<u32*>(zeros + 32 * C);  // one word after the zero area
    if (threadIdx.x == 0) *last = atomicAdd(counters + blockIdx.x, 1u) == gridDim.y - 1;
    __syncthreads();
    if (!*last) return;
    __threadfence();
    const int rows = 8 * T * 16, r0 = blockIdx.x * rows;
    for (int i = threadIdx.x; i < rows * M; i += blockDim.x) {
        const int m = i / rows, n = r0 + i % rows;
        if (n >= N) continue;
        float v = 0.0f;
        for (int s = 0; s < (int)gridDim.y; s++) v += __ldcg(partial + ((size_t)s * M + m) * N + n);
        y[(size_t)m * N + n] = v * post;
    }
    if (threadIdx.x == 0) counters[blockIdx.x] = 0u;  // ready for the next launch
}

#define KILN_GEMV_TC5(MM, TT, DD, LATE, MINB)                                                   \
    extern "C" __global__ void __launch_bounds__(256, MINB)                                     \
            kiln_gemv_nvfp4_tc5_m##MM##_t##TT##_d##DD##_l##LATE##_b##MINB(                      \
            const float* __restrict__ x, const u8* __restrict__ packed,                         \
            const u8* __restrict__ scales, const float* __restrict__ tensor_scale,              \
            float* __restrict__ y, int N, int K, float* __restrict__ partial,                   \
            u32* __restrict__ counters) {                                                       \
        kiln_gemv_tc5_body<MM, TT, DD, LATE>(x, packed, scales, tensor_scale, y, N, K, partial,       \
                                       counters);                                               \
    }

// (M, tiles T, depth D in super-tiles, LATE loads, blocks per SM (a register cap)): keep in
// sync with TC5_KERNELS in gemv_tc5.rs.
KILN_GEMV_TC5(1, 2, 3, 0, 2)
KILN_GEMV_TC5(1, 2, 2, 0, 2)
KILN_GEMV_TC5(1, 2, 3, 1, 2)
KILN_GEMV_TC5(1, 1, 4, 1, 2)
KILN_GEMV_TC5(1, 1, 3, 1, 3)
KILN_GEMV_TC5(2, 2, 3, 1, 2)
KILN_GEMV_TC5(3, 2, 3, 1, 2)
KILN_GEMV_TC5(4, 2, 3, 1, 2)
KILN_GEMV_TC5(4, 2, 3, 0, 2)

// ---- v6: persistent blocks, one K slice per block, 16 T-row groups handed out at run time ----
// Why: Nsight Compute on v5 (8192 x 8192, M = 1, one wave of 256 blocks) had the SMs active
// only 84% of the kernel's time and 8% of warp time at the block barriers: every warp owns a
// fixed piece of W, so SMs whose loads come back late decide the end while the others idle.
// Here grid.y = S slices of K (S divides K / 128, slice length >= D) and grid.x = P blocks per
// slice, all resident at once. A block stages its slice of x once; each warp then takes row
// groups of its slice from a ticket counter (one per slice) until none are left, streaming the
// super-tiles of one group after another with D in flight, so the loads run on across groups.
// Partial sums meet as in v5: per row group, the last slice to finish adds the S partials in
// slice order (deterministic) and writes y. Counters: [0, S) tickets, [S] warps finished,
// [S + 1, S + 1 + groups) slices finished per group; the last warp to finish zeroes the
// tickets, each group's last slice its own counter, so all are zero for the next launch.
// Launch: 256 threads, grid (P, S); dynamic shared memory tc6_smem_bytes in gemv_tc5.rs.

// Lane 0's next ticket, issued early (the atomic's round trip overlaps a group's loads).
__device__ __forceinline__ u32 kiln_tc6_fetch(u32* counter, int lane) {
    return lane == 0 ? atomicAdd(counter, 1u) : 0u;
}

// Signal the groups this warp finished since the last flush (their partial sums are written):
// one fence for all of them (a fence waits for every load the warp has in flight, so not one
// per group), then per group the slice counter; the last slice of a group adds the S partial
// sums in slice order and writes y.
template <int M, int T>
__device__ __forceinline__ void kiln_tc6_flush(const int* list, int count, u32* group_done,
        const float* __restrict__ partial, float* __restrict__ y, int N, int S, float post,
        int lane) {
    __threadfence();
    __syncwarp();
    constexpr int rows = 16 * T;
    for (int i = 0; i < count; i++) {
        const int u = list[i];
        u32 last = 0;
        if (lane == 0) last = atomicAdd(group_done + u, 1u) == (u32)S - 1;
        if (!__shfl_sync(0xFFFFFFFFu, last, 0)) continue;
        __threadfence();
        for (int e = lane; e < rows * M; e += 32) {
            const int m = e / rows, n = u * rows + e % rows;
            if (n >= N) continue;
            float v = 0.0f;
            for (int s = 0; s < S; s++) v += __ldcg(partial + ((size_t)s * M + m) * N + n);
            y[(size_t)m * N + n] = v * post;
        }
        if (lane == 0) group_done[u] = 0u;
    }
    __syncwarp();
}

template <int M, int T, int D>
__device__ __forceinline__ void kiln_gemv_tc6_body(const float* __restrict__ x,
        const u8* __restrict__ packed, const u8* __restrict__ scales,
        const float* __restrict__ tensor_scale, float* __restrict__ y, int N, int K,
        float* __restrict__ partial, u32* __restrict__ counters) {
    extern __shared__ uint4 kiln_tc6_smem[];
    constexpr int C = 2 * M;
    constexpr int LIST = 32;  // finished groups a warp keeps before it must flush
    __shared__ int kiln_tc6_done[8][LIST];
    const int S = gridDim.y;
    const int nsl = (K >> 7) / S;
    const int s_begin = blockIdx.y * nsl, s_end = s_begin + nsl;
    const int groups = (N + 16 * T - 1) / (16 * T);
    uint2* xs = reinterpret_cast<uint2*>(kiln_tc6_smem);  // [nsl][8 t][4 j][C]
    uint2* zeros = xs + (size_t)nsl * 32 * C;              // [32 C]: B for unused columns
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, j = lane & 3;
    const uint4* wbase = reinterpret_cast<const uint4*>(packed);
    const u16* sbase = reinterpret_cast<const u16*>(scales);
    u32* tickets = counters + blockIdx.y;
    u32* group_done = counters + S + 1;
    int* done = kiln_tc6_done[warp];
    int ndone = 0;

    // The loader walks (group lu, super-tile lU); the groups it takes after the first wait in
    // q0, q1 until the consumer gets to them (nsl >= D keeps it at most two groups ahead).
    u32 pend = kiln_tc6_fetch(tickets, lane);
    int lu = (int)__shfl_sync(0xFFFFFFFFu, pend, 0);
    if (lu < groups) pend = kiln_tc6_fetch(tickets, lane);
    int lU = s_begin;
    int cu = lu, q0 = groups, q1 = groups;
    u32 roff[T][2];
    kiln_tc_row_offsets<T>(roff, min(lu, groups - 1) * T, g, j, N, K);
    uint4 wb[D][T][2];
    u32 sb[D][T][2];
#define KILN_TC6_ADVANCE()                                                                     \
    if (++lU == s_end && lu < groups) {                                                        \
        lu = (int)__shfl_sync(0xFFFFFFFFu, pend, 0);                                           \
        if (lu < groups) pend = kiln_tc6_fetch(tickets, lane);                                 \
        if (q0 >= groups) q0 = lu;                                                             \
        else q1 = lu;                                                                          \
        lU = s_begin;                                                                          \
        kiln_tc_row_offsets<T>(roff, min(lu, groups - 1) * T, g, j, N, K);                     \
    }
#pragma unroll
    for (int d = 0; d < D; d++) {
        kiln_tc_load_supertile<T>(wb[d], sb[d], wbase, sbase, roff, lU, lu < groups);
        KILN_TC6_ADVANCE()
    }

    kiln_tc_stage_x<M>(x + 128 * s_begin, xs, nsl * 128, K);
    for (int c = threadIdx.x; c < 32 * C; c += blockDim.x) zeros[c] = make_uint2(0u, 0u);
    __syncthreads();

    float acc[T][4];
#pragma unroll
    for (int tt = 0; tt < T; tt++)
#pragma unroll
        for (int q = 0; q < 4; q++) acc[tt][q] = 0.0f;
    const uint2* xl = g < C ? xs + j * C + g : zeros;
    const size_t xstep = g < C ? (size_t)32 * C : 0;
    const float post = __ldg(tensor_scale) * 512.0f;  // undo the 2^-9 of the scaled A
    float* mine = partial + (size_t)blockIdx.y * M * N;
    int cU = s_begin;
    while (cu < groups) {
#pragma unroll
        for (int d = 0; d < D; d++) {
            if (cu < groups) {
                uint4 w[T][2];
                u32 sw[T][2];
#pragma unroll
                for (int tt = 0; tt < T; tt++)
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        w[tt][h] = wb[d][tt][h];
                        sw[tt][h] = sb[d][tt][h];
                    }
                kiln_tc_supertile_mma<M, T, 0>(acc, w, sw, xl + (size_t)(cU - s_begin) * xstep);
                kiln_tc_load_supertile<T>(wb[d], sb[d], wbase, sbase, roff, lU, lu < groups);
                KILN_TC6_ADVANCE()
                if (++cU == s_end) {
                    // group cu is done: D fragment acc[0..1] = row g (x row j hi, lo), acc[2..3]
                    // row g + 8; lanes with j < M hold results
                    const bool direct = S == 1;
                    float* out = direct ? y : mine;
                    const float f = direct ? post : 1.0f;
                    if (j < M) {
#pragma unroll
                        for (int tt = 0; tt < T; tt++) {
                            const int n0 = (cu * T + tt) * 16 + g;
                            if (n0 < N) out[(size_t)j * N + n0] = (acc[tt][0] + acc[tt][1]) * f;
                            if (n0 + 8 < N) out[(size_t)j * N + n0 + 8] = (acc[tt][2] + acc[tt][3]) * f;
                        }
                    }
                    if (!direct) {
                        if (lane == 0) done[ndone] = cu;
                        if (++ndone == LIST) {
                            kiln_tc6_flush<M, T>(done, ndone, group_done, partial, y, N, S, post, lane);
                            ndone = 0;
                        }
                    }
#pragma unroll
                    for (int tt = 0; tt < T; tt++)
#pragma unroll
                        for (int q = 0; q < 4; q++) acc[tt][q] = 0.0f;
                    cu = q0;
                    q0 = q1;
                    q1 = groups;
                    cU = s_begin;
                }
            }
        }
    }
#undef KILN_TC6_ADVANCE
    if (ndone > 0) kiln_tc6_flush<M, T>(done, ndone, group_done, partial, y, N, S, post, lane);
    // every warp has taken its last ticket: the last one here zeroes the tickets
    if (lane == 0) {
        const u32 total = gridDim.x * gridDim.y * (blockDim.x >> 5);
        if (atomicAdd(counters + S, 1u) == total - 1) {
            for (int s = 0; s < S; s++) counters[s] = 0u;
            counters[S] = 0u;
        }
    }
}

#define KILN_GEMV_TC6(MM, TT, DD, MINB)                                                         \
    extern "C" __global__ void __launch_bounds__(256, MINB)                                     \
            kiln_gemv_nvfp4_tc6_m##MM##_t##TT##_d##DD##_b##MINB(                                \
            const float* __restrict__ x, const u8* __restrict__ packed,                         \
            const u8* __restrict__ scales, const float* __restrict__ tensor_scale,              \
            float* __restrict__ y, int N, int K, float* __restrict__ partial,                   \
            u32* __restrict__ counters) {                                                       \
        kiln_gemv_tc6_body<MM, TT, DD>(x, packed, scales, tensor_scale, y, N, K, partial,       \
                                       counters);                                               \
    }

// (M, tiles T, depth D, blocks per SM): keep in sync with TC6_KERNELS in gemv_tc5.rs.
KILN_GEMV_TC6(1, 1, 3, 2)
KILN_GEMV_TC6(1, 1, 3, 3)
KILN_GEMV_TC6(1, 2, 2, 2)
KILN_GEMV_TC6(1, 1, 4, 2)
KILN_GEMV_TC6(2, 2, 3, 2)
KILN_GEMV_TC6(3, 2, 3, 2)
KILN_GEMV_TC6(4, 2, 3, 2)
KILN_GEMV_TC6(4, 1, 3, 2)
