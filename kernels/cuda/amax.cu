// amax.cu — absolute maximum of a tensor, and the index of its first non-finite element.
//
// Layout: x is a flat array of n elements, f32 (kiln_amax_f32) or bf16 bits (kiln_amax_bf16).
// Outputs (device, zeroed by the host): *amax_bits (the f32 bits of max |x|; for non-negative
// floats the bit order is the value order, so atomicMax on u32 works) and *first_bad_inv
// (atomicMax of ~index over every NaN/inf, so it ends as ~(first bad index), 0 if none).
// Launch: 1-D grid-stride, 256 threads per block, vector loads of 16 bytes.

template <typename T> struct AmaxVec;

__device__ __forceinline__ void kiln_amax_acc(float v, u64 idx, float& m, u64& bad) {
    if (!isfinite(v)) { if (idx < bad) bad = idx; }
    else m = fmaxf(m, fabsf(v));
}

__device__ __forceinline__ void kiln_amax_finish(float m, u64 bad, u32* amax_bits, u64* first_bad_inv) {
    __shared__ float sm[32];
    __shared__ u64 sb[32];
    m = kiln_warp_max(m);
    bad = kiln_warp_min_u64(bad);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { sm[warp] = m; sb[warp] = bad; }
    __syncthreads();
    if (warp == 0) {
        int nw = blockDim.x >> 5;
        m = lane < nw ? sm[lane] : 0.0f;
        bad = lane < nw ? sb[lane] : ~0ull;
        m = kiln_warp_max(m);
        bad = kiln_warp_min_u64(bad);
        if (lane == 0) {
            atomicMax(amax_bits, __float_as_uint(m));
            if (bad != ~0ull) atomicMax(first_bad_inv, ~bad);
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
kiln_amax_f32(const float* __restrict__ x, u64 n, u32* amax_bits, u64* first_bad_inv) {
    float m = 0.0f;
    u64 bad = ~0ull;
    u64 stride = (u64)gridDim.x * blockDim.x;
    u64 n4 = n / 4;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += stride) {
        float4 v = __ldg(x4 + i);
        kiln_amax_acc(v.x, 4 * i, m, bad);
        kiln_amax_acc(v.y, 4 * i + 1, m, bad);
        kiln_amax_acc(v.z, 4 * i + 2, m, bad);
        kiln_amax_acc(v.w, 4 * i + 3, m, bad);
    }
    for (u64 i = n4 * 4 + (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        kiln_amax_acc(x[i], i, m, bad);
    kiln_amax_finish(m, bad, amax_bits, first_bad_inv);
}

extern "C" __global__ void __launch_bounds__(256)
kiln_amax_bf16(const u16* __restrict__ x, u64 n, u32* amax_bits, u64* first_bad_inv) {
    float m = 0.0f;
    u64 bad = ~0ull;
    u64 stride = (u64)gridDim.x * blockDim.x;
    u64 n8 = n / 8;
    const uint4* x8 = reinterpret_cast<const uint4*>(x);
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += stride) {
        uint4 v = __ldg(x8 + i);
        u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            kiln_amax_acc(__uint_as_float(w[j] << 16), 8 * i + 2 * j, m, bad);
            kiln_amax_acc(__uint_as_float(w[j] & 0xFFFF0000u), 8 * i + 2 * j + 1, m, bad);
        }
    }
    for (u64 i = n8 * 8 + (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        kiln_amax_acc(kiln_bf16_to_f32(x[i]), i, m, bad);
    kiln_amax_finish(m, bad, amax_bits, first_bad_inv);
}

// Turn the amax into the tensor scale (one thread): *tensor_scale = kiln_tensor_scale(amax).
extern "C" __global__ void kiln_tensor_scale_from_amax(const u32* amax_bits, float* tensor_scale) {
    if (threadIdx.x == 0 && blockIdx.x == 0) *tensor_scale = kiln_tensor_scale(__uint_as_float(*amax_bits));
}

// A pure read of n 16-byte words (folded with xor into one word per block, written to
// out[blockIdx.x] so nothing is optimised away): the benchmark's read-bandwidth ceiling for a
// kernel that reads a given number of bytes. Launch: grid-stride, 256 threads per block,
// 4 loads in flight per thread. Chained like the split-K GEMV (the benchmark's ceiling for a chain):
// it reads p before waiting for the previous kernel, writes out after.
extern "C" __global__ void __launch_bounds__(256)
kiln_stream_read(const uint4* __restrict__ p, u64 n, u32* __restrict__ out) {
    kiln_pdl_launch_dependents();
    u32 acc = 0;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        uint4 v[4];
#pragma unroll
        for (int u = 0; u < 4; u++) v[u] = kiln_ld_stream(p + i + u * stride);
#pragma unroll
        for (int u = 0; u < 4; u++) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    for (; i < n; i += stride) {
        const uint4 v = kiln_ld_stream(p + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    for (int o = 16; o > 0; o >>= 1) acc ^= __shfl_xor_sync(0xFFFFFFFFu, acc, o);
    __shared__ u32 part[8];
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = acc;
    __syncthreads();
    kiln_pdl_wait();
    if (threadIdx.x == 0) {
        u32 a = 0;
        for (int w = 0; w < (int)(blockDim.x >> 5); w++) a ^= part[w];
        out[blockIdx.x] = a;
    }
}
