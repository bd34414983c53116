//! The decode-time GEMV `y[m, N] = x[m, K] · Wᵀ` for m = 1..=8 (x and y f32, W NVFP4 on the
//! device): which kernel runs a shape by default ([`CudaKernels::default_gemv_kernel`]), how
//! each kernel splits its work, and the launches, plain or chained ([`GemvLaunch`]). The
//! production kernels, by regime (H100 measurements in kernels/BENCHMARKS.md):
//!
//! - matrices of ≥ 16M weights, every m, and m = 5..8 where all of x does not fit in shared
//!   memory: the split-K tensor-core kernel (`gemv_tensor_core_split_k.cu`; K split across
//!   blocks, partial sums in a scratch that [`CudaKernels::reserve_gemv`] reserves up front);
//! - smaller matrices, m = 1: the CUDA-core kernel (`gemv_cuda_core.cu`; it starts fastest);
//! - smaller matrices, m = 2..8: the tensor-core kernel (`gemv_tensor_core.cu`; every block
//!   stages all of x, its warps split K), or, for m = 2..4 with K so large that x fits in
//!   shared memory only without that kernel's reduction area, the hi/lo tensor-core kernel
//!   (`gemv_tensor_core_hilo.cu`);
//! - anything the tensor-core kernels cannot take (K % 128 ≠ 0, no tensor cores): the
//!   CUDA-core kernel.
//!
//! Which kernels are built is [`super::gemv_kernels`]; the benchmark's extra launches (probes,
//! m = 5..8 as two launches) are `gemv_bench` (the `bench` feature).

use cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg,
};

use super::context::CudaKernels;
use super::driver::{drv, launch_chained, param};
use super::gemv_kernels::SplitKConfig;
use super::ops::DeviceNvfp4;
use crate::KernelError;

/// Most rows of x a GEMV takes (m = 1..=GEMV_MAX_ROWS): the decode step, and prompts in
/// batches of this many rows; over it a forward's linears are GEMMs (the engine's prompt path,
/// whose kernels — `kiln_add_rmsnorm_bf16_x4`, `kiln_qkv_post_x4`, … — are chosen by the same
/// bound).
pub const GEMV_MAX_ROWS: usize = 8;

/// Which GEMV kernel (see the module docs for the regime of each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemvKernel {
    /// CUDA cores (`gemv_cuda_core.cu`), `rows` rows of W per warp (more rows keep more bytes
    /// in flight per lane, at the cost of registers): 4 for every m ([`GemvKernel::CUDA_CORE`]);
    /// 8 for m = 1 with the `bench` feature only.
    CudaCore {
        /// Rows of W per warp.
        rows: u8,
    },
    /// Tensor cores with x's bf16 hi and lo parts in two MMAs per step
    /// (`gemv_tensor_core_hilo.cu`; "v1"): K % 128 == 0 and m·K·4 + 4096 bytes of shared memory.
    TensorCoreHiLo,
    /// Tensor cores (`gemv_tensor_core.cu`; "v2"): every block stages all of x (bf16 hi/lo in
    /// B's columns, one MMA per tile and step, two for m = 5..8) and its warps split K;
    /// `tiles` 16-row tiles per warp, `depth` super-tiles of loads in flight.
    TensorCore {
        /// 16-row tiles per warp.
        tiles: u8,
        /// Super-tiles of weights in flight per tile.
        depth: u8,
    },
    /// Tensor cores with K split across blocks (`gemv_tensor_core_split_k.cu`; "v5"): each
    /// block stages only its slice of x; the slices' partial sums meet in
    /// [`super::gemv_kernels::GemvScratch`] and
    /// the last block of each row range adds them in order (deterministic).
    TensorCoreSplitK {
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

impl GemvKernel {
    /// The CUDA-core kernel with 4 rows per warp (every m).
    pub const CUDA_CORE: GemvKernel = GemvKernel::CudaCore { rows: 4 };

    /// The split-K kernel of a configuration (its m aside).
    pub fn split_k((_, tiles, depth, late, per_sm): SplitKConfig) -> GemvKernel {
        GemvKernel::TensorCoreSplitK {
            tiles: tiles as u8,
            depth: depth as u8,
            late,
            per_sm: per_sm as u8,
        }
    }
}

/// How a GEMV is queued. The default is a plain launch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GemvLaunch {
    /// Programmatic dependent launch: the kernel may start while the previous kernel on the
    /// stream runs, reading only W until that kernel is done (see
    /// [`CudaKernels::gemv_chained_async`] for the contract).
    pub chained: bool,
    /// Before waiting for the previous kernel, each warp also asks the L2 for the rest of its
    /// slice of W (split-K kernel only). A benchmark knob: on the H100 it measured slower than
    /// without wherever the defaults run (kernels/BENCHMARKS.md, fifth pass), so no default
    /// uses it.
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

impl CudaKernels {
    /// Queue the fused dequantize-GEMV `y[m, N] = x[m, K] · Wᵀ` for `m` in 1..=8, x and y f32,
    /// with the default kernel for the shape ([`CudaKernels::default_gemv_kernel`]).
    /// Requires `K % 32 == 0` (use [`CudaKernels::matmul_nvfp4_large_async`] otherwise).
    pub fn gemv_async(
        &self,
        x: &CudaSlice<f32>,
        m: usize,
        w: &DeviceNvfp4,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        self.gemv_with_async(x, m, w, y, self.default_gemv_kernel(m, w.rows, w.cols))
    }

    /// The GEMV kernel for `m` rows of x and an `[n, k]` W, from the H100 measurements in
    /// kernels/BENCHMARKS.md. With the tensor-core kernels on ([`CudaKernels::tensor_core_gemv`]),
    /// on matrices of at least 16M weights: the split-K kernel (m = 1: 2 tiles per warp, 2
    /// super-tiles in flight, or for K <= 1024 one tile, 3 in flight, late loads and 3 blocks
    /// per SM; m = 2..4: 2 tiles, 3 in flight, late loads; m = 5..8: two MMAs per step, 2
    /// tiles, 2 in flight, late loads). On smaller matrices (launch-latency bound): m = 1 the
    /// CUDA-core kernel (it starts fastest), m = 2..8 the tensor-core kernel (m = 5..8 with two
    /// MMAs per step) where all of x fits in shared memory, else the split-K kernel for
    /// m = 5..8; the hi/lo tensor-core kernel (m = 2..4) where none of those fit. Everything
    /// else, and every shape with the tensor-core kernels off, runs the CUDA-core kernel.
    pub fn default_gemv_kernel(&self, m: usize, n: usize, k: usize) -> GemvKernel {
        if !self.tensor_core_gemv {
            return GemvKernel::CUDA_CORE;
        }
        let small_tc = m >= 5 && self.tensor_core_fits(m, k, 1);
        if n.saturating_mul(k) >= 16 << 20 || (m >= 5 && !small_tc) {
            // m = 1: one tile deep-3 with late loads and 3 blocks per SM for short rows and for
            // the largest matrices (a 7B model's gate/up and vocabulary projections: on the
            // H200, 2026-12-04, chained, 34.9 vs 36.1 µs at 37888×3584 and 106 vs 129 µs at
            // 152064×3584), two tiles deep-2 in between (3584² … 8192²)
            let two_tiles = (1, 2, 2, false, 2);
            let c = match m {
                1 if k <= 1024 || n.saturating_mul(k) >= 128 << 20 => (1, 1, 3, true, 3),
                1 => two_tiles,
                2..=4 => (m, 2, 3, true, 2),
                _ => (m, 2, 2, true, 2),
            };
            // (a very wide K can keep 3 blocks a SM from fitting: then the two-tile kernel)
            if let Some(c) = [c, two_tiles]
                .into_iter()
                .filter(|c| c.0 == m)
                .find(|&c| self.split_k_fits(c, n, k))
            {
                return GemvKernel::split_k(c);
            }
        }
        let tc = |tiles: u8, depth: u8| GemvKernel::TensorCore { tiles, depth };
        let pick = match m {
            1 => GemvKernel::CUDA_CORE,
            2..=4 if k >= 8192 => tc(4, 1),
            _ => tc(1, 4),
        };
        match pick {
            GemvKernel::TensorCore { tiles, .. } if self.tensor_core_fits(m, k, tiles as usize) => {
                pick
            }
            // only m = 2..4 get here with a hi/lo kernel that fits: for m = 5..8 the split-K
            // kernel above needs less shared memory than the hi/lo one wherever the device's
            // limit is a multiple of 1 KiB other than 0 mod 4 KiB (every GPU with tensor cores)
            _ if m >= 2 && self.tensor_core_hilo_fits(m, k) => GemvKernel::TensorCoreHiLo,
            _ => GemvKernel::CUDA_CORE,
        }
    }

    /// [`CudaKernels::gemv_async`] for one GEMV of a chain over weights that stay put (a decode
    /// step: layer after layer): where the default kernel is the split-K one or a CUDA-core
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
        let kernel = self.default_gemv_kernel(m, w.rows, w.cols);
        self.gemv_with_launch_async(x, m, w, y, kernel, GemvLaunch::CHAINED)
    }

    /// [`CudaKernels::gemv_async`] with an explicit kernel (tests and the benchmark compare
    /// them); it must be one [`CudaKernels::gemv_kernels_for`] lists for the shape.
    pub fn gemv_with_async(
        &self,
        x: &CudaSlice<f32>,
        m: usize,
        w: &DeviceNvfp4,
        y: &mut CudaSlice<f32>,
        kernel: GemvKernel,
    ) -> Result<(), KernelError> {
        self.gemv_with_launch_async(x, m, w, y, kernel, GemvLaunch::default())
    }

    /// [`CudaKernels::gemv_with_async`] queued as `launch` says (the split-K and the CUDA-core
    /// kernels take a chained launch, only split-K the L2 prefetch; the other tensor-core
    /// kernels launch as usual). A chained launch has the contract of
    /// [`CudaKernels::gemv_chained_async`].
    pub fn gemv_with_launch_async(
        &self,
        x: &CudaSlice<f32>,
        m: usize,
        w: &DeviceNvfp4,
        y: &mut CudaSlice<f32>,
        kernel: GemvKernel,
        launch: GemvLaunch,
    ) -> Result<(), KernelError> {
        let (n, k) = (w.rows, w.cols);
        if !(1..=GEMV_MAX_ROWS).contains(&m) {
            return Err(KernelError::InvalidArgument(format!(
                "GEMV takes 1 to {GEMV_MAX_ROWS} rows of x, got {m}"
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
        match kernel {
            GemvKernel::TensorCoreSplitK {
                tiles,
                depth,
                late,
                per_sm,
            } => {
                let c = (m, tiles as usize, depth as usize, late, per_sm as usize);
                self.split_k_launch(x, w, y, c, launch)
            }
            GemvKernel::TensorCore { tiles, depth } => {
                let (t, d) = (tiles as usize, depth as usize);
                let func = self
                    .f
                    .gemv
                    .tensor_core((m, t, d))
                    .filter(|_| self.tensor_core_fits(m, k, t));
                let Some(func) = func else {
                    return Err(KernelError::InvalidArgument(format!(
                        "the tensor-core GEMV takes K % 128 == 0, {} bytes of shared memory and \
                         one of the built (m, tiles, depth) {:?}; got m = {m}, K = {k}, \
                         tiles = {t}, depth = {d}",
                        tensor_core_smem_bytes(m, k, t),
                        self.f
                            .gemv
                            .tensor_core
                            .iter()
                            .map(|e| e.0)
                            .collect::<Vec<_>>()
                    )));
                };
                let ksplit = tensor_core_ksplit(n, k, t, d, self.sm_count as usize);
                let cfg = LaunchConfig {
                    grid_dim: (n.div_ceil(16 * t * (8 / ksplit)) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: tensor_core_smem_bytes(m, k, t) as u32,
                };
                self.launch_gemv(func, cfg, x, w, y, ksplit, "tensor-core")
            }
            GemvKernel::TensorCoreHiLo => {
                let func = self
                    .f
                    .gemv
                    .tensor_core_hilo(m)
                    .filter(|_| self.tensor_core_hilo_fits(m, k));
                let Some(func) = func else {
                    return Err(KernelError::InvalidArgument(format!(
                        "the hi/lo tensor-core GEMV needs a kernel for m = {m} (built: {:?}), \
                         K % 128 == 0 and {m}·K·4 + 4096 bytes of shared memory (K = {k})",
                        self.f
                            .gemv
                            .tensor_core_hilo
                            .iter()
                            .map(|e| e.0)
                            .collect::<Vec<_>>()
                    )));
                };
                let ksplit = tensor_core_hilo_ksplit(n, k, self.sm_count as usize);
                let cfg = LaunchConfig {
                    grid_dim: (n.div_ceil(16 * (8 / ksplit)) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: (m * k * 4 + 4096) as u32,
                };
                self.launch_gemv(func, cfg, x, w, y, ksplit, "hi/lo tensor-core")
            }
            GemvKernel::CudaCore { rows } => {
                let r = rows as usize;
                let Some(func) = self.f.gemv.cuda_core((m, r)) else {
                    return Err(KernelError::InvalidArgument(format!(
                        "no CUDA-core GEMV with {r} rows per warp for m = {m} in this build \
                         (built: {:?}; 8 rows per warp, m = 1, only with the `bench` feature)",
                        self.f
                            .gemv
                            .cuda_core
                            .iter()
                            .map(|e| e.0)
                            .collect::<Vec<_>>()
                    )));
                };
                let ksplit = cuda_core_ksplit(n, k, r, self.sm_count as usize);
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
        }
    }

    /// Every GEMV kernel this build has that can take `m` rows of x and an `[n, k]` W on this
    /// device (the tests run them all; with the `bench` feature the benchmark times them): the
    /// CUDA-core kernels always; the tensor-core ones when on and they fit.
    pub fn gemv_kernels_for(&self, m: usize, n: usize, k: usize) -> Vec<GemvKernel> {
        let g = &self.f.gemv;
        let mut v: Vec<GemvKernel> = g
            .cuda_core
            .iter()
            .filter(|((mm, _), _)| *mm == m)
            .map(|&((_, r), _)| GemvKernel::CudaCore { rows: r as u8 })
            .collect();
        if !self.tensor_core_gemv {
            return v;
        }
        if self.gemv_fits(GemvKernel::TensorCoreHiLo, m, n, k) {
            v.push(GemvKernel::TensorCoreHiLo);
        }
        v.extend(
            g.tensor_core
                .iter()
                .filter(|&&((mm, t, _), _)| mm == m && self.tensor_core_fits(m, k, t))
                .map(|&((_, t, d), _)| GemvKernel::TensorCore {
                    tiles: t as u8,
                    depth: d as u8,
                }),
        );
        // kernels built for m, and (with `bench`) for m = 5..8 the 4-row ones run twice (where
        // no kernel for m has the same tiles, depth, loads and blocks per SM)
        for &(c, _) in &g.split_k {
            let kernel = GemvKernel::split_k(c);
            let ours = c.0 == m || (m > 4 && c.0 == 4);
            if ours && !v.contains(&kernel) && self.split_k_fits((m, c.1, c.2, c.3, c.4), n, k) {
                v.push(kernel);
            }
        }
        v
    }

    /// Whether `kernel` is built and can take `m` rows of x and an `[n, k]` W on this device
    /// (a launch of it checks the same).
    pub fn gemv_fits(&self, kernel: GemvKernel, m: usize, n: usize, k: usize) -> bool {
        let g = &self.f.gemv;
        match kernel {
            GemvKernel::CudaCore { rows } => {
                g.cuda_core((m, rows as usize)).is_some() && k.is_multiple_of(32)
            }
            GemvKernel::TensorCoreHiLo => {
                g.tensor_core_hilo(m).is_some() && self.tensor_core_hilo_fits(m, k)
            }
            GemvKernel::TensorCore { tiles, depth } => {
                let t = tiles as usize;
                g.tensor_core((m, t, depth as usize)).is_some() && self.tensor_core_fits(m, k, t)
            }
            GemvKernel::TensorCoreSplitK {
                tiles,
                depth,
                late,
                per_sm,
            } => {
                let c = (m, tiles as usize, depth as usize, late, per_sm as usize);
                self.split_k_fits(c, n, k)
            }
        }
    }

    /// Whether a hi/lo tensor-core GEMV can take `m` rows of x with this K (K % 128 == 0 and x
    /// as bf16 hi/lo fits in shared memory; whether a kernel is built for m is not asked).
    fn tensor_core_hilo_fits(&self, m: usize, k: usize) -> bool {
        k.is_multiple_of(128) && m * k * 4 + 4096 <= self.smem_optin
    }

    /// Whether a tensor-core GEMV with `tiles` 16-row tiles per warp can take `m` rows of x
    /// with this K (a kernel built for m and tiles, at any depth; K % 128 == 0; x as bf16 hi/lo
    /// fits in shared memory).
    fn tensor_core_fits(&self, m: usize, k: usize, tiles: usize) -> bool {
        (1..=GEMV_MAX_ROWS).contains(&m)
            && self
                .f
                .gemv
                .tensor_core
                .iter()
                .any(|&((mm, t, _), _)| mm == m && t == tiles)
            && k.is_multiple_of(128)
            && tensor_core_smem_bytes(m, k, tiles) <= self.smem_optin
    }

    /// Whether the split-K GEMV can run `c` on an `[n, k]` W: built for `c.0` rows of x (with
    /// the `bench` feature also 5..=8 rows as 4 + the rest, both built), K % 128 == 0, and the
    /// slice of x fits in shared memory.
    fn split_k_fits(&self, c: SplitKConfig, n: usize, k: usize) -> bool {
        let (m, t, _, _, b) = c;
        let direct = self.f.gemv.split_k(c).is_some();
        #[cfg(feature = "bench")]
        let in_two = !direct && self.split_k_runs_in_two(c);
        #[cfg(not(feature = "bench"))]
        let in_two = false;
        let staged = if direct { m } else { m.min(4) };
        (direct || in_two)
            && k.is_multiple_of(128)
            && split_k_smem_bytes(staged, k, self.split_k_slices_for(n, k, t, b)) <= self.smem_optin
    }

    /// The K slices a split-K launch of this shape uses (`per_sm` resident blocks per SM; with
    /// the `bench` feature `KILN_GEMV_SLICES` as read at start-up, a tuning knob, clamped to
    /// 1..=K/128).
    pub fn split_k_slices_for(&self, n: usize, k: usize, tiles: usize, per_sm: usize) -> usize {
        #[cfg(feature = "bench")]
        if let Some(s) = self.gemv_slices {
            return s.clamp(1, (k / 128).max(1));
        }
        split_k_slices(n, k, tiles, per_sm * self.sm_count as usize)
    }

    /// Reserve the split-K GEMV's scratch for up to `m` rows of x and an `[n, k]` W: enough for
    /// every split-K kernel of this build on that shape (the default's and any other that
    /// [`CudaKernels::gemv_kernels_for`] lists). Call it for every shape before launching GEMVs
    /// on it, and before capturing GEMVs in a CUDA graph: launches never allocate, and one whose
    /// scratch is too small fails with [`KernelError::GemvScratchNotReserved`]. The scratch is
    /// one for all shapes (launches on the one stream run in order) and only grows (zeroed);
    /// growing replaces the buffers, so capture graphs after the last call.
    pub fn reserve_gemv(&self, m: usize, n: usize, k: usize) -> Result<(), KernelError> {
        if !(1..=GEMV_MAX_ROWS).contains(&m) {
            return Err(KernelError::InvalidArgument(format!(
                "GEMV takes 1 to {GEMV_MAX_ROWS} rows of x, got {m}"
            )));
        }
        let (partials, counters) =
            self.f
                .gemv
                .split_k
                .iter()
                .fold((0, 0), |(p, c), &((_, tiles, _, _, per_sm), _)| {
                    let slices = self.split_k_slices_for(n, k, tiles, per_sm);
                    let (sp, sc) = split_k_scratch(m, n, tiles, slices);
                    (p.max(sp), c.max(sc))
                });
        self.gemv_scratch()?
            .reserve(&self.stream, partials, counters)
    }

    /// (partial-sum floats, counters) of split-K scratch reserved so far.
    pub fn gemv_scratch_reserved(&self) -> Result<(usize, usize), KernelError> {
        Ok(self.gemv_scratch()?.reserved())
    }

    fn gemv_scratch(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, super::gemv_kernels::GemvScratch>, KernelError> {
        // the lock guards reserve against a concurrent launch; a launch only reads the buffers
        self.gemv_scratch
            .lock()
            .map_err(|_| KernelError::InvalidArgument("GEMV scratch lock poisoned".into()))
    }

    /// Launch the split-K GEMV for `c.0` rows of x; the caller (`gemv_with_launch_async`)
    /// checked the shapes of x and y.
    fn split_k_launch(
        &self,
        x: &CudaSlice<f32>,
        w: &DeviceNvfp4,
        y: &mut CudaSlice<f32>,
        c: SplitKConfig,
        launch: GemvLaunch,
    ) -> Result<(), KernelError> {
        let (n, k) = (w.rows, w.cols);
        if !self.split_k_fits(c, n, k) {
            return Err(KernelError::InvalidArgument(format!(
                "the split-K tensor-core GEMV takes K % 128 == 0, a slice of x that fits in \
                 shared memory and one of the built (m, tiles, depth, late, blocks per SM) {:?}; \
                 got [{n}, {k}], {c:?}",
                self.f.gemv.split_k.iter().map(|e| e.0).collect::<Vec<_>>()
            )));
        }
        #[cfg(feature = "bench")]
        if self.f.gemv.split_k(c).is_none() {
            return self.split_k_in_two(x, w, y, c, launch);
        }
        self.split_k_part(&x.slice(..), w, &mut y.slice_mut(..), c, launch)
    }

    /// One split-K launch (a kernel built for `c.0` rows of x, 1..=8).
    pub(super) fn split_k_part(
        &self,
        x: &CudaView<'_, f32>,
        w: &DeviceNvfp4,
        y: &mut CudaViewMut<'_, f32>,
        c: SplitKConfig,
        launch: GemvLaunch,
    ) -> Result<(), KernelError> {
        let (n, k) = (w.rows, w.cols);
        let (m, tiles, _, _, per_sm) = c;
        let func = self.f.gemv.split_k(c).expect("checked by split_k_fits");
        let slices = self.split_k_slices_for(n, k, tiles, per_sm);
        let rowblocks = n.div_ceil(split_k_rows_per_block(tiles));
        let (need_partials, need_counters) = split_k_scratch(m, n, tiles, slices);
        let mut scratch = self.gemv_scratch()?;
        let (have_partials, have_counters) = scratch.reserved();
        let Some((partial, counters)) = scratch.buffers(need_partials, need_counters) else {
            return Err(KernelError::GemvScratchNotReserved {
                m,
                n,
                k,
                need_partials,
                need_counters,
                have_partials,
                have_counters,
            });
        };
        let cfg = LaunchConfig {
            grid_dim: (rowblocks as u32, slices as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: split_k_smem_bytes(m, k, slices) as u32,
        };
        let (ni, ki) = (n as i32, k as i32);
        let flags = i32::from(launch.l2_prefetch);
        if launch.chained {
            let s = &self.stream;
            let (qp, cp) = (partial.device_ptr_mut(s).0, counters.device_ptr_mut(s).0);
            let ptrs = gemv_ptrs(s, x, w, y);
            let mut params: Vec<*mut std::ffi::c_void> = ptrs
                .iter()
                .map(param)
                .chain([
                    param(&ni),
                    param(&ki),
                    param(&qp),
                    param(&cp),
                    param(&flags),
                ])
                .collect();
            // SAFETY: the same kernel and arguments as the plain launch below (the pointers
            // outlive the call: cuLaunchKernelEx copies the values); the kernel reads only W
            // before griddepcontrol.wait, which the caller of a chained launch vouches the
            // previous kernel on the stream does not write.
            return unsafe { launch_chained(s, func, cfg, &mut params) }
                .map_err(drv("launching kiln_gemv_tensor_core_split_k (chained)"));
        }
        let mut b = self.stream.launch_builder(func);
        b.arg(x)
            .arg(&w.packed)
            .arg(&w.scales)
            .arg(&w.tensor_scale)
            .arg(y)
            .arg(&ni)
            .arg(&ki)
            .arg(partial)
            .arg(counters)
            .arg(&flags);
        // SAFETY: matches kiln_gemv_tensor_core_split_k_*; x holds m × K and y m × N floats
        // (the caller's views); the partial buffer holds slices × m × N floats and one counter
        // per row range, all zero between launches; everything is on this stream.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(drv("launching kiln_gemv_tensor_core_split_k"))
    }

    /// Launch one of the GEMV kernels that take (x, packed, scales, tensor_scale, y, N, K,
    /// ksplit): the CUDA-core, tensor-core and hi/lo ones (and the probes); the caller checked
    /// the shapes and picked `cfg` for that kernel.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_gemv(
        &self,
        func: &CudaFunction,
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
        // SAFETY: every such GEMV kernel has this argument list; the caller checked x (m × K),
        // y (m × N), K's alignment and the shared memory for this kernel.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| KernelError::Cuda {
                context: format!("launching the {which} GEMV kernel"),
                message: e.to_string(),
            })
    }

    /// [`CudaKernels::launch_gemv`] as a chained launch, for the CUDA-core kernels only (they
    /// wait for the previous kernel before reading x; the other non-split-K tensor-core
    /// kernels do not).
    fn launch_gemv_chained(
        &self,
        func: &CudaFunction,
        cfg: LaunchConfig,
        x: &CudaSlice<f32>,
        w: &DeviceNvfp4,
        y: &mut CudaSlice<f32>,
        ksplit: usize,
    ) -> Result<(), KernelError> {
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
        unsafe { launch_chained(s, func, cfg, &mut params) }
            .map_err(drv("launching the cuda-core GEMV kernel (chained)"))
    }
}

/// The raw device pointers of a GEMV's x, packed W, scales, tensor scale and y (the first five
/// parameters of every GEMV kernel), for [`launch_chained`]. Event tracking is off in this
/// crate, so the pointers need no guard.
fn gemv_ptrs(
    s: &cudarc::driver::CudaStream,
    x: &impl DevicePtr<f32>,
    w: &DeviceNvfp4,
    y: &mut impl DevicePtrMut<f32>,
) -> [cudarc::driver::sys::CUdeviceptr; 5] {
    [
        x.device_ptr(s).0,
        w.packed.device_ptr(s).0,
        w.scales.device_ptr(s).0,
        w.tensor_scale.device_ptr(s).0,
        y.device_ptr_mut(s).0,
    ]
}

/// How many warps split K in the CUDA-core GEMV: enough warps to fill the GPU (≥ 16 per SM)
/// while each warp still covers at least 32 16-byte units (a full pass of its lanes), and at
/// most 64 units per warp when there are warps enough.
pub fn cuda_core_ksplit(n: usize, k: usize, rows_per_warp: usize, sm_count: usize) -> usize {
    let units = k / 32;
    let groups = n.div_ceil(rows_per_warp);
    let mut ks = 1;
    while ks < 8 && units / (2 * ks) >= 32 && (groups * ks < 16 * sm_count || units / ks > 64) {
        ks *= 2;
    }
    ks
}

/// How many warps split the 128-wide super-tiles of K in the hi/lo tensor-core GEMV: enough
/// warp tasks (16-row tiles × splits) to fill the GPU, each keeping ≥ 4 super-tiles.
pub fn tensor_core_hilo_ksplit(n: usize, k: usize, sm_count: usize) -> usize {
    let nsup = k / 128;
    let tiles = n.div_ceil(16);
    let mut ks = 1;
    while ks < 8 && nsup / (2 * ks) >= 4 && tiles * ks < 16 * sm_count {
        ks *= 2;
    }
    ks
}

/// How many warps split the super-tiles (128 k) in the tensor-core GEMV: enough warp tasks to
/// fill the GPU (16 per SM), while each warp keeps at least 2·depth super-tiles.
pub fn tensor_core_ksplit(n: usize, k: usize, tiles: usize, d: usize, sm_count: usize) -> usize {
    let nsup = k / 128;
    let groups = n.div_ceil(16 * tiles);
    let mut ks = 1;
    while ks < 8 && nsup / (2 * ks) >= d && groups * ks < 16 * sm_count {
        ks *= 2;
    }
    ks
}

/// Dynamic shared memory of the tensor-core GEMV: x as bf16 hi/lo (4·m·K bytes), a zero area
/// for unused B columns (32·2m uint2) and the cross-warp reduction.
pub fn tensor_core_smem_bytes(m: usize, k: usize, tiles: usize) -> usize {
    4 * m * k + 512 * m + 8 * tiles * 16 * m * 4
}

/// Rows of W one split-K block covers: 8 warps × `tiles` tiles × 16 rows.
pub fn split_k_rows_per_block(tiles: usize) -> usize {
    8 * tiles * 16
}

/// How many K slices (grid.y) a split-K launch uses for `[n, k]` on `slots` resident blocks:
/// the fewest waves × (super-tiles per block + 2, the block's fixed start-up and reduction
/// cost), then the fewest slices (less partial-sum traffic).
pub fn split_k_slices(n: usize, k: usize, tiles: usize, slots: usize) -> usize {
    let nsup = k / 128;
    let rowblocks = n.div_ceil(split_k_rows_per_block(tiles));
    let mut best = (usize::MAX, 1);
    for s in 1..=32.min(nsup.max(1)) {
        let cost = (rowblocks * s).div_ceil(slots.max(1)) * (nsup.div_ceil(s) + 2);
        if cost < best.0 {
            best = (cost, s);
        }
    }
    best.1
}

/// The scratch a split-K launch of `m` rows of x on N = `n` rows of W with `tiles` tiles per
/// warp in `slices` K slices uses: (partial-sum floats `[slices][m][N]`, one counter per row
/// range). [`CudaKernels::reserve_gemv`] reserves the largest of these over the built kernels.
pub fn split_k_scratch(m: usize, n: usize, tiles: usize, slices: usize) -> (usize, usize) {
    (slices * m * n, n.div_ceil(split_k_rows_per_block(tiles)))
}

/// Dynamic shared memory of a split-K launch: the slice of x as bf16 hi/lo, the zero area and
/// the "last block" flag.
pub fn split_k_smem_bytes(m: usize, k: usize, slices: usize) -> usize {
    4 * m * (k / 128).div_ceil(slices) * 128 + 512 * m + 16
}

#[cfg(test)]
mod tests {
    use super::super::gemv_kernels::{self as built, experiments};
    use super::*;
    use crate::cuda::compile::macro_instances;

    /// The instantiation lines of `macro_name` in a kernel file, as configurations: those
    /// before its `#ifdef KILN_BENCH` section must be the production table, those inside it
    /// the experiments (with the `bench` feature; without it there are none).
    fn check<C: PartialEq + std::fmt::Debug>(
        src: &str,
        macro_name: &str,
        config: impl Fn(&[usize]) -> C,
        production: &[C],
        experiments: &[C],
    ) {
        let all = macro_instances(src, macro_name);
        let pick = |bench: bool| -> Vec<C> {
            all.iter()
                .filter(|(_, b)| *b == bench)
                .map(|(v, _)| config(v))
                .collect()
        };
        assert_eq!(pick(false), production, "{macro_name}");
        if cfg!(feature = "bench") {
            assert_eq!(pick(true), experiments, "{macro_name} (bench)");
        } else {
            assert!(experiments.is_empty());
        }
    }

    #[test]
    fn every_listed_kernel_is_instantiated_in_its_cu_file() {
        check(
            include_str!("../../cuda/gemv_cuda_core.cu"),
            "KILN_GEMV_CUDA_CORE",
            |v| (v[0], v[1]),
            built::CUDA_CORE_KERNELS,
            experiments::CUDA_CORE_KERNELS,
        );
        check(
            include_str!("../../cuda/gemv_tensor_core_hilo.cu"),
            "KILN_GEMV_TENSOR_CORE_HILO",
            |v| v[0],
            built::TENSOR_CORE_HILO_KERNELS,
            experiments::TENSOR_CORE_HILO_KERNELS,
        );
        let tc = include_str!("../../cuda/gemv_tensor_core.cu");
        check(
            tc,
            "KILN_GEMV_TENSOR_CORE",
            |v| (v[0], v[1], v[2]),
            built::TENSOR_CORE_KERNELS,
            experiments::TENSOR_CORE_KERNELS,
        );
        // the probes are benchmark-only
        let probes = macro_instances(tc, "KILN_GEMV_TENSOR_CORE_PROBE");
        assert_eq!(probes, [(vec![1], true), (vec![2], true), (vec![3], true)]);
        check(
            include_str!("../../cuda/gemv_tensor_core_split_k.cu"),
            "KILN_GEMV_SPLIT_K",
            |v| (v[0], v[1], v[2], v[3] == 1, v[4]),
            built::SPLIT_K_KERNELS,
            experiments::SPLIT_K_KERNELS,
        );
    }

    /// Every configuration the default selection can return is a production kernel.
    #[test]
    fn every_default_is_a_production_kernel() {
        for m in 1..=8 {
            let split_k = match m {
                1 => vec![(1, 1, 3, true, 3), (1, 2, 2, false, 2)],
                2..=4 => vec![(m, 2, 3, true, 2)],
                _ => vec![(m, 2, 2, true, 2)],
            };
            for c in split_k {
                assert!(built::SPLIT_K_KERNELS.contains(&c), "{c:?}");
            }
            assert!(built::CUDA_CORE_KERNELS.contains(&(m, 4)));
            if m >= 2 {
                let t = [(m, 1, 4)].into_iter().chain((m <= 4).then_some((m, 4, 1)));
                for c in t {
                    assert!(built::TENSOR_CORE_KERNELS.contains(&c), "{c:?}");
                }
            }
            if (2..=4).contains(&m) {
                assert!(built::TENSOR_CORE_HILO_KERNELS.contains(&m));
            }
        }
    }

    #[test]
    fn ksplit_choices_for_the_benchmark_shapes() {
        assert_eq!(cuda_core_ksplit(8192, 8192, 4, 132), 4);
        assert_eq!(cuda_core_ksplit(4864, 896, 4, 132), 1);
        assert_eq!(cuda_core_ksplit(896, 4864, 4, 132), 4);
        assert_eq!(cuda_core_ksplit(18944, 3584, 4, 132), 2);
        assert_eq!(cuda_core_ksplit(3584, 18944, 4, 132), 8);
        assert_eq!(cuda_core_ksplit(10, 32, 4, 132), 1);
    }

    /// The scratch matches what the kernel indexes: partial[slice][m][N] and one counter per
    /// block of 8 warps × tiles × 16 rows (grid.x).
    #[test]
    fn split_k_scratch_sizes() {
        assert_eq!(split_k_scratch(1, 8192, 2, 8), (8 * 8192, 32));
        assert_eq!(split_k_scratch(8, 3584, 2, 17), (17 * 8 * 3584, 14));
        assert_eq!(split_k_scratch(1, 100, 1, 1), (100, 1));
        assert_eq!(split_k_scratch(4, 129, 1, 2), (2 * 4 * 129, 2));
    }

    #[test]
    fn slices_for_the_benchmark_shapes_on_an_h100() {
        let slots = 264;
        assert_eq!(split_k_slices(8192, 8192, 2, slots), 8);
        assert_eq!(split_k_slices(18944, 3584, 2, slots), 3);
        assert_eq!(split_k_slices(3584, 18944, 2, slots), 17);
        // many row ranges: no split (one wave more costs less than a second start-up)
        assert_eq!(split_k_slices(151936, 896, 2, slots), 1);
        // a tiny K never splits below one super-tile per slice
        assert_eq!(split_k_slices(64, 128, 2, slots), 1);
    }
}
