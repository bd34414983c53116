//! The decode-time GEMV launchers: the CUDA-core kernels (`gemv_cuda_core.cu`, 4 or 8 rows per
//! warp), the tensor-core kernels v1 (`gemv_tensor_core_hilo.cu`) and v2 (`gemv_tensor_core.cu`), the
//! default choice among them and the split-K v5 kernel (`gemv_tc5.rs`), the list of variants a
//! shape can take, how K is split across warps, and the benchmark's probe kernels.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::context::CudaKernels;
use super::ops::DeviceNvfp4;
use crate::KernelError;

impl CudaKernels {
    /// Queue the fused dequantize-GEMV `y[m, N] = x[m, K] · Wᵀ` for `m` in 1..=8, x and y f32.
    /// Requires `K % 32 == 0` (use [`CudaKernels::matmul_nvfp4_large_async`] otherwise).
    pub fn gemv_async(
        &self,
        x: &CudaSlice<f32>,
        m: usize,
        w: &DeviceNvfp4,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        self.gemv_variant_async(x, m, w, y, self.default_gemv_variant_for(m, w.rows, w.cols))
    }

    /// The GEMV kernel for `m` rows of x and an `[n, k]` W, from the H100 measurements in
    /// kernels/BENCHMARKS.md. When the tensor-core kernels passed their start-up check, on
    /// matrices of at least 16M weights: the split-K v5 kernel (m = 1: 2 tiles per warp, 2
    /// super-tiles in flight, or for K <= 1024 one tile, 3 in flight, late loads and 3 blocks
    /// per SM; m = 2..4: 2 tiles, 3 in flight, late loads; m = 5..8: one launch with two MMAs
    /// per step, 2 tiles, 2 in flight, late loads). On smaller matrices (launch-latency bound):
    /// m = 1 the CUDA-core kernel (it starts fastest), m = 2..8 the v2 kernel (m = 5..8 with
    /// two MMAs per step) where all of x fits in shared memory, else v5 for m = 5..8; the first
    /// tensor-core kernel where none of those fit. Everything else, and every shape when the
    /// start-up check failed, runs the CUDA-core kernel.
    pub fn default_gemv_variant_for(&self, m: usize, n: usize, k: usize) -> GemvVariant {
        if !self.tc_gemv_ok {
            return GemvVariant::Rows4;
        }
        let small_tc2 = m >= 5 && self.gemv_tc2_fits(m, k, 1);
        if n.saturating_mul(k) >= 16 << 20 || (m >= 5 && !small_tc2) {
            let c = match m {
                1 if k <= 1024 => (1, 1, 3, true, 3),
                1 => (1, 2, 2, false, 2),
                2..=4 => (m, 2, 3, true, 2),
                _ => (m, 2, 2, true, 2),
            };
            if self.gemv_tc5_fits(c, n, k) {
                return GemvVariant::TensorCore5 {
                    tiles: c.1 as u8,
                    depth: c.2 as u8,
                    late: c.3,
                    per_sm: c.4 as u8,
                };
            }
        }
        let tc2 = |tiles: u8, depth: u8| GemvVariant::TensorCore2 { tiles, depth };
        let pick = match m {
            1 => GemvVariant::Rows4,
            2..=4 if k >= 8192 => tc2(4, 1),
            _ => tc2(1, 4),
        };
        match pick {
            GemvVariant::TensorCore2 { tiles, .. } if self.gemv_tc2_fits(m, k, tiles as usize) => {
                pick
            }
            _ if m >= 2 && self.gemv_tc_fits(m, k) => GemvVariant::TensorCore,
            _ => GemvVariant::Rows4,
        }
    }

    /// [`CudaKernels::gemv_async`] for one GEMV of a chain over weights that stay put (a decode
    /// step: layer after layer): where the default kernel is the split-K v5 one or a CUDA-core
    /// one it is queued as a programmatic dependent launch (compute capability 9.0+), so its
    /// blocks start — and issue their first weight loads — while the previous kernel on the
    /// stream finishes; it reads x and writes y only after that kernel is done. **W must not be
    /// written by the kernel queued just before this call** (a quantize or optimizer step on W:
    /// use [`CudaKernels::gemv_async`] after those). Other kernels launch as usual.
    pub fn gemv_chained_async(
        &self,
        x: &CudaSlice<f32>,
        m: usize,
        w: &DeviceNvfp4,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        let v = self.default_gemv_variant_for(m, w.rows, w.cols);
        self.gemv_variant_launch_async(x, m, w, y, v, GemvLaunch::CHAINED)
    }

    /// [`CudaKernels::gemv_async`] with an explicit kernel variant (the benchmark compares them).
    pub fn gemv_variant_async(
        &self,
        x: &CudaSlice<f32>,
        m: usize,
        w: &DeviceNvfp4,
        y: &mut CudaSlice<f32>,
        variant: GemvVariant,
    ) -> Result<(), KernelError> {
        self.gemv_variant_launch_async(x, m, w, y, variant, GemvLaunch::default())
    }

    /// [`CudaKernels::gemv_variant_async`] queued as `launch` says (the v5 and the CUDA-core
    /// kernels take a chained launch, only v5 the L2 prefetch; the tensor-core v1/v2 kernels
    /// launch as usual). A chained launch has the contract of
    /// [`CudaKernels::gemv_chained_async`].
    pub fn gemv_variant_launch_async(
        &self,
        x: &CudaSlice<f32>,
        m: usize,
        w: &DeviceNvfp4,
        y: &mut CudaSlice<f32>,
        variant: GemvVariant,
        launch: GemvLaunch,
    ) -> Result<(), KernelError> {
        let (n, k) = (w.rows, w.cols);
        if !(1..=8).contains(&m) {
            return Err(KernelError::InvalidArgument(format!(
                "GEMV takes 1 to 8 rows of x, got {m}"
            )));
        }
        if !k.is_multiple_of(32) {
            return Err(KernelError::InvalidArgument(format!(
                "GEMV needs K % 32 == 0, got K = {k}"
            )));
        }
        if x.len() != m * k || y.len() != m * n {
            return Err(KernelError::InvalidArgument(format!(
                "GEMV shapes: x has {} elements (want {m}×{k}), y has {} (want {m}×{n})",
                x.len(),
                y.len()
            )));
        }
        if let GemvVariant::TensorCore5 {
            tiles,
            depth,
            late,
            per_sm,
        } = variant
        {
            let c = (m, tiles as usize, depth as usize, late, per_sm as usize);
            return self.gemv_tc5_launch(x, w, y, c, launch);
        }
        if let GemvVariant::TensorCore2 { tiles, depth } = variant {
            let (t, d) = (tiles as usize, depth as usize);
            let Some(idx) = tc2_index(m, t, d).filter(|_| self.gemv_tc2_fits(m, k, t)) else {
                return Err(KernelError::InvalidArgument(format!(
                    "the tensor-core GEMV v2 takes K % 128 == 0, {} bytes of shared memory and \
                     one of the built (m, tiles, depth) {TC2_KERNELS:?}; got m = {m}, K = {k}, \
                     tiles = {t}, depth = {d}",
                    tc2_smem_bytes(m, k, t)
                )));
            };
            let ksplit = gemv_tc2_ksplit(n, k, t, d, self.sm_count as usize);
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(16 * t * (8 / ksplit)) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: tc2_smem_bytes(m, k, t) as u32,
            };
            return self.launch_gemv(&self.f.gemv_tc2[idx], cfg, x, w, y, ksplit, "tc2");
        }
        if variant == GemvVariant::TensorCore {
            if !self.gemv_tc_fits(m, k) {
                return Err(KernelError::InvalidArgument(format!(
                    "the tensor-core GEMV needs K % 128 == 0 and {m}·K·4 bytes of shared memory (K = {k})"
                )));
            }
            let ksplit = gemv_tc_ksplit(n, k, self.sm_count as usize);
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(16 * (8 / ksplit)) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: (m * k * 4 + 4096) as u32,
            };
            return self.launch_gemv(&self.f.gemv_tc[m - 1], cfg, x, w, y, ksplit, "tc");
        }
        let (func, r) = match variant {
            GemvVariant::Rows8 if m == 1 => (&self.f.gemv_m1_r8, 8),
            GemvVariant::Rows8 => {
                return Err(KernelError::InvalidArgument(
                    "the 8-rows-per-warp GEMV exists for m = 1 only".into(),
                ))
            }
            _ => (&self.f.gemv[m - 1], 4),
        };
        let ksplit = gemv_ksplit(n, k, r, self.sm_count as usize);
        let rows_per_block = r * (8 / ksplit);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(rows_per_block) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        if launch.chained {
            return self.launch_gemv_chained(func, cfg, x, w, y, ksplit);
        }
        self.launch_gemv(func, cfg, x, w, y, ksplit, "cuda-core")
    }

    /// Diagnostics for the benchmark, not a GEMV (y is garbage): the v2 kernel with 2 tiles and 3
    /// super-tiles in flight at m = 1, launched as that kernel is, with `probe` 1 = x not
    /// staged, 2 = no decode or MMA (loaded words folded together), 3 = neither. Timing these
    /// beside the real kernel shows what the loads alone and the staging cost.
    pub fn gemv_probe_async(
        &self,
        probe: usize,
        x: &CudaSlice<f32>,
        w: &DeviceNvfp4,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        let (n, k) = (w.rows, w.cols);
        if !(1..=3).contains(&probe) || !self.gemv_tc2_fits(1, k, 2) || x.len() != k || y.len() != n
        {
            return Err(KernelError::InvalidArgument(format!(
                "GEMV probe {probe}: takes probe 1..=3, m = 1 and a shape the v2 kernel fits \
                 (got K = {k}, x {} elements, y {})",
                x.len(),
                y.len()
            )));
        }
        let ksplit = gemv_tc2_ksplit(n, k, 2, 3, self.sm_count as usize);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(16 * 2 * (8 / ksplit)) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: tc2_smem_bytes(1, k, 2) as u32,
        };
        self.launch_gemv(&self.f.gemv_probe[probe - 1], cfg, x, w, y, ksplit, "probe")
    }

    /// Launch one of the GEMV kernels, which all take (x, packed, scales, tensor_scale, y, N,
    /// K, ksplit); the caller checked the shapes and picked `cfg` for that kernel.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_gemv(
        &self,
        func: &cudarc::driver::CudaFunction,
        cfg: LaunchConfig,
        x: &CudaSlice<f32>,
        w: &DeviceNvfp4,
        y: &mut CudaSlice<f32>,
        ksplit: usize,
        which: &str,
    ) -> Result<(), KernelError> {
        let (ni, ki, ks) = (w.rows as i32, w.cols as i32, ksplit as i32);
        let mut b = self.stream.launch_builder(func);
        b.arg(x)
            .arg(&w.packed)
            .arg(&w.scales)
            .arg(&w.tensor_scale)
            .arg(y)
            .arg(&ni)
            .arg(&ki)
            .arg(&ks);
        // SAFETY: every GEMV kernel has this argument list; the caller checked x (m × K), y
        // (m × N), K's alignment and the shared memory for this kernel.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| KernelError::Cuda {
                context: format!("launching the {which} GEMV kernel"),
                message: e.to_string(),
            })
    }

    /// [`CudaKernels::launch_gemv`] as a chained launch, for the CUDA-core kernels only (they
    /// wait for the previous kernel before reading x; the tensor-core v1/v2 kernels do not).
    fn launch_gemv_chained(
        &self,
        func: &cudarc::driver::CudaFunction,
        cfg: LaunchConfig,
        x: &CudaSlice<f32>,
        w: &DeviceNvfp4,
        y: &mut CudaSlice<f32>,
        ksplit: usize,
    ) -> Result<(), KernelError> {
        use super::gemv_tc5::{gemv_ptrs, param};
        let (ni, ki, ks) = (w.rows as i32, w.cols as i32, ksplit as i32);
        let s = &self.stream;
        let ptrs = gemv_ptrs(s, x, w, y);
        let mut params: Vec<_> = ptrs
            .iter()
            .map(param)
            .chain([param(&ni), param(&ki), param(&ks)])
            .collect();
        // SAFETY: the CUDA-core GEMV kernels' parameters (as in launch_gemv); they read only W
        // before griddepcontrol.wait, and the caller of a chained launch vouches that the
        // previous kernel on the stream does not write W.
        unsafe { super::gemv_tc5::launch_chained(s, func, cfg, &mut params) }.map_err(
            super::context::drv("launching the cuda-core GEMV kernel (chained)"),
        )
    }

    /// Every GEMV kernel that can take `m` rows of x and an `[n, k]` W on this device (the
    /// benchmark and the GPU tests run them all): the CUDA-core kernels always; the tensor-core
    /// ones when they passed the start-up check and fit.
    pub fn gemv_variants_for(&self, m: usize, n: usize, k: usize) -> Vec<GemvVariant> {
        let mut v = vec![GemvVariant::Rows4];
        if m == 1 {
            v.push(GemvVariant::Rows8);
        }
        if !self.tc_gemv_ok {
            return v;
        }
        if self.gemv_tc_fits(m, k) {
            v.push(GemvVariant::TensorCore);
        }
        v.extend(tc2_variants(m).filter(|var| match *var {
            GemvVariant::TensorCore2 { tiles, .. } => self.gemv_tc2_fits(m, k, tiles as usize),
            _ => false,
        }));
        // kernels built for m, and for m = 5..8 the 4-row ones run twice (where no kernel for m
        // has the same tiles, depth, loads and blocks per SM)
        for &c in super::gemv_tc5::TC5_KERNELS {
            let var = GemvVariant::TensorCore5 {
                tiles: c.1 as u8,
                depth: c.2 as u8,
                late: c.3,
                per_sm: c.4 as u8,
            };
            let ours = c.0 == m || (m > 4 && c.0 == 4);
            if ours && !v.contains(&var) && self.gemv_tc5_fits((m, c.1, c.2, c.3, c.4), n, k) {
                v.push(var);
            }
        }
        v
    }

    /// Whether the tensor-core GEMV can take `m` rows of x with this K (K % 128 == 0 and x as
    /// bf16 hi/lo fits in shared memory).
    pub fn gemv_tc_fits(&self, m: usize, k: usize) -> bool {
        k.is_multiple_of(128) && m * k * 4 + 4096 <= self.smem_optin
    }

    /// Whether the tensor-core GEMV v2 with `tiles` 16-row tiles per warp can take `m` rows of
    /// x with this K (a kernel built for m and tiles, K % 128 == 0, x as bf16 hi/lo fits in
    /// shared memory).
    pub fn gemv_tc2_fits(&self, m: usize, k: usize, tiles: usize) -> bool {
        (1..=8).contains(&m)
            && TC2_KERNELS.iter().any(|&(mm, t, _)| mm == m && t == tiles)
            && k.is_multiple_of(128)
            && tc2_smem_bytes(m, k, tiles) <= self.smem_optin
    }
}

/// Dynamic shared memory of the tensor-core GEMV v2: x as bf16 hi/lo (4·m·K bytes), a zero
/// area for unused B columns (32·2m uint2) and the cross-warp reduction.
pub fn tc2_smem_bytes(m: usize, k: usize, tiles: usize) -> usize {
    4 * m * k + 512 * m + 8 * tiles * 16 * m * 4
}

/// The v2 kernels built, as (m, tiles per warp, super-tiles in flight per tile); the same list
/// as the `KILN_GEMV_TENSOR_CORE` lines of `gemv_tensor_core.cu`, in the same order.
pub const TC2_KERNELS: &[(usize, usize, usize)] = &[
    (1, 2, 3),
    (2, 1, 4),
    (2, 4, 1),
    (3, 1, 4),
    (3, 4, 1),
    (4, 1, 4),
    (4, 4, 1),
    (5, 1, 4),
    (6, 1, 4),
    (7, 1, 4),
    (8, 1, 4),
];

/// Index of (m, tiles, depth) in [`TC2_KERNELS`].
pub fn tc2_index(m: usize, tiles: usize, depth: usize) -> Option<usize> {
    TC2_KERNELS.iter().position(|&e| e == (m, tiles, depth))
}

/// The v2 variants built for `m` rows of x.
pub fn tc2_variants(m: usize) -> impl Iterator<Item = GemvVariant> {
    TC2_KERNELS
        .iter()
        .filter(move |&&(mm, _, _)| mm == m)
        .map(|&(_, t, d)| GemvVariant::TensorCore2 {
            tiles: t as u8,
            depth: d as u8,
        })
}

/// How many warps split the super-tiles (128 k) in the v2 kernel: enough warp tasks to fill
/// the GPU (16 per SM), while each warp keeps at least 2·depth super-tiles.
pub fn gemv_tc2_ksplit(n: usize, k: usize, tiles: usize, d: usize, sm_count: usize) -> usize {
    let nsup = k / 128;
    let groups = n.div_ceil(16 * tiles);
    let mut ks = 1;
    while ks < 8 && nsup / (2 * ks) >= d && groups * ks < 16 * sm_count {
        ks *= 2;
    }
    ks
}

/// How a GEMV is queued. The default is a plain launch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GemvLaunch {
    /// Programmatic dependent launch: the kernel may start while the previous kernel on the
    /// stream runs, reading only W until that kernel is done (see
    /// [`CudaKernels::gemv_chained_async`] for the contract).
    pub chained: bool,
    /// Before waiting for the previous kernel, each warp also asks the L2 for the rest of its
    /// slice of W. A benchmark knob: on the H100 it measured slower than without wherever the
    /// defaults run (kernels/BENCHMARKS.md, fifth pass), so no default uses it.
    pub l2_prefetch: bool,
}

impl GemvLaunch {
    /// The launch [`CudaKernels::gemv_chained_async`] uses.
    pub const CHAINED: GemvLaunch = GemvLaunch {
        chained: true,
        l2_prefetch: false,
    };
    /// Chained, with the L2 prefetch before the wait.
    pub const CHAINED_PREFETCH: GemvLaunch = GemvLaunch {
        chained: true,
        l2_prefetch: true,
    };
}

/// Which GEMV kernel: rows of W per warp (more rows keep more bytes in flight per lane, at the
/// cost of registers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemvVariant {
    /// 4 rows per warp (every m).
    Rows4,
    /// 8 rows per warp (m = 1 only).
    Rows8,
    /// Tensor cores (mma.sync bf16, x split into bf16 hi + lo): K % 128 == 0 and
    /// m·K·4 bytes of shared memory.
    TensorCore,
    /// Tensor cores, v2 (`gemv_tensor_core.cu`): m <= 8 with one MMA per tile and step (two for
    /// m = 5..8; x rows' hi/lo parts in B's columns), `tiles` (1, 2 or 4) 16-row tiles per warp
    /// and several super-tiles of loads in flight.
    TensorCore2 {
        /// 16-row tiles per warp.
        tiles: u8,
        /// Super-tiles of weights in flight per tile.
        depth: u8,
    },
    /// Tensor cores, v5 (`gemv_tensor_core_split_k.cu`): the v2 decode with K split across blocks (each
    /// stages only its slice of x; a deterministic last-block reduction); m = 1..8 (5..8 with two
    /// MMAs per step).
    TensorCore5 {
        /// 16-row tiles per warp.
        tiles: u8,
        /// Super-tiles of weights in flight per tile.
        depth: u8,
        /// Issue the next loads after decoding a super-tile, into its registers.
        late: bool,
        /// Resident blocks per SM (the kernel's register cap).
        per_sm: u8,
    },
}

/// How many warps split the 128-wide super-tiles of K in the tensor-core GEMV: enough warp
/// tasks (16-row tiles × splits) to fill the GPU, each keeping ≥ 4 super-tiles.
pub fn gemv_tc_ksplit(n: usize, k: usize, sm_count: usize) -> usize {
    let nsup = k / 128;
    let tiles = n.div_ceil(16);
    let mut ks = 1;
    while ks < 8 && nsup / (2 * ks) >= 4 && tiles * ks < 16 * sm_count {
        ks *= 2;
    }
    ks
}

/// How many warps split K in the GEMV: enough warps to fill the GPU (≥ 16 per SM) while
/// each warp still covers at least 32 16-byte units (a full pass of its lanes), and at most
/// 64 units per warp when there are warps enough.
pub fn gemv_ksplit(n: usize, k: usize, rows_per_warp: usize, sm_count: usize) -> usize {
    let units = k / 32;
    let groups = n.div_ceil(rows_per_warp);
    let mut ks = 1;
    while ks < 8 && units / (2 * ks) >= 32 && (groups * ks < 16 * sm_count || units / ks > 64) {
        ks *= 2;
    }
    ks
}

#[cfg(test)]
mod tests {
    use super::gemv_ksplit;

    #[test]
    fn every_listed_tc2_kernel_is_instantiated_in_the_cu_file() {
        let src = include_str!("../../cuda/gemv_tensor_core.cu");
        let built: Vec<(usize, usize, usize)> =
            crate::cuda::compile::macro_instances(src, "KILN_GEMV_TENSOR_CORE")
                .iter()
                .map(|v| (v[0], v[1], v[2]))
                .collect();
        assert_eq!(built, super::TC2_KERNELS);
    }

    #[test]
    fn ksplit_choices_for_the_benchmark_shapes() {
        assert_eq!(gemv_ksplit(8192, 8192, 4, 132), 4);
        assert_eq!(gemv_ksplit(4864, 896, 4, 132), 1);
        assert_eq!(gemv_ksplit(896, 4864, 4, 132), 4);
        assert_eq!(gemv_ksplit(18944, 3584, 4, 132), 2);
        assert_eq!(gemv_ksplit(3584, 18944, 4, 132), 8);
        assert_eq!(gemv_ksplit(10, 32, 4, 132), 1);
    }
}
