// gemv_tensor_core.cu — the tensor-core GEMV for small matrices (was "v2", gemv_nvfp4_tc2.cu):
// every block stages all of x and its warps split K. Decode-time fused dequantize + GEMV for
// M = 1..8: y[m, n] = sum_k x[m, k] * W[n, k], W in NVFP4 [N, K] (K % 128 == 0).
//
// Same decode and fragment order as gemv_tensor_core_hilo.cu (read that header first): each lane
// decodes E2M1 pairs into bf16 (value * 2^-126), multiplies them by its block's E4M3 scale
// * 2^117 (exact), and feeds mma.sync.m16n8k16 (bf16 in, f32 accumulate). What differs:
// - B's 8 columns hold x row m as bf16 hi (column 2m) and lo (column 2m + 1), so ONE MMA per
//   16-row tile and 16-k step serves all M <= 4 rows at full f32-level accuracy (the older
//   kernel ran two MMAs, hi and lo, and used one column per x row).
// - each warp runs T 16-row tiles at once, so every B fragment read from shared memory serves
//   T MMAs, and keeps D super-tiles (128 k) of weight loads in flight per tile (a ring of
//   registers), so enough bytes are in flight per SM to cover DRAM latency. (Asking L2 to
//   fetch 256 B per load, L2::256B, measured 10-25% slower on the H100: BENCHMARKS.md.)
// - ("wide" variants loading 64 contiguous bytes per lane measured slower and were removed in
//   the third pass; BENCHMARKS.md.)
// - x is staged in 8-element items (all threads busy even for small K).
//
// Layout: x f32 [M, K], y f32 [M, N] row-major; packed [N, K/2]; scales [N, K/16] E4M3;
// tensor_scale one f32 on the device.
// Kernels are named kiln_gemv_tensor_core_m{M}_t{T}_d{D}; each has a register cap (min blocks per SM) so that several
// blocks fit on an SM: the loop is latency-bound (decode chains, HMMA, shared-memory loads),
// so more resident warps help as much as more bytes in flight.
// Launch: 256 threads = 8 warps = (8 / KSPLIT) row groups of T tiles x KSPLIT warps splitting
// the super-tiles; grid.x = ceil(N / (16 * T * (8 / KSPLIT))); dynamic shared memory
// 4 * M * K + 512 * M + 8 * T * 16 * M * 4 bytes (tensor_core_smem_bytes in
// src/cuda/gemv.rs).

// The decode, MMA, x staging and main loop are in gemv_tensor_core.cuh (shared with
// gemv_tensor_core_split_k.cu, which differs in how K is split and how the partial sums meet).
#include "gemv_tensor_core.cuh"

// PROBE (diagnostics for the benchmark, never a GEMV): bit 0 skips staging x, bit 1 replaces
// the decode and MMA by folding the loaded words into the accumulator (y is garbage).
template <int M, int T, int D, int PROBE = 0>
__device__ __forceinline__ void kiln_gemv_tensor_core_body(const float* __restrict__ x,
        const u8* __restrict__ packed, const u8* __restrict__ scales,
        const float* __restrict__ tensor_scale, float* __restrict__ y, int N, int K, int ksplit) {
    extern __shared__ uint4 kiln_tensor_core_smem[];
    constexpr int C = 2 * M;  // B columns in use
    const int nsup = K >> 7;
    uint2* xs = reinterpret_cast<uint2*>(kiln_tensor_core_smem);  // [nsup][8 t][4 j][C]
    uint2* zeros = xs + (size_t)nsup * 32 * C;                 // [32 C]: B for unused columns
    float* red = reinterpret_cast<float*>(zeros + 32 * C);     // [8 warps][T][16][M]
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, j = lane & 3;
    const int groups = 8 / ksplit;
    const int rg = warp / ksplit, kp = warp % ksplit;
    const int tile0 = (blockIdx.x * groups + rg) * T;
    const int per = (nsup + ksplit - 1) / ksplit;
    const int u_begin = min(nsup, kp * per), u_end = min(nsup, u_begin + per);
    const uint4* wbase = reinterpret_cast<const uint4*>(packed);
    const u16* sbase = reinterpret_cast<const u16*>(scales);
    u32 roff[T][2];
    kiln_tc_row_offsets<T>(roff, tile0, g, j, N, K);

    // the first D super-tiles' loads go out before x is staged
    uint4 wb[D][T][2];
    u32 sb[D][T][2];
    kiln_tc_load_first<T, D>(wb, sb, wbase, sbase, roff, u_begin, u_end);

    if (!(PROBE & 1)) kiln_tc_stage_x<M>(x, xs, K, K);
    for (int c = threadIdx.x; c < 32 * C; c += blockDim.x) zeros[c] = make_uint2(0u, 0u);
    __syncthreads();

    constexpr bool TWO = C > 8;  // M = 5..8: a second MMA per step for x rows 4..7
    float acc[T][4], acc2[T][4];
    kiln_tc_main_loop<M, T, D, 0, PROBE>(acc, acc2, wb, sb, wbase, sbase, roff, u_begin, u_end, xs,
                                         zeros, 0, g, j);
    // lanes hold x rows j (and 4 + j); those with j < M (4 + j < M) hold results
    constexpr int R = TWO ? 2 : 1;
    float v[R][T][2];
    kiln_tc_row_sums<T, R>(acc, acc2, v);
#pragma unroll
    for (int r = 0; r < R; r++) {
        const int m = 4 * r + j;
        if (m < M) {
#pragma unroll
            for (int tt = 0; tt < T; tt++) {
                float* rw = red + ((size_t)warp * T + tt) * 16 * M;
                rw[g * M + m] = v[r][tt][0];
                rw[(g + 8) * M + m] = v[r][tt][1];
            }
        }
    }
    __syncthreads();
    const float post = __ldg(tensor_scale) * 512.0f;  // undo the 2^-9 of the scaled A
    for (int i = threadIdx.x; i < groups * T * 16 * M; i += blockDim.x) {
        const int gg = i / (T * 16 * M), tt = (i / (16 * M)) % T, row = (i / M) % 16, m = i % M;
        const int n = ((blockIdx.x * groups + gg) * T + tt) * 16 + row;
        float v = 0.0f;
        for (int k = 0; k < ksplit; k++)
            v += red[(((size_t)(gg * ksplit + k)) * T + tt) * 16 * M + row * M + m];
        if (n < N) y[(size_t)m * N + n] = v * post;
    }
}

#define KILN_GEMV_TENSOR_CORE(MM, TT, DD, MINB)                                                   \
    extern "C" __global__ void __launch_bounds__(256, MINB)                                       \
            kiln_gemv_tensor_core_m##MM##_t##TT##_d##DD(                                          \
            const float* __restrict__ x, const u8* __restrict__ packed,                           \
            const u8* __restrict__ scales, const float* __restrict__ tensor_scale,                \
            float* __restrict__ y, int N, int K, int ksplit) {                                    \
        kiln_gemv_tensor_core_body<MM, TT, DD>(x, packed, scales, tensor_scale, y, N, K, ksplit); \
    }

// (M, tiles T, depth D in super-tiles, min blocks per SM): keep in sync with TENSOR_CORE_KERNELS
// (production: the defaults on small matrices) and experiments::TENSOR_CORE_KERNELS (the
// benchmark's, compiled with -DKILN_BENCH) in src/cuda/gemv_kernels.rs.
KILN_GEMV_TENSOR_CORE(2, 1, 4, 2)
KILN_GEMV_TENSOR_CORE(2, 4, 1, 2)
KILN_GEMV_TENSOR_CORE(3, 1, 4, 2)
KILN_GEMV_TENSOR_CORE(3, 4, 1, 2)
KILN_GEMV_TENSOR_CORE(4, 1, 4, 2)
KILN_GEMV_TENSOR_CORE(4, 4, 1, 2)
KILN_GEMV_TENSOR_CORE(5, 1, 4, 1)
KILN_GEMV_TENSOR_CORE(6, 1, 4, 1)
KILN_GEMV_TENSOR_CORE(7, 1, 4, 1)
KILN_GEMV_TENSOR_CORE(8, 1, 4, 1)

#ifdef KILN_BENCH
// M = 1 (no default uses it: the CUDA-core kernel runs M = 1 on small matrices, the split-K one
// on large): the reference for the probes below.
KILN_GEMV_TENSOR_CORE(1, 2, 3, 2)

// Diagnostics (kiln-kernel-bench, GEMV rows marked "probe"): the m1_t2_d3 kernel's loads and
// schedule without staging x (1), without the decode and MMA (2), or with neither (3).
#define KILN_GEMV_TENSOR_CORE_PROBE(P)                                                            \
    extern "C" __global__ void __launch_bounds__(256, 2) kiln_gemv_tensor_core_probe##P(          \
            const float* __restrict__ x, const u8* __restrict__ packed,                           \
            const u8* __restrict__ scales, const float* __restrict__ tensor_scale,                \
            float* __restrict__ y, int N, int K, int ksplit) {                                    \
        kiln_gemv_tensor_core_body<1, 2, 3, P>(x, packed, scales, tensor_scale, y, N, K, ksplit); \
    }
KILN_GEMV_TENSOR_CORE_PROBE(1)
KILN_GEMV_TENSOR_CORE_PROBE(2)
KILN_GEMV_TENSOR_CORE_PROBE(3)
#endif
