//! The v6 tensor-core GEMV (`gemv_nvfp4_tc5.cu`, second half): v5's decode and split-K
//! reduction with persistent blocks, one K slice per block, and 16·T-row groups handed to warps
//! at run time by a ticket counter, so the SMs whose loads come back first take more of the
//! matrix instead of idling at the end of a single wave. This module holds the list of built
//! kernels, the slice choice and the launch (the scratch buffer is v5's).

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::context::{drv, CudaKernels};
use super::ops::DeviceNvfp4;
use crate::KernelError;

/// A v6 kernel: (m, 16-row tiles per warp task, super-tiles in flight, blocks per SM).
pub type Tc6Config = (usize, usize, usize, usize);

/// The v6 kernels built; the same list as the `KILN_GEMV_TC6` lines of `gemv_nvfp4_tc5.cu`, in
/// the same order.
pub const TC6_KERNELS: &[Tc6Config] = &[
    (1, 1, 3, 2),
    (1, 1, 3, 3),
    (1, 2, 2, 2),
    (1, 1, 4, 2),
    (2, 2, 3, 2),
    (3, 2, 3, 2),
    (4, 2, 3, 2),
    (4, 1, 3, 2),
];

/// Index of a configuration in [`TC6_KERNELS`].
pub fn tc6_index(c: Tc6Config) -> Option<usize> {
    TC6_KERNELS.iter().position(|&e| e == c)
}

/// The K slices of a v6 launch of `[n, k]` (`tiles` per task, `depth` in flight) on `slots`
/// resident blocks: a divisor of K/128 leaving each slice at least `depth` super-tiles, the
/// fewest that give every warp about 4 tasks (so the run-time hand-out can even out the SMs'
/// finishing times), else the most there can be. 0 when no slice length fits `depth`.
pub fn tc6_slices(n: usize, k: usize, tiles: usize, depth: usize, slots: usize) -> usize {
    let nsup = k / 128;
    let groups = n.div_ceil(16 * tiles);
    let warps = 8 * slots.max(1);
    let fits: Vec<usize> = (1..=nsup)
        .filter(|s| nsup.is_multiple_of(*s) && nsup / s >= depth)
        .collect();
    fits.iter()
        .copied()
        .find(|&s| groups * s >= 4 * warps)
        .or(fits.last().copied())
        .unwrap_or(0)
}

/// Static shared memory of the v6 kernels (each warp's list of finished row groups).
pub const TC6_STATIC_SMEM: usize = 8 * 32 * 4;

/// Dynamic shared memory of a v6 launch: the slice of x as bf16 hi/lo and the zero area.
pub fn tc6_smem_bytes(m: usize, k: usize, slices: usize) -> usize {
    4 * m * (k / 128) / slices.max(1) * 128 + 512 * m
}

impl CudaKernels {
    /// The K slices a v6 launch of `c` on `[n, k]` uses: `slices` when it is a valid choice
    /// (divides K/128 with at least `depth` super-tiles each), else [`tc6_slices`]; 0 when none.
    pub fn tc6_slices_for(&self, c: Tc6Config, n: usize, k: usize, slices: usize) -> usize {
        let nsup = k / 128;
        if slices > 0 && nsup.is_multiple_of(slices) && nsup / slices >= c.2 {
            return slices;
        }
        tc6_slices(n, k, c.1, c.2, c.3 * self.sm_count as usize)
    }

    /// Whether the v6 GEMV can run `c` on an `[n, k]` W (m = 5..=8 as 4 + the rest, both
    /// built), K % 128 == 0, a valid slice count and the slice of x fits in shared memory.
    pub fn gemv_tc6_fits(&self, c: Tc6Config, n: usize, k: usize, slices: usize) -> bool {
        let (m, t, d, b) = c;
        let built = if m <= 4 {
            tc6_index(c).is_some()
        } else {
            m <= 8 && tc6_index((4, t, d, b)).is_some() && tc6_index((m - 4, t, d, b)).is_some()
        };
        let s = if k.is_multiple_of(128) {
            self.tc6_slices_for(c, n, k, slices)
        } else {
            0
        };
        built && s > 0 && tc6_smem_bytes(m.min(4), k, s) + TC6_STATIC_SMEM <= self.smem_optin
    }

    /// Launch the v6 GEMV for `c.0` rows of x (5..=8 rows as two launches) with `slices` K
    /// slices (0: [`tc6_slices`]); the caller (`gemv_variant_async`) checked x and y.
    pub(super) fn gemv_tc6_launch(
        &self,
        x: &CudaSlice<f32>,
        w: &DeviceNvfp4,
        y: &mut CudaSlice<f32>,
        c: Tc6Config,
        slices: usize,
    ) -> Result<(), KernelError> {
        let (n, k) = (w.rows, w.cols);
        if !self.gemv_tc6_fits(c, n, k, slices) {
            return Err(KernelError::InvalidArgument(format!(
                "the tensor-core GEMV v6 takes K % 128 == 0, K/128 with a divisor leaving \
                 {} super-tiles per slice, a slice of x that fits in shared memory and one of \
                 the built (m, tiles, depth, blocks per SM) {TC6_KERNELS:?}; got [{n}, {k}], {c:?}",
                c.2
            )));
        }
        let (m, t, d, b) = c;
        let first = m.min(4);
        self.gemv_tc6_part(
            &x.slice(..first * k),
            w,
            &mut y.slice_mut(..first * n),
            (first, t, d, b),
            slices,
        )?;
        if m > 4 {
            self.gemv_tc6_part(
                &x.slice(first * k..),
                w,
                &mut y.slice_mut(first * n..),
                (m - 4, t, d, b),
                slices,
            )?;
        }
        Ok(())
    }

    fn gemv_tc6_part(
        &self,
        x: &CudaView<'_, f32>,
        w: &DeviceNvfp4,
        y: &mut CudaViewMut<'_, f32>,
        c: Tc6Config,
        slices: usize,
    ) -> Result<(), KernelError> {
        let (n, k) = (w.rows, w.cols);
        let (m, tiles, _, per_sm) = c;
        let idx = tc6_index(c).expect("checked by gemv_tc6_fits");
        let s = self.tc6_slices_for(c, n, k, slices);
        let per_slice = (per_sm * self.sm_count as usize / s).max(1);
        let groups = n.div_ceil(16 * tiles);
        let mut scratch = self
            .gemv_scratch
            .lock()
            .map_err(|_| KernelError::InvalidArgument("GEMV scratch lock poisoned".into()))?;
        let (partial, counters) = scratch.ensure(&self.stream, s * m * n, s + 1 + groups)?;
        let cfg = LaunchConfig {
            grid_dim: (per_slice as u32, s as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: tc6_smem_bytes(m, k, s) as u32,
        };
        let (ni, ki) = (n as i32, k as i32);
        let mut b = self.stream.launch_builder(&self.f.gemv_tc6[idx]);
        b.arg(x)
            .arg(&w.packed)
            .arg(&w.scales)
            .arg(&w.tensor_scale)
            .arg(y)
            .arg(&ni)
            .arg(&ki)
            .arg(partial)
            .arg(counters);
        // SAFETY: matches kiln_gemv_nvfp4_tc6_m{m}_t{t}_d{d}_b{b}; x holds m × K and y m × N
        // floats (the caller's views); the partial buffer holds s × m × N floats and the
        // counters s + 1 + groups words, zero between launches; everything is on this stream.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(drv("launching kiln_gemv_nvfp4_tc6"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_tc6_kernel_is_instantiated_in_the_cu_file() {
        let src = include_str!("../../cuda/gemv_nvfp4_tc5.cu");
        let built: Vec<Tc6Config> = crate::cuda::compile::macro_instances(src, "KILN_GEMV_TC6")
            .iter()
            .map(|v| (v[0], v[1], v[2], v[3]))
            .collect();
        assert_eq!(built, TC6_KERNELS);
    }

    #[test]
    fn slices_for_the_benchmark_shapes_on_an_h100() {
        let slots = 264;
        // 512 groups of 16 rows: 16 slices of 4 super-tiles give each of 2112 warps ~4 tasks
        assert_eq!(tc6_slices(8192, 8192, 1, 3, slots), 16);
        assert_eq!(tc6_slices(151936, 896, 1, 3, slots), 1);
        assert_eq!(tc6_slices(18944, 3584, 1, 3, slots), 7);
        assert_eq!(tc6_slices(3584, 18944, 1, 3, slots), 37);
        // no divisor of K/128 leaves 3 super-tiles per slice when K/128 is 2
        assert_eq!(tc6_slices(64, 256, 1, 3, slots), 0);
        // a small matrix takes the most slices there can be
        assert_eq!(tc6_slices(64, 1024, 1, 3, slots), 2);
    }
}
