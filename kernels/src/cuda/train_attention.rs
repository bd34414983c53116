//! The train step's causal attention as flash-attention kernels (`kernels/cuda/attention_train.cu`):
//! a forward that keeps the scores on chip and saves each query row's log-sum-exp, and an FA2
//! backward that recomputes the probabilities from it — so no `[B·nh][T][T]` scores,
//! probabilities or their gradients exist. Built for the head dims in
//! [`TRAIN_FLASH_HEAD_DIMS`]; other head dims keep the materialized path (GEMMs + softmax
//! kernels in `train`).
//!
//! Layouts as in `train`: queries `[B][nh][T][hd]` (the group layout), keys and values
//! `[B][kvh][T][hd]` (bf16); the output and its gradient in tokens `[N][nh·hd]`; the
//! gradients of q, k and v f32 in their layouts; the log-sum-exp and the row term `D` f32
//! `[B][nh][T]`.

use cudarc::driver::{CudaFunction, LaunchConfig};

use super::context::CudaKernels;
use super::decode::{cfg, flash_prefill_smem, flash_scale_log2, DevAddr, FLASH_PREFILL_HEAD_DIMS};
use super::driver::{drv, param};
use super::train::TrainAttnShape;
use crate::KernelError;

/// The head dims the flash train attention is built for (those of the prompt path's flash
/// kernel: they share `flash_attention.cuh`).
pub const TRAIN_FLASH_HEAD_DIMS: &[usize] = FLASH_PREFILL_HEAD_DIMS;

/// Dynamic shared memory of the backward kernel for `hd` (`KILN_FB_SMEM`): K and V of 64
/// keys, Q and dO of 32 queries (rows of hd + 8 bf16), dS 32 × 72 bf16, the 32 rows'
/// log-sum-exp and D (57,088 bytes at hd 128).
pub fn train_flash_bwd_smem(hd: usize) -> u32 {
    ((2 * 64 + 2 * 32) * (hd + 8) * 2 + 32 * 72 * 2 + 2 * 32 * 4) as u32
}

/// The loaded flash train attention kernels.
pub(crate) struct TrainFlashFunctions {
    fwd: Vec<(usize, CudaFunction)>,
    bwd: Vec<(usize, CudaFunction)>,
    dot: CudaFunction,
}

impl TrainFlashFunctions {
    pub(crate) fn load(
        func: &dyn Fn(&str, &str) -> Result<CudaFunction, KernelError>,
    ) -> Result<Self, KernelError> {
        let with_smem = |name: String, bytes: u32| -> Result<CudaFunction, KernelError> {
            let f = func("attention_train.cu", &name)?;
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .map_err(drv("raising a flash train kernel's shared-memory limit"))?;
            Ok(f)
        };
        let per_hd = |stem: &str, smem: fn(usize) -> u32| {
            TRAIN_FLASH_HEAD_DIMS
                .iter()
                .map(|&hd| Ok((hd, with_smem(format!("{stem}_hd{hd}"), smem(hd))?)))
                .collect::<Result<Vec<_>, KernelError>>()
        };
        Ok(TrainFlashFunctions {
            fwd: per_hd("kiln_train_flash_fwd", flash_prefill_smem)?,
            bwd: per_hd("kiln_train_flash_bwd", train_flash_bwd_smem)?,
            dot: func("attention_train.cu", "kiln_train_attn_dot")?,
        })
    }
}

/// The kernel for `hd` in `table`, or an error naming the built head dims.
fn for_hd(table: &[(usize, CudaFunction)], hd: usize) -> Result<&CudaFunction, KernelError> {
    table
        .iter()
        .find(|(d, _)| *d == hd)
        .map(|(_, f)| f)
        .ok_or_else(|| {
            KernelError::InvalidArgument(format!(
            "the flash train attention is built for head dims {TRAIN_FLASH_HEAD_DIMS:?}, not {hd}"
        ))
        })
}

impl CudaKernels {
    /// Why the flash train attention kernels did not load (`attention_train.cu` is an optional
    /// module: its failure leaves the materialized attention usable), or `None` when they did.
    pub fn train_flash_load_error(&self) -> Option<&str> {
        self.f.train.flash_load_error()
    }

    /// Queue the causal attention forward: `out` (bf16 tokens `[N][nh·hd]`) and each query
    /// row's log-sum-exp `lse` (f32 `[B][nh][T]`, for the backward) from `q`, `k`, `v` (bf16,
    /// the group layouts). Fails for a head dim not in [`TRAIN_FLASH_HEAD_DIMS`].
    ///
    /// # Safety
    /// `q` and `out` hold `N·nh·hd` bf16, `k` and `v` `N·kvh·hd` bf16, `lse` `B·nh·T` f32.
    pub unsafe fn train_flash_attn_fwd_async(
        &self,
        shape: TrainAttnShape,
        (q, k, v): (DevAddr, DevAddr, DevAddr),
        out: DevAddr,
        lse: DevAddr,
    ) -> Result<(), KernelError> {
        shape.check()?;
        let hd = shape.head_dim;
        let f = for_hd(&self.f.train.flash()?.fwd, hd)?;
        let (t, nh, kvh, _) = Self::attn_ints(shape);
        let sl2 = flash_scale_log2(hd);
        let grid = (
            shape.heads as u32,
            shape.seq.div_ceil(64) as u32,
            shape.batch as u32,
        );
        // SAFETY: the parameters match kiln_train_flash_fwd_hd{hd}; the caller's contract
        // covers the buffers.
        unsafe {
            self.train_go(
                f,
                LaunchConfig {
                    shared_mem_bytes: flash_prefill_smem(hd),
                    ..cfg(grid, 128)
                },
                "launching kiln_train_flash_fwd",
                &mut [
                    param(&q),
                    param(&k),
                    param(&v),
                    param(&out),
                    param(&lse),
                    param(&t),
                    param(&nh),
                    param(&kvh),
                    param(&sl2),
                ],
            )
        }
    }

    /// Queue the causal attention backward: from the forward's inputs, its output `out`
    /// (bf16 tokens) and log-sum-exp `lse`, and the output's gradient `dout_g` (bf16, the
    /// group layout of q), the gradients `dq`, `dk`, `dv` (f32, the layouts of q, k, v; `dq`
    /// is zeroed here, `dk` and `dv` are overwritten). `dd` (f32 `B·nh·T`) is scratch for the
    /// row term D = rowsum(dO ⊙ O).
    ///
    /// # Safety
    /// The buffers of [`CudaKernels::train_flash_attn_fwd_async`] with the forward's results;
    /// `dout_g` `N·nh·hd` bf16, `dd` `B·nh·T` f32, `dq` `N·nh·hd` f32, `dk` and `dv` `N·kvh·hd`
    /// f32.
    pub unsafe fn train_flash_attn_bwd_async(
        &self,
        shape: TrainAttnShape,
        (q, k, v): (DevAddr, DevAddr, DevAddr),
        (out, lse): (DevAddr, DevAddr),
        dout_g: DevAddr,
        dd: DevAddr,
        (dq, dk, dv): (DevAddr, DevAddr, DevAddr),
    ) -> Result<(), KernelError> {
        shape.check()?;
        let hd = shape.head_dim;
        let fl = self.f.train.flash()?;
        let f = for_hd(&fl.bwd, hd)?;
        let (t, nh, kvh, hd_i) = Self::attn_ints(shape);
        let rows = (shape.batch * shape.heads * shape.seq) as i64;
        let (sl2, scale) = (flash_scale_log2(hd), 1.0 / (hd as f32).sqrt());
        // SAFETY: the parameters match kiln_train_attn_dot and kiln_train_flash_bwd_hd{hd};
        // the caller's contract covers the buffers (dq: N·nh·hd f32).
        unsafe {
            cudarc::driver::result::memset_d8_async(
                dq,
                0,
                shape.tokens() * shape.heads * hd * 4,
                self.stream().cu_stream(),
            )
            .map_err(drv("zeroing the query gradient"))?;
            self.train_go(
                &fl.dot,
                cfg(((rows as u64).div_ceil(8) as u32, 1, 1), 256),
                "launching kiln_train_attn_dot",
                &mut [
                    param(&dout_g),
                    param(&out),
                    param(&dd),
                    param(&t),
                    param(&nh),
                    param(&hd_i),
                    param(&rows),
                ],
            )?;
            let grid = (
                shape.seq.div_ceil(64) as u32,
                (shape.batch * shape.kv_heads) as u32,
                1,
            );
            self.train_go(
                f,
                LaunchConfig {
                    shared_mem_bytes: train_flash_bwd_smem(hd),
                    ..cfg(grid, 128)
                },
                "launching kiln_train_flash_bwd",
                &mut [
                    param(&q),
                    param(&k),
                    param(&v),
                    param(&dout_g),
                    param(&lse),
                    param(&dd),
                    param(&dq),
                    param(&dk),
                    param(&dv),
                    param(&t),
                    param(&nh),
                    param(&kvh),
                    param(&sl2),
                    param(&scale),
                ],
            )
        }
    }
}
