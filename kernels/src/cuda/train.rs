//! The GPU train step's kernels besides the GEMMs (`kernels/cuda/train.cu`): embedding gather
//! and scatter-add, RMSNorm forward / backward, the q/k/v epilogue (bias + RoPE into the
//! attention layout) and its backward, Qwen3's per-head q/k RMSNorm and its backward, the causal softmax and its backward, the head merge /
//! split around the output projection, SwiGLU forward / backward, cross-entropy over a chunk of
//! logits, the straight-through NVFP4 fake-quant of a master weight, and AdamW over many tensors
//! in one launch with the global-norm clip computed on the device.
//!
//! Layouts are those of `train.cu`'s header: the residual stream f32 `[N, H]` (N = B·T tokens),
//! GEMM inputs bf16, GEMM outputs f32, attention in the group layout (queries
//! `[B][kvh][rep][T][hd]`, keys and values `[B][kvh][T][hd]`, scores `[B][kvh][rep·T][T]`).
//! Launchers take raw device addresses ([`DevAddr`]) like the decode kernels' and are `unsafe`
//! for the same reason: each says which buffers must be live and how large.

use std::ffi::c_void;

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig};

use super::context::CudaKernels;
use super::decode::{cfg, DevAddr};
use super::driver::{drv, launch_raw, param};
use super::ops::DeviceStatus;
use super::train_attention::TrainFlashFunctions;
use crate::cpu::adamw::{MOMENT1_SR_SALT, MOMENT2_SR_SALT};
use crate::cpu::AdamWScalars;
use crate::KernelError;

/// Elements per block of the multi-tensor kernels (`KILN_TRAIN_CHUNK`).
pub const TRAIN_CHUNK: usize = 4096;
/// Columns each thread of the RMSNorm backward holds (`KILN_NORM_COLS_PER_THREAD`).
const NORM_COLS_PER_THREAD: usize = 8;
/// Most rows per block of the RMSNorm backward (its dw partial sums are added once per block);
/// fewer where that leaves the GPU short of blocks ([`norm_bwd_rows`]).
const NORM_BWD_ROWS: usize = 32;

/// The SwiGLU kernels' grid: 256 columns a block, a row per `blockIdx.y` (rows past 65,535
/// loop).
fn swiglu_grid(tokens: usize, inter: usize) -> LaunchConfig {
    cfg(
        (
            inter.div_ceil(256) as u32,
            tokens.clamp(1, 65_535) as u32,
            1,
        ),
        256,
    )
}

/// Rows per block of the RMSNorm backward over `rows` rows: enough blocks for about eight per
/// SM (a block is one to four warps wide, so 32 rows a block left most SMs with one block of
/// four warps: 197 µs for 4,096 rows of 896 on the H200, 16% of a 0.5B train step, by ncu),
/// at most [`NORM_BWD_ROWS`] so the dw atomics stay few.
fn norm_bwd_rows(rows: usize, sm_count: u32) -> usize {
    rows.div_ceil(8 * sm_count.max(1) as usize)
        .clamp(1, NORM_BWD_ROWS)
}
/// Rotation pairs each thread of the q/k/v backward owns (`KILN_QKV_PAIRS_PER_THREAD`).
const QKV_PAIRS_PER_THREAD: usize = 4;
/// Tokens per block of the q/k/v backward (its bias gradient is added once per block).
const QKV_BWD_ROWS: usize = 16;
/// The widest head the per-head q/k norm takes (`32 · KILN_HEAD_MAX_PER_LANE`).
pub const HEAD_NORM_MAX_DIM: usize = 256;
/// Tokens per block of the per-head norm's backward (its weight gradients are added once per
/// block).
const HEAD_NORM_BWD_ROWS: usize = 32;

/// The loaded train kernels.
pub(crate) struct TrainFunctions {
    embed_fwd: CudaFunction,
    embed_bwd: CudaFunction,
    rmsnorm_fwd: CudaFunction,
    rmsnorm_bwd: CudaFunction,
    qkv_fwd: CudaFunction,
    qkv_bwd: CudaFunction,
    head_norm_fwd: CudaFunction,
    head_norm_bwd: CudaFunction,
    causal_softmax: CudaFunction,
    softmax_bwd: CudaFunction,
    merge_heads: CudaFunction,
    split_heads: CudaFunction,
    swiglu_fwd: CudaFunction,
    swiglu_bwd: CudaFunction,
    cross_entropy: CudaFunction,
    fakequant_bf16: CudaFunction,
    grad_sumsq: CudaFunction,
    adamw_f32m: CudaFunction,
    adamw_bf16m: CudaFunction,
    /// The flash attention kernels, or why they could not be loaded (kept apart so that a
    /// failure there leaves every other kernel usable).
    flash: Result<TrainFlashFunctions, String>,
}

impl TrainFunctions {
    /// Why the flash attention kernels did not load, or `None` when they did.
    pub(super) fn flash_load_error(&self) -> Option<&str> {
        self.flash.as_ref().err().map(String::as_str)
    }

    /// The flash attention kernels, or the error that kept them from loading.
    pub(super) fn flash(&self) -> Result<&TrainFlashFunctions, KernelError> {
        self.flash.as_ref().map_err(|e| {
            KernelError::InvalidArgument(format!(
                "the flash train attention kernels did not load: {e}"
            ))
        })
    }

    pub(crate) fn load(
        func: &dyn Fn(&str, &str) -> Result<CudaFunction, KernelError>,
    ) -> Result<Self, KernelError> {
        let f = |name: &str| func("train.cu", name);
        Ok(TrainFunctions {
            embed_fwd: f("kiln_train_embed_fwd")?,
            embed_bwd: f("kiln_train_embed_bwd")?,
            rmsnorm_fwd: f("kiln_train_rmsnorm_fwd")?,
            rmsnorm_bwd: f("kiln_train_rmsnorm_bwd")?,
            qkv_fwd: f("kiln_train_qkv_fwd")?,
            qkv_bwd: f("kiln_train_qkv_bwd")?,
            head_norm_fwd: f("kiln_train_head_norm_fwd")?,
            head_norm_bwd: f("kiln_train_head_norm_bwd")?,
            causal_softmax: f("kiln_train_causal_softmax")?,
            softmax_bwd: f("kiln_train_softmax_bwd")?,
            merge_heads: f("kiln_train_merge_heads")?,
            split_heads: f("kiln_train_split_heads")?,
            swiglu_fwd: f("kiln_train_swiglu_fwd")?,
            swiglu_bwd: f("kiln_train_swiglu_bwd")?,
            cross_entropy: f("kiln_train_cross_entropy")?,
            fakequant_bf16: f("kiln_train_fakequant_bf16")?,
            grad_sumsq: f("kiln_train_grad_sumsq")?,
            adamw_f32m: f("kiln_train_adamw_f32m")?,
            adamw_bf16m: f("kiln_train_adamw_bf16m")?,
            flash: TrainFlashFunctions::load(func).map_err(|e| e.to_string()),
        })
    }
}

/// The attention shape of a train step: `batch` sequences of `seq` tokens, `heads` query heads
/// sharing `kv_heads` key/value heads of `head_dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainAttnShape {
    /// Sequences (B).
    pub batch: usize,
    /// Tokens per sequence (T).
    pub seq: usize,
    /// Query heads (nh), a multiple of `kv_heads`.
    pub heads: usize,
    /// Key/value heads (kvh).
    pub kv_heads: usize,
    /// Head dimension (hd), even.
    pub head_dim: usize,
}

impl TrainAttnShape {
    /// Tokens (N = B·T).
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }

    /// Query heads per KV head.
    pub fn rep(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Columns of the stacked q/k/v projection: `(nh + 2·kvh)·hd`.
    pub fn qkv_cols(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    /// Rows of the score matrices over all groups: `B·nh·T`.
    pub fn score_rows(&self) -> usize {
        self.batch * self.heads * self.seq
    }

    pub(crate) fn check(&self) -> Result<(), KernelError> {
        let ok = self.batch > 0
            && self.seq > 0
            && self.heads > 0
            && self.kv_heads > 0
            && self.heads.is_multiple_of(self.kv_heads)
            && self.head_dim.is_multiple_of(2)
            && self.head_dim > 0;
        if ok {
            Ok(())
        } else {
            Err(KernelError::InvalidArgument(format!(
                "attention shape {self:?}: heads must be a positive multiple of kv_heads and head_dim even"
            )))
        }
    }
}

/// One tensor of a multi-tensor AdamW launch: master weight, gradient and moments (f32, or bf16
/// where the table says so), `n` elements each. `#[repr(C)]`: `KilnTrainTensor` in `train.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainTensor {
    /// f32 master weight.
    pub w: DevAddr,
    /// f32 gradient.
    pub g: DevAddr,
    /// First moment.
    pub m: DevAddr,
    /// Second moment.
    pub v: DevAddr,
    /// Elements.
    pub n: i64,
}

/// The device table of a multi-tensor AdamW launch: the tensors and the first chunk of each.
/// Build it once per model (the addresses do not change between steps).
pub struct TrainTensorTable {
    tensors: CudaSlice<u8>,
    chunk_start: CudaSlice<i32>,
    count: i32,
    chunks: u32,
    bf16_moments: bool,
}

impl TrainTensorTable {
    /// Blocks of one launch over the table ([`TRAIN_CHUNK`] elements each).
    pub fn chunks(&self) -> u32 {
        self.chunks
    }
}

/// `KilnTrainAdamW` in `train.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct AdamWArgs {
    beta1: f32,
    beta2: f32,
    eps: f32,
    decay: f32,
    step_size: f32,
    bc2_sqrt: f32,
    max_norm: f32,
    m_seed: u64,
    v_seed: u64,
}

impl CudaKernels {
    /// A plain launch of a train kernel.
    pub(super) unsafe fn train_go(
        &self,
        f: &CudaFunction,
        c: LaunchConfig,
        what: &str,
        params: &mut [*mut c_void],
    ) -> Result<(), KernelError> {
        if c.grid_dim.0 == 0 {
            return Ok(()); // nothing to do (zero rows or elements)
        }
        // SAFETY: the caller's contract.
        unsafe { launch_raw(&self.stream, f, c, params, false) }.map_err(drv(what))
    }

    /// Queue `h[n, :] = table[ids[n], :]` for `n < tokens` (f32 table `[rows, width]`).
    ///
    /// # Safety
    /// `ids` holds `tokens` i32 below the table's rows; `h` holds `tokens·width` f32.
    pub unsafe fn train_embed_fwd_async(
        &self,
        ids: DevAddr,
        table: DevAddr,
        h: DevAddr,
        tokens: usize,
        width: usize,
    ) -> Result<(), KernelError> {
        let w = width as i32;
        // SAFETY: the parameters match the kernel; the caller's contract covers the buffers.
        unsafe {
            self.train_go(
                &self.f.train.embed_fwd,
                cfg((tokens as u32, 1, 1), 256),
                "launching kiln_train_embed_fwd",
                &mut [param(&ids), param(&table), param(&h), param(&w)],
            )
        }
    }

    /// Queue `dtable[ids[n], :] += dh[n, :]` (atomic adds).
    ///
    /// # Safety
    /// As [`CudaKernels::train_embed_fwd_async`], with `dh` for `h` and `dtable` for `table`.
    pub unsafe fn train_embed_bwd_async(
        &self,
        ids: DevAddr,
        dh: DevAddr,
        dtable: DevAddr,
        tokens: usize,
        width: usize,
    ) -> Result<(), KernelError> {
        let w = width as i32;
        // SAFETY: as above.
        unsafe {
            self.train_go(
                &self.f.train.embed_bwd,
                cfg((tokens as u32, 1, 1), 256),
                "launching kiln_train_embed_bwd",
                &mut [param(&ids), param(&dh), param(&dtable), param(&w)],
            )
        }
    }

    /// Queue `y = h·r·w` (bf16) and `rstd[n] = r` per row, `r = 1/sqrt(mean(h²) + eps)`.
    ///
    /// # Safety
    /// `h` holds `rows·width` f32, `w` `width` f32, `y` `rows·width` bf16, `rstd` `rows` f32.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn train_rmsnorm_fwd_async(
        &self,
        h: DevAddr,
        w: DevAddr,
        y: DevAddr,
        rstd: DevAddr,
        rows: usize,
        width: usize,
        eps: f32,
    ) -> Result<(), KernelError> {
        let wi = width as i32;
        // SAFETY: the parameters match the kernel; the caller's contract covers the buffers.
        unsafe {
            self.train_go(
                &self.f.train.rmsnorm_fwd,
                cfg((rows as u32, 1, 1), 256),
                "launching kiln_train_rmsnorm_fwd",
                &mut [
                    param(&h),
                    param(&w),
                    param(&y),
                    param(&rstd),
                    param(&wi),
                    param(&eps),
                ],
            )
        }
    }

    /// Queue the RMSNorm backward given `dy` (f32): `dh +=` the input gradient, `dw +=` the
    /// weight gradient (atomic, one add per column per block of rows).
    ///
    /// # Safety
    /// `h`, `dy`, `dh` hold `rows·width` f32; `w`, `dw` `width` f32; `rstd` `rows` f32 (from
    /// the forward). `width` ≤ 8192.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn train_rmsnorm_bwd_async(
        &self,
        h: DevAddr,
        w: DevAddr,
        rstd: DevAddr,
        dy: DevAddr,
        dh: DevAddr,
        dw: DevAddr,
        rows: usize,
        width: usize,
    ) -> Result<(), KernelError> {
        let block = width
            .div_ceil(NORM_COLS_PER_THREAD)
            .next_multiple_of(32)
            .clamp(128, 1024);
        if width > block * NORM_COLS_PER_THREAD {
            return Err(KernelError::InvalidArgument(format!(
                "RMSNorm backward over {width} columns: at most {} are supported",
                1024 * NORM_COLS_PER_THREAD
            )));
        }
        let per_block = norm_bwd_rows(rows, self.sm_count);
        let (ri, wi, per) = (rows as i32, width as i32, per_block as i32);
        // SAFETY: the parameters match the kernel; the caller's contract covers the buffers.
        unsafe {
            self.train_go(
                &self.f.train.rmsnorm_bwd,
                cfg((rows.div_ceil(per_block) as u32, 1, 1), block as u32),
                "launching kiln_train_rmsnorm_bwd",
                &mut [
                    param(&h),
                    param(&w),
                    param(&rstd),
                    param(&dy),
                    param(&dh),
                    param(&dw),
                    param(&ri),
                    param(&wi),
                    param(&per),
                ],
            )
        }
    }

    /// Queue the q/k/v epilogue: `qkv` f32 `[N, qkv_cols]` (+ `bias`, or 0) → RoPE'd `q`
    /// (group layout), RoPE'd `k` and `v` (`[B][kvh][T][hd]`), bf16.
    ///
    /// # Safety
    /// `qkv` holds `N·qkv_cols` f32, `bias` `qkv_cols` f32 or is 0, `inv_freq` `hd/2` f32; `q`
    /// holds `N·nh·hd` bf16, `k` and `v` `N·kvh·hd` bf16.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn train_qkv_fwd_async(
        &self,
        shape: TrainAttnShape,
        qkv: DevAddr,
        bias: DevAddr,
        inv_freq: DevAddr,
        q: DevAddr,
        k: DevAddr,
        v: DevAddr,
    ) -> Result<(), KernelError> {
        shape.check()?;
        let (t, nh, kvh, hd) = Self::attn_ints(shape);
        // SAFETY: the parameters match the kernel; the caller's contract covers the buffers.
        unsafe {
            self.train_go(
                &self.f.train.qkv_fwd,
                cfg((shape.tokens() as u32, 1, 1), 256),
                "launching kiln_train_qkv_fwd",
                &mut [
                    param(&qkv),
                    param(&bias),
                    param(&inv_freq),
                    param(&q),
                    param(&k),
                    param(&v),
                    param(&t),
                    param(&nh),
                    param(&kvh),
                    param(&hd),
                ],
            )
        }
    }

    /// Queue the q/k/v epilogue's backward: `dq`, `dk`, `dv` f32 in the attention layouts →
    /// `dqkv` bf16 `[N, qkv_cols]` (inverse RoPE), and `dbias +=` its column sums (0: no bias).
    ///
    /// # Safety
    /// As [`CudaKernels::train_qkv_fwd_async`] with f32 gradients in q/k/v's layouts, `dqkv`
    /// `N·qkv_cols` bf16 and `dbias` `qkv_cols` f32 or 0.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn train_qkv_bwd_async(
        &self,
        shape: TrainAttnShape,
        dq: DevAddr,
        dk: DevAddr,
        dv: DevAddr,
        inv_freq: DevAddr,
        dqkv: DevAddr,
        dbias: DevAddr,
    ) -> Result<(), KernelError> {
        shape.check()?;
        let (t, nh, kvh, hd) = Self::attn_ints(shape);
        let pairs = shape.qkv_cols() / 2;
        let block = pairs
            .div_ceil(QKV_PAIRS_PER_THREAD)
            .next_multiple_of(32)
            .clamp(64, 1024);
        if pairs > block * QKV_PAIRS_PER_THREAD {
            return Err(KernelError::InvalidArgument(format!(
                "q/k/v backward over {} columns: at most {} are supported",
                shape.qkv_cols(),
                2 * 1024 * QKV_PAIRS_PER_THREAD
            )));
        }
        let tokens = shape.tokens();
        let (ni, per) = (tokens as i32, QKV_BWD_ROWS as i32);
        // SAFETY: the parameters match the kernel; the caller's contract covers the buffers.
        unsafe {
            self.train_go(
                &self.f.train.qkv_bwd,
                cfg((tokens.div_ceil(QKV_BWD_ROWS) as u32, 1, 1), block as u32),
                "launching kiln_train_qkv_bwd",
                &mut [
                    param(&dq),
                    param(&dk),
                    param(&dv),
                    param(&inv_freq),
                    param(&dqkv),
                    param(&dbias),
                    param(&ni),
                    param(&t),
                    param(&nh),
                    param(&kvh),
                    param(&hd),
                    param(&per),
                ],
            )
        }
    }

    /// Queue Qwen3's per-head RMSNorm of q and k, in place on the q/k/v GEMM output `qkv` f32
    /// `[N, qkv_cols]`: each q head normed with `qw`, each k head with `kw` (both `[hd]`); the
    /// normalized values `xhat` (bf16 `[N·(nh + kvh)·hd]`) and `rstd` (f32 `[N·(nh + kvh)]`)
    /// are saved for the backward. Run it before [`CudaKernels::train_qkv_fwd_async`].
    ///
    /// # Safety
    /// `qkv` holds `N·qkv_cols` f32, `qw` and `kw` `hd` f32, `xhat` and `rstd` as above.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn train_head_norm_fwd_async(
        &self,
        shape: TrainAttnShape,
        qkv: DevAddr,
        qw: DevAddr,
        kw: DevAddr,
        xhat: DevAddr,
        rstd: DevAddr,
        eps: f32,
    ) -> Result<(), KernelError> {
        Self::check_head_norm(shape)?;
        let (_, nh, kvh, hd) = Self::attn_ints(shape);
        let ni = shape.tokens() as i32;
        let rows = shape.tokens() * (shape.heads + shape.kv_heads);
        // SAFETY: the parameters match the kernel; the caller's contract covers the buffers.
        unsafe {
            self.train_go(
                &self.f.train.head_norm_fwd,
                cfg((rows.div_ceil(8) as u32, 1, 1), 256),
                "launching kiln_train_head_norm_fwd",
                &mut [
                    param(&qkv),
                    param(&qw),
                    param(&kw),
                    param(&xhat),
                    param(&rstd),
                    param(&ni),
                    param(&nh),
                    param(&kvh),
                    param(&hd),
                    param(&eps),
                ],
            )
        }
    }

    /// Queue the per-head q/k norm's backward, in place on `dqkv` bf16 `[N, qkv_cols]` (the
    /// gradient of the normed q and k, from [`CudaKernels::train_qkv_bwd_async`], becomes that
    /// of the GEMM output); `dqw` / `dkw +=` the weight gradients (atomic, once per block).
    ///
    /// # Safety
    /// As [`CudaKernels::train_head_norm_fwd_async`] with `xhat` and `rstd` from it, `dqkv`
    /// `N·qkv_cols` bf16, `dqw` and `dkw` `hd` f32.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn train_head_norm_bwd_async(
        &self,
        shape: TrainAttnShape,
        dqkv: DevAddr,
        xhat: DevAddr,
        rstd: DevAddr,
        qw: DevAddr,
        kw: DevAddr,
        dqw: DevAddr,
        dkw: DevAddr,
    ) -> Result<(), KernelError> {
        Self::check_head_norm(shape)?;
        let (_, nh, kvh, hd) = Self::attn_ints(shape);
        let tokens = shape.tokens();
        let per_block = norm_bwd_rows(tokens, self.sm_count).min(HEAD_NORM_BWD_ROWS);
        let (ni, per) = (tokens as i32, per_block as i32);
        let block = (32 * (shape.heads + shape.kv_heads)).min(512) as u32;
        // SAFETY: the parameters match the kernel; the caller's contract covers the buffers.
        unsafe {
            self.train_go(
                &self.f.train.head_norm_bwd,
                cfg((tokens.div_ceil(per_block) as u32, 1, 1), block),
                "launching kiln_train_head_norm_bwd",
                &mut [
                    param(&dqkv),
                    param(&xhat),
                    param(&rstd),
                    param(&qw),
                    param(&kw),
                    param(&dqw),
                    param(&dkw),
                    param(&ni),
                    param(&nh),
                    param(&kvh),
                    param(&hd),
                    param(&per),
                ],
            )
        }
    }

    fn check_head_norm(shape: TrainAttnShape) -> Result<(), KernelError> {
        shape.check()?;
        if shape.head_dim > HEAD_NORM_MAX_DIM {
            return Err(KernelError::InvalidArgument(format!(
                "per-head q/k norm over head_dim {}: at most {HEAD_NORM_MAX_DIM} is supported",
                shape.head_dim
            )));
        }
        Ok(())
    }

    /// The shape's (T, nh, kvh, hd) as the kernels take them.
    pub(super) fn attn_ints(shape: TrainAttnShape) -> (i32, i32, i32, i32) {
        (
            shape.seq as i32,
            shape.heads as i32,
            shape.kv_heads as i32,
            shape.head_dim as i32,
        )
    }

    /// Queue `p = softmax(scale·s)` over each row's causal prefix (row r: position `r % seq`),
    /// zeros past it; `s` f32 and `p` bf16, `[rows, seq]`.
    ///
    /// # Safety
    /// `s` holds `rows·seq` f32 and `p` `rows·seq` bf16; `rows` is a multiple of `seq`.
    pub unsafe fn train_causal_softmax_async(
        &self,
        s: DevAddr,
        p: DevAddr,
        rows: usize,
        seq: usize,
        scale: f32,
    ) -> Result<(), KernelError> {
        if seq == 0 || !rows.is_multiple_of(seq) {
            return Err(KernelError::InvalidArgument(format!(
                "causal softmax over {rows} rows of {seq}: rows must be a multiple of a positive seq"
            )));
        }
        let t = seq as i32;
        // SAFETY: the parameters match the kernel; the caller's contract covers the buffers.
        unsafe {
            self.train_go(
                &self.f.train.causal_softmax,
                cfg((rows as u32, 1, 1), 128),
                "launching kiln_train_causal_softmax",
                &mut [param(&s), param(&p), param(&t), param(&scale)],
            )
        }
    }

    /// Queue `ds = scale · p ⊙ (dp − rowsum(p ⊙ dp))` (the softmax backward with its scale).
    ///
    /// # Safety
    /// `p` and `ds` hold `rows·seq` bf16, `dp` `rows·seq` f32.
    pub unsafe fn train_softmax_bwd_async(
        &self,
        p: DevAddr,
        dp: DevAddr,
        ds: DevAddr,
        rows: usize,
        seq: usize,
        scale: f32,
    ) -> Result<(), KernelError> {
        let t = seq as i32;
        // SAFETY: the parameters match the kernel; the caller's contract covers the buffers.
        unsafe {
            self.train_go(
                &self.f.train.softmax_bwd,
                cfg((rows as u32, 1, 1), 128),
                "launching kiln_train_softmax_bwd",
                &mut [param(&p), param(&dp), param(&ds), param(&t), param(&scale)],
            )
        }
    }

    /// Queue the attention output from the group layout (f32) to tokens `[N, nh·hd]` (bf16).
    ///
    /// # Safety
    /// `o` holds `N·nh·hd` f32, `out` `N·nh·hd` bf16.
    pub unsafe fn train_merge_heads_async(
        &self,
        shape: TrainAttnShape,
        o: DevAddr,
        out: DevAddr,
    ) -> Result<(), KernelError> {
        // SAFETY: the caller's contract.
        unsafe { self.heads_permute(&self.f.train.merge_heads, shape, o, out) }
    }

    /// Queue the inverse of [`CudaKernels::train_merge_heads_async`]: tokens `[N, nh·hd]` (f32)
    /// to the group layout (bf16).
    ///
    /// # Safety
    /// `d` holds `N·nh·hd` f32, `dst` `N·nh·hd` bf16.
    pub unsafe fn train_split_heads_async(
        &self,
        shape: TrainAttnShape,
        d: DevAddr,
        dst: DevAddr,
    ) -> Result<(), KernelError> {
        // SAFETY: the caller's contract.
        unsafe { self.heads_permute(&self.f.train.split_heads, shape, d, dst) }
    }

    unsafe fn heads_permute(
        &self,
        f: &CudaFunction,
        shape: TrainAttnShape,
        src: DevAddr,
        dst: DevAddr,
    ) -> Result<(), KernelError> {
        shape.check()?;
        let (t, nh, kvh, hd) = Self::attn_ints(shape);
        // SAFETY: both permute kernels take (src, dst, T, nh, kvh, hd); the caller's contract
        // covers the buffers.
        unsafe {
            self.train_go(
                f,
                cfg((shape.tokens() as u32, 1, 1), 256),
                "launching a head permute kernel",
                &mut [
                    param(&src),
                    param(&dst),
                    param(&t),
                    param(&nh),
                    param(&kvh),
                    param(&hd),
                ],
            )
        }
    }

    /// Queue `a = silu(g)·u` (bf16 `[tokens, inter]`) from `gu` = `[g | u]` f32 `[tokens, 2·inter]`.
    ///
    /// # Safety
    /// `gu` holds `tokens·2·inter` f32, `a` `tokens·inter` bf16.
    pub unsafe fn train_swiglu_fwd_async(
        &self,
        gu: DevAddr,
        a: DevAddr,
        tokens: usize,
        inter: usize,
    ) -> Result<(), KernelError> {
        let (ii, ni) = (inter as i32, tokens as i32);
        // SAFETY: the parameters match the kernel; the caller's contract covers the buffers.
        unsafe {
            self.train_go(
                &self.f.train.swiglu_fwd,
                swiglu_grid(tokens, inter),
                "launching kiln_train_swiglu_fwd",
                &mut [param(&gu), param(&a), param(&ii), param(&ni)],
            )
        }
    }

    /// Queue the SwiGLU backward: `da` f32 `[tokens, inter]` → `dgu` bf16 `[tokens, 2·inter]`.
    ///
    /// # Safety
    /// `gu` holds `tokens·2·inter` f32 (the forward's input), `da` `tokens·inter` f32, `dgu`
    /// `tokens·2·inter` bf16.
    pub unsafe fn train_swiglu_bwd_async(
        &self,
        gu: DevAddr,
        da: DevAddr,
        dgu: DevAddr,
        tokens: usize,
        inter: usize,
    ) -> Result<(), KernelError> {
        let (ii, ni) = (inter as i32, tokens as i32);
        // SAFETY: the parameters match the kernel; the caller's contract covers the buffers.
        unsafe {
            self.train_go(
                &self.f.train.swiglu_bwd,
                swiglu_grid(tokens, inter),
                "launching kiln_train_swiglu_bwd",
                &mut [param(&gu), param(&da), param(&dgu), param(&ii), param(&ni)],
            )
        }
    }

    /// Queue cross-entropy over `rows` rows of `logits` (f32 `[rows, vocab]`): `loss_sum +=
    /// Σ weight[n]·(logsumexp − logit[target[n]])` (one f64, atomic) and `dlogits = weight ·
    /// (softmax − onehot)` (bf16, zeros where the weight is 0).
    ///
    /// # Safety
    /// `logits` holds `rows·vocab` f32, `target` `rows` i32 below `vocab`, `weight` `rows` f32,
    /// `dlogits` `rows·vocab` bf16, `loss_sum` one f64.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn train_cross_entropy_async(
        &self,
        logits: DevAddr,
        target: DevAddr,
        weight: DevAddr,
        dlogits: DevAddr,
        loss_sum: DevAddr,
        rows: usize,
        vocab: usize,
    ) -> Result<(), KernelError> {
        let v = vocab as i32;
        // SAFETY: the parameters match the kernel; the caller's contract covers the buffers.
        unsafe {
            self.train_go(
                &self.f.train.cross_entropy,
                cfg((rows as u32, 1, 1), 512),
                "launching kiln_train_cross_entropy",
                &mut [
                    param(&logits),
                    param(&target),
                    param(&weight),
                    param(&dlogits),
                    param(&loss_sum),
                    param(&v),
                ],
            )
        }
    }

    /// Queue the straight-through fake-quant of a master weight: `out` (bf16) = NVFP4 round to
    /// nearest of `w` with the tensor scale of its amax in `status` (from
    /// [`CudaKernels::amax_async`] over the same `w`), dequantized: the CPU quantizer's values,
    /// rounded to bf16.
    ///
    /// # Safety
    /// `w` holds `count` f32 (16-byte aligned), `out` `count` bf16.
    pub unsafe fn train_fakequant_bf16_async(
        &self,
        w: DevAddr,
        status: &DeviceStatus,
        out: DevAddr,
        count: usize,
    ) -> Result<(), KernelError> {
        let amax_bits = self.addr(&status.amax_bits, 0);
        if !count.is_multiple_of(16) {
            return Err(KernelError::InvalidArgument(format!(
                "fake-quant of {count} elements: NVFP4 blocks need a multiple of 16"
            )));
        }
        let n = count as i64;
        // SAFETY: the parameters match the kernel; the caller's contract covers the buffers.
        unsafe {
            self.train_go(
                &self.f.train.fakequant_bf16,
                cfg(((count / 4).div_ceil(256) as u32, 1, 1), 256),
                "launching kiln_train_fakequant_bf16",
                &mut [param(&w), param(&amax_bits), param(&out), param(&n)],
            )
        }
    }

    /// Queue `y = bf16(x)` (round to nearest even) over `n` elements at raw addresses.
    ///
    /// # Safety
    /// `x` holds `n` f32 and `y` `n` bf16.
    pub unsafe fn train_f32_to_bf16_async(
        &self,
        x: DevAddr,
        y: DevAddr,
        n: usize,
    ) -> Result<(), KernelError> {
        let nn = n as u64;
        let blocks = n.div_ceil(256).clamp(1, self.sm_count as usize * 16) as u32;
        // SAFETY: (x, n, y) is kiln_f32_to_bf16's parameter list (a grid-stride loop); the
        // caller's contract covers the buffers.
        unsafe {
            self.train_go(
                &self.f.f32_to_bf16,
                cfg((blocks, 1, 1), 256),
                "launching kiln_f32_to_bf16",
                &mut [param(&x), param(&nn), param(&y)],
            )
        }
    }

    /// Upload the table of a multi-tensor AdamW launch (moments bf16 when `bf16_moments`).
    pub fn train_tensor_table(
        &self,
        tensors: &[TrainTensor],
        bf16_moments: bool,
    ) -> Result<TrainTensorTable, KernelError> {
        if tensors.is_empty() {
            return Err(KernelError::InvalidArgument(
                "an AdamW launch needs at least one tensor".into(),
            ));
        }
        let mut starts = Vec::with_capacity(tensors.len() + 1);
        let mut chunks = 0usize;
        for t in tensors {
            starts.push(chunks as i32);
            chunks += (t.n.max(0) as usize).div_ceil(TRAIN_CHUNK).max(1);
        }
        starts.push(chunks as i32);
        if chunks > i32::MAX as usize {
            return Err(KernelError::InvalidArgument(format!(
                "{chunks} AdamW chunks exceed one launch"
            )));
        }
        let bytes: Vec<u8> = tensors
            .iter()
            .flat_map(|t| {
                [t.w, t.g, t.m, t.v]
                    .into_iter()
                    .flat_map(u64::to_le_bytes)
                    .chain(t.n.to_le_bytes())
            })
            .collect();
        let s = &self.stream;
        Ok(TrainTensorTable {
            tensors: s
                .clone_htod(&bytes)
                .map_err(drv("uploading the AdamW table"))?,
            chunk_start: s
                .clone_htod(&starts)
                .map_err(drv("uploading the AdamW table"))?,
            count: tensors.len() as i32,
            chunks: chunks as u32,
            bf16_moments,
        })
    }

    /// Queue `sumsq += Σ g²` over every gradient of `table` (`sumsq`: one f64, zeroed by the
    /// caller before the step's first launch).
    ///
    /// # Safety
    /// Every buffer the table names is live; `sumsq` is one f64.
    pub unsafe fn train_grad_sumsq_async(
        &self,
        table: &TrainTensorTable,
        sumsq: DevAddr,
    ) -> Result<(), KernelError> {
        let (tp, sp) = self.table_ptrs(table);
        // SAFETY: the parameters match the kernel; the caller's contract covers the buffers.
        unsafe {
            self.train_go(
                &self.f.train.grad_sumsq,
                cfg((table.chunks, 1, 1), 256),
                "launching kiln_train_grad_sumsq",
                &mut [param(&tp), param(&sp), param(&table.count), param(&sumsq)],
            )
        }
    }

    /// Queue one AdamW step over every tensor of `table` with the scalars of `sc` (the CPU
    /// step's arithmetic), the gradients clipped to the global norm `max_norm` (0: no clipping)
    /// using `sumsq` from [`CudaKernels::train_grad_sumsq_async`] of the same gradients. bf16
    /// moments are stored with stochastic rounding (element e of a tensor draws
    /// `sr_uniform(sc.sr_seed ^ MOMENT{1,2}_SR_SALT, e)`). A non-finite norm changes nothing.
    ///
    /// # Safety
    /// As [`CudaKernels::train_grad_sumsq_async`]; moments are f32 or bf16 as the table says.
    pub unsafe fn train_adamw_async(
        &self,
        table: &TrainTensorTable,
        sumsq: DevAddr,
        sc: &AdamWScalars,
        max_norm: f32,
    ) -> Result<(), KernelError> {
        let (tp, sp) = self.table_ptrs(table);
        let args = AdamWArgs {
            beta1: sc.beta1,
            beta2: sc.beta2,
            eps: sc.eps,
            decay: sc.decay,
            step_size: sc.step_size,
            bc2_sqrt: sc.bc2_sqrt,
            max_norm,
            m_seed: sc.sr_seed ^ MOMENT1_SR_SALT,
            v_seed: sc.sr_seed ^ MOMENT2_SR_SALT,
        };
        let f = if table.bf16_moments {
            &self.f.train.adamw_bf16m
        } else {
            &self.f.train.adamw_f32m
        };
        // SAFETY: the parameters match the kernel (AdamWArgs is KilnTrainAdamW); the caller's
        // contract covers the buffers.
        unsafe {
            self.train_go(
                f,
                cfg((table.chunks, 1, 1), 256),
                "launching kiln_train_adamw",
                &mut [
                    param(&tp),
                    param(&sp),
                    param(&table.count),
                    param(&sumsq),
                    param(&args),
                ],
            )
        }
    }

    fn table_ptrs(&self, table: &TrainTensorTable) -> (DevAddr, DevAddr) {
        (
            self.addr(&table.tensors, 0),
            self.addr(&table.chunk_start, 0),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tensor_table_matches_the_kernels_struct() {
        // KilnTrainTensor: four pointers and a long long, 40 bytes; KilnTrainAdamW: 7 floats,
        // 4 bytes of padding, two u64 seeds.
        assert_eq!(std::mem::size_of::<TrainTensor>(), 40);
        assert_eq!(std::mem::size_of::<AdamWArgs>(), 48);
        assert_eq!(std::mem::offset_of!(AdamWArgs, m_seed), 32);
    }

    #[test]
    fn the_norm_backward_spreads_rows_over_the_gpu() {
        // 8 × 512 tokens on 132 SMs: 4 rows a block, 1,024 blocks
        assert_eq!(norm_bwd_rows(4096, 132), 4);
        // short inputs: one row a block; very long ones: capped
        assert_eq!(norm_bwd_rows(10, 132), 1);
        assert_eq!(norm_bwd_rows(1 << 20, 132), NORM_BWD_ROWS);
        assert_eq!(norm_bwd_rows(0, 0), 1);
    }

    #[test]
    fn attention_shapes_are_checked() {
        let good = TrainAttnShape {
            batch: 2,
            seq: 8,
            heads: 14,
            kv_heads: 2,
            head_dim: 64,
        };
        assert!(good.check().is_ok());
        assert_eq!(
            (good.tokens(), good.rep(), good.qkv_cols()),
            (16, 7, 18 * 64)
        );
        assert_eq!(good.score_rows(), 2 * 14 * 8);
        let bad = TrainAttnShape { heads: 13, ..good };
        assert!(bad.check().unwrap_err().to_string().contains("multiple"));
    }
}
