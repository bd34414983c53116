//! The v3 tensor-core GEMV (`gemv_nvfp4_tc3.cu`): persistent blocks whose warps stream 16-row
//! weight tiles into shared memory with Hopper bulk copies (`cp.async.bulk` + mbarrier). This
//! module holds the list of built kernels, their shared-memory size, how a shape is split into
//! rounds, warp groups and K chunks, and the launch.

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::context::CudaKernels;
use super::ops::DeviceNvfp4;
use crate::KernelError;

/// The v3 kernels built, as (m, k per chunk, stages per warp, warps per block); the same list as
/// the `KILN_GEMV_TC3` lines of `gemv_nvfp4_tc3.cu`, in the same order.
pub const TC3_KERNELS: &[(usize, usize, usize, usize)] = &[
    (1, 1024, 2, 8),
    (1, 512, 4, 8),
    (1, 512, 2, 8),
    (1, 512, 2, 4),
    (1, 256, 4, 8),
    (1, 512, 2, 16),
    (2, 512, 2, 8),
    (4, 512, 2, 8),
];

/// Index of (m, kc, stages, warps) in [`TC3_KERNELS`].
pub fn tc3_index(m: usize, kc: usize, stages: usize, warps: usize) -> Option<usize> {
    TC3_KERNELS
        .iter()
        .position(|&e| e == (m, kc, stages, warps))
}

/// Bytes of one shared-memory stage: 16 rows of `kc / 2` code bytes (row stride padded by 64)
/// and `kc / 16` scale bytes (stride padded by 16).
fn stage_bytes(kc: usize) -> usize {
    16 * ((kc / 2 + 64) + (kc / 16 + 16))
}

/// Dynamic shared memory of a v3 launch: the warps' stage rings and mbarriers, x as bf16 hi/lo
/// (4·m·K bytes), the zero area for unused B columns and the double-buffered reduction.
pub fn tc3_smem_bytes(m: usize, k: usize, kc: usize, stages: usize, warps: usize) -> usize {
    warps * stages * (stage_bytes(kc) + 8) + 4 * m * k + 512 * m + 2 * warps * 16 * m * 4
}

/// How a v3 launch covers an `[n, k]` matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tc3Plan {
    /// Warps of a group splitting one tile's K chunks (a power of two dividing the warps).
    pub ksplit: usize,
    /// Thread blocks (persistent: at most SMs × resident blocks per SM).
    pub blocks: usize,
    /// Rounds of tiles the busiest block runs.
    pub rounds: usize,
}

/// The split for `[n, k]` with chunks of `kc` and `warps` warps per block on `slots` resident
/// blocks (SMs × blocks per SM). Minimises the tiles each block walks (rounds × groups: the
/// bytes the busiest SM reads), then prefers more warps per tile; a group may have up to a
/// quarter more warps than the tile has chunks (an idle warp costs less than a ragged last
/// round).
pub fn tc3_plan(n: usize, k: usize, kc: usize, warps: usize, slots: usize) -> Tc3Plan {
    let nch = k.div_ceil(kc);
    let tiles = n.div_ceil(16);
    let mut best: Option<(usize, usize, Tc3Plan)> = None;
    let mut s = warps;
    while s >= 1 {
        if s == 1 || s <= (nch + nch / 4).max(1) {
            let groups = warps / s;
            let blocks = tiles.div_ceil(groups).min(slots.max(1));
            let rounds = tiles.div_ceil(blocks * groups);
            let cost = (rounds * groups, nch.div_ceil(s));
            let plan = Tc3Plan {
                ksplit: s,
                blocks,
                rounds,
            };
            if best.is_none_or(|(c0, c1, _)| cost < (c0, c1)) {
                best = Some((cost.0, cost.1, plan));
            }
        }
        s /= 2;
    }
    best.expect("ksplit 1 is always a candidate").2
}

impl CudaKernels {
    /// Whether the v3 GEMV can take `m` rows of x with this K on this device: sm_90 or newer
    /// (bulk copies), K % 256 == 0, a built kernel for `m` with this configuration, and its
    /// shared memory within the device's per-block limit.
    pub fn gemv_tc3_fits(
        &self,
        m: usize,
        k: usize,
        kc: usize,
        stages: usize,
        warps: usize,
    ) -> bool {
        self.compute_capability().0 >= 9
            && k.is_multiple_of(256)
            && tc3_index(m, kc, stages, warps).is_some()
            && tc3_smem_bytes(m, k, kc, stages, warps) <= self.smem_optin
    }

    /// Resident v3 blocks per SM for this shared-memory size (≥ 1; 1 KB per block is reserved
    /// by the driver).
    fn tc3_blocks_per_sm(&self, smem: usize, warps: usize) -> usize {
        let by_smem = self.smem_per_sm / (smem + 1024);
        let by_threads = 2048 / (32 * warps);
        by_smem.min(by_threads).max(1)
    }

    /// The plan a v3 launch uses for `[n, k]` (see [`tc3_plan`]).
    pub fn tc3_plan_for(
        &self,
        m: usize,
        n: usize,
        k: usize,
        kc: usize,
        stages: usize,
        warps: usize,
    ) -> Tc3Plan {
        let smem = tc3_smem_bytes(m, k, kc, stages, warps);
        let slots = self.sm_count as usize * self.tc3_blocks_per_sm(smem, warps);
        tc3_plan(n, k, kc, warps, slots)
    }

    /// Launch the v3 GEMV (shapes already checked by the caller, `gemv_variant_async`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemv_tc3_launch(
        &self,
        x: &CudaSlice<f32>,
        m: usize,
        w: &DeviceNvfp4,
        y: &mut CudaSlice<f32>,
        kc: usize,
        stages: usize,
        warps: usize,
    ) -> Result<(), KernelError> {
        let (n, k) = (w.rows, w.cols);
        let Some(idx) =
            tc3_index(m, kc, stages, warps).filter(|_| self.gemv_tc3_fits(m, k, kc, stages, warps))
        else {
            return Err(KernelError::InvalidArgument(format!(
                "the tensor-core GEMV v3 takes an sm_90+ GPU, K % 256 == 0, {} bytes of shared \
                 memory (this device allows {}) and one of the built (m, kc, stages, warps) \
                 {TC3_KERNELS:?}; got m = {m}, K = {k}, kc = {kc}, stages = {stages}, warps = {warps}",
                tc3_smem_bytes(m, k, kc, stages, warps),
                self.smem_optin
            )));
        };
        let plan = self.tc3_plan_for(m, n, k, kc, stages, warps);
        let cfg = LaunchConfig {
            grid_dim: (plan.blocks as u32, 1, 1),
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: tc3_smem_bytes(m, k, kc, stages, warps) as u32,
        };
        self.launch_gemv(&self.f.gemv_tc3[idx], cfg, x, w, y, plan.ksplit, "tc3")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_tc3_kernel_is_instantiated_in_the_cu_file() {
        let src = include_str!("../../cuda/gemv_nvfp4_tc3.cu");
        let built: Vec<(usize, usize, usize, usize)> = src
            .lines()
            .filter_map(|l| l.strip_prefix("KILN_GEMV_TC3("))
            .map(|l| {
                let v: Vec<usize> = l
                    .trim_end_matches(')')
                    .split(',')
                    .map(|t| t.trim().parse().unwrap())
                    .collect();
                (v[0], v[1], v[2], v[3])
            })
            .collect();
        assert_eq!(built, TC3_KERNELS);
    }

    #[test]
    fn plans_for_the_benchmark_shapes_on_an_h100() {
        // 132 SMs, one 8-warp block each
        let p = tc3_plan(8192, 8192, 1024, 8, 132);
        assert_eq!((p.ksplit, p.blocks, p.rounds), (8, 132, 4));
        // 7 chunks of 512: 8 warps per tile (one idle) beats 2 groups of 4 (ragged rounds)
        let p = tc3_plan(18944, 3584, 512, 8, 132);
        assert_eq!((p.ksplit, p.blocks, p.rounds), (8, 132, 9));
        // one chunk per tile: every warp its own tile
        let p = tc3_plan(4096, 256, 512, 8, 132);
        assert_eq!((p.ksplit, p.blocks, p.rounds), (1, 32, 1));
        // fewer tiles than blocks: no empty blocks
        let p = tc3_plan(64, 8192, 512, 8, 132);
        assert_eq!((p.ksplit, p.blocks, p.rounds), (8, 4, 1));
    }

    #[test]
    fn shared_memory_fits_an_h100_for_the_big_shapes() {
        let h100 = 232_448;
        assert!(tc3_smem_bytes(1, 8192, 1024, 2, 8) <= h100);
        assert!(tc3_smem_bytes(1, 18944, 512, 2, 8) <= h100);
        assert!(tc3_smem_bytes(4, 8192, 512, 2, 8) <= h100);
    }
}
