//! Benchmark-only GEMV launches (the `bench` feature): the probe kernels, which run parts of
//! the tensor-core kernel's schedule and are not GEMVs, and m = 5..8 on the split-K kernels
//! built for 4 rows (two launches: x rows 0..4, then the rest). The experiments' kernels are
//! listed in `gemv_kernels::experiments`, loaded with the production ones and launched through
//! the production entry points ([`CudaKernels::gemv_with_async`]).

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::context::CudaKernels;
use super::gemv::{tensor_core_ksplit, tensor_core_smem_bytes, GemvKernel, GemvLaunch};
use super::gemv_kernels::SplitKConfig;
use super::ops::DeviceNvfp4;
use crate::KernelError;

impl CudaKernels {
    /// Diagnostics for the benchmark, not a GEMV (y is garbage): the tensor-core kernel with 2
    /// tiles and 3 super-tiles in flight at m = 1, launched as that kernel is, with `probe`
    /// 1 = x not staged, 2 = no decode or MMA (loaded words folded together), 3 = neither.
    /// Timing these beside the real kernel shows what the loads alone and the staging cost.
    pub fn gemv_probe_async(
        &self,
        probe: usize,
        x: &CudaSlice<f32>,
        w: &DeviceNvfp4,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        let (n, k) = (w.rows, w.cols);
        let reference = GemvKernel::TensorCore { tiles: 2, depth: 3 };
        if !(1..=self.f.gemv.probes.len()).contains(&probe)
            || !self.gemv_fits(reference, 1, n, k)
            || x.len() != k
            || y.len() != n
        {
            return Err(KernelError::InvalidArgument(format!(
                "GEMV probe {probe}: takes probe 1..=3, m = 1 and a shape the tensor-core kernel \
                 fits (got K = {k}, x {} elements, y {})",
                x.len(),
                y.len()
            )));
        }
        let ksplit = tensor_core_ksplit(n, k, 2, 3, self.sm_count as usize);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(16 * 2 * (8 / ksplit)) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: tensor_core_smem_bytes(1, k, 2) as u32,
        };
        self.launch_gemv(
            &self.f.gemv.probes[probe - 1],
            cfg,
            x,
            w,
            y,
            ksplit,
            "probe",
        )
    }

    /// Whether `c` (m = 5..8, no kernel of its own) runs as two launches of built kernels:
    /// (4, …) for x rows 0..4 and (m − 4, …) for the rest.
    pub(super) fn split_k_runs_in_two(&self, c: SplitKConfig) -> bool {
        let (m, t, d, l, b) = c;
        (5..=8).contains(&m)
            && self.f.gemv.split_k((4, t, d, l, b)).is_some()
            && self.f.gemv.split_k((m - 4, t, d, l, b)).is_some()
    }

    /// The split-K GEMV for m = 5..8 as two launches (see
    /// [`CudaKernels::split_k_runs_in_two`]); the caller checked the shapes and that it fits.
    pub(super) fn split_k_in_two(
        &self,
        x: &CudaSlice<f32>,
        w: &DeviceNvfp4,
        y: &mut CudaSlice<f32>,
        c: SplitKConfig,
        launch: GemvLaunch,
    ) -> Result<(), KernelError> {
        let (n, k) = (w.rows, w.cols);
        let m = c.0;
        let first = m.min(4);
        self.split_k_part(
            &x.slice(..first * k),
            w,
            &mut y.slice_mut(..first * n),
            (first, c.1, c.2, c.3, c.4),
            launch,
        )?;
        if m > 4 {
            self.split_k_part(
                &x.slice(first * k..),
                w,
                &mut y.slice_mut(first * n..),
                (m - 4, c.1, c.2, c.3, c.4),
                launch,
            )?;
        }
        Ok(())
    }
}
