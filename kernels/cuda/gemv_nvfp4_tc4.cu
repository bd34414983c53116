// gemv_nvfp4_tc4.cu — decode-time fused dequantize + GEMV, v4: the v2 kernel's loads and
// tensor-core MMA (gemv_nvfp4_tc2.cu), with E2M1 and E4M3 decoded by shared-memory lookup
// tables instead of bit arithmetic. y[m, n] = sum_k x[m, k] * W[n, k], M = 1..4, W in NVFP4
// [N, K] (K % 128 == 0).
//
// Why: the v2 kernel is issue-bound (Nsight Compute on the H100: ~4.3 instructions per
// weight, the time scales with the SM clock), and moving a nibble into a bf16 bit pattern
// takes ~4 integer instructions per pair of weights. Here a code byte (two weights) becomes its
// bf16x2 pair with one PRMT (which builds the table address: byte * 256 + lane * 4) and one
// LDS, and a scale byte its bf16x2 the same way; the product e2m1 * e4m3 (<= 6 significant
// bits, |v| <= 2688, >= 2^-10) is exact in bf16, so one HMUL2 per pair gives the scaled weights.
//
// Tables (first 64 KiB of dynamic shared memory, built by each block): row i (256 bytes) holds
// at word l (l = lane, 0..31) the bf16x2 (e2m1(i & 15), e2m1(i >> 4)) and at word 32 + l the
// bf16x2 (e4m3(i), e4m3(i)). Every lane reads its own column, so no bank conflicts.
//
// K order inside an MMA: lane (g, j) holds the 16 bytes at k = 128 s + 32 j of rows g and g + 8
// of its tile; k-tile t uses bytes 2t (A columns 2j, 2j + 1 = k + 4t, + 1) and 2t + 1 (columns
// 2j + 8, 2j + 9 = k + 4t + 2, + 3), so B's rows for lane j are x[k + 4t .. + 4] in order: x is
// staged as xs[s][t][j][2M] uint2 = (bf16x2(x[k+4t], x[k+4t+1]), bf16x2(x[k+4t+2], x[k+4t+3]))
// with column 2m = x row m's bf16 hi part and 2m + 1 its lo part (f32-level accuracy).
// Launch as the v2 kernel (gemv.rs): 256 threads, (8 / KSPLIT) row groups of T tiles x KSPLIT
// warps; dynamic shared memory 65536 + 4 M K + 512 M + 8 T 16 M 4 bytes (tc4_smem_bytes).

#define KILN_TC4_TABLE_BYTES 65536

// Build the two tables (all threads of the block): task (i, table) computes one value and
// writes it to the 32 lane columns of row i.
__device__ __forceinline__ void kiln_tc4_build_tables(u32* table) {
    for (int e = threadIdx.x; e < 512; e += blockDim.x) {
        const int i = e >> 1, second = e & 1;
        u32 v;
        if (!second) {
            const u32 lo = kiln_f32_to_bf16(kiln_e2m1_to_f32(i & 15));
            const u32 hi = kiln_f32_to_bf16(kiln_e2m1_to_f32(i >> 4));
            v = lo | (hi << 16);
        } else {
            const u32 sc = kiln_f32_to_bf16(kiln_e4m3_to_f32((u8)i));
            v = sc | (sc << 16);
        }
        uint4* dst = reinterpret_cast<uint4*>(table + i * 64 + second * 32);
#pragma unroll
        for (int q = 0; q < 8; q++) dst[q] = make_uint4(v, v, v, v);
    }
}

// Table address of byte k (0..3) of w for this lane: w.byte_k * 256 + lb (lb = lane * 4, or
// lane * 4 + 128 for the scale table).
__device__ __forceinline__ u32 kiln_tc4_addr(u32 w, u32 lb, int k) {
    return __byte_perm(w, lb, 0x5504 | (k << 4));
}

__device__ __forceinline__ u32 kiln_tc4_lds(const unsigned char* smem, u32 addr) {
    u32 v;
    asm("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"((u32)__cvta_generic_to_shared(smem) + addr));
    return v;
}

// Stage x f32 [M, K] as described in the header (all threads of the block).
template <int M>
__device__ __forceinline__ void kiln_tc4_stage_x(const float* __restrict__ x, uint2* xs, int K) {
    constexpr int C = 2 * M;
    const int nsup = K >> 7;
    const int total = M * nsup * 16;
    // item (m, s, j, t2): x[m][128 s + 32 j + 8 t2 .. + 8] -> k-tiles 2 t2, 2 t2 + 1; 4 items
    // per thread and pass, loads first (one L2 round trip per pass)
    for (int c0 = threadIdx.x; c0 < total; c0 += 4 * blockDim.x) {
        float4 f[4][2];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int c = c0 + u * blockDim.x;
            if (c < total) {
                const int m = c / (nsup * 16), r = c % (nsup * 16);
                const float4* xp = reinterpret_cast<const float4*>(x + (size_t)m * K + 8 * r);
                f[u][0] = __ldg(xp);
                f[u][1] = __ldg(xp + 1);
            }
        }
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int c = c0 + u * blockDim.x;
            if (c >= total) break;
            const int m = c / (nsup * 16), r = c % (nsup * 16);
            const int s = r >> 4, jj = (r >> 2) & 3, t2 = r & 3;
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const float e[4] = {f[u][h].x, f[u][h].y, f[u][h].z, f[u][h].w};
                const u32 hi01 = kiln_pack_bf16x2(e[0], e[1]), hi23 = kiln_pack_bf16x2(e[2], e[3]);
                const float r0 = e[0] - __uint_as_float(hi01 << 16), r1 = e[1] - __uint_as_float(hi01 & 0xFFFF0000u);
                const float r2 = e[2] - __uint_as_float(hi23 << 16), r3 = e[3] - __uint_as_float(hi23 & 0xFFFF0000u);
                uint2* dst = xs + ((size_t)(s * 8 + 2 * t2 + h) * 4 + jj) * C + 2 * m;
                dst[0] = make_uint2(hi01, hi23);
                dst[1] = make_uint2(kiln_pack_bf16x2(r0, r1), kiln_pack_bf16x2(r2, r3));
            }
        }
    }
}

template <int M, int T, int D>
__device__ __forceinline__ void kiln_gemv_tc4_body(const float* __restrict__ x,
        const u8* __restrict__ packed, const u8* __restrict__ scales,
        const float* __restrict__ tensor_scale, float* __restrict__ y, int N, int K, int ksplit) {
    extern __shared__ __align__(16) unsigned char kiln_tc4_smem[];
    constexpr int C = 2 * M;  // B columns in use
    const int nsup = K >> 7;
    uint2* xs = reinterpret_cast<uint2*>(kiln_tc4_smem + KILN_TC4_TABLE_BYTES);  // [nsup][8][4][C]
    uint2* zeros = xs + (size_t)nsup * 32 * C;                                   // [32 C]
    float* red = reinterpret_cast<float*>(zeros + 32 * C);                       // [8][T][16][M]
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, j = lane & 3;
    const int groups = 8 / ksplit;
    const int rg = warp / ksplit, kp = warp % ksplit;
    const int tile0 = (blockIdx.x * groups + rg) * T;
    const int per = (nsup + ksplit - 1) / ksplit;
    const int u_begin = min(nsup, kp * per), u_end = min(nsup, u_begin + per);
    const size_t rstride = (size_t)(K >> 5);  // uint4 (and u16 scale pairs) per row
    const uint4* wbase = reinterpret_cast<const uint4*>(packed);
    const u16* sbase = reinterpret_cast<const u16*>(scales);
    u32 roff[T][2];
#pragma unroll
    for (int tt = 0; tt < T; tt++)
#pragma unroll
        for (int h = 0; h < 2; h++)
            roff[tt][h] = (u32)min((tile0 + tt) * 16 + g + 8 * h, N - 1) * (u32)rstride + (u32)j;

    // the first D super-tiles' loads go out before the tables and x are built
    uint4 wb[D][T][2];
    u32 sb[D][T][2];
#pragma unroll
    for (int d = 0; d < D; d++) {
        const int U = u_begin + d;
#pragma unroll
        for (int tt = 0; tt < T; tt++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                if (U < u_end) {
                    wb[d][tt][h] = kiln_tc_ld_stream(wbase + roff[tt][h] + (size_t)U * 4);
                    sb[d][tt][h] = __ldg(sbase + roff[tt][h] + (size_t)U * 4);
                } else {
                    wb[d][tt][h] = make_uint4(0, 0, 0, 0);
                    sb[d][tt][h] = 0;
                }
            }
    }

    kiln_tc4_build_tables(reinterpret_cast<u32*>(kiln_tc4_smem));
    kiln_tc4_stage_x<M>(x, xs, K);
    for (int c = threadIdx.x; c < 32 * C; c += blockDim.x) zeros[c] = make_uint2(0u, 0u);
    __syncthreads();

    float acc[T][4];
#pragma unroll
    for (int tt = 0; tt < T; tt++)
#pragma unroll
        for (int q = 0; q < 4; q++) acc[tt][q] = 0.0f;
    // lanes whose B column is unused read zeros (same offsets, no per-step select)
    const uint2* xl = g < C ? xs + j * C + g : zeros;
    const size_t xstep = g < C ? (size_t)32 * C : 0;
    const u32 lb = (u32)lane * 4u, lbs = lb + 128u;

    for (int U0 = u_begin; U0 < u_end; U0 += D) {
#pragma unroll
        for (int d = 0; d < D; d++) {
            const int U = U0 + d;
            if (U < u_end) {
                uint4 w[T][2];
                u32 sw[T][2];
#pragma unroll
                for (int tt = 0; tt < T; tt++)
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        w[tt][h] = wb[d][tt][h];
                        sw[tt][h] = sb[d][tt][h];
                    }
                if (U + D < u_end) {
#pragma unroll
                    for (int tt = 0; tt < T; tt++)
#pragma unroll
                        for (int h = 0; h < 2; h++) {
                            wb[d][tt][h] = kiln_tc_ld_stream(wbase + roff[tt][h] + (size_t)(U + D) * 4);
                            sb[d][tt][h] = __ldg(sbase + roff[tt][h] + (size_t)(U + D) * 4);
                        }
                }
                u32 sc[T][2][2];
#pragma unroll
                for (int tt = 0; tt < T; tt++)
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        sc[tt][h][0] = kiln_tc4_lds(kiln_tc4_smem, kiln_tc4_addr(sw[tt][h], lbs, 0));
                        sc[tt][h][1] = kiln_tc4_lds(kiln_tc4_smem, kiln_tc4_addr(sw[tt][h], lbs, 1));
                    }
                const uint2* xt = xl + (size_t)U * xstep;
#pragma unroll
                for (int t = 0; t < 8; t++) {
                    const uint2 bv = xt[t * 4 * C];
                    const int wi = t >> 1, blk = t >> 2, b0 = 2 * (t & 1);
#pragma unroll
                    for (int tt = 0; tt < T; tt++) {
                        const uint4 wa = w[tt][0], wc = w[tt][1];
                        const u32 q0 = wi == 0 ? wa.x : wi == 1 ? wa.y : wi == 2 ? wa.z : wa.w;
                        const u32 q1 = wi == 0 ? wc.x : wi == 1 ? wc.y : wi == 2 ? wc.z : wc.w;
                        const u32 a0 = kiln_bf16x2_mul(kiln_tc4_lds(kiln_tc4_smem, kiln_tc4_addr(q0, lb, b0)), sc[tt][0][blk]);
                        const u32 a2 = kiln_bf16x2_mul(kiln_tc4_lds(kiln_tc4_smem, kiln_tc4_addr(q0, lb, b0 + 1)), sc[tt][0][blk]);
                        const u32 a1 = kiln_bf16x2_mul(kiln_tc4_lds(kiln_tc4_smem, kiln_tc4_addr(q1, lb, b0)), sc[tt][1][blk]);
                        const u32 a3 = kiln_bf16x2_mul(kiln_tc4_lds(kiln_tc4_smem, kiln_tc4_addr(q1, lb, b0 + 1)), sc[tt][1][blk]);
                        kiln_mma_bf16(acc[tt], a0, a1, a2, a3, bv.x, bv.y);
                    }
                }
            }
        }
    }
    // D fragment: acc[0..1] = (row g, columns 2j, 2j+1) = x row j hi and lo parts; acc[2..3]
    // the same for row g + 8. Lanes with j < M hold results.
    if (j < M) {
#pragma unroll
        for (int tt = 0; tt < T; tt++) {
            float* rw = red + ((size_t)warp * T + tt) * 16 * M;
            rw[g * M + j] = acc[tt][0] + acc[tt][1];
            rw[(g + 8) * M + j] = acc[tt][2] + acc[tt][3];
        }
    }
    __syncthreads();
    const float post = __ldg(tensor_scale);
    for (int i = threadIdx.x; i < groups * T * 16 * M; i += blockDim.x) {
        const int gg = i / (T * 16 * M), tt = (i / (16 * M)) % T, row = (i / M) % 16, m = i % M;
        const int n = ((blockIdx.x * groups + gg) * T + tt) * 16 + row;
        float v = 0.0f;
        for (int k = 0; k < ksplit; k++)
            v += red[(((size_t)(gg * ksplit + k)) * T + tt) * 16 * M + row * M + m];
        if (n < N) y[(size_t)m * N + n] = v * post;
    }
}

#define KILN_GEMV_TC4(MM, TT, DD, MINB)                                                         \
    extern "C" __global__ void __launch_bounds__(256, MINB)                                     \
            kiln_gemv_nvfp4_tc4_m##MM##_t##TT##_d##DD(                                          \
            const float* __restrict__ x, const u8* __restrict__ packed,                         \
            const u8* __restrict__ scales, const float* __restrict__ tensor_scale,              \
            float* __restrict__ y, int N, int K, int ksplit) {                                  \
        kiln_gemv_tc4_body<MM, TT, DD>(x, packed, scales, tensor_scale, y, N, K, ksplit);       \
    }

// (M, tiles T, depth D in super-tiles, min blocks per SM): keep in sync with TC4_KERNELS in
// gemv_tc4.rs.
KILN_GEMV_TC4(1, 1, 4, 2)
KILN_GEMV_TC4(1, 2, 3, 2)
KILN_GEMV_TC4(1, 2, 2, 2)
KILN_GEMV_TC4(1, 4, 1, 2)
KILN_GEMV_TC4(2, 2, 3, 1)
KILN_GEMV_TC4(4, 2, 3, 1)
KILN_GEMV_TC4(4, 1, 4, 1)
