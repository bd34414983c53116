//! The decode step's fused GEMVs (`gemv_fused.cu`, `kiln_gemv_cc_m1_*`): the CUDA-core
//! m = 1 GEMV with the small kernel that would run before it — RMSNorm, SwiGLU or the
//! attention's combine — computed by every block into shared memory after the wait, and, for
//! the o and down projections, the residual add folded into its store. One launch instead of
//! two, the same bits as the separate kernels (GPU test
//! `fused_decode_gemvs_equal_the_separate_kernels`). Where they run is the engine's choice
//! ([`CudaKernels::fused_gemv_fits`] says where they can).

use cudarc::driver::{DevicePtr, LaunchConfig};

use super::context::CudaKernels;
use super::decode::DevAddr;
use super::driver::{drv, launch_chained, param};
use super::gemv::{cuda_core_ksplit, GemvKernel};
use super::ops::DeviceNvfp4;
use crate::KernelError;

/// Rows of W per warp of the fused kernels (their `kiln_gemv_cuda_core_body<1, 4, …>`).
const ROWS_PER_WARP: usize = 4;

/// Most heads the fused combine takes (`KILN_FUSED_COMBINE_MAX_HEADS` in the kernel).
pub const FUSED_COMBINE_MAX_HEADS: usize = 128;

/// Most attention splits the engine lets the o GEMV combine: every block of the o GEMV
/// combines every head, reading `splits · K` partial outputs, so at many splits (long
/// contexts) the separate combine, which reads them once, is the cheaper one.
pub const FUSED_COMBINE_MAX_SPLITS: usize = 32;

/// What a fused GEMV computes its x from (each f32 on the device), and where its output goes.
#[derive(Clone, Copy, Debug)]
pub enum FusedX {
    /// `y = W · (h / sqrt(mean(h²) + eps) · weight)`: `h` and `weight` hold K floats (the
    /// separate [`CudaKernels::add_rmsnorm_async`] without its residual add).
    Norm {
        /// The residual stream.
        h: DevAddr,
        /// The norm's weight.
        weight: DevAddr,
        /// Its epsilon.
        eps: f32,
    },
    /// `y += W · silu(gate · s0) · (up · s1)`: `gate_up` holds the gate/up GEMV's 2K outputs
    /// (gate, then up), `scales` their two tensor scales (as [`CudaKernels::swiglu_async`]).
    SwigluResidual {
        /// The gate/up GEMV's output.
        gate_up: DevAddr,
        /// The gate and up tensor scales.
        scales: DevAddr,
    },
    /// `y += W · x`: x as is (K floats) — the o GEMV after a separate combine.
    Residual {
        /// The GEMV's input.
        x: DevAddr,
    },
    /// `y += W · combine(part_o, part_ml)`: the attention's split outputs of one token as
    /// [`CudaKernels::attention_async`] without `out` left them, combined as
    /// `kiln_attention_combine` does; K = heads · head_dim. Shared memory: K + heads · splits
    /// floats ([`CudaKernels::fused_combine_fits`]).
    CombineResidual {
        /// Partial outputs `[heads][splits][head_dim]`.
        part_o: DevAddr,
        /// Per split (max, sum of exp) `[heads][splits][2]`.
        part_ml: DevAddr,
        /// The token's position (one i32).
        pos: DevAddr,
        /// Head dimension.
        head_dim: usize,
        /// Splits of the attention.
        splits: usize,
        /// Positions per split.
        chunk: usize,
    },
}

impl CudaKernels {
    /// Why the fused GEMVs did not load, if they did not (the separate kernels are unaffected).
    pub fn fused_gemv_load_error(&self) -> Option<&str> {
        self.f.gemv.fused.as_ref().err().map(String::as_str)
    }

    /// The widest K whose x fits in the fused GEMVs' shared memory (0 when they did not load).
    pub fn fused_gemv_max_k(&self) -> usize {
        self.f.gemv.fused.as_ref().map_or(0, |f| f.x_bytes / 4)
    }

    /// Whether the fused GEMVs can run W `[n, k]`: the CUDA-core kernel is the m = 1 default at
    /// this shape (the fused kernels are that kernel) and x fits in shared memory.
    pub fn fused_gemv_fits(&self, n: usize, k: usize) -> bool {
        let Ok(fused) = &self.f.gemv.fused else {
            return false;
        };
        self.default_gemv_kernel(1, n, k) == GemvKernel::CUDA_CORE
            && k.is_multiple_of(32)
            && k * 4 <= fused.x_bytes
    }

    /// Whether the fused combine can run for an o projection `[n, heads · head_dim]` with
    /// `splits` attention splits: [`CudaKernels::fused_gemv_fits`], at most
    /// [`FUSED_COMBINE_MAX_HEADS`] heads, and x with the splits' weights in shared memory.
    pub fn fused_combine_fits(
        &self,
        n: usize,
        heads: usize,
        head_dim: usize,
        splits: usize,
    ) -> bool {
        let k = heads * head_dim;
        self.fused_gemv_fits(n, k)
            && heads <= FUSED_COMBINE_MAX_HEADS
            && self
                .f
                .gemv
                .fused
                .as_ref()
                .is_ok_and(|f| (k + heads * splits) * 4 <= f.x_bytes)
    }

    /// Queue `y (+)= W · x(src)` for one token as a chained launch (see [`FusedX`]).
    ///
    /// # Safety
    /// Every address of `src` and `y` is a live device buffer of the size [`FusedX`] states for
    /// K = `w.cols` (y: `w.rows` floats, not overlapping the inputs); the previous kernel on
    /// the stream does not write W (a chained launch reads it before the wait).
    pub unsafe fn gemv_fused_async(
        &self,
        src: &FusedX,
        w: &DeviceNvfp4,
        y: DevAddr,
    ) -> Result<(), KernelError> {
        let (n, k) = (w.rows, w.cols);
        let f = self.f.gemv.fused.as_ref().map_err(|e| {
            KernelError::InvalidArgument(format!("the fused decode GEMVs did not load: {e}"))
        })?;
        if !self.fused_gemv_fits(n, k) {
            return Err(KernelError::InvalidArgument(format!(
                "the fused GEMV runs only where the CUDA-core kernel is the m = 1 default and x \
                 fits in shared memory (K % 32 == 0, 4·K ≤ {} bytes); W is [{n}, {k}] — queue \
                 the separate kernels instead",
                f.x_bytes
            )));
        }
        let ksplit = cuda_core_ksplit(n, k, ROWS_PER_WARP, self.sm_count as usize);
        let x_floats = match *src {
            FusedX::Residual { .. } => 0,
            FusedX::CombineResidual {
                head_dim, splits, ..
            } => k + k / head_dim.max(1) * splits,
            _ => k,
        };
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(ROWS_PER_WARP * (8 / ksplit)) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: (x_floats * 4) as u32,
        };
        let s = &self.stream;
        let (packed, scales, tensor_scale) = (
            w.packed.device_ptr(s).0,
            w.scales.device_ptr(s).0,
            w.tensor_scale.device_ptr(s).0,
        );
        let (ni, ki, ks) = (n as i32, k as i32, ksplit as i32);
        let tail = |p: &mut Vec<*mut std::ffi::c_void>| {
            p.extend([
                param(&packed),
                param(&scales),
                param(&tensor_scale),
                param(&y),
                param(&ni),
                param(&ki),
                param(&ks),
            ])
        };
        // SAFETY (each launch): the parameters match the kernel's; the caller's contract covers
        // the buffers and the chained launch.
        match *src {
            FusedX::Norm { h, weight, eps } => {
                let mut p = vec![param(&h), param(&weight), param(&eps)];
                tail(&mut p);
                unsafe { launch_chained(s, &f.norm, cfg, &mut p) }
                    .map_err(drv("launching kiln_gemv_cc_m1_norm"))
            }
            FusedX::Residual { x } => {
                let mut p = vec![param(&x)];
                tail(&mut p);
                unsafe { launch_chained(s, &f.residual, cfg, &mut p) }
                    .map_err(drv("launching kiln_gemv_cc_m1_residual"))
            }
            FusedX::SwigluResidual { gate_up, scales } => {
                let mut p = vec![param(&gate_up), param(&scales)];
                tail(&mut p);
                unsafe { launch_chained(s, &f.swiglu_residual, cfg, &mut p) }
                    .map_err(drv("launching kiln_gemv_cc_m1_swiglu_residual"))
            }
            FusedX::CombineResidual {
                part_o,
                part_ml,
                pos,
                head_dim,
                splits,
                chunk,
            } => {
                if head_dim == 0
                    || !k.is_multiple_of(head_dim)
                    || !self.fused_combine_fits(n, k / head_dim, head_dim, splits)
                {
                    return Err(KernelError::InvalidArgument(format!(
                        "the fused combine needs K = heads · head_dim with at most \
                         {FUSED_COMBINE_MAX_HEADS} heads and x with heads · splits weights in \
                         shared memory; K = {k}, head_dim = {head_dim}, {splits} splits — \
                         combine separately (attention_async with an output) instead"
                    )));
                }
                let (hd, sp, ch) = (head_dim as i32, splits as i32, chunk as i32);
                let mut p = vec![
                    param(&part_o),
                    param(&part_ml),
                    param(&pos),
                    param(&hd),
                    param(&sp),
                    param(&ch),
                ];
                tail(&mut p);
                unsafe { launch_chained(s, &f.combine_residual, cfg, &mut p) }
                    .map_err(drv("launching kiln_gemv_cc_m1_combine_residual"))
            }
        }
    }
}
