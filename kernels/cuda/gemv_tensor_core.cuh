// gemv_tensor_core.cuh — the tensor-core GEMV's shared step, included by the tensor-core GEMV
// kernel files (compile.rs expands the #include; nvfp4_common.cuh comes first).
//
// Hopper has no FP4 MMA: each lane decodes E2M1 in software into bf16 pairs (the sign and
// the three magnitude bits of a nibble moved into a bf16 bit pattern give value * 2^-126
// exactly), multiplies them by its block's E4M3 scale * 2^117 (exact: the product has at most
// 5 significant bits) and feeds mma.sync.m16n8k16 (bf16 in, f32 accumulate); x goes in as
// bf16 hi + lo parts, so the result keeps f32-level accuracy.
//
// Here: the decode and MMA primitives (every tensor-core GEMV), the staging of x into shared
// memory, the weight stream, the super-tile step, the main loop and the per-lane row sums (the
// kernels of gemv_tensor_core.cu and gemv_tensor_core_split_k.cu — "v2" and "v5" in
// BENCHMARKS.md —, which differ only in how K is split and how the partial sums meet).

// Two f32 -> bf16x2 (round to nearest even), lo in the low half.
__device__ __forceinline__ u32 kiln_pack_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// The top nibble of each 16-bit half of q as a bf16 pair: e2m1 value * 2^-126.
__device__ __forceinline__ u32 kiln_e2m1_pair_bf16(u32 q) {
    return (q & 0x80008000u) | ((q >> 6) & 0x01C001C0u);
}

// a * b exactly (both halves), via fma with -0.
__device__ __forceinline__ u32 kiln_bf16x2_mul(u32 a, u32 b) {
    u32 r;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(0x80008000u));
    return r;
}

// E4M3 byte -> bf16x2 (both halves) holding scale * 2^117, sign included (exact: <= 4
// significant bits; subnormal scales become normal bf16).
__device__ __forceinline__ u32 kiln_scale_bf16x2(u32 b) {
    float s = __fmul_rn(kiln_f16bits_to_f32((b & 0x7Fu) << 7), 4.2535295865117308e37f);  // *2^8*2^117
    u32 h = (__float_as_uint(s) >> 16) | ((b & 0x80u) << 8);
    return h | (h << 16);
}

__device__ __forceinline__ void kiln_mma_bf16(float c[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Stage x f32 [M, K] (rows row_stride apart) into shared memory for the tensor-core
// GEMVs (gemv_tensor_core.cu, gemv_tensor_core_split_k.cu), all threads of the block taking part: xs[s][t][j][2M] uint2 = B fragment (b0, b1) of k-tile t of super-tile s
// for lane j, column 2m = x row m's bf16 hi part, 2m + 1 its lo part. Item (m, s, jj, t2) is
// the 8 elements 8 t2 .. +8 of lane jj's 32-element chunk of super-tile s (k0 = 128 s + 32 jj)
// -> k-tiles 2 t2 and 2 t2 + 1, in the order the nibble decode produces pairs.
template <int M>
__device__ __forceinline__ void kiln_tc_stage_x(const float* __restrict__ x, uint2* xs, int K,
                                                int row_stride) {
    constexpr int C = 2 * M;
    const int nsup = K >> 7, total = M * nsup * 16;
    // 4 items per thread and pass, all loads issued before any is used (x comes from L2 while
    // the weight stream fills the memory queues: one round trip per pass, not per item)
    for (int c0 = threadIdx.x; c0 < total; c0 += 4 * blockDim.x) {
        float4 f[4][2];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int c = c0 + u * blockDim.x;
            if (c < total) {
                const int m = c / (nsup * 16), r = c % (nsup * 16);
                const int s = r >> 4, jj = (r >> 2) & 3, t2 = r & 3;
                const int k0 = 128 * s + 32 * jj;
                const float4* xp = reinterpret_cast<const float4*>(x + (size_t)m * row_stride + k0 + 8 * t2);
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
            const float v[8] = {f[u][0].x, f[u][0].y, f[u][0].z, f[u][0].w,
                                f[u][1].x, f[u][1].y, f[u][1].z, f[u][1].w};
#pragma unroll
            for (int odd = 0; odd < 2; odd++) {
                const int p0 = odd ? 1 : 3;  // pair 0 = elements (p0, p0 + 4), pair 1 = (p0 - 1, p0 + 3)
                const float e[4] = {v[p0], v[p0 + 4], v[p0 - 1], v[p0 + 3]};
                const u32 hi01 = kiln_pack_bf16x2(e[0], e[1]), hi23 = kiln_pack_bf16x2(e[2], e[3]);
                const float r0 = e[0] - __uint_as_float(hi01 << 16), r1 = e[1] - __uint_as_float(hi01 & 0xFFFF0000u);
                const float r2 = e[2] - __uint_as_float(hi23 << 16), r3 = e[3] - __uint_as_float(hi23 & 0xFFFF0000u);
                const int t = 2 * t2 + odd;
                uint2* dst = xs + ((size_t)(s * 8 + t) * 4 + jj) * C + 2 * m;
                dst[0] = make_uint2(hi01, hi23);
                dst[1] = make_uint2(kiln_pack_bf16x2(r0, r1), kiln_pack_bf16x2(r2, r3));
            }
        }
    }
}

// ---- The v2 / v5 weight stream, super-tile step and main loop ----
// A warp owns T 16-row tiles; lane (g, j) reads, for tile tt and half h, the 16 bytes at
// k = 128 U + 32 j of row 16 (tile0 + tt) + g + 8 h (clamped to N - 1) and that row's scale pair
// for the same 32 k, for each super-tile U.

// Per (tile, half): the row's first uint4 of W for this lane, also its first u16 scale pair
// (both arrays have K / 32 entries per row); super-tile U's are at + 4 U.
template <int T>
__device__ __forceinline__ void kiln_tc_row_offsets(u32 (&roff)[T][2], int tile0, int g, int j,
                                                    int N, int K) {
    const u32 rstride = (u32)(K >> 5);
#pragma unroll
    for (int tt = 0; tt < T; tt++)
#pragma unroll
        for (int h = 0; h < 2; h++)
            roff[tt][h] = (u32)min((tile0 + tt) * 16 + g + 8 * h, N - 1) * rstride + (u32)j;
}

// Super-tile U's weights and scale pairs for every (tile, half), or zeros when !valid.
template <int T>
__device__ __forceinline__ void kiln_tc_load_supertile(uint4 (&w)[T][2], u32 (&s)[T][2],
        const uint4* __restrict__ wbase, const u16* __restrict__ sbase, const u32 (&roff)[T][2],
        int U, bool valid) {
#pragma unroll
    for (int tt = 0; tt < T; tt++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            if (valid) {
                w[tt][h] = kiln_ld_stream(wbase + roff[tt][h] + (size_t)U * 4);
                s[tt][h] = __ldg(sbase + roff[tt][h] + (size_t)U * 4);
            } else {
                w[tt][h] = make_uint4(0, 0, 0, 0);
                s[tt][h] = 0;
            }
        }
}

// Decode one super-tile (w, s) and run its 8 k-steps: one mma.m16n8k16 per tile and step, B
// from xt (this lane's column of the staged x, kiln_tc_stage_x order). With TWO (M = 5..8:
// C = 2M > 8 columns) the same decoded A also feeds a second MMA per tile and step, B columns
// 8..15 (x rows 4..7) from xt2 into acc2. PROBE bit 1 (benchmark diagnostics only) replaces
// the MMA by folding the decoded words into acc.
template <int M, int T, int PROBE, bool TWO>
__device__ __forceinline__ void kiln_tc_supertile_mma_n(float (&acc)[T][4], float (&acc2)[T][4],
        const uint4 (&w)[T][2], const u32 (&s)[T][2], const uint2* xt, const uint2* xt2) {
    constexpr int C = 2 * M;
    u32 sc[T][2][2];
#pragma unroll
    for (int tt = 0; tt < T; tt++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            sc[tt][h][0] = kiln_scale_bf16x2(s[tt][h] & 0xFFu);
            sc[tt][h][1] = kiln_scale_bf16x2((s[tt][h] >> 8) & 0xFFu);
        }
#pragma unroll
    for (int t = 0; t < 8; t++) {
        const uint2 bv = xt[t * 4 * C];
        const uint2 bv2 = TWO ? xt2[t * 4 * C] : bv;
        const int wi = t >> 1, blk = t >> 2, sh = 8 * (t & 1);
#pragma unroll
        for (int tt = 0; tt < T; tt++) {
            const uint4 wa = w[tt][0], wc = w[tt][1];
            const u32 q0 = (wi == 0 ? wa.x : wi == 1 ? wa.y : wi == 2 ? wa.z : wa.w) << sh;
            const u32 q1 = (wi == 0 ? wc.x : wi == 1 ? wc.y : wi == 2 ? wc.z : wc.w) << sh;
            const u32 a0 = kiln_bf16x2_mul(kiln_e2m1_pair_bf16(q0), sc[tt][0][blk]);
            const u32 a2 = kiln_bf16x2_mul(kiln_e2m1_pair_bf16(q0 << 4), sc[tt][0][blk]);
            const u32 a1 = kiln_bf16x2_mul(kiln_e2m1_pair_bf16(q1), sc[tt][1][blk]);
            const u32 a3 = kiln_bf16x2_mul(kiln_e2m1_pair_bf16(q1 << 4), sc[tt][1][blk]);
            if (PROBE & 2) {
                acc[tt][0] = __uint_as_float(__float_as_uint(acc[tt][0]) ^ q0 ^ q1 ^ bv.x ^ sc[tt][0][blk]);
            } else {
                kiln_mma_bf16(acc[tt], a0, a1, a2, a3, bv.x, bv.y);
                if (TWO) kiln_mma_bf16(acc2[tt], a0, a1, a2, a3, bv2.x, bv2.y);
            }
        }
    }
}

// The first D super-tiles' loads of a warp's K range [u_begin, u_end) (zeros past its end):
// they go out before x is staged.
template <int T, int D>
__device__ __forceinline__ void kiln_tc_load_first(uint4 (&wb)[D][T][2], u32 (&sb)[D][T][2],
        const uint4* wbase, const u16* sbase, const u32 (&roff)[T][2],
        int u_begin, int u_end) {
#pragma unroll
    for (int d = 0; d < D; d++)
        kiln_tc_load_supertile<T>(wb[d], sb[d], wbase, sbase, roff, u_begin + d, u_begin + d < u_end);
}

// The main loop: super-tiles U = u_begin .. u_end of this warp's T tiles, D super-tiles of
// loads in flight per tile (the ring wb/sb, filled by kiln_tc_load_first), each decoded and
// multiplied by kiln_tc_supertile_mma_n into acc (x rows 0..3) and, for M = 5..8, acc2 (x rows
// 4..7); both are zeroed here. x is staged (kiln_tc_stage_x) in xs from super-tile x_first on
// (0: all of K; the split-K kernel: its slice's first super-tile); zeros holds 32 * 2M zero
// uint2, the B fragment of lanes whose column (g, g + 8) is past the 2M in use. LATE: the next
// loads go out after a super-tile is decoded, straight into the registers just consumed (no
// ring copies; one super-tile less in flight); otherwise before. PROBE: as in
// kiln_tc_supertile_mma_n (benchmark diagnostics; 0 in every GEMV).
template <int M, int T, int D, int LATE, int PROBE>
__device__ __forceinline__ void kiln_tc_main_loop(float (&acc)[T][4], float (&acc2)[T][4],
        uint4 (&wb)[D][T][2], u32 (&sb)[D][T][2], const uint4* wbase, const u16* sbase,
        const u32 (&roff)[T][2], int u_begin, int u_end,
        const uint2* xs, const uint2* zeros, int x_first, int g, int j) {
    constexpr int C = 2 * M;      // B columns in use
    constexpr bool TWO = C > 8;  // M = 5..8: a second MMA per step for x rows 4..7
#pragma unroll
    for (int tt = 0; tt < T; tt++)
#pragma unroll
        for (int q = 0; q < 4; q++) acc[tt][q] = acc2[tt][q] = 0.0f;
    // lanes whose B column is unused read zeros (same offsets, no per-step select)
    const uint2* xl = g < C ? xs + j * C + g : zeros;
    const size_t xstep = g < C ? (size_t)32 * C : 0;
    const uint2* xl2 = g + 8 < C ? xs + j * C + 8 + g : zeros;
    const size_t xstep2 = g + 8 < C ? (size_t)32 * C : 0;

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
                if (!LATE && U + D < u_end)
                    kiln_tc_load_supertile<T>(wb[d], sb[d], wbase, sbase, roff, U + D, true);
                kiln_tc_supertile_mma_n<M, T, PROBE, TWO>(acc, acc2, w, sw,
                                                          xl + (size_t)(U - x_first) * xstep,
                                                          xl2 + (size_t)(U - x_first) * xstep2);
                if (LATE && U + D < u_end)
                    kiln_tc_load_supertile<T>(wb[d], sb[d], wbase, sbase, roff, U + D, true);
            }
        }
    }
}

// The row sums a lane holds after kiln_tc_supertile_mma_n: D fragment acc[0..1] = (row g,
// columns 2j, 2j + 1) = x row j's hi and lo parts, acc[2..3] the same for row g + 8; acc2 the
// same for x row 4 + j (R = 2, M = 5..8). v[r][tt] = (row g, row g + 8) of x row 4 r + j.
template <int T, int R>
__device__ __forceinline__ void kiln_tc_row_sums(const float (&acc)[T][4], const float (&acc2)[T][4],
                                                 float (&v)[R][T][2]) {
#pragma unroll
    for (int r = 0; r < R; r++) {
        const float(&a)[T][4] = r == 0 ? acc : acc2;
#pragma unroll
        for (int tt = 0; tt < T; tt++) {
            v[r][tt][0] = a[tt][0] + a[tt][1];
            v[r][tt][1] = a[tt][2] + a[tt][3];
        }
    }
}
