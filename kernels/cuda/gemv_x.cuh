// gemv_x.cuh — where the CUDA-core GEMV's x comes from when it is computed into shared memory
// after the wait (X::kShared; include after gemv_cuda_core.cuh and block_reduce.cuh), shared
// by the fused decode GEMVs (gemv_fused.cu) and the persistent decode kernel
// (decode_persistent.cu). Activations are read through L2 (__ldcg): in the persistent kernel
// other blocks wrote them in the same launch, which the non-coherent read-only path would not
// see.

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
                const float v = __ldcg(h + i);
                ss += v * v;
            }
            ss = kiln_warp_sum(ss);
            if (lane == 0) red[vw] = ss;
        }
        __syncthreads();
        float ss = 0.0f;
        for (int v = 0; v < (B >> 5); ++v) ss += red[v];
        const float r = kiln_rms_scale(ss, K, eps);
        for (int i = threadIdx.x; i < K; i += blockDim.x) xs[kiln_xs_index(i)] = __ldcg(h + i) * r * w[i];
        __syncthreads();
    }
};

// x as is from global memory, through L2, into the shared copy.
struct KilnXL2 {
    const float* x;
    static constexpr bool kShared = true;
    __device__ __forceinline__ void fill(float* xs, int K) const {
        for (int i = threadIdx.x; i < K; i += blockDim.x) xs[kiln_xs_index(i)] = __ldcg(x + i);
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
        const int ns = kiln_combine_splits(__ldcg(pos) + 1, splits, chunk);
        float* wts = xs + K;  // [nh][ns]
        for (int h = threadIdx.x; h < nh; h += blockDim.x)
            kiln_combine_stats(part_ml, (size_t)h * splits, ns, stat[2 * h], stat[2 * h + 1]);
        __syncthreads();
        for (int t = threadIdx.x; t < nh * ns; t += blockDim.x) {
            const int h = t / ns, sp = t - h * ns;
            const float m = __ldcg(part_ml + ((size_t)h * splits + sp) * 2);
            wts[t] = m == KILN_NEG_INF ? KILN_NEG_INF : expf(m - stat[2 * h]);
        }
        __syncthreads();
        for (int i = threadIdx.x; i < K; i += blockDim.x) {
            const int h = i / hd, e = i - h * hd;
            const float* po = part_o + (size_t)h * splits * hd + e;
            const float* w = wts + h * ns;
            float o = 0.0f;
            for (int sp = 0; sp < ns; ++sp)
                if (w[sp] != KILN_NEG_INF) o += __ldcg(po + (size_t)sp * hd) * w[sp];
            xs[kiln_xs_index(i)] = o / stat[2 * h + 1];
        }
        __syncthreads();
    }
};
