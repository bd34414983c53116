// gemv_cuda_core.cuh — the CUDA-core GEMV's body (see gemv_cuda_core.cu's header for the
// decode, the layout and the launch), included by gemv_cuda_core.cu (the production kernels)
// and gemv_fused.cu (the decode step's fused kernels): the E2M1 decode, where x comes from
// (KilnXGlobal: global memory as is; the fused kernels' sources fill a swizzled shared copy)
// and the store (y = W·x, or y += W·x for the residual).
// kiln_ld_stream (the weight loads) and the chained-launch helpers are in nvfp4_common.cuh.

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

// Which rows a row group of the GEMV takes: group gi (of all blocks' groups, in order) takes
// rows row0(gi) .. row0(gi) + R - 1. The plain GEMV: consecutive groups, consecutive rows.
template <int R>
struct KilnRowsLinear {
    __device__ __forceinline__ int operator()(int gi) const { return gi * R; }
};

// The chained launch's wait (see nvfp4_common.cuh).
struct KilnPdlWait {
    __device__ __forceinline__ void operator()() const { kiln_pdl_wait(); }
};

// One block's share of the GEMV: its row groups tile·groups .. tile·groups + groups - 1 (rows
// from ROWS). With `first`, the block's first weight loads go out, then wait(), then x is filled
// (a block that runs several tiles of one GEMV, the persistent decode kernel, fills x once).
// With PDL, the next kernel on the stream may start launching at once.
template <int M, int R, class X, bool RESIDUAL, bool PDL, class ROWS, class WAIT>
__device__ __forceinline__ void kiln_gemv_cuda_core_tile(const X xsrc,
        const u8* __restrict__ packed, const u8* __restrict__ scales,
        const float* __restrict__ tensor_scale, float* __restrict__ y, int N, int K, int ksplit,
        int tile, bool first, const ROWS rows, const WAIT wait) {
    __shared__ float red[8][R][M];
    extern __shared__ float4 xs4[];  // the fused kernels' x (K floats, kiln_xs_index order)
    static_assert(M == 1 || !X::kShared, "the fused kernels are M = 1");
    if (PDL) kiln_pdl_launch_dependents();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int groups = 8 / ksplit;
    const int g = warp / ksplit, kp = warp % ksplit;
    const int row0 = rows(tile * groups + g);
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
    if (first) {
        wait();
        xsrc.fill(reinterpret_cast<float*>(xs4), K);  // (the fused kernels: x into shared memory)
    }
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
        int n = rows(tile * groups + gg) + r;
        float v = 0.0f;
        for (int k = 0; k < ksplit; k++) v += red[gg * ksplit + k][r][m];
        if (n >= N) continue;
        // the residual add as the separate kernels did it: x + (the rounded product); y read
        // through L2 (the persistent kernel's other blocks wrote it in the same launch)
        if (RESIDUAL) y[(size_t)m * N + n] = __ldcg(y + (size_t)m * N + n) + __fmul_rn(v, post);
        else y[(size_t)m * N + n] = v * post;
    }
}

// The whole GEMV as one launch: block b takes tile b.
template <int M, int R, class X, bool RESIDUAL>
__device__ __forceinline__ void kiln_gemv_cuda_core_body(const X xsrc,
        const u8* __restrict__ packed, const u8* __restrict__ scales,
        const float* __restrict__ tensor_scale, float* __restrict__ y, int N, int K, int ksplit) {
    kiln_gemv_cuda_core_tile<M, R, X, RESIDUAL, true>(xsrc, packed, scales, tensor_scale, y, N, K,
                                                      ksplit, blockIdx.x, true,
                                                      KilnRowsLinear<R>{}, KilnPdlWait{});
}
