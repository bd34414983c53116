// Block- and warp-wide reductions shared by the transformer kernels (decode.cu, train.cu).

#define KILN_NEG_INF __int_as_float(0xff800000)

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the sum.
__device__ __forceinline__ float kiln_block_sum(float v, float* red) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();  // red may still be read by a previous call
    if (lane == 0) red[warp] = v;
    __syncthreads();
    const int nw = blockDim.x >> 5;
    float s = 0.0f;
    for (int w = 0; w < nw; ++w) s += red[w];
    return s;
}

// Max over the block (as kiln_block_sum); every thread gets it.
__device__ __forceinline__ float kiln_block_max(float v, float* red) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float m = KILN_NEG_INF;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) m = fmaxf(m, red[w]);
    return m;
}

__device__ __forceinline__ float kiln_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    return v;
}
