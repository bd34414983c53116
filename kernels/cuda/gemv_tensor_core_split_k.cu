// gemv_tensor_core_split_k.cu — the split-K tensor-core GEMV (was "v5", gemv_nvfp4_tc5.cu):
// decode-time fused dequantize + GEMV with the decode and tensor-core MMA of
// gemv_tensor_core.cu ("v2", read that header first) and K split across blocks
// instead of across the warps of a block. y[m, n] = sum_k x[m, k] * W[n, k], M = 1..8 (for
// M = 5..8 each decoded A fragment feeds two MMAs: x rows 0..3 and 4..7),
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
// Kernels: kiln_gemv_tensor_core_split_k_m{M}_t{T}_d{D}_l{LATE}_b{blocks per SM}.
// Launch: 256 threads, grid (ceil(N / R), slices); dynamic shared memory
// 4 M (K / slices rounded up to 128) + 512 M + 16 bytes (split_k_smem_bytes in
// src/cuda/gemv.rs).
//
// Chained launches (programmatic dependent launch, src/cuda/gemv.rs): the kernel lets the next
// one start at once and reads only W (packed, scales) before it waits for the previous kernel on
// the stream, so a chain of GEMVs over weights that do not change (decode) overlaps each launch's
// start-up — its first weight loads — with the previous launch's last blocks. x, y, the partial
// sums and the counters are touched only after the wait. flags bit 0: before waiting, also ask
// the L2 for the rest of this warp's slice of W (prefetch.global.L2, one line per lane and step).

// The decode, MMA, x staging and main loop are in gemv_tensor_core.cuh (shared with
// gemv_tensor_core.cu).
#include "gemv_tensor_core.cuh"

// The split-K finish: every thread of the block calls this after its main loop. A lane holds, for each r < R with
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

template <int M, int T, int D, int LATE>
__device__ __forceinline__ void kiln_gemv_split_k_body(const float* __restrict__ x,
        const u8* __restrict__ packed, const u8* __restrict__ scales,
        const float* __restrict__ tensor_scale, float* __restrict__ y, int N, int K,
        float* __restrict__ partial, u32* __restrict__ counters, int flags) {
    extern __shared__ uint4 kiln_split_k_smem[];
    kiln_pdl_launch_dependents();
    constexpr int C = 2 * M;  // B columns in use
    const int nsup = K >> 7;
    const int per = (nsup + gridDim.y - 1) / gridDim.y;
    const int s_begin = min(nsup, (int)blockIdx.y * per), s_end = min(nsup, s_begin + per);
    const int nsl = s_end - s_begin;
    uint2* xs = reinterpret_cast<uint2*>(kiln_split_k_smem);  // [per][8 t][4 j][C]
    uint2* zeros = xs + (size_t)per * 32 * C;              // [32 C]: B for unused columns
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, j = lane & 3;
    const int tile0 = (blockIdx.x * 8 + warp) * T;
    const uint4* wbase = reinterpret_cast<const uint4*>(packed);
    const u16* sbase = reinterpret_cast<const u16*>(scales);
    u32 roff[T][2];
    kiln_tc_row_offsets<T>(roff, tile0, g, j, N, K);

    if (flags & 1) {
        // lines of 2 super-tiles (rows start 128-byte aligned when K % 256 == 0); lane j takes
        // every 4th line of each of its rows, from the line after the first D super-tiles (loaded below)
        for (int U = ((s_begin + D) & ~1) + 2 * j; U < s_end; U += 8)
#pragma unroll
            for (int tt = 0; tt < T; tt++)
#pragma unroll
                for (int h = 0; h < 2; h++) kiln_prefetch_l2(wbase + (roff[tt][h] - j) + (size_t)U * 4);
    }
    // the first D super-tiles' loads go out before x is staged
    uint4 wb[D][T][2];
    u32 sb[D][T][2];
    kiln_tc_load_first<T, D>(wb, sb, wbase, sbase, roff, s_begin, s_end);
    // everything below may depend on the previous kernel on the stream
    kiln_pdl_wait();

    // stage this slice of x (super-tiles s_begin .. s_end, stored from local index 0)
    kiln_tc_stage_x<M>(x + 128 * s_begin, xs, nsl * 128, K);
    for (int c = threadIdx.x; c < 32 * C; c += blockDim.x) zeros[c] = make_uint2(0u, 0u);
    __syncthreads();

    constexpr bool TWO = C > 8;  // M = 5..8: a second MMA per step for x rows 4..7
    float acc[T][4], acc2[T][4];
    kiln_tc_main_loop<M, T, D, LATE, 0>(acc, acc2, wb, sb, wbase, sbase, roff, s_begin, s_end, xs,
                                        zeros, s_begin, g, j);
    // lanes hold x rows j (and 4 + j); those with j < M (4 + j < M) hold results
    constexpr int R = TWO ? 2 : 1;
    float v[R][T][2];
    kiln_tc_row_sums<T, R>(acc, acc2, v);
    int mrow[R];
    bool has[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        mrow[r] = 4 * r + j;
        has[r] = 4 * r + j < M;
    }
    const float post = __ldg(tensor_scale) * 512.0f;  // undo the 2^-9 of the scaled A
    kiln_splitk_finish<M, T, R>(v, mrow, has, tile0, g, post, y, N, partial, counters,
                                reinterpret_cast<u32*>(zeros + 32 * C));  // a word after the zero area
}

#define KILN_GEMV_SPLIT_K(MM, TT, DD, LATE, MINB)                                                   \
    extern "C" __global__ void __launch_bounds__(256, MINB)                                         \
            kiln_gemv_tensor_core_split_k_m##MM##_t##TT##_d##DD##_l##LATE##_b##MINB(                \
            const float* __restrict__ x, const u8* __restrict__ packed,                             \
            const u8* __restrict__ scales, const float* __restrict__ tensor_scale,                  \
            float* __restrict__ y, int N, int K, float* __restrict__ partial,                       \
            u32* __restrict__ counters, int flags) {                                                \
        kiln_gemv_split_k_body<MM, TT, DD, LATE>(x, packed, scales, tensor_scale, y, N, K, partial, \
                                             counters, flags);                                      \
    }

// (M, tiles T, depth D in super-tiles, LATE loads, blocks per SM (a register cap)): keep in
// sync with SPLIT_K_KERNELS (production: the defaults) and experiments::SPLIT_K_KERNELS (the
// benchmark's, compiled with -DKILN_BENCH) in src/cuda/gemv_kernels.rs.
KILN_GEMV_SPLIT_K(1, 2, 2, 0, 2)
KILN_GEMV_SPLIT_K(1, 1, 3, 1, 3)
KILN_GEMV_SPLIT_K(2, 2, 3, 1, 2)
KILN_GEMV_SPLIT_K(3, 2, 3, 1, 2)
KILN_GEMV_SPLIT_K(4, 2, 3, 1, 2)
KILN_GEMV_SPLIT_K(5, 2, 2, 1, 2)
KILN_GEMV_SPLIT_K(6, 2, 2, 1, 2)
KILN_GEMV_SPLIT_K(7, 2, 2, 1, 2)
KILN_GEMV_SPLIT_K(8, 2, 2, 1, 2)
#ifdef KILN_BENCH
// Other depths, tiles and load timings (no default uses them); the M = 4 ones also run
// M = 5..8 as two launches.
KILN_GEMV_SPLIT_K(1, 2, 3, 0, 2)
KILN_GEMV_SPLIT_K(1, 2, 3, 1, 2)
KILN_GEMV_SPLIT_K(1, 1, 4, 1, 2)
KILN_GEMV_SPLIT_K(4, 2, 3, 0, 2)
KILN_GEMV_SPLIT_K(8, 2, 3, 1, 2)
#endif
