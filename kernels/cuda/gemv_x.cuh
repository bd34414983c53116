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
