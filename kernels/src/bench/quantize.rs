//! The quantize rows of the GPU benchmark (bf16 -> NVFP4: the full two-pass quantize, the amax
//! pass alone, and the one-pass quantize with a known tensor scale).

use cudarc::driver::CudaSlice;
use half::bf16;

use super::timing::{rotation, upload, Timer};
use crate::cuda::ops::DeviceInput;
use crate::cuda::{CudaKernels, DeviceNvfp4};
use crate::nvfp4::Rounding;
use crate::KernelError;

/// A row sink: (kernel, N, K, seconds, bytes moved, baseline seconds, note).
pub(super) type Push<'a> = dyn FnMut(&str, usize, usize, f64, f64, Option<f64>, String) + 'a;

/// Time the quantize kernels on the bf16 weights `wb` (`[n, kk]`); `ws2` is their tensor scale.
pub(super) fn time_quantize(
    k: &CudaKernels,
    timer: &Timer,
    wb: &[bf16],
    n: usize,
    kk: usize,
    ws2: f32,
    push: &mut Push,
) -> Result<(), KernelError> {
    let ne = n * kk;
    let packed_bytes = ne / 2 + ne / 16;
    let q_bytes = (ne * 2 + packed_bytes) as f64;
    let sets = rotation(ne * 2);
    let xs: Vec<CudaSlice<bf16>> = (0..sets).map(|_| upload(k, wb)).collect::<Result<_, _>>()?;
    let mut outs: Vec<DeviceNvfp4> = (0..sets.min(8))
        .map(|_| k.alloc_nvfp4(n, kk))
        .collect::<Result<_, _>>()?;
    let mut status = k.alloc_status()?;
    let nout = outs.len();
    let t_q = timer.time(|i| {
        k.quantize_async(
            DeviceInput::Bf16(&xs[i % sets]),
            n,
            kk,
            Rounding::Nearest,
            &mut status,
            &mut outs[i % nout],
        )
    })?;
    push(
        "quantize bf16->nvfp4 (amax + quantize)",
        n,
        kk,
        t_q,
        q_bytes,
        None,
        "two passes over the input: amax must be known before any block".into(),
    );
    let t_amax = timer.time(|i| k.amax_async(DeviceInput::Bf16(&xs[i % sets]), &mut status))?;
    push(
        "  amax pass alone (part of the above)",
        n,
        kk,
        t_amax,
        (ne * 2) as f64,
        None,
        "reads the bf16 input once".into(),
    );
    let t_q1 = timer.time(|i| {
        k.quantize_with_scale_async(
            DeviceInput::Bf16(&xs[i % sets]),
            n,
            kk,
            ws2,
            Rounding::Nearest,
            &mut outs[i % nout],
        )
    })?;
    push(
        "quantize bf16->nvfp4 (known tensor scale)",
        n,
        kk,
        t_q1,
        q_bytes,
        None,
        "one pass".into(),
    );
    drop(xs);
    drop(outs);
    Ok(())
}
