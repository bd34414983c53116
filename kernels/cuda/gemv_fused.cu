// gemv_fused.cu — the decode step's fused GEMVs (kiln_gemv_cc_m1_*, M = 1, 4 rows per warp;
// launchers in src/cuda/gemv_fused.rs). A module of its own, so that a problem with these
// kernels (they are off by default until measured) cannot keep the production GEMVs from
// loading.
//
// The CUDA-core GEMV's body (gemv_cuda_core.cuh) with the decode step's small
// kernel before it folded into its x load and, optionally, the residual add into its store —
// x is computed after the wait by every block into shared memory (see KilnXNorm, KilnXSwiglu,
// KilnXCombine below) and y[n] += W·x replaces y[n] = W·x. Each computes the bits the separate
// kernels (decode.cu) compute: the same per-element functions (decode_ops.cuh), the same
// reduction orders. Dynamic shared memory: K floats (the combine: + heads · splits); static:
// up to 1,152 bytes (the loader, src/cuda/gemv_kernels.rs, reads it and leaves room for it).

#include "block_reduce.cuh"
#include "decode_ops.cuh"
#include "gemv_cuda_core.cuh"
#include "gemv_x.cuh"

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
