//! The transformer kernels of the GPU engine besides the GEMVs (`kernels/cuda/decode.cu`):
//! embedding lookup, residual add + RMSNorm, the q/k/v epilogue (tensor scales, bias, q/k norm,
//! RoPE, KV append), attention split over the context with its combine, SwiGLU, the greedy
//! pick that advances the position, and seeded random weights for benchmarks.
//!
//! The launchers take raw device addresses ([`DevAddr`]): the engine lays its activations,
//! caches and scalars out once, slices rows by offset, and captures the same launches in a
//! CUDA graph. They are `unsafe`: each says which buffers must be live and how large.

use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use super::context::CudaKernels;
use super::driver::{drv, launch_raw, param};
use super::gemv::GEMV_MAX_ROWS;
use crate::KernelError;
use std::ffi::c_void;

/// A device address (0: none, where a launcher says a buffer is optional).
pub type DevAddr = u64;

/// Warps per block of the attention kernel for (head_dim, query heads bound):
/// `KILN_ATTN_WARPS_FOR` in decode.cu.
pub fn attention_warps(hd: usize, rep: usize) -> u32 {
    if hd * rep <= 512 {
        8
    } else {
        4
    }
}

/// The attention kernels built: (head_dim, most query heads per KV head). A model whose
/// (head_dim, heads / kv_heads) no entry covers cannot run on the GPU engine.
pub const ATTENTION_KERNELS: &[(usize, usize)] = &[
    (32, 2),
    (32, 4),
    (32, 8),
    (64, 2),
    (64, 4),
    (64, 8),
    (64, 16),
    (128, 2),
    (128, 4),
    (128, 8),
    (128, 16),
    (256, 2),
    (256, 4),
    (256, 8),
];

/// The head dims the flash prefill attention (`attention_prefill.cu`) is built for; others take
/// the GEMM path (S and P through global memory).
pub const FLASH_PREFILL_HEAD_DIMS: &[usize] = &[32, 64, 128];

/// Dynamic shared memory of the flash prefill kernel for `hd` (`KILN_FA_SMEM`): two stages of
/// 64 keys and 64 values, rows padded to hd + 8 bf16 (69,632 bytes at hd 128).
pub fn flash_prefill_smem(hd: usize) -> u32 {
    (2 * 2 * 64 * (hd + 8) * 2) as u32
}

/// The widest row the prompt path's float4 add + RMSNorm takes (`KILN_NORM_X4_MAX` float4s
/// for each of its 256 threads); wider rows take the scalar kernel.
const NORM_X4_MAX_WIDTH: usize = 8 * 4 * 256;

/// `log2(e) / sqrt(hd)`: the flash kernels' score scale in the exp2 domain.
pub(crate) fn flash_scale_log2(hd: usize) -> f32 {
    std::f32::consts::LOG2_E / (hd as f32).sqrt()
}

/// Blocks of the greedy pick (its scratch holds one value and index per block).
pub const ARGMAX_BLOCKS: usize = 264;

/// The loaded decode kernels.
pub(crate) struct DecodeFunctions {
    embed_bf16: CudaFunction,
    add_rmsnorm: CudaFunction,
    add_rmsnorm_bf16: CudaFunction,
    add_rmsnorm_bf16_x4: CudaFunction,
    qkv_post: CudaFunction,
    qkv_post_x4: CudaFunction,
    attention: Vec<((usize, usize), CudaFunction)>,
    attention_combine: CudaFunction,
    swiglu: CudaFunction,
    swiglu_bf16: CudaFunction,
    swiglu_bf16_x8: CudaFunction,
    causal_softmax: CudaFunction,
    flash_prefill: Vec<(usize, CudaFunction)>,
    argmax_advance: CudaFunction,
    sample_advance: CudaFunction,
    random_nvfp4: CudaFunction,
    random_bf16: CudaFunction,
}

impl DecodeFunctions {
    pub(crate) fn load(
        func: &dyn Fn(&str, &str) -> Result<CudaFunction, KernelError>,
    ) -> Result<Self, KernelError> {
        let f = |name: &str| func("decode.cu", name);
        Ok(DecodeFunctions {
            embed_bf16: f("kiln_embed_bf16")?,
            add_rmsnorm: f("kiln_add_rmsnorm")?,
            add_rmsnorm_bf16: f("kiln_add_rmsnorm_bf16")?,
            add_rmsnorm_bf16_x4: f("kiln_add_rmsnorm_bf16_x4")?,
            qkv_post: f("kiln_qkv_post")?,
            qkv_post_x4: f("kiln_qkv_post_x4")?,
            attention: ATTENTION_KERNELS
                .iter()
                .map(|&(hd, rep)| Ok(((hd, rep), f(&attention_name(hd, rep))?)))
                .collect::<Result<_, KernelError>>()?,
            attention_combine: f("kiln_attention_combine")?,
            swiglu: f("kiln_swiglu")?,
            swiglu_bf16: f("kiln_swiglu_bf16")?,
            swiglu_bf16_x8: f("kiln_swiglu_bf16_x8")?,
            causal_softmax: f("kiln_causal_softmax_bf16")?,
            flash_prefill: FLASH_PREFILL_HEAD_DIMS
                .iter()
                .map(|&hd| {
                    let f = func("attention_prefill.cu", &format!("kiln_flash_prefill_hd{hd}"))?;
                    f.set_attribute(
                        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        flash_prefill_smem(hd) as i32,
                    )
                    .map_err(drv("raising the flash prefill kernel's shared-memory limit"))?;
                    Ok((hd, f))
                })
                .collect::<Result<_, KernelError>>()?,
            argmax_advance: f("kiln_argmax_advance")?,
            sample_advance: f("kiln_sample_advance")?,
            random_nvfp4: f("kiln_random_nvfp4")?,
            random_bf16: f("kiln_random_bf16")?,
        })
    }
}

/// The CUDA function name of the attention kernel for (head_dim, most query heads per KV head).
pub fn attention_name(hd: usize, rep: usize) -> String {
    format!("kiln_attention_hd{hd}_rep{rep}")
}

/// The attention kernel entry for a head_dim and query heads per KV head: the smallest built
/// `rep` bound that covers it.
pub fn attention_kernel_for(head_dim: usize, rep: usize) -> Option<(usize, usize)> {
    ATTENTION_KERNELS
        .iter()
        .filter(|&&(hd, r)| hd == head_dim && r >= rep)
        .min_by_key(|&&(_, r)| r)
        .copied()
}

/// Sampling parameters for [`CudaKernels::sample_advance_async`] (the CPU sampler's rules).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceSampling {
    /// Temperature (> 0).
    pub temperature: f32,
    /// Keep the k largest logits (0: all).
    pub top_k: usize,
    /// Keep the smallest prefix reaching this probability (1: all).
    pub top_p: f32,
    /// The noise's seed.
    pub seed: u64,
}

/// The q/k/v epilogue's buffers ([`CudaKernels::qkv_post_async`]).
#[derive(Debug, Clone, Copy)]
pub struct QkvPost {
    /// `[T, (nh + 2·kvh)·hd]` f32: the GEMV output over the concatenated q, k, v rows.
    pub qkv: DevAddr,
    /// 3 f32: the tensor scales of q, k and v.
    pub scale: DevAddr,
    /// `[(nh + 2·kvh)·hd]` f32 bias, or 0.
    pub bias: DevAddr,
    /// `[hd]` f32 q-norm weight, or 0 (then `k_norm` is 0 too).
    pub q_norm: DevAddr,
    /// `[hd]` f32 k-norm weight, or 0.
    pub k_norm: DevAddr,
    /// `[hd/2]` f32 RoPE inverse frequencies.
    pub inv_freq: DevAddr,
    /// One i32: the position of the forward's first token.
    pub pos: DevAddr,
    /// `[T, nh·hd]` f32 output queries.
    pub q_out: DevAddr,
    /// The layer's keys, bf16 `[kvh][cap][hd]`.
    pub k_cache: DevAddr,
    /// The layer's values, bf16 `[kvh][cap][hd]`.
    pub v_cache: DevAddr,
}

/// The attention's shape ([`CudaKernels::attention_async`]).
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Tokens in the forward (queries).
    pub tokens: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Positions the cache holds per head (its row stride).
    pub capacity: usize,
    /// Positions per split.
    pub chunk: usize,
    /// Splits of the context (grid y): `capacity.div_ceil(chunk)` covers any length.
    pub splits: usize,
}

pub(crate) fn cfg(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaKernels {
    /// The device address of `s`'s element `offset` (event tracking is off in this crate, so
    /// the address needs no guard).
    pub fn addr<T>(&self, s: &CudaSlice<T>, offset: usize) -> DevAddr {
        debug_assert!(offset <= s.len());
        s.device_ptr(&self.stream).0 + (offset * std::mem::size_of::<T>()) as u64
    }

    /// Launch `f` with the parameter addresses `params`, as a programmatic dependent launch
    /// (every decode.cu kernel waits for the previous kernel before reading anything).
    ///
    /// # Safety
    /// `params` point at values matching `f`'s parameter list (each caller's contract).
    unsafe fn go(
        &self,
        f: &CudaFunction,
        c: LaunchConfig,
        what: &str,
        params: &mut [*mut c_void],
    ) -> Result<(), KernelError> {
        // SAFETY: the caller's contract.
        unsafe { launch_raw(&self.stream, f, c, params, true) }.map_err(drv(what))
    }

    /// Queue `x[t, :] = table[ids[t], :]` (bf16 → f32) for `t < tokens`.
    ///
    /// # Safety
    /// `ids` holds `tokens` u32 below the table's rows; `table` is bf16 `[rows, h]`; `x` holds
    /// `tokens·h` f32.
    pub unsafe fn embed_async(
        &self,
        ids: DevAddr,
        table: DevAddr,
        x: DevAddr,
        tokens: usize,
        h: usize,
    ) -> Result<(), KernelError> {
        let hi = h as i32;
        // SAFETY: the parameters match the kernel; the caller's contract covers the buffers.
        unsafe {
            self.go(
                &self.f.decode.embed_bf16,
                cfg((tokens as u32, 1, 1), 256),
                "launching kiln_embed_bf16",
                &mut [param(&ids), param(&table), param(&x), param(&hi)],
            )
        }
    }

    /// Queue, per row of `rows`: `x += d` (when `d` ≠ 0), then `h = rmsnorm(x) · w`, written as
    /// f32, or as bf16 with `bf16_out` (the prompt path's GEMM input).
    ///
    /// # Safety
    /// `x` (and `d` if given) hold `rows·width` f32, `h` as many f32 (bf16 with `bf16_out`),
    /// `w` holds `width` f32.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn add_rmsnorm_async(
        &self,
        x: DevAddr,
        d: DevAddr,
        w: DevAddr,
        h: DevAddr,
        rows: usize,
        width: usize,
        eps: f32,
        bf16_out: bool,
    ) -> Result<(), KernelError> {
        let wi = width as i32;
        let mut block = (width.div_ceil(32) * 32).clamp(32, 1024) as u32;
        let (f, what) = if bf16_out
            && rows > GEMV_MAX_ROWS
            && width.is_multiple_of(4)
            && width <= NORM_X4_MAX_WIDTH
        {
            // a prompt batch: float4 accesses, the row in registers
            block = 256;
            (
                &self.f.decode.add_rmsnorm_bf16_x4,
                "launching kiln_add_rmsnorm_bf16_x4",
            )
        } else if bf16_out {
            (
                &self.f.decode.add_rmsnorm_bf16,
                "launching kiln_add_rmsnorm_bf16",
            )
        } else {
            (&self.f.decode.add_rmsnorm, "launching kiln_add_rmsnorm")
        };
        // SAFETY: the parameters match the kernel; the caller's contract covers the buffers.
        unsafe {
            self.go(
                f,
                cfg((rows as u32, 1, 1), block),
                what,
                &mut [
                    param(&x),
                    param(&d),
                    param(&w),
                    param(&h),
                    param(&wi),
                    param(&eps),
                ],
            )
        }
    }

    /// Queue the q/k/v epilogue for `tokens` tokens (see [`QkvPost`]).
    ///
    /// # Safety
    /// The buffers of `p` are as [`QkvPost`] describes, `pos + tokens <= capacity`, and
    /// `head_dim` is even, a multiple of 32 and at most 256.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn qkv_post_async(
        &self,
        p: &QkvPost,
        tokens: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        eps: f32,
    ) -> Result<(), KernelError> {
        if head_dim > 256 || !head_dim.is_multiple_of(32) {
            return Err(KernelError::InvalidArgument(format!(
                "the q/k/v epilogue takes head_dim a multiple of 32 up to 256, got {head_dim}"
            )));
        }
        let (nh, kvh, hd, cap) = (
            heads as i32,
            kv_heads as i32,
            head_dim as i32,
            capacity as i32,
        );
        let t = tokens as i32;
        let mut params = [
            param(&p.qkv),
            param(&p.scale),
            param(&p.bias),
            param(&p.q_norm),
            param(&p.k_norm),
            param(&p.inv_freq),
            param(&p.pos),
            param(&p.q_out),
            param(&p.k_cache),
            param(&p.v_cache),
            param(&nh),
            param(&kvh),
            param(&hd),
            param(&cap),
            param(&eps),
            param(&t),
        ];
        // SAFETY: the parameters match the kernel chosen (kiln_qkv_post takes all but the
        // last); the caller's contract covers the buffers (for the prompt kernel, rows of a
        // multiple of 8 elements keep every float4 aligned).
        unsafe {
            // a unit of hd / 8 lanes must be a power of two within a warp (hd 8 · 2^k ≤ 256)
            if tokens > GEMV_MAX_ROWS
                && head_dim.is_multiple_of(8)
                && (head_dim / 8).is_power_of_two()
            {
                // a prompt batch: hd / 8 lanes per (head, token), float4 accesses
                let units_per_block = 128 / (head_dim / 8);
                let units = tokens * (heads + 2 * kv_heads);
                self.go(
                    &self.f.decode.qkv_post_x4,
                    cfg((units.div_ceil(units_per_block) as u32, 1, 1), 128),
                    "launching kiln_qkv_post_x4",
                    &mut params,
                )
            } else {
                self.go(
                    &self.f.decode.qkv_post,
                    cfg(
                        ((heads + 2 * kv_heads) as u32, tokens as u32, 1),
                        head_dim as u32,
                    ),
                    "launching kiln_qkv_post",
                    &mut params[..15],
                )
            }
        }
    }

    /// The splits of [`CudaKernels::attention_async`]: each split's partial output and (max,
    /// sum of exp) into `part_o` / `part_ml`.
    ///
    /// # Safety
    /// As [`CudaKernels::attention_async`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn attention_splits_async(
        &self,
        q: DevAddr,
        k_cache: DevAddr,
        v_cache: DevAddr,
        pos: DevAddr,
        part_o: DevAddr,
        part_ml: DevAddr,
        s: &AttentionShape,
    ) -> Result<(), KernelError> {
        let rep = s.heads / s.kv_heads.max(1);
        let Some(key) = attention_kernel_for(s.head_dim, rep) else {
            return Err(KernelError::InvalidArgument(format!(
                "no attention kernel for head_dim {} with {rep} query heads per KV head (built: \
                 {ATTENTION_KERNELS:?} as (head_dim, most heads per KV head))",
                s.head_dim
            )));
        };
        let f = &self
            .f
            .decode
            .attention
            .iter()
            .find(|(k, _)| *k == key)
            .expect("every ATTENTION_KERNELS entry is loaded")
            .1;
        let (nh, kvh, cap, chunk) = (
            s.heads as i32,
            s.kv_heads as i32,
            s.capacity as i32,
            s.chunk as i32,
        );
        let scale = 1.0f32 / (s.head_dim as f32).sqrt();
        // SAFETY: the parameters match the kernel; the caller's contract covers the buffers.
        unsafe {
            self.go(
                f,
                cfg(
                    (s.kv_heads as u32, s.splits as u32, s.tokens as u32),
                    32 * attention_warps(key.0, key.1),
                ),
                "launching the attention kernel",
                &mut [
                    param(&q),
                    param(&k_cache),
                    param(&v_cache),
                    param(&pos),
                    param(&part_o),
                    param(&part_ml),
                    param(&nh),
                    param(&kvh),
                    param(&cap),
                    param(&chunk),
                    param(&scale),
                ],
            )
        }
    }

    /// Queue attention over the cache for `s.tokens` queries (query t sees positions
    /// `0..=pos+t`), split over the context, then the combine into `out` `[T, nh·hd]` — or,
    /// with `out` `None`, no combine: the splits stay in `part_o` / `part_ml` for the fused o
    /// GEMV ([`crate::cuda::gemv_fused::FusedX::CombineResidual`]) to combine in its x load.
    ///
    /// # Safety
    /// `q` holds `T·nh·hd` f32; `k_cache`/`v_cache` are the layer's bf16 `[kvh][cap][hd]` with
    /// positions `0..pos+T` written; `part_o` holds `T·nh·splits·hd` f32 and `part_ml`
    /// `T·nh·splits·2`; `splits·chunk >= pos + T`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn attention_async(
        &self,
        q: DevAddr,
        k_cache: DevAddr,
        v_cache: DevAddr,
        pos: DevAddr,
        part_o: DevAddr,
        part_ml: DevAddr,
        out: Option<DevAddr>,
        s: &AttentionShape,
    ) -> Result<(), KernelError> {
        // SAFETY: the caller's contract.
        unsafe { self.attention_splits_async(q, k_cache, v_cache, pos, part_o, part_ml, s) }?;
        let Some(out) = out else { return Ok(()) };
        let (nh, hd, splits, chunk) = (
            s.heads as i32,
            s.head_dim as i32,
            s.splits as i32,
            s.chunk as i32,
        );
        // SAFETY: the parameters match the kernel; the caller's contract covers the buffers.
        unsafe {
            self.go(
                &self.f.decode.attention_combine,
                cfg(
                    (s.heads as u32, s.tokens as u32, 1),
                    s.head_dim.clamp(32, 256) as u32,
                ),
                "launching kiln_attention_combine",
                &mut [
                    param(&part_o),
                    param(&part_ml),
                    param(&pos),
                    param(&out),
                    param(&nh),
                    param(&hd),
                    param(&splits),
                    param(&chunk),
                ],
            )
        }
    }

    /// Queue the prefill attention's causal softmax: each row (b, t) of `s` `[batch][T][L]`
    /// f32 over positions `0..=pos+t` into `p` (bf16, same shape, zeros past the prefix).
    ///
    /// # Safety
    /// `s` holds `batch·T·L` f32, `p` as many bf16, `pos` one i32 with `pos + T <= L`.
    pub unsafe fn causal_softmax_async(
        &self,
        s: DevAddr,
        p: DevAddr,
        batch: usize,
        tokens: usize,
        keys: usize,
        pos: DevAddr,
    ) -> Result<(), KernelError> {
        let (l, t) = (keys as i32, tokens as i32);
        // SAFETY: the parameters match the kernel; the caller's contract covers the buffers.
        unsafe {
            self.go(
                &self.f.decode.causal_softmax,
                cfg((tokens as u32, batch as u32, 1), 256),
                "launching kiln_causal_softmax_bf16",
                &mut [param(&s), param(&p), param(&l), param(&t), param(&pos)],
            )
        }
    }

    /// Queue the causal attention of a prompt batch of `tokens` queries on the tensor cores
    /// (flash-attention style: the scores stay in registers): `out[t, h, :]` (f32) attends
    /// query `q[t, h, :]` (bf16, `[tokens][nh][hd]`) over keys `0 ..= pos + t` of KV head
    /// `h / (nh / kvh)` in the bf16 caches `[kvh][cap][hd]`. Returns `false` (nothing queued)
    /// for a head dim not in [`FLASH_PREFILL_HEAD_DIMS`].
    ///
    /// # Safety
    /// `q` holds `tokens·nh·hd` bf16, `out` as many f32, the caches `kvh·cap·hd` bf16 with
    /// positions `0 .. pos + tokens` written, `pos` one i32 with `pos + tokens <= cap`; `nh` is
    /// a multiple of `kvh`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn flash_prefill_async(
        &self,
        q: DevAddr,
        k_cache: DevAddr,
        v_cache: DevAddr,
        pos: DevAddr,
        out: DevAddr,
        tokens: usize,
        heads: (usize, usize, usize),
        cap: usize,
    ) -> Result<bool, KernelError> {
        let (nh, kvh, hd) = heads;
        let Some((_, f)) = self.f.decode.flash_prefill.iter().find(|(d, _)| *d == hd) else {
            return Ok(false);
        };
        let (t, nh_i, kvh_i, cap_i) = (tokens as i32, nh as i32, kvh as i32, cap as i32);
        let scale_log2 = flash_scale_log2(hd);
        // SAFETY: the parameters match kiln_flash_prefill_hd{hd}; the caller's contract covers
        // the buffers.
        unsafe {
            self.go(
                f,
                LaunchConfig {
                    shared_mem_bytes: flash_prefill_smem(hd),
                    ..cfg((nh as u32, tokens.div_ceil(64) as u32, 1), 128)
                },
                "launching kiln_flash_prefill",
                &mut [
                    param(&q),
                    param(&k_cache),
                    param(&v_cache),
                    param(&pos),
                    param(&out),
                    param(&t),
                    param(&nh_i),
                    param(&kvh_i),
                    param(&cap_i),
                    param(&scale_log2),
                ],
            )?;
        }
        Ok(true)
    }

    /// Queue `act[t, i] = silu(gu[t, i]·scale[0]) · gu[t, I + i]·scale[1]` for `t < tokens`:
    /// f32 in and out, or with `bf16` bf16 in and out (the prompt path, between its GEMMs).
    ///
    /// # Safety
    /// `gu` holds `tokens·2·inter` and `act` `tokens·inter` f32 (bf16 with `bf16`), `scale` 2
    /// f32.
    pub unsafe fn swiglu_async(
        &self,
        gu: DevAddr,
        scale: DevAddr,
        act: DevAddr,
        tokens: usize,
        inter: usize,
        bf16: bool,
    ) -> Result<(), KernelError> {
        let n = tokens * inter;
        let (ii, ni) = (inter as i32, n as i32);
        if bf16 && inter.is_multiple_of(8) && tokens <= 65_535 {
            // eight elements a thread, a row of blocks per token
            let grid = (inter.div_ceil(8 * 256) as u32, tokens as u32, 1);
            // SAFETY: the parameters match kiln_swiglu_bf16_x8; the caller's contract covers
            // the buffers (16-byte aligned rows: inter is a multiple of 8).
            return unsafe {
                self.go(
                    &self.f.decode.swiglu_bf16_x8,
                    cfg(grid, 256),
                    "launching kiln_swiglu_bf16_x8",
                    &mut [param(&gu), param(&scale), param(&act), param(&ii)],
                )
            };
        }
        let f = if bf16 {
            &self.f.decode.swiglu_bf16
        } else {
            &self.f.decode.swiglu
        };
        // SAFETY: the parameters match the kernel; the caller's contract covers the buffers.
        unsafe {
            self.go(
                f,
                cfg((n.div_ceil(256) as u32, 1, 1), 256),
                "launching kiln_swiglu",
                &mut [
                    param(&gu),
                    param(&scale),
                    param(&act),
                    param(&ii),
                    param(&ni),
                ],
            )
        }
    }

    /// Queue the greedy pick over `vocab` logits: the first index of the largest is written
    /// to `token`; with `advance`, `*pos += 1`.
    ///
    /// # Safety
    /// `logits` holds `vocab` f32; `part_val` and `part_idx` hold [`ARGMAX_BLOCKS`] f32 / i32;
    /// `counter` is one u32, zero before the first launch (each launch leaves it zero);
    /// `token` one u32, `pos` one i32.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn argmax_advance_async(
        &self,
        logits: DevAddr,
        vocab: usize,
        part_val: DevAddr,
        part_idx: DevAddr,
        counter: DevAddr,
        token: DevAddr,
        pos: DevAddr,
        advance: bool,
    ) -> Result<(), KernelError> {
        let (v, adv) = (vocab as i32, i32::from(advance));
        let blocks = vocab.div_ceil(256).clamp(1, ARGMAX_BLOCKS) as u32;
        // SAFETY: the parameters match the kernel; the caller's contract covers the buffers.
        unsafe {
            self.go(
                &self.f.decode.argmax_advance,
                cfg((blocks, 1, 1), 256),
                "launching kiln_argmax_advance",
                &mut [
                    param(&logits),
                    param(&v),
                    param(&part_val),
                    param(&part_idx),
                    param(&counter),
                    param(&token),
                    param(&pos),
                    param(&adv),
                ],
            )
        }
    }

    /// Queue a sampled pick over `vocab` logits (temperature, top-k, top-p as the CPU sampler
    /// applies them; the Gumbel-max trick with noise hashed from the seed, `*step` and the
    /// index): the token is written to `token`, `*step` advances, and with `advance`
    /// `*pos += 1`.
    ///
    /// # Safety
    /// `logits` holds `vocab` f32; `step`, `token` one u32 each, `pos` one i32.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn sample_advance_async(
        &self,
        logits: DevAddr,
        vocab: usize,
        p: &DeviceSampling,
        step: DevAddr,
        token: DevAddr,
        pos: DevAddr,
        advance: bool,
    ) -> Result<(), KernelError> {
        let (v, k, adv) = (
            vocab as i32,
            p.top_k.min(i32::MAX as usize) as i32,
            i32::from(advance),
        );
        // SAFETY: the parameters match the kernel; the caller's contract covers the buffers.
        unsafe {
            self.go(
                &self.f.decode.sample_advance,
                cfg((1, 1, 1), 1024),
                "launching kiln_sample_advance",
                &mut [
                    param(&logits),
                    param(&v),
                    param(&p.temperature),
                    param(&k),
                    param(&p.top_p),
                    param(&p.seed),
                    param(&step),
                    param(&token),
                    param(&pos),
                    param(&adv),
                ],
            )
        }
    }

    /// Queue seeded random NVFP4 contents: every code byte a hash of (seed, index), block
    /// scales E4M3 codes uniform in `scale_codes` (the tensor scale is left as it is).
    pub fn random_nvfp4_async(
        &self,
        w: &mut super::ops::DeviceNvfp4,
        seed: u64,
        scale_codes: (u8, u8),
    ) -> Result<(), KernelError> {
        let (np, ns) = (w.packed.len() as u64, w.scales.len() as u64);
        let (lo, hi) = (
            scale_codes.0 as u32,
            scale_codes.1.max(scale_codes.0) as u32,
        );
        let mut b = self.stream.launch_builder(&self.f.decode.random_nvfp4);
        b.arg(&mut w.packed)
            .arg(&np)
            .arg(&mut w.scales)
            .arg(&ns)
            .arg(&seed)
            .arg(&lo)
            .arg(&hi);
        // SAFETY: matches kiln_random_nvfp4; the lengths are the buffers' own.
        unsafe { b.launch(cfg((self.sm_count * 8, 1, 1), 256)) }
            .map(|_| ())
            .map_err(drv("launching kiln_random_nvfp4"))
    }

    /// Queue seeded random bf16 values uniform in `[-a, a]` into `out`.
    pub fn random_bf16_async(
        &self,
        out: &mut CudaSlice<half::bf16>,
        seed: u64,
        a: f32,
    ) -> Result<(), KernelError> {
        let n = out.len() as u64;
        let mut b = self.stream.launch_builder(&self.f.decode.random_bf16);
        b.arg(out).arg(&n).arg(&seed).arg(&a);
        // SAFETY: matches kiln_random_bf16; n is the buffer's length.
        unsafe { b.launch(cfg((self.sm_count * 8, 1, 1), 256)) }
            .map(|_| ())
            .map_err(drv("launching kiln_random_bf16"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_attention_kernel_is_instantiated_in_decode_cu() {
        let src = include_str!("../../cuda/decode.cu");
        for &(hd, rep) in ATTENTION_KERNELS {
            assert!(
                src.contains(&format!("KILN_ATTENTION({hd}, {rep})")),
                "decode.cu lacks KILN_ATTENTION({hd}, {rep})"
            );
        }
        assert_eq!(
            src.matches("\nKILN_ATTENTION(").count(),
            ATTENTION_KERNELS.len()
        );
    }

    #[test]
    fn the_smallest_covering_attention_kernel_is_picked() {
        assert_eq!(attention_kernel_for(64, 7), Some((64, 8)));
        assert_eq!(attention_kernel_for(64, 1), Some((64, 2)));
        assert_eq!(attention_kernel_for(128, 3), Some((128, 4)));
        assert_eq!(attention_kernel_for(128, 12), Some((128, 16)));
        assert_eq!(attention_kernel_for(256, 12), None);
        assert_eq!(attention_kernel_for(96, 2), None);
    }
}
