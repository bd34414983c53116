// decode_persistent.cu — a whole decode step's decoder layers as one persistent kernel
// (kiln_decode_persistent_hd{HD}_rep{REP}; launcher in src/cuda/decode_persistent.rs).
//
// The separate kernels of a decode step (decode.cu, gemv_cuda_core.cu) are ~10 launches a layer;
// on a small model each costs a few µs of launch and drain however little it computes, and the
// step is launch-bound (Qwen2.5-0.5B shape: 97 GEMVs of ~4 µs). Here every block of one
// co-resident grid (a cooperative launch: at most as many blocks as fit at once) runs every
// stage, and the stages are separated by a grid barrier (a counter in global memory) instead of
// a kernel boundary. Per layer:
//   A  RMSNorm → q/k/v GEMV        (every block normalises x into shared memory itself)
//   B  q/k/v epilogue + attention  (items (kv head, split); the split that holds the new
//                                   position also writes its k and v to the cache)
//   C  the splits' combine         (attn; or, up to 32 splits, every block of stage D combines
//                                   them into its x itself: one barrier fewer)
//   D  o GEMV, residual added to x
//   E  RMSNorm → gate/up GEMV, SwiGLU (a tile takes gate rows and the matching up rows, so the
//                                   block that computed them applies SwiGLU: act)
//   F  down GEMV, residual added to x
// then the final RMSNorm into h (the vocabulary GEMV and the pick are the next launches).
// Before the barrier that opens a GEMV stage, each block issues its first weight loads (weights
// never depend on the step), as a chained launch does before griddepcontrol.wait; and each
// layer starts by asking the L2 for the next layer's weights.
//
// The same bits as the separate kernels: the GEMV is the CUDA-core GEMV's tile
// (gemv_cuda_core.cuh) with the separate path's K split; the norms, the epilogue, attention and
// the combine use the same per-element functions and reduction orders (decode_ops.cuh,
// gemv_x.cuh). Activations written in the launch are read through L2 (__ldcg).
//
// Block 256 threads; dynamic shared memory max(H, nh·hd (+ nh·splits when stage D combines), I,
// (2·REP + 2)·HD) floats.

#include "block_reduce.cuh"
#include "decode_ops.cuh"
#include "gemv_cuda_core.cuh"
#include "gemv_x.cuh"

// One decoder layer's weights (device addresses; null where the model has none).
struct KilnPLayer {
    const float* in_norm;
    const u8* qkv_w;
    const u8* qkv_s;
    const float* qkv_ts;
    const float* qkv_scale;  // q, k, v tensor scales
    const float* qkv_bias;
    const float* q_norm;
    const float* k_norm;
    const u8* o_w;
    const u8* o_s;
    const float* o_ts;
    const float* post_norm;
    const u8* gu_w;
    const u8* gu_s;
    const float* gu_ts;
    const float* gu_scale;  // gate, up tensor scales
    const u8* dn_w;
    const u8* dn_s;
    const float* dn_ts;
};

// Everything else a step reads and writes (DecodePersistentArgs in decode_persistent.rs: keep
// the order).
struct KilnPArgs {
    const KilnPLayer* layers;
    const u32* token;
    const int* pos;
    const u16* embed;
    const float* final_norm;
    const float* inv_freq;
    float* x;
    float* qkv;
    float* attn;
    float* gu;
    float* act;
    float* h;
    float* part_o;
    float* part_ml;
    u16* kc;
    u16* vc;
    u32* bar;    // the grid barrier's counter and flag (KilnGridBarrier), zero at launch
    u64* trace;  // null, or the barriers' timestamps (KilnGridBarrier)
    int n_layers, H, I, nh, kvh, cap, chunk, splits;
    int ks_qkv, ks_o, ks_gu, ks_down;
    int fold_combine;  // the o stage combines the splits itself (no stage C)
    int prefetch;      // each layer asks the L2 for the next layer's weights
    int barrier_kind;  // KilnGridBarrier's kind
    float eps, softmax_scale;
};
static_assert(sizeof(KilnPArgs) == 216, "KilnPArgs layout (decode_persistent.rs)");
static_assert(sizeof(KilnPLayer) == 152, "KilnPLayer layout (decode_persistent.rs)");

__device__ __forceinline__ u64 kiln_globaltimer() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// The grid barrier: every block arrives, then waits until all gridDim.x blocks have arrived
// `target / gridDim.x` times in all; the block's writes before it are visible to every block
// after it. bar[0] counts arrivals, bar[32] (its own 128-byte line) is kind 2's release flag;
// both zero at launch. Kinds (KILN_PERSISTENT=barrier=K; the probe kernel times each):
//   0  __threadfence, atomicAdd, poll the counter (ld.acquire), __threadfence
//   1  red.release.gpu on the counter, poll it with ld.acquire (no sequentially consistent fences)
//   2  atom.acq_rel.gpu on the counter; the last block to arrive stores the target to the flag
//      (st.release), the others poll the flag, so the pollers do not slow the arrivals' atomics
// With `trace`, thread 0 of each block writes the global timer (ns) at its arrival and at its
// release: trace[8 + 2·(barrier·gridDim + block)] and the next word.
struct KilnGridBarrier {
    u32* bar;
    u64* trace;
    int kind;
    __device__ __forceinline__ void operator()(u32 target) const {
        __syncthreads();
        if (threadIdx.x == 0) {
            const size_t slot = 8 + 2 * ((size_t)(target / gridDim.x - 1) * gridDim.x + blockIdx.x);
            if (trace) trace[slot] = kiln_globaltimer();
            u32 v;
            if (kind == 0) {
                __threadfence();
                atomicAdd(bar, 1u);
                do {
                    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(bar) : "memory");
                } while (v < target);
                __threadfence();
            } else if (kind == 1) {
                asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(bar) : "memory");
                do {
                    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(bar) : "memory");
                } while (v < target);
            } else {
                asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(v) : "l"(bar) : "memory");
                if (v + 1 == target) {
                    asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(bar + 32), "r"(target) : "memory");
                } else {
                    do {
                        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(bar + 32) : "memory");
                    } while (v < target);
                }
            }
            if (trace) trace[slot + 1] = kiln_globaltimer();
        }
        __syncthreads();
    }
};

// The GEMV tile's wait: the barrier that ends the previous stage.
struct KilnGridWait {
    KilnGridBarrier b;
    u32 target;
    __device__ __forceinline__ void operator()() const { b(target); }
};

// A kernel of grid barriers alone (n of them, as the persistent kernel's blocks run them):
// what one costs with this many blocks, apart from the stages' work.
extern "C" __global__ void __launch_bounds__(256) kiln_grid_barrier_probe(u32* bar, u64* trace,
                                                                          int kind, int n) {
    const KilnGridBarrier b{bar, trace, kind};
    for (int i = 1; i <= n; ++i) b((u32)i * gridDim.x);
}

// Gate/up rows in pairs: group gi of a tile of 2·half groups takes gate rows (the first half)
// or the up rows I apart (the second), so tile t holds gate and up rows t·half·4 .. +half·4.
struct KilnRowsPaired {
    int half, I;
    __device__ __forceinline__ int operator()(int gi) const {
        const int t = gi / (2 * half), g = gi - t * 2 * half;
        const int base = t * half * 4;
        return g < half ? base + g * 4 : I + base + (g - half) * 4;
    }
};

// One GEMV stage: the block's tiles (tile = blockIdx.x, + gridDim.x, ...), the barrier after
// the first tile's first loads; a block without a tile still takes part in the barrier. After
// each tile, `after(tile)` (with the tile's stores visible to the block).
template <class X, bool RESIDUAL, class ROWS, class AFTER>
__device__ __forceinline__ void kiln_p_gemv(const X xsrc, const u8* w, const u8* s, const float* ts,
                                            float* y, int N, int K, int ksplit, int tiles,
                                            const ROWS rows, const KilnGridBarrier bar, u32 target,
                                            const AFTER after) {
    bool first = true;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        kiln_gemv_cuda_core_tile<1, 4, X, RESIDUAL, false>(xsrc, w, s, ts, y, N, K, ksplit, tile,
                                                          first, rows, KilnGridWait{bar, target});
        first = false;
        __syncthreads();
        after(tile);
        __syncthreads();
    }
    if (first) bar(target);
}

struct KilnNoAfter {
    __device__ __forceinline__ void operator()(int) const {}
};

// SwiGLU of the gate and up rows a paired tile computed.
struct KilnSwigluAfter {
    const float* gu;
    const float* scale;
    float* act;
    int I, rows;  // gate rows per tile
    __device__ __forceinline__ void operator()(int tile) const {
        const int i = tile * rows + (int)threadIdx.x;
        if ((int)threadIdx.x < rows && i < I)
            act[i] = kiln_silu_mul(__ldcg(gu + i) * scale[0], __ldcg(gu + I + i) * scale[1]);
    }
};

// Stage B for one (kv head, split): the epilogue of the group's rep query heads (and, in the
// split that holds position p, of k and v, appended to the cache), then the attention kernel's
// split (kiln_attention_split) with q from shared memory and the cache read through L2.
template <int HD, int REP>
__device__ __forceinline__ void kiln_p_attention_item(const KilnPArgs& a, const KilnPLayer& L,
                                                      u16* kc, u16* vc, int kv, int s, int p,
                                                      int ns, float* sh) {
    constexpr int E = HD / 32;
    __shared__ float wsum[(REP + 2) * HD / 32];
    const int rep = a.nh / a.kvh, half = HD / 2;
    const int lane = threadIdx.x & 31;
    const bool holds_p = s == ns - 1;
    const int nheads = rep + (holds_p ? 2 : 0);  // q heads of the group, then k and v
    float* raw = sh;                // [nheads][HD]: scaled + bias
    float* qs = sh + (REP + 2) * HD;  // [rep][HD]: the rotated queries
    const float* qn = L.q_norm;
    auto head_of = [&](int slot, int& kind) {
        kind = slot < rep ? 0 : (slot == rep ? 1 : 2);
        return kind == 0 ? kv * rep + slot : (kind == 1 ? a.nh + kv : a.nh + a.kvh + kv);
    };
    for (int t = threadIdx.x; t < nheads * HD; t += blockDim.x) {
        const int slot = t / HD, i = t - slot * HD;
        int kind;
        const int head = head_of(slot, kind);
        const float val = kiln_qkv_value(__ldcg(a.qkv + head * HD + i), L.qkv_scale[kind], L.qkv_bias,
                                          head * HD + i);
        raw[t] = val;
        if (qn) {  // a warp lies within one head (HD a multiple of 32, nheads·HD too)
            const float ss = kiln_warp_sum(val * val);
            if (lane == 0) wsum[t >> 5] = ss;
        }
    }
    __syncthreads();
    // the head norm, RoPE; k and v of position p to the cache, q to qs
    for (int t = threadIdx.x; t < nheads * HD; t += blockDim.x) {
        const int slot = t / HD, i = t - slot * HD;
        int kind;
        head_of(slot, kind);
        const size_t row = ((size_t)kv * a.cap + p) * HD;
        if (kind == 2) {
            vc[row + i] = kiln_f32_to_bf16(raw[t]);
            continue;
        }
        const int pi = i < half ? i + half : i - half;
        float val = raw[t], partner = raw[slot * HD + pi];
        if (qn) {
            float ss = 0.0f;
            for (int w = 0; w < HD / 32; ++w) ss += wsum[slot * (HD / 32) + w];
            const float* nw = kind == 0 ? qn : L.k_norm;
            val = kiln_head_norm(val, ss, HD, a.eps, nw[i]);
            partner = kiln_head_norm(partner, ss, HD, a.eps, nw[pi]);
        }
        const float ang = (float)p * a.inv_freq[i < half ? i : i - half];
        float sn, cs;
        sincosf(ang, &sn, &cs);
        const float out = kiln_rope(val, partner, cs, sn, i < half);
        if (kind == 0) qs[slot * HD + i] = out;
        else kc[row + i] = kiln_f32_to_bf16(out);
    }
    __syncthreads();

    const int len = p + 1, start = s * a.chunk, end = min(start + a.chunk, len);
    float qr[REP][E];
#pragma unroll
    for (int r = 0; r < REP; ++r)
#pragma unroll
        for (int e = 0; e < E; ++e) qr[r][e] = r < rep ? qs[r * HD + lane * E + e] * a.softmax_scale : 0.0f;
    kiln_attention_split<HD, REP, true>(qr, kc + (size_t)kv * a.cap * HD + lane * E,
                                        vc + (size_t)kv * a.cap * HD + lane * E, start, end, rep,
                                        a.part_o, a.part_ml, (size_t)kv * rep, a.splits, s);
    __syncthreads();
}

// Ask the L2 for `bytes` bytes at p, one 128-byte line per thread of the grid in turn.
__device__ __forceinline__ void kiln_p_prefetch(const u8* p, size_t bytes) {
    const size_t stride = (size_t)gridDim.x * blockDim.x * 128;
    for (size_t off = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 128; off < bytes; off += stride)
        kiln_prefetch_l2(p + off);
}

// A layer's weights into the L2 (codes and scales of its four matrices), spread over the grid:
// at ~8 MB a layer on the Qwen2.5-0.5B shape a few lines a thread, so that its GEMV stages
// find their weights in the L2 instead of waiting for DRAM.
__device__ __forceinline__ void kiln_p_prefetch_layer(const KilnPLayer& L, int qkv_rows, int H,
                                                      int q_size, int I) {
    const size_t wq = (size_t)qkv_rows * H, wo = (size_t)H * q_size, wg = (size_t)2 * I * H,
                 wd = (size_t)H * I;
    kiln_p_prefetch(L.qkv_w, wq / 2);
    kiln_p_prefetch(L.qkv_s, wq / 16);
    kiln_p_prefetch(L.o_w, wo / 2);
    kiln_p_prefetch(L.o_s, wo / 16);
    kiln_p_prefetch(L.gu_w, wg / 2);
    kiln_p_prefetch(L.gu_s, wg / 16);
    kiln_p_prefetch(L.dn_w, wd / 2);
    kiln_p_prefetch(L.dn_s, wd / 16);
}

template <int HD, int REP>
__device__ __forceinline__ void kiln_decode_persistent_body(const KilnPArgs& a) {
    extern __shared__ float4 xs4[];
    float* sh = reinterpret_cast<float*>(xs4);
    const int p = __ldcg(a.pos);
    const int H = a.H, I = a.I, q_size = a.nh * HD, qkv_rows = q_size + 2 * a.kvh * HD;
    u32 epoch = 0;
    const u32 nb = gridDim.x;
    const KilnGridBarrier gb{a.bar, a.trace, a.barrier_kind};
    if (a.prefetch) kiln_p_prefetch_layer(a.layers[0], qkv_rows, H, q_size, I);
    // the embedding of the token into x
    {
        const u16* row = a.embed + (size_t)__ldcg(a.token) * H;
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < H; i += gridDim.x * blockDim.x)
            a.x[i] = kiln_bf16_to_f32(row[i]);
    }
    const int ns = kiln_combine_splits(p + 1, a.splits, a.chunk);
    const size_t layer_kv = (size_t)a.kvh * a.cap * HD;
    // rows per tile of a GEMV with K split ks: 8 / ks groups of 4
    auto tiles = [](int n, int ks) { return (n + 32 / ks - 1) / (32 / ks); };
    const int gu_half = 8 / a.ks_gu / 2;
    for (int l = 0; l < a.n_layers; ++l) {
        const KilnPLayer& L = a.layers[l];
        if (a.prefetch && l + 1 < a.n_layers) kiln_p_prefetch_layer(a.layers[l + 1], qkv_rows, H, q_size, I);
        // A: RMSNorm → q/k/v
        kiln_p_gemv<KilnXNorm, false>(KilnXNorm{a.x, L.in_norm, a.eps}, L.qkv_w, L.qkv_s, L.qkv_ts,
                                      a.qkv, qkv_rows, H, a.ks_qkv, tiles(qkv_rows, a.ks_qkv),
                                      KilnRowsLinear<4>{}, gb, ++epoch * nb, KilnNoAfter{});
        // B: epilogue + attention
        gb(++epoch * nb);
        u16* kc = a.kc + l * layer_kv;
        u16* vc = a.vc + l * layer_kv;
        for (int item = blockIdx.x; item < a.kvh * ns; item += gridDim.x)
            kiln_p_attention_item<HD, REP>(a, L, kc, vc, item / ns, item % ns, p, ns, sh);
        if (a.fold_combine) {
            // C + D: every block of the o stage combines the splits into its x
            kiln_p_gemv<KilnXCombine, true>(KilnXCombine{a.part_o, a.part_ml, a.pos, HD, a.splits, a.chunk},
                                            L.o_w, L.o_s, L.o_ts, a.x, H, q_size, a.ks_o,
                                            tiles(H, a.ks_o), KilnRowsLinear<4>{}, gb, ++epoch * nb,
                                            KilnNoAfter{});
        } else {
            // C: combine
            gb(++epoch * nb);
            for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < q_size; t += gridDim.x * blockDim.x) {
                const int hh = t / HD, e = t - hh * HD;
                const size_t row0 = (size_t)hh * a.splits;
                float mx, sum;
                kiln_combine_stats(a.part_ml, row0, ns, mx, sum);
                a.attn[t] = kiln_combine_elem(a.part_o, a.part_ml, row0, ns, HD, e, mx, sum);
            }
            // D: o, residual
            kiln_p_gemv<KilnXL2, true>(KilnXL2{a.attn}, L.o_w, L.o_s, L.o_ts, a.x, H, q_size, a.ks_o,
                                       tiles(H, a.ks_o), KilnRowsLinear<4>{}, gb, ++epoch * nb,
                                       KilnNoAfter{});
        }
        // E: RMSNorm → gate/up, SwiGLU
        kiln_p_gemv<KilnXNorm, false>(KilnXNorm{a.x, L.post_norm, a.eps}, L.gu_w, L.gu_s, L.gu_ts,
                                      a.gu, 2 * I, H, a.ks_gu, I / (gu_half * 4),
                                      KilnRowsPaired{gu_half, I}, gb, ++epoch * nb,
                                      KilnSwigluAfter{a.gu, L.gu_scale, a.act, I, gu_half * 4});
        // F: down, residual
        kiln_p_gemv<KilnXL2, true>(KilnXL2{a.act}, L.dn_w, L.dn_s, L.dn_ts, a.x, H, I, a.ks_down,
                                   tiles(H, a.ks_down), KilnRowsLinear<4>{}, gb, ++epoch * nb,
                                   KilnNoAfter{});
    }
    // the final RMSNorm into h; the vocabulary GEMV (a chained launch) may start launching
    kiln_pdl_launch_dependents();
    gb(++epoch * nb);
    if (blockIdx.x != 0) return;
    if (a.trace && threadIdx.x == 0) {  // the trace's header: blocks, barriers
        a.trace[0] = nb;
        a.trace[1] = epoch;
    }
    KilnXNorm{a.x, a.final_norm, a.eps}.fill(sh, H);
    for (int i = threadIdx.x; i < H; i += blockDim.x) a.h[i] = sh[kiln_xs_index(i)];
}

#define KILN_DECODE_PERSISTENT(HD, REP)                                                        \
    extern "C" __global__ void __launch_bounds__(256, 2)                                       \
        kiln_decode_persistent_hd##HD##_rep##REP(const KilnPArgs a) {                          \
        kiln_decode_persistent_body<HD, REP>(a);                                               \
    }

// (head_dim, query heads per KV head bound): keep in step with PERSISTENT_KERNELS in
// src/cuda/decode_persistent.rs.
KILN_DECODE_PERSISTENT(32, 2)
KILN_DECODE_PERSISTENT(32, 4)
KILN_DECODE_PERSISTENT(32, 8)
KILN_DECODE_PERSISTENT(64, 2)
KILN_DECODE_PERSISTENT(64, 4)
KILN_DECODE_PERSISTENT(64, 8)
KILN_DECODE_PERSISTENT(128, 2)
KILN_DECODE_PERSISTENT(128, 4)
KILN_DECODE_PERSISTENT(128, 8)
