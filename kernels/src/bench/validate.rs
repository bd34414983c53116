//! The checks run before any timing: GEMV against an f64 reference, a chained GEMV launch
//! against a plain one, AdamW against the CPU step.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use cudarc::driver::CudaSlice;

use crate::cpu::{adamw_step_nvfp4, AdamWParams};
use crate::cuda::driver::drv;
use crate::cuda::{CudaKernels, DeviceNvfp4, GemvKernel, GemvLaunch};
use crate::nvfp4::Nvfp4Tensor;
use crate::KernelError;

/// ‖y − ref‖/‖ref‖ for M = 1 with ref computed in f64 on the dequantized weights.
pub(super) fn gemv_rel_error(y: &[f32], x: &[f32], w: &Nvfp4Tensor) -> f64 {
    use rayon::prelude::*;
    let wd = w.dequantize();
    let k = w.cols;
    let (num, den) = wd
        .par_chunks(k)
        .zip(y.par_iter())
        .map(|(row, &yv)| {
            let r: f64 = row.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum();
            let d = if yv.is_finite() {
                yv as f64 - r
            } else {
                f64::INFINITY
            };
            (d * d, r * r)
        })
        .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    (num / den).sqrt()
}

/// One AdamW step on GPU and CPU from the same state; identical up to rare last-bit flips.
pub(super) fn validate_adamw(
    k: &CudaKernels,
    w: &Nvfp4Tensor,
    rng: &mut ChaCha8Rng,
) -> Result<(bool, String), KernelError> {
    let ne = w.rows * w.cols;
    let g: Vec<f32> = (0..ne).map(|_| rng.random_range(-1e-2f32..1e-2)).collect();
    let hp = AdamWParams {
        lr: 1e-3,
        ..AdamWParams::default()
    };
    let (mut wc, mut wg) = (w.clone(), w.clone());
    let (mut mc, mut vc) = (vec![0.0f32; ne], vec![0.0f32; ne]);
    let (mut mg, mut vg) = (vec![0.0f32; ne], vec![0.0f32; ne]);
    adamw_step_nvfp4(&mut wc, &g, &mut mc, &mut vc, hp, 1, 32, 11)?;
    k.adamw_step_nvfp4(&mut wg, &g, &mut mg, &mut vg, hp, 1, 32, 11)?;
    let packed_diff = wc
        .packed
        .iter()
        .zip(&wg.packed)
        .filter(|(a, b)| a != b)
        .count();
    let scale_diff = wc
        .scales
        .iter()
        .zip(&wg.scales)
        .filter(|(a, b)| a != b)
        .count();
    let m_diff = mc
        .iter()
        .zip(&mg)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    let ok = packed_diff <= ne / 20_000
        && scale_diff <= ne / 320_000
        && m_diff == 0
        && wc.tensor_scale == wg.tensor_scale;
    Ok((
        ok,
        format!("{packed_diff} packed bytes, {scale_diff} scales, {m_diff} moments differ"),
    ))
}

/// Whether `launch` (a chained launch) of `kernel` gives the same bits as a plain launch: one
/// plain launch, then three chained ones back to back into another buffer.
pub(super) fn chained_matches_plain(
    k: &CudaKernels,
    x: &CudaSlice<f32>,
    m: usize,
    w: &DeviceNvfp4,
    kernel: GemvKernel,
    launch: GemvLaunch,
) -> Result<bool, KernelError> {
    let n = w.rows;
    let alloc = || {
        k.stream()
            .alloc_zeros::<f32>(m * n)
            .map_err(drv("allocating"))
    };
    let (mut plain, mut chained) = (alloc()?, alloc()?);
    k.gemv_with_async(x, m, w, &mut plain, kernel)?;
    for _ in 0..3 {
        k.gemv_with_launch_async(x, m, w, &mut chained, kernel, launch)?;
    }
    let a = k.stream().clone_dtoh(&plain).map_err(drv("reading"))?;
    let b = k.stream().clone_dtoh(&chained).map_err(drv("reading"))?;
    k.synchronize()?;
    Ok(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()))
}
