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
// The body (decode, x source, main loop, store) is in gemv_cuda_core.cuh, shared with
// gemv_fused.cu.
#include "gemv_cuda_core.cuh"

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
