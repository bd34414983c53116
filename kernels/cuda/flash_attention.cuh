// flash_attention.cuh — causal attention on the tensor cores, flash-attention style (FA2):
// scores never leave the registers, so no [heads][T][keys] buffer is written or read, and the
// softmax runs online over tiles of 64 keys. Shared by the prompt path (attention_prefill.cu:
// one sequence over the KV cache, f32 out) and the train step (attention_train.cu: a batch of
// sequences, bf16 out and each row's log-sum-exp for the backward); also the bf16 mma /
// ldmatrix / cp.async helpers the train backward uses.
//
// One block of 128 threads owns 64 query rows of one head (warp w: rows 16w .. 16w+15); the
// grid's row blocks are taken last first (the last rows see the most keys), so the short ones
// fill the tail. Tiles of 64 keys of K and V are staged in dynamic shared memory by cp.async,
// two stages deep (the next tile loads while this one is used; rows padded to HD + 8 bf16, so
// ldmatrix's eight 16-byte rows fall in distinct banks): KILN_FA_SMEM(HD) bytes. Each warp
// computes S = Q·Kᵀ with mma.m16n8k16 (bf16 in, f32 accumulate), masks, updates its rows'
// running max and sum, rounds P to bf16 and accumulates O += P·V (V fragments by
// ldmatrix.trans). exp2 with log2(e)/sqrt(HD) folded into the scale. A warp skips the tiles
// its rows cannot see. Query t sees keys 0 ..= pos + t.

#define KILN_FA_ROWS 64
#define KILN_FA_KEYS 64
#define KILN_FA_NEG_INF __int_as_float(0xff800000)
// dynamic shared memory of the HD kernel: 2 stages × (K, V) × 64 rows × (HD + 8) bf16
#define KILN_FA_SMEM(HD) (2 * 2 * KILN_FA_KEYS * ((HD) + 8) * 2)

__device__ __forceinline__ void kiln_cp_async16(u16* dst, const u16* src) {
    const u32 a = (u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(a), "l"(src));
}
__device__ __forceinline__ void kiln_cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void kiln_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" :: "n"(N));
}

__device__ __forceinline__ void kiln_mma_bf16_16816(float c[4], const u32 a[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void kiln_ldmatrix_x4(u32 r[4], const u16* p) {
    const u32 a = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

__device__ __forceinline__ void kiln_ldmatrix_x4_trans(u32 r[4], const u16* p) {
    const u32 a = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

// Two f32 as bf16x2 (lo in the low half), round to nearest even.
__device__ __forceinline__ u32 kiln_pack_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// An output pair: two f32, or two bf16 (round to nearest even) in one 32-bit store.
__device__ __forceinline__ void kiln_fa_store2(float* p, float a, float b) {
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
__device__ __forceinline__ void kiln_fa_store2(u16* p, float a, float b) {
    *reinterpret_cast<u32*>(p) = kiln_pack_bf16x2(a, b);
}

// Where one sequence's queries, keys and output live: query t of head h at
// q[t·q_row + h·q_head], key / value j of KV head g at k[g·kv_head + j·HD], output at
// out[t·out_row + h·out_head]; lse (or null) gets each query row's log-sum-exp in the scaled
// log2 domain (max + log2(sum)) at lse[h·T + t].
struct KilnFlashLayout {
    long q_row, q_head, kv_head, out_row, out_head;
};

// Block (h = blockIdx.x, row block blockIdx.y) of the causal flash attention over one sequence.
template <int HD, typename OutT>
__device__ __forceinline__ void kiln_flash_fwd(const u16* __restrict__ q,
                                               const u16* __restrict__ k_cache,
                                               const u16* __restrict__ v_cache,
                                               OutT* __restrict__ out, float* __restrict__ lse,
                                               KilnFlashLayout lay, int T, int nh, int kvh,
                                               int pos, float scale_log2) {
    static_assert(HD % 32 == 0 && HD <= 128, "head_dim a multiple of 32, at most 128");
    constexpr int S = HD + 8;   // shared row stride (bf16)
    constexpr int KS = HD / 16; // k-steps of Q·Kᵀ
    constexpr int NT = HD / 8;  // n-tiles of O
    extern __shared__ __align__(16) u16 kiln_fa_smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int h = blockIdx.x, g = h / (nh / kvh);
    const int t0 = (gridDim.y - 1 - blockIdx.y) * KILN_FA_ROWS;
    const int wr = t0 + warp * 16;
    const int r_lo = wr + (lane >> 2), r_hi = r_lo + 8;
    const int warp_last = min(T - 1, wr + 15);

    // this warp's 16 query rows as A fragments, all HD columns
    u32 qa[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; kk++) {
        const int c = kk * 16 + (lane & 3) * 2;
        const u32* lo = reinterpret_cast<const u32*>(q + r_lo * lay.q_row + h * lay.q_head + c);
        const u32* hi = reinterpret_cast<const u32*>(q + r_hi * lay.q_row + h * lay.q_head + c);
        qa[kk][0] = r_lo < T ? lo[0] : 0u;
        qa[kk][1] = r_hi < T ? hi[0] : 0u;
        qa[kk][2] = r_lo < T ? lo[4] : 0u;
        qa[kk][3] = r_hi < T ? hi[4] : 0u;
    }
    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m_lo = KILN_FA_NEG_INF, m_hi = KILN_FA_NEG_INF, l_lo = 0.0f, l_hi = 0.0f;

    const int nkeys = pos + min(T, t0 + KILN_FA_ROWS);  // keys any row of the block sees
    const u16* kb = k_cache + g * lay.kv_head;
    const u16* vb = v_cache + g * lay.kv_head;
    // stage st: K at kiln_fa_smem + st·2·64·S, V right after it
    auto load_tile = [&](int k0, int st) {
        u16* ks = kiln_fa_smem + st * 2 * KILN_FA_KEYS * S;
        u16* vs = ks + KILN_FA_KEYS * S;
        for (int i = threadIdx.x; i < KILN_FA_KEYS * HD / 8; i += blockDim.x) {
            const int r = i / (HD / 8), c = (i % (HD / 8)) * 8;
            if (k0 + r < nkeys) {
                kiln_cp_async16(ks + r * S + c, kb + (size_t)(k0 + r) * HD + c);
                kiln_cp_async16(vs + r * S + c, vb + (size_t)(k0 + r) * HD + c);
            } else {
                *reinterpret_cast<uint4*>(ks + r * S + c) = make_uint4(0u, 0u, 0u, 0u);
                *reinterpret_cast<uint4*>(vs + r * S + c) = make_uint4(0u, 0u, 0u, 0u);
            }
        }
        kiln_cp_async_commit();
    };
    load_tile(0, 0);
    for (int k0 = 0, st = 0; k0 < nkeys; k0 += KILN_FA_KEYS, st ^= 1) {
        // the next tile goes into the other stage, which every warp finished reading in the
        // previous iteration (the barrier at its end)
        if (k0 + KILN_FA_KEYS < nkeys) {
            load_tile(k0 + KILN_FA_KEYS, st ^ 1);
            kiln_cp_async_wait<1>();
        } else {
            kiln_cp_async_wait<0>();
        }
        __syncthreads();  // this tile's copies (every thread's) are visible
        const u16* ks = kiln_fa_smem + st * 2 * KILN_FA_KEYS * S;
        const u16* vs = ks + KILN_FA_KEYS * S;
        if (wr < T && k0 <= pos + warp_last) {  // else no row of this warp sees the tile
            float s[KILN_FA_KEYS / 8][4];
            const int mi = lane >> 3;
#pragma unroll
            for (int j = 0; j < KILN_FA_KEYS / 8; j++) {
                s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < KS; kk += 2) {
                    u32 b[4];
                    kiln_ldmatrix_x4(b, ks + (j * 8 + (lane & 7)) * S + (kk + (mi >> 1)) * 16 + (mi & 1) * 8);
                    kiln_mma_bf16_16816(s[j], qa[kk], b[0], b[1]);
                    kiln_mma_bf16_16816(s[j], qa[kk + 1], b[2], b[3]);
                }
            }
            // mask, scale, the rows' new maxima (over the 4 lanes of a row)
            float mx_lo = m_lo, mx_hi = m_hi;
#pragma unroll
            for (int j = 0; j < KILN_FA_KEYS / 8; j++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int key = k0 + j * 8 + (lane & 3) * 2 + e;
                    const float a = key <= pos + r_lo ? s[j][e] * scale_log2 : KILN_FA_NEG_INF;
                    const float b = key <= pos + r_hi ? s[j][2 + e] * scale_log2 : KILN_FA_NEG_INF;
                    s[j][e] = a;
                    s[j][2 + e] = b;
                    mx_lo = fmaxf(mx_lo, a);
                    mx_hi = fmaxf(mx_hi, b);
                }
            }
#pragma unroll
            for (int d = 1; d < 4; d <<= 1) {
                mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xFFFFFFFFu, mx_lo, d));
                mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xFFFFFFFFu, mx_hi, d));
            }
            // rows past T (or not yet reached) stay at -inf: keep their arithmetic finite
            const float base_lo = mx_lo == KILN_FA_NEG_INF ? 0.0f : mx_lo;
            const float base_hi = mx_hi == KILN_FA_NEG_INF ? 0.0f : mx_hi;
            const float al_lo = exp2f(m_lo - base_lo), al_hi = exp2f(m_hi - base_hi);
            m_lo = mx_lo;
            m_hi = mx_hi;
            u32 pa[KILN_FA_KEYS / 16][4];
            float sum_lo = 0.0f, sum_hi = 0.0f;
#pragma unroll
            for (int j = 0; j < KILN_FA_KEYS / 8; j++) {
                const float p0 = exp2f(s[j][0] - base_lo), p1 = exp2f(s[j][1] - base_lo);
                const float p2 = exp2f(s[j][2] - base_hi), p3 = exp2f(s[j][3] - base_hi);
                sum_lo += p0 + p1;
                sum_hi += p2 + p3;
                pa[j >> 1][(j & 1) * 2] = kiln_pack_bf16x2(p0, p1);
                pa[j >> 1][(j & 1) * 2 + 1] = kiln_pack_bf16x2(p2, p3);
            }
            l_lo = l_lo * al_lo + sum_lo;
            l_hi = l_hi * al_hi + sum_hi;
#pragma unroll
            for (int n = 0; n < NT; n++) {
                o[n][0] *= al_lo;
                o[n][1] *= al_lo;
                o[n][2] *= al_hi;
                o[n][3] *= al_hi;
            }
#pragma unroll
            for (int kk = 0; kk < KILN_FA_KEYS / 16; kk++) {
#pragma unroll
                for (int n = 0; n < NT; n += 2) {
                    u32 b[4];
                    kiln_ldmatrix_x4_trans(b, vs + (kk * 16 + (mi & 1) * 8 + (lane & 7)) * S + n * 8 + (mi >> 1) * 8);
                    kiln_mma_bf16_16816(o[n], pa[kk], b[0], b[1]);
                    kiln_mma_bf16_16816(o[n + 1], pa[kk], b[2], b[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with this stage before it is refilled
    }
#pragma unroll
    for (int d = 1; d < 4; d <<= 1) {
        l_lo += __shfl_xor_sync(0xFFFFFFFFu, l_lo, d);
        l_hi += __shfl_xor_sync(0xFFFFFFFFu, l_hi, d);
    }
    const float inv_lo = 1.0f / l_lo, inv_hi = 1.0f / l_hi;
#pragma unroll
    for (int n = 0; n < NT; n++) {
        const int c = n * 8 + (lane & 3) * 2;
        if (r_lo < T)
            kiln_fa_store2(out + r_lo * lay.out_row + h * lay.out_head + c, o[n][0] * inv_lo,
                           o[n][1] * inv_lo);
        if (r_hi < T)
            kiln_fa_store2(out + r_hi * lay.out_row + h * lay.out_head + c, o[n][2] * inv_hi,
                           o[n][3] * inv_hi);
    }
    if (lse != nullptr && (lane & 3) == 0) {
        if (r_lo < T) lse[(long)h * T + r_lo] = m_lo + log2f(l_lo);
        if (r_hi < T) lse[(long)h * T + r_hi] = m_hi + log2f(l_hi);
    }
}

