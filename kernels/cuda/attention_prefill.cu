// attention_prefill.cu — causal attention of a prompt batch over the layer's KV cache, on the
// tensor cores (flash_attention.cuh): q bf16 [T][nh][HD] (RoPE applied); k_cache, v_cache the
// layer's bf16 caches [kvh][cap][HD] holding positions 0 .. pos+T-1; out f32 [T][nh][HD].
// Query t of the batch (position pos + t) sees keys 0 ..= pos + t; query head h reads KV head
// h / (nh / kvh). Grid (nh, ceil(T / 64)), block 128, KILN_FA_SMEM(HD) bytes of dynamic
// shared memory.

#include "flash_attention.cuh"

#define KILN_FLASH_PREFILL(HD)                                                                    \
    extern "C" __global__ void __launch_bounds__(128, 2) kiln_flash_prefill_hd##HD(                  \
        const u16* __restrict__ q, const u16* __restrict__ k_cache,                              \
        const u16* __restrict__ v_cache, const int* __restrict__ pos, float* __restrict__ out,   \
        int T, int nh, int kvh, int cap, float scale_log2) {                                     \
        /* queued as a programmatic dependent launch: wait for the kernel before (it wrote q  \
           and the caches), then let the next one start launching */                            \
        kiln_pdl_wait();                                                                          \
        kiln_pdl_launch_dependents();                                                             \
        const KilnFlashLayout lay = {(long)nh * HD, HD, (long)cap * HD, (long)nh * HD, HD};      \
        kiln_flash_fwd<HD, float>(q, k_cache, v_cache, out, nullptr, lay, T, nh, kvh, *pos,       \
                                  scale_log2);                                                    \
    }

KILN_FLASH_PREFILL(32)
KILN_FLASH_PREFILL(64)
KILN_FLASH_PREFILL(128)
