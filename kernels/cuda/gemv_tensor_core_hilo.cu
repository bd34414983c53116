// gemv_tensor_core_hilo.cu — the first tensor-core GEMV (was "v1", gemv_nvfp4_tc.cu), x's bf16 hi
// and lo parts in two MMAs per step: decode-time fused dequantize + GEMV
// y[m, n] = sum_k x[m, k] * W[n, k] for M = 1..8, W in NVFP4 [N, K] (K % 128 == 0).
//
// Hopper has no FP4 MMA, so each lane decodes E2M1 in software into bf16 pairs (the sign and
// the three magnitude bits of a nibble moved into a bf16 bit pattern give value * 2^-126
// exactly), multiplies them by its block's E4M3 scale * 2^117 (fma.rn.bf16x2; the product
// e2m1 * scale * 2^-9 has at most 5 significant bits, so it is exact), and feeds
// mma.sync.m16n8k16 (bf16 in, f32 accumulate). x is split into bf16 hi + lo parts (x = hi + lo
// to ~2^-17 relative), two MMAs per tile, so the result keeps f32-level accuracy.
//
// Layout: x f32 [M, K], y f32 [M, N] row-major; packed [N, K/2] (even element in the low
// nibble), scales [N, K/16] E4M3, tensor_scale one f32 on the device.
// The K order inside an MMA is free as long as A and B agree: lane (g = lane/4, j = lane%4)
// loads the 16 bytes (32 elements) at k = 128*s + 32*j of rows g and g+8 of its 16-row tile for
// every super-tile s, and the 8 MMA k-tiles of a super-tile take their 16 logical k from those
// lanes' chunks in the order the nibble decode produces pairs; the block stages x into shared
// memory in exactly that order (bf16 hi/lo, 16 bytes per lane per k-tile).
// Kernels: kiln_gemv_tensor_core_hilo_m{M}.
// Launch: 256 threads = 8 warps = (8 / KSPLIT) row tiles of 16 x KSPLIT warps splitting the
// super-tiles; grid.x = ceil(N / (16 * 8 / KSPLIT)); dynamic shared memory M*K*4 + 4096 bytes.

// The decode and MMA helpers (kiln_e2m1_pair_bf16, kiln_mma_bf16, ...) are in
// gemv_tensor_core.cuh, shared with the other tensor-core GEMVs; kiln_ld_stream in nvfp4_common.cuh.
#include "gemv_tensor_core.cuh"

template <int M>
__device__ __forceinline__ void kiln_gemv_tensor_core_hilo_body(const float* __restrict__ x,
        const u8* __restrict__ packed, const u8* __restrict__ scales,
        const float* __restrict__ tensor_scale, float* __restrict__ y, int N, int K, int ksplit) {
    extern __shared__ uint4 kiln_smem[];
    const int nsup = K >> 7;
    uint4* xs = kiln_smem;                                          // [M][nsup][4 j][8 t] x 16 B
    float* red = reinterpret_cast<float*>(kiln_smem + (size_t)M * nsup * 32);  // [8 warps][16][8]
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, j = lane & 3;
    const int tiles_pb = 8 / ksplit;
    const int tile = blockIdx.x * tiles_pb + warp / ksplit;
    const int kp = warp % ksplit;
    const int per = (nsup + ksplit - 1) / ksplit;
    const int s_begin = kp * per, s_end = min(nsup, s_begin + per);
    const int ra = min(tile * 16 + g, N - 1), rb = min(tile * 16 + g + 8, N - 1);
    const uint4* wa = reinterpret_cast<const uint4*>(packed + (size_t)ra * (size_t)(K >> 1)) + j;
    const uint4* wb = reinterpret_cast<const uint4*>(packed + (size_t)rb * (size_t)(K >> 1)) + j;
    const u16* sa = reinterpret_cast<const u16*>(scales + (size_t)ra * (size_t)(K >> 4)) + j;
    const u16* sb = reinterpret_cast<const u16*>(scales + (size_t)rb * (size_t)(K >> 4)) + j;

    // start the first weight loads before staging x
    uint4 na = make_uint4(0, 0, 0, 0), nb = na;
    u32 nsa = 0, nsb = 0;
    if (s_begin < s_end) {
        na = kiln_ld_stream(wa + (size_t)s_begin * 4);
        nb = kiln_ld_stream(wb + (size_t)s_begin * 4);
        nsa = __ldg(sa + (size_t)s_begin * 4);
        nsb = __ldg(sb + (size_t)s_begin * 4);
    }

    // stage x: chunk c = (m, s, jj) holds x[m][128 s + 32 jj .. +32] in k-tile order
    for (int c = threadIdx.x; c < M * nsup * 4; c += blockDim.x) {
        const float4* xp = reinterpret_cast<const float4*>(x) + (size_t)c * 8;
        float v[32];
#pragma unroll
        for (int q = 0; q < 8; q++) {
            float4 f = __ldg(xp + q);
            v[4 * q] = f.x; v[4 * q + 1] = f.y; v[4 * q + 2] = f.z; v[4 * q + 3] = f.w;
        }
#pragma unroll
        for (int t = 0; t < 8; t++) {
            const int base = 8 * (t >> 1);
            const int p0 = (t & 1) ? 1 : 3;  // pair 0 = elements (p0, p0 + 4), pair 1 = (p0 - 1, p0 + 3)
            float e[4] = {v[base + p0], v[base + p0 + 4], v[base + p0 - 1], v[base + p0 + 3]};
            u32 hi01 = kiln_pack_bf16x2(e[0], e[1]), hi23 = kiln_pack_bf16x2(e[2], e[3]);
            float r0 = e[0] - __uint_as_float(hi01 << 16), r1 = e[1] - __uint_as_float(hi01 & 0xFFFF0000u);
            float r2 = e[2] - __uint_as_float(hi23 << 16), r3 = e[3] - __uint_as_float(hi23 & 0xFFFF0000u);
            xs[(size_t)c * 8 + t] = make_uint4(hi01, hi23, kiln_pack_bf16x2(r0, r1), kiln_pack_bf16x2(r2, r3));
        }
    }
    __syncthreads();

    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const uint4* xl = xs + ((size_t)(g < M ? g : 0) * nsup * 4 + j) * 8;
    for (int s = s_begin; s < s_end; s++) {
        const uint4 a = na, b = nb;
        const u32 sca = nsa, scb = nsb;
        if (s + 1 < s_end) {
            na = kiln_ld_stream(wa + (size_t)(s + 1) * 4);
            nb = kiln_ld_stream(wb + (size_t)(s + 1) * 4);
            nsa = __ldg(sa + (size_t)(s + 1) * 4);
            nsb = __ldg(sb + (size_t)(s + 1) * 4);
        }
        const u32 ma0 = kiln_scale_bf16x2(sca & 0xFFu), ma1 = kiln_scale_bf16x2(sca >> 8);
        const u32 mb0 = kiln_scale_bf16x2(scb & 0xFFu), mb1 = kiln_scale_bf16x2(scb >> 8);
        const u32 wa4[4] = {a.x, a.y, a.z, a.w}, wb4[4] = {b.x, b.y, b.z, b.w};
        const uint4* xt = xl + (size_t)s * 32;
#pragma unroll
        for (int t = 0; t < 8; t++) {
            const int wi = t >> 1;
            const u32 qa = wa4[wi] << (8 * (t & 1)), qb = wb4[wi] << (8 * (t & 1));
            const u32 sA = wi < 2 ? ma0 : ma1, sB = wi < 2 ? mb0 : mb1;
            const u32 a0 = kiln_bf16x2_mul(kiln_e2m1_pair_bf16(qa), sA);
            const u32 a2 = kiln_bf16x2_mul(kiln_e2m1_pair_bf16(qa << 4), sA);
            const u32 a1 = kiln_bf16x2_mul(kiln_e2m1_pair_bf16(qb), sB);
            const u32 a3 = kiln_bf16x2_mul(kiln_e2m1_pair_bf16(qb << 4), sB);
            const uint4 xf = xt[t];
            kiln_mma_bf16(acc, a0, a1, a2, a3, xf.x, xf.y);
            kiln_mma_bf16(acc, a0, a1, a2, a3, xf.z, xf.w);
        }
    }
    // D: acc[0..1] = (row g, n 2j, 2j+1), acc[2..3] = (row g+8, n 2j, 2j+1)
    float* rw = red + warp * 128;
    rw[g * 8 + 2 * j] = acc[0];
    rw[g * 8 + 2 * j + 1] = acc[1];
    rw[(g + 8) * 8 + 2 * j] = acc[2];
    rw[(g + 8) * 8 + 2 * j + 1] = acc[3];
    __syncthreads();
    const float post = __ldg(tensor_scale) * 512.0f;  // undo the 2^-9 of the scaled A
    for (int t = threadIdx.x; t < tiles_pb * 16 * M; t += blockDim.x) {
        const int tt = t / (16 * M), row = (t / M) % 16, m = t % M;
        const int n = (blockIdx.x * tiles_pb + tt) * 16 + row;
        float v = 0.0f;
        for (int k = 0; k < ksplit; k++) v += red[(tt * ksplit + k) * 128 + row * 8 + m];
        if (n < N) y[(size_t)m * N + n] = v * post;
    }
}

#define KILN_GEMV_TENSOR_CORE_HILO(MM)                                                          \
    extern "C" __global__ void __launch_bounds__(256) kiln_gemv_tensor_core_hilo_m##MM(         \
            const float* __restrict__ x, const u8* __restrict__ packed,                         \
            const u8* __restrict__ scales, const float* __restrict__ tensor_scale,              \
            float* __restrict__ y, int N, int K, int ksplit) {                                  \
        kiln_gemv_tensor_core_hilo_body<MM>(x, packed, scales, tensor_scale, y, N, K, ksplit);  \
    }

// M: keep in sync with TENSOR_CORE_HILO_KERNELS (production: the M a default can pick, when x
// fits in shared memory only without the tensor-core kernel's reduction area) and
// experiments::TENSOR_CORE_HILO_KERNELS (-DKILN_BENCH) in src/cuda/gemv_kernels.rs.
KILN_GEMV_TENSOR_CORE_HILO(2)
KILN_GEMV_TENSOR_CORE_HILO(3)
KILN_GEMV_TENSOR_CORE_HILO(4)
#ifdef KILN_BENCH
// The other M (no default uses them).
KILN_GEMV_TENSOR_CORE_HILO(1)
KILN_GEMV_TENSOR_CORE_HILO(5)
KILN_GEMV_TENSOR_CORE_HILO(6)
KILN_GEMV_TENSOR_CORE_HILO(7)
KILN_GEMV_TENSOR_CORE_HILO(8)
#endif
