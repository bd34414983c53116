// gemv_cuda_core.cu — the CUDA-core GEMV (no tensor cores): decode-time fused dequantize + GEMV
// y[m, n] = sum_k x[m, k] * W[n, k] for M = 1..8 rows of x, W in NVFP4 [N, K] (packed [N, K/2],
// scales [N, K/16], one tensor scale).
//
// Hopper has no FP4 tensor cores, so E2M1 is decoded in software: the top nibble of each 16-bit
// half of a packed word is moved into an f16 bit pattern (sign -> bit 15, the 3 magnitude bits
// -> bits 9..11), which is the E2M1 value times 2^-14 exactly (subnormal f16 for 0.5); it is
// widened to f32 (exact) and multiplied with x in f32. Products are summed per 16-element
// block, multiplied by the block's E4M3 scale (decoded the same way: the 7 magnitude bits of an
// E4M3 byte shifted into an f16 are the scale times 2^-8 exactly, subnormals included), and
// the 2^22 and the tensor scale are applied once per output. All math is f32: the only
// rounding is f32 accumulation.
//
// Layout: x f32 [M, K] row-major, y f32 [M, N] row-major. Requires K % 32 == 0 (one 16-byte
// load = 32 elements = 2 scale blocks per lane per row).
// Kernels: kiln_gemv_cuda_core_m{M}_r{R}.
// Launch: 256 threads = 8 warps = (8 / KSPLIT) row groups x KSPLIT warps that split K; a row
// group handles R consecutive rows (kernel name suffix _r8 / _r4); grid.x =
// ceil(N / (R * 8 / KSPLIT)). Each lane keeps the next unit's R 16-byte weight loads in flight
// while it computes the current one. Weights are read with ld.global.nc.L1::no_allocate so
// that x stays in L1. Chained launches (src/cuda/gemv.rs): only the first weight loads come
// before the griddepcontrol.wait; x and y after it.

//
// The fused decode GEMVs (kiln_gemv_cc_m1_*, M = 1): the same body with the decode step's small
// kernel before it folded into its x load and, optionally, the residual add into its store —
// x is computed after the wait by every block into shared memory (see KilnXNorm, KilnXSwiglu,
// KilnXCombine below) and y[n] += W·x replaces y[n] = W·x. Each computes the bits the separate
// kernels (decode.cu) compute: the same per-element functions (decode_ops.cuh), the same
// reduction orders. Dynamic shared memory: K floats (the combine: + heads · splits); static:
// up to 1,152 bytes (the loader, src/cuda/gemv_kernels.rs, reads it and leaves room for it).

// kiln_ld_stream (the weight loads) and the chained-launch helpers are in nvfp4_common.cuh.
#include "block_reduce.cuh"
#include "decode_ops.cuh"

// f16 bit pair -> two f32 (exact widening).
__device__ __forceinline__ void kiln_h2_to_f2(u32 h, float& lo, float& hi) {
    asm("{.reg .b16 l, h;\n\tmov.b32 {l, h}, %2;\n\tcvt.f32.f16 %0, l;\n\tcvt.f32.f16 %1, h;}"
        : "=f"(lo), "=f"(hi) : "r"(h));
}

// Decode one packed word (8 elements, element e in nibble e) into f[0..8) = e2m1 * 2^-14.
__device__ __forceinline__ void kiln_decode8(u32 q, float f[8]) {
#pragma unroll
    for (int t = 0; t < 4; t++) {
        // top nibbles of the two halves are elements 3 - t and 7 - t
        u32 h = (q & 0x80008000u) | ((q >> 3) & 0x0E000E00u);
        kiln_h2_to_f2(h, f[3 - t], f[7 - t]);
        q <<= 4;
    }
}

// x read from global memory as is (the plain GEMV).
struct KilnXGlobal {
    const float* __restrict__ x;
    static constexpr bool kShared = false;
    __device__ __forceinline__ void fill(float*, int) const {}
};

// Where element i of x sits in the fused kernels' shared copy: the 8 float4s of each 32-element
// unit rotated by the unit's index (mod 8), so that the 8 lanes of a quarter warp, which read
// the same float4 of 8 consecutive units, hit 8 different bank groups.
__device__ __forceinline__ int kiln_xs_float4(int unit, int q) { return (unit << 3) | (q ^ (unit & 7)); }
__device__ __forceinline__ int kiln_xs_index(int i) {
    return (kiln_xs_float4(i >> 5, (i >> 2) & 7) << 2) | (i & 3);
}

template <int M, int R, class X, bool RESIDUAL>
__device__ __forceinline__ void kiln_gemv_cuda_core_body(const X xsrc,
        const u8* __restrict__ packed, const u8* __restrict__ scales,
        const float* __restrict__ tensor_scale, float* __restrict__ y, int N, int K, int ksplit) {
    __shared__ float red[8][R][M];
    extern __shared__ float4 xs4[];  // the fused kernels' x (K floats, kiln_xs_index order)
    static_assert(M == 1 || !X::kShared, "the fused kernels are M = 1");
    kiln_pdl_launch_dependents();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int groups = 8 / ksplit;
    const int g = warp / ksplit, kp = warp % ksplit;
    const int row0 = (blockIdx.x * groups + g) * R;
    const int units = K >> 5;  // 16-byte units per row
    const int per = (units + ksplit - 1) / ksplit;
    const int u_begin = kp * per;
    const int u_end = min(units, u_begin + per);
    const size_t wstride = (size_t)(K >> 5);  // uint4 per row
    const size_t sstride = (size_t)(K >> 5);  // u16 (2 scale bytes) per row
    const uint4* wbase = reinterpret_cast<const uint4*>(packed) + (size_t)min(row0, N - 1) * wstride;
    const u16* sbase = reinterpret_cast<const u16*>(scales) + (size_t)min(row0, N - 1) * sstride;
    int rlast = N - 1 - min(row0, N - 1);  // rows past N re-read the last row (never written)

    float acc[R][M];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int m = 0; m < M; m++) acc[r][m] = 0.0f;

    uint4 wn[R];
    u32 sn[R];
    int u = u_begin + lane;
    if (u < u_end) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            int rr = min(r, rlast);
            wn[r] = kiln_ld_stream(wbase + rr * wstride + u);
            sn[r] = __ldg(sbase + rr * sstride + u);
        }
    }
    // chained launches: x and y only after the previous kernel on the stream is done
    kiln_pdl_wait();
    xsrc.fill(reinterpret_cast<float*>(xs4), K);  // (the fused kernels: x into shared memory)
    while (u < u_end) {
        uint4 w[R];
        float sc[R][2];
#pragma unroll
        for (int r = 0; r < R; r++) {
            w[r] = wn[r];
            // the unit's two scale bytes, decoded via f16 (value * 2^-8)
            kiln_h2_to_f2(((sn[r] & 0x7Fu) << 7) | ((sn[r] & 0x7F00u) << 15), sc[r][0], sc[r][1]);
        }
        const int uc = u;
        u += 32;
        if (u < u_end) {  // prefetch the next unit
#pragma unroll
            for (int r = 0; r < R; r++) {
                int rr = min(r, rlast);
                wn[r] = kiln_ld_stream(wbase + rr * wstride + u);
                sn[r] = __ldg(sbase + rr * sstride + u);
            }
        }
#pragma unroll
        for (int j = 0; j < 4; j++) {  // word j: elements uc*32 + 8j .. +8, scale block j/2
            float xv[M][8];
#pragma unroll
            for (int m = 0; m < M; m++) {
                float4 a, b;
                if constexpr (X::kShared) {
                    a = xs4[kiln_xs_float4(uc, 2 * j)];
                    b = xs4[kiln_xs_float4(uc, 2 * j + 1)];
                } else {
                    const float4* xp =
                        reinterpret_cast<const float4*>(xsrc.x + (size_t)m * K + (size_t)uc * 32 + j * 8);
                    a = __ldg(xp);
                    b = __ldg(xp + 1);
                }
                xv[m][0] = a.x; xv[m][1] = a.y; xv[m][2] = a.z; xv[m][3] = a.w;
                xv[m][4] = b.x; xv[m][5] = b.y; xv[m][6] = b.z; xv[m][7] = b.w;
            }
#pragma unroll
            for (int r = 0; r < R; r++) {
                u32 q = j == 0 ? w[r].x : j == 1 ? w[r].y : j == 2 ? w[r].z : w[r].w;
                float f[8];
                kiln_decode8(q, f);
#pragma unroll
                for (int m = 0; m < M; m++) {
                    float p = 0.0f;
#pragma unroll
                    for (int e = 0; e < 8; e++) p = fmaf(xv[m][e], f[e], p);
                    acc[r][m] = fmaf(p, sc[r][j >> 1], acc[r][m]);
                }
            }
        }
    }
    // reduce over the warp, then over the KSPLIT warps of the row group
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int m = 0; m < M; m++) {
            float v = acc[r][m];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
            if (lane == 0) red[warp][r][m] = v;
        }
    __syncthreads();
    // undo the 2^-14 (E2M1) and 2^-8 (E4M3) of the f16 decodes
    const float post = __ldg(tensor_scale) * 4194304.0f;
    for (int t = threadIdx.x; t < groups * R * M; t += blockDim.x) {
        int gg = t / (R * M), r = (t / M) % R, m = t % M;
        int n = (blockIdx.x * groups + gg) * R + r;
        float v = 0.0f;
        for (int k = 0; k < ksplit; k++) v += red[gg * ksplit + k][r][m];
        if (n >= N) continue;
        // the residual add as the separate kernels did it: x + (the rounded product)
        if (RESIDUAL) y[(size_t)m * N + n] = y[(size_t)m * N + n] + __fmul_rn(v, post);
        else y[(size_t)m * N + n] = v * post;
    }
}

#define KILN_GEMV_CUDA_CORE(MM, RR, MINB)                                                       \
    extern "C" __global__ void __launch_bounds__(256, MINB) kiln_gemv_cuda_core_m##MM##_r##RR(  \
            const float* __restrict__ x, const u8* __restrict__ packed,                         \
            const u8* __restrict__ scales, const float* __restrict__ tensor_scale,              \
            float* __restrict__ y, int N, int K, int ksplit) {                                  \
        kiln_gemv_cuda_core_body<MM, RR, KilnXGlobal, false>(KilnXGlobal{x}, packed, scales,    \
                                                             tensor_scale, y, N, K, ksplit);   \
    }

// (M, rows per warp R, min blocks per SM): keep in sync with CUDA_CORE_KERNELS (production) and
// experiments::CUDA_CORE_KERNELS (the benchmark's, compiled with -DKILN_BENCH) in
// src/cuda/gemv_kernels.rs.
KILN_GEMV_CUDA_CORE(1, 4, 3)
KILN_GEMV_CUDA_CORE(2, 4, 2)
KILN_GEMV_CUDA_CORE(3, 4, 2)
KILN_GEMV_CUDA_CORE(4, 4, 1)
KILN_GEMV_CUDA_CORE(5, 4, 1)
KILN_GEMV_CUDA_CORE(6, 4, 1)
KILN_GEMV_CUDA_CORE(7, 4, 1)
KILN_GEMV_CUDA_CORE(8, 4, 1)
#ifdef KILN_BENCH
// 8 rows per warp at M = 1 (no default uses it).
KILN_GEMV_CUDA_CORE(1, 8, 1)
#endif

// ---- The fused decode GEMVs (M = 1, 4 rows per warp): x computed into shared memory ----

// RMSNorm of the residual stream h [K] with weight w: x = h · r · w. The sum of squares in
// kiln_add_rmsnorm's order: that kernel runs B = clamp(ceil32(K), 32, 1024) threads, thread t
// summing h[t], h[t + B], ... in turn, then each warp's butterfly, then the warps' sums in
// order; here the block's warps play its virtual warps warp, warp + 8, ...
struct KilnXNorm {
    const float* __restrict__ h;
    const float* __restrict__ w;
    float eps;
    static constexpr bool kShared = true;
    __device__ __forceinline__ void fill(float* xs, int K) const {
        __shared__ float red[32];
        const int B = min(max((K + 31) & ~31, 32), 1024);
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        for (int vw = warp; vw < (B >> 5); vw += (int)(blockDim.x >> 5)) {
            float ss = 0.0f;
            for (int i = (vw << 5) + lane; i < K; i += B) {
                const float v = h[i];
                ss += v * v;
            }
            ss = kiln_warp_sum(ss);
            if (lane == 0) red[vw] = ss;
        }
        __syncthreads();
        float ss = 0.0f;
        for (int v = 0; v < (B >> 5); ++v) ss += red[v];
        const float r = kiln_rms_scale(ss, K, eps);
        for (int i = threadIdx.x; i < K; i += blockDim.x) xs[kiln_xs_index(i)] = h[i] * r * w[i];
        __syncthreads();
    }
};

// SwiGLU of the gate/up GEMV's output gu [2K] (gate, then up) with their tensor scales.
struct KilnXSwiglu {
    const float* __restrict__ gu;
    const float* __restrict__ scale;
    static constexpr bool kShared = true;
    __device__ __forceinline__ void fill(float* xs, int K) const {
        const float s0 = scale[0], s1 = scale[1];
        for (int i = threadIdx.x; i < K; i += blockDim.x)
            xs[kiln_xs_index(i)] = kiln_silu_mul(gu[i] * s0, gu[K + i] * s1);
        __syncthreads();
    }
};

// The decode attention's combine of one token: x[h·hd + e] over heads h < K / hd from the
// splits' partial outputs (kiln_attention_combine's part_o / part_ml layout, T = 1). Each
// (head, split)'s weight exp(m - max) is computed once into shared memory after x (nh · ns
// floats; KILN_NEG_INF marks a split without positions), then each element sums
// part_o · weight in split order — the separate kernel's operations on the same values.
#define KILN_FUSED_COMBINE_MAX_HEADS 128
struct KilnXCombine {
    const float* __restrict__ part_o;
    const float* __restrict__ part_ml;
    const int* __restrict__ pos;
    int hd, splits, chunk;
    static constexpr bool kShared = true;
    __device__ __forceinline__ void fill(float* xs, int K) const {
        __shared__ float stat[2 * KILN_FUSED_COMBINE_MAX_HEADS];
        const int nh = K / hd;
        const int ns = kiln_combine_splits(*pos + 1, splits, chunk);
        float* wts = xs + K;  // [nh][ns]
        for (int h = threadIdx.x; h < nh; h += blockDim.x)
            kiln_combine_stats(part_ml, (size_t)h * splits, ns, stat[2 * h], stat[2 * h + 1]);
        __syncthreads();
        for (int t = threadIdx.x; t < nh * ns; t += blockDim.x) {
            const int h = t / ns, sp = t - h * ns;
            const float m = part_ml[((size_t)h * splits + sp) * 2];
            wts[t] = m == KILN_NEG_INF ? KILN_NEG_INF : expf(m - stat[2 * h]);
        }
        __syncthreads();
        for (int i = threadIdx.x; i < K; i += blockDim.x) {
            const int h = i / hd, e = i - h * hd;
            const float* po = part_o + (size_t)h * splits * hd + e;
            const float* w = wts + h * ns;
            float o = 0.0f;
            for (int sp = 0; sp < ns; ++sp)
                if (w[sp] != KILN_NEG_INF) o += po[(size_t)sp * hd] * w[sp];
            xs[kiln_xs_index(i)] = o / stat[2 * h + 1];
        }
        __syncthreads();
    }
};

// y = W · rmsnorm(h) (the q/k/v and gate/up GEMVs of a decode step, the norm folded in).
extern "C" __global__ void __launch_bounds__(256, 3) kiln_gemv_cc_m1_norm(
        const float* __restrict__ h, const float* __restrict__ w, float eps,
        const u8* __restrict__ packed, const u8* __restrict__ scales,
        const float* __restrict__ tensor_scale, float* __restrict__ y, int N, int K, int ksplit) {
    kiln_gemv_cuda_core_body<1, 4, KilnXNorm, false>(KilnXNorm{h, w, eps}, packed, scales, tensor_scale,
                                                     y, N, K, ksplit);
}

// y += W · x (the o GEMV after a separate combine, the residual add folded in).
extern "C" __global__ void __launch_bounds__(256, 3) kiln_gemv_cc_m1_residual(
        const float* __restrict__ x, const u8* __restrict__ packed, const u8* __restrict__ scales,
        const float* __restrict__ tensor_scale, float* __restrict__ y, int N, int K, int ksplit) {
    kiln_gemv_cuda_core_body<1, 4, KilnXGlobal, true>(KilnXGlobal{x}, packed, scales, tensor_scale, y, N, K,
                                                      ksplit);
}

// y += W · swiglu(gu) (the down GEMV, SwiGLU and the residual add folded in; y the residual).
extern "C" __global__ void __launch_bounds__(256, 3) kiln_gemv_cc_m1_swiglu_residual(
        const float* __restrict__ gu, const float* __restrict__ scale,
        const u8* __restrict__ packed, const u8* __restrict__ scales,
        const float* __restrict__ tensor_scale, float* __restrict__ y, int N, int K, int ksplit) {
    kiln_gemv_cuda_core_body<1, 4, KilnXSwiglu, true>(KilnXSwiglu{gu, scale}, packed, scales, tensor_scale,
                                                      y, N, K, ksplit);
}

// y += W · combine(part_o, part_ml) (the o GEMV, the attention's combine and the residual add
// folded in; y the residual).
extern "C" __global__ void __launch_bounds__(256, 3) kiln_gemv_cc_m1_combine_residual(
        const float* __restrict__ part_o, const float* __restrict__ part_ml, const int* __restrict__ pos,
        int hd, int splits, int chunk,
        const u8* __restrict__ packed, const u8* __restrict__ scales,
        const float* __restrict__ tensor_scale, float* __restrict__ y, int N, int K, int ksplit) {
    kiln_gemv_cuda_core_body<1, 4, KilnXCombine, true>(KilnXCombine{part_o, part_ml, pos, hd, splits, chunk},
                                                       packed, scales, tensor_scale, y, N, K, ksplit);
}
