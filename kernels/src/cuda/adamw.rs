//! The AdamW step on device-resident packed weights (`adamw_nvfp4.cu`): two fused passes, no f32
//! copy of the weights.

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

use super::context::CudaKernels;
use super::decode::{cfg, DevAddr};
use super::driver::{drv, launch_raw, param};
use super::ops::{grid, DeviceNvfp4, DeviceStatus};
use crate::cpu::adamw::{MOMENT1_SR_SALT, MOMENT2_SR_SALT};
use crate::cpu::{AdamWParams, AdamWScalars, AdamWStepStats};
use crate::KernelError;

/// AdamW scalars as the kernel's `KilnAdamW` struct (passed by value).
#[repr(C)]
#[derive(Clone, Copy)]
struct KilnAdamW {
    beta1: f32,
    beta2: f32,
    eps: f32,
    decay: f32,
    step_size: f32,
    bc2_sqrt: f32,
}
// SAFETY: plain-old-data with the same layout as the CUDA struct.
unsafe impl DeviceRepr for KilnAdamW {}

impl CudaKernels {
    /// Queue one AdamW step on device-resident packed weights (see
    /// [`crate::cpu::adamw_step_nvfp4`], whose arithmetic and result this matches bit for bit).
    /// Fused kernels: the weights are never materialised in f32, so the scratch is the 4-byte
    /// amax in `status` whatever `chunk_rows` is (which must still be ≥ 1).
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_step_async(
        &self,
        w: &mut DeviceNvfp4,
        grad: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        hp: AdamWParams,
        step: u64,
        chunk_rows: usize,
        seed: u64,
        status: &mut DeviceStatus,
    ) -> Result<AdamWStepStats, KernelError> {
        let n = w.rows * w.cols;
        crate::cpu::adamw::check_step_args(n, [grad.len(), m.len(), v.len()], chunk_rows)?;
        let sc = AdamWScalars::new(hp, step, seed);
        let h = KilnAdamW {
            beta1: sc.beta1,
            beta2: sc.beta2,
            eps: sc.eps,
            decay: sc.decay,
            step_size: sc.step_size,
            bc2_sqrt: sc.bc2_sqrt,
        };
        let s = &self.stream;
        s.memset_zeros(&mut status.amax_bits)
            .map_err(drv("resetting amax"))?;
        // The fused kernels never hold a chunk of f32 weights, so there is nothing for a chunk
        // to bound: each pass is one launch over the whole tensor (chunk_rows is validated
        // only, for the same contract as the CPU path).
        let nb = w.nblocks() as u64;
        let first_block: u64 = 0;
        {
            let mut b = s.launch_builder(&self.f.adamw_amax);
            b.arg(&w.packed)
                .arg(&w.scales)
                .arg(&w.tensor_scale)
                .arg(grad)
                .arg(&*m)
                .arg(&*v)
                .arg(&nb)
                .arg(&h)
                .arg(&mut status.amax_bits);
            // SAFETY: matches kiln_adamw_nvfp4_amax; buffers cover nb blocks (checked above).
            unsafe { b.launch(grid(nb as usize * 4)) }
                .map_err(drv("launching kiln_adamw_nvfp4_amax"))?;
        }
        {
            let mut b = s.launch_builder(&self.f.adamw_apply);
            b.arg(&mut w.packed)
                .arg(&mut w.scales)
                .arg(&w.tensor_scale)
                .arg(grad)
                .arg(m)
                .arg(v)
                .arg(&nb)
                .arg(&h)
                .arg(&status.amax_bits)
                .arg(&sc.sr_seed)
                .arg(&first_block);
            // SAFETY: matches kiln_adamw_nvfp4_apply; buffers cover nb blocks.
            unsafe { b.launch(grid(nb as usize * 4)) }
                .map_err(drv("launching kiln_adamw_nvfp4_apply"))?;
        }
        let mut b = s.launch_builder(&self.f.tensor_scale_from_amax);
        b.arg(&status.amax_bits).arg(&mut w.tensor_scale);
        // SAFETY: matches kiln_tensor_scale_from_amax (two one-element buffers).
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (32, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(drv("launching kiln_tensor_scale_from_amax"))?;
        Ok(AdamWStepStats {
            peak_temp_bytes: 0,
            chunks: 1,
            old_tensor_scale: f32::NAN,
            new_tensor_scale: f32::NAN,
        })
    }

    /// Queue the train step's AdamW on one device-resident packed weight (GPU `nvfp4-full`):
    /// [`CudaKernels::adamw_step_async`]'s two fused passes and arithmetic, with the gradient
    /// clipped to the global norm `max_norm` (0: off) from `sumsq` (Σ g² over every gradient of
    /// the step, f64) and moments f32 or bf16. `weight_sc` carries the weight's stochastic-
    /// rounding seed (the CPU's `AdamWScalars::new(hp, step, seed ^ fnv1a(name))`); bf16
    /// moments draw from `moment_sr_seed ^ MOMENT{1,2}_SR_SALT` (the CPU's
    /// `sr_seed ^ fnv1a(name)` of the run's scalars), element e drawing `sr_uniform(·, e)` —
    /// so with the same gradient the bytes equal `ParamStore::adamw_step`'s. A non-finite
    /// `sumsq` changes nothing; `moments_only` (lr 0) leaves the weight bit-identical.
    ///
    /// # Safety
    /// `grad` holds `w.rows·w.cols` f32; `m` and `v` as many f32 (or bf16 with
    /// `bf16_moments`); `sumsq` one f64; all live until the queued work has run.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn train_adamw_nvfp4_async(
        &self,
        w: &mut DeviceNvfp4,
        grad: DevAddr,
        (m, v): (DevAddr, DevAddr),
        bf16_moments: bool,
        weight_sc: &AdamWScalars,
        moment_sr_seed: u64,
        (sumsq, max_norm): (DevAddr, f32),
        moments_only: bool,
        status: &mut DeviceStatus,
    ) -> Result<(), KernelError> {
        let h = KilnAdamW {
            beta1: weight_sc.beta1,
            beta2: weight_sc.beta2,
            eps: weight_sc.eps,
            decay: weight_sc.decay,
            step_size: weight_sc.step_size,
            bc2_sqrt: weight_sc.bc2_sqrt,
        };
        let s = &self.stream;
        s.memset_zeros(&mut status.amax_bits)
            .map_err(drv("resetting amax"))?;
        let nb = w.nblocks() as u64;
        let threads = nb as usize * 4;
        let grid = cfg((threads.div_ceil(256) as u32, 1, 1), 256);
        let (amax_f, apply_f) = &self.f.adamw_train[bf16_moments as usize];
        let (packed, scales, ts) = (
            self.addr(&w.packed, 0),
            self.addr(&w.scales, 0),
            self.addr(&w.tensor_scale, 0),
        );
        let amax = self.addr(&status.amax_bits, 0);
        let (ms, vs) = (
            moment_sr_seed ^ MOMENT1_SR_SALT,
            moment_sr_seed ^ MOMENT2_SR_SALT,
        );
        let only = moments_only as i32;
        // SAFETY: the parameter lists match the kernels (KilnAdamW by value); the caller's
        // contract covers the buffers, `w`'s cover its nb blocks.
        unsafe {
            if !moments_only {
                launch_raw(
                    s,
                    amax_f,
                    grid,
                    &mut [
                        param(&packed),
                        param(&scales),
                        param(&ts),
                        param(&grad),
                        param(&m),
                        param(&v),
                        param(&nb),
                        param(&h),
                        param(&sumsq),
                        param(&max_norm),
                        param(&amax),
                    ],
                    false,
                )
                .map_err(drv("launching kiln_adamw_nvfp4_amax (train)"))?;
            }
            launch_raw(
                s,
                apply_f,
                grid,
                &mut [
                    param(&packed),
                    param(&scales),
                    param(&ts),
                    param(&grad),
                    param(&m),
                    param(&v),
                    param(&nb),
                    param(&h),
                    param(&sumsq),
                    param(&max_norm),
                    param(&amax),
                    param(&weight_sc.sr_seed),
                    param(&ms),
                    param(&vs),
                    param(&only),
                ],
                false,
            )
            .map_err(drv("launching kiln_adamw_nvfp4_apply (train)"))?;
            if moments_only {
                return Ok(());
            }
            launch_raw(
                s,
                &self.f.adamw_commit_scale,
                cfg((1, 1, 1), 32),
                &mut [param(&sumsq), param(&amax), param(&ts)],
                false,
            )
            .map_err(drv("launching kiln_adamw_nvfp4_commit_scale"))?;
        }
        Ok(())
    }
}
