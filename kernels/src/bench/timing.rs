//! Timing with CUDA events (warm-up, batches, median) and input rotation past the L2.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use crate::cuda::driver::{drv, launch_chained, param};
use crate::cuda::CudaKernels;
use crate::KernelError;

/// Timed closure result: median seconds per call.
pub(super) struct Timer<'a> {
    pub(super) k: &'a CudaKernels,
    pub(super) samples: usize,
}

impl Timer<'_> {
    /// Median seconds per call of `f(i)` (i rotates input sets), timed with CUDA events in
    /// batches long enough (≥ ~0.5 ms) for event resolution not to matter.
    pub(super) fn time(
        &self,
        mut f: impl FnMut(usize) -> Result<(), KernelError>,
    ) -> Result<f64, KernelError> {
        let ctx = self.k.context();
        let stream = self.k.stream();
        let ev = || {
            ctx.new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(drv("creating an event"))
        };
        let (start, end) = (ev()?, ev()?);
        // warm-up (module load, cuBLAS heuristics, clocks)
        for i in 0..3 {
            f(i)?;
        }
        self.k.synchronize()?;
        // estimate one call to choose the batch size
        start.record(stream).map_err(drv("recording an event"))?;
        for i in 0..3 {
            f(i)?;
        }
        end.record(stream).map_err(drv("recording an event"))?;
        let est = start.elapsed_ms(&end).map_err(drv("reading an event"))? as f64 / 3.0;
        let reps = ((0.5 / est.max(1e-4)).ceil() as usize).clamp(1, 1000);
        let mut times = Vec::with_capacity(self.samples);
        let mut i = 0;
        for _ in 0..self.samples {
            start.record(stream).map_err(drv("recording an event"))?;
            for _ in 0..reps {
                f(i)?;
                i += 1;
            }
            end.record(stream).map_err(drv("recording an event"))?;
            times.push(
                start.elapsed_ms(&end).map_err(drv("reading an event"))? as f64 / 1e3 / reps as f64,
            );
        }
        times.sort_by(|a, b| a.partial_cmp(b).expect("finite times"));
        Ok(times[times.len() / 2])
    }
}

/// How many copies of a buffer set of `bytes` to rotate through so the working set is ≥ 160 MB
/// (over 3× the H100's 50 MB L2).
pub(super) fn rotation(bytes: usize) -> usize {
    (160_000_000usize.div_ceil(bytes.max(1))).clamp(1, 64)
}

pub(super) fn upload<T: cudarc::driver::DeviceRepr>(
    k: &CudaKernels,
    v: &[T],
) -> Result<CudaSlice<T>, KernelError> {
    k.stream()
        .clone_htod(v)
        .map_err(drv("uploading benchmark data"))
}

/// Queue a pure read of `buf` (a multiple of 16 bytes) with `kiln_stream_read`, 4 blocks of 256
/// threads per SM; `out` takes one word per block (`4 × SMs`). `chained`: as a programmatic
/// dependent launch (the ceiling for a chain of chained GEMVs).
pub(super) fn stream_read_async(
    k: &CudaKernels,
    buf: &CudaSlice<u8>,
    out: &mut CudaSlice<u32>,
    chained: bool,
) -> Result<(), KernelError> {
    let blocks = 4 * k.sm_count as usize;
    assert!(
        buf.len().is_multiple_of(16) && out.len() >= blocks,
        "stream_read_async arguments"
    );
    let n = (buf.len() / 16) as u64;
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    if chained {
        let (bp, op) = (buf.device_ptr(&k.stream).0, out.device_ptr_mut(&k.stream).0);
        let mut params = [param(&bp), param(&n), param(&op)];
        // SAFETY: kiln_stream_read's parameters; it reads only buf (never written by the
        // benchmark's other kernels) before its griddepcontrol.wait.
        return unsafe { launch_chained(&k.stream, &k.f.stream_read, cfg, &mut params) }
            .map_err(drv("launching kiln_stream_read (chained)"));
    }
    let mut b = k.stream.launch_builder(&k.f.stream_read);
    b.arg(buf).arg(&n).arg(out);
    // SAFETY: matches kiln_stream_read; buf holds n 16-byte words, out one word per block.
    unsafe { b.launch(cfg) }
        .map(|_| ())
        .map_err(drv("launching kiln_stream_read"))
}
