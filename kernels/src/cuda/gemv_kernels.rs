//! Which GEMV kernels this build loads, and their state on the device (a leaf under
//! [`super::context`] and [`super::gemv`]): the configuration of each kernel family, the
//! production tables — and, with the `bench` feature, the benchmark's experiments
//! (`experiments`) —, the loaded function handles (`GemvFunctions`) and the split-K kernel's
//! scratch ([`GemvScratch`]). The kernels are in `kernels/cuda/gemv_*.cu`; which one runs a
//! shape, and the launches, are in [`super::gemv`].
//!
//! Each table lists the instantiation lines of its `.cu` file in order (unit-tested in
//! `gemv.rs`); experiments sit in the file's `#ifdef KILN_BENCH` section, compiled only when
//! the `bench` feature passes `-DKILN_BENCH` to NVRTC.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream};

use super::driver::drv;
use crate::KernelError;

/// A CUDA-core kernel (`gemv_cuda_core.cu`): (m, rows of W per warp).
pub type CudaCoreConfig = (usize, usize);

/// A tensor-core kernel (`gemv_tensor_core.cu`): (m, 16-row tiles per warp, super-tiles of
/// loads in flight per tile).
pub type TensorCoreConfig = (usize, usize, usize);

/// A split-K tensor-core kernel (`gemv_tensor_core_split_k.cu`): (m, tiles per warp,
/// super-tiles in flight per tile, late — the next loads are issued after a super-tile is
/// decoded, into the registers it used —, resident blocks per SM the register cap allows).
pub type SplitKConfig = (usize, usize, usize, bool, usize);

/// The CUDA-core kernels: 4 rows per warp, every m (the `KILN_GEMV_CUDA_CORE` lines).
pub const CUDA_CORE_KERNELS: &[CudaCoreConfig] = &[
    (1, 4),
    (2, 4),
    (3, 4),
    (4, 4),
    (5, 4),
    (6, 4),
    (7, 4),
    (8, 4),
];

/// The hi/lo tensor-core kernels, by m (the `KILN_GEMV_TENSOR_CORE_HILO` lines): only the m a
/// default can pick (2..=4, see `CudaKernels::default_gemv_kernel`).
pub const TENSOR_CORE_HILO_KERNELS: &[usize] = &[2, 3, 4];

/// The tensor-core kernels (the `KILN_GEMV_TENSOR_CORE` lines): m = 2..4 with 4 tiles × 1 deep
/// (K ≥ 8192) or 1 tile × 4 deep, m = 5..8 with 1 tile × 4 deep.
pub const TENSOR_CORE_KERNELS: &[TensorCoreConfig] = &[
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

/// The split-K kernels (the `KILN_GEMV_SPLIT_K` lines): the defaults of
/// `CudaKernels::default_gemv_kernel` for m = 1 (K > 1024 under 128 Mi weights; K ≤ 1024 or
/// at least 128 Mi weights), 2..4 and 5..8.
pub const SPLIT_K_KERNELS: &[SplitKConfig] = &[
    (1, 2, 2, false, 2),
    (1, 1, 3, true, 3),
    (2, 2, 3, true, 2),
    (3, 2, 3, true, 2),
    (4, 2, 3, true, 2),
    (5, 2, 2, true, 2),
    (6, 2, 2, true, 2),
    (7, 2, 2, true, 2),
    (8, 2, 2, true, 2),
];

/// The benchmark's experiments (the `bench` feature; the `#ifdef KILN_BENCH` lines of each
/// file): kernels no default picks, kept to compare against, and the probe kernels.
#[cfg(feature = "bench")]
pub mod experiments {
    use super::{CudaCoreConfig, SplitKConfig, TensorCoreConfig};

    /// 8 rows per warp at m = 1.
    pub const CUDA_CORE_KERNELS: &[CudaCoreConfig] = &[(1, 8)];
    /// The hi/lo kernel for the m no default gives it.
    pub const TENSOR_CORE_HILO_KERNELS: &[usize] = &[1, 5, 6, 7, 8];
    /// m = 1, 2 tiles × 3 deep: the probes' reference.
    pub const TENSOR_CORE_KERNELS: &[TensorCoreConfig] = &[(1, 2, 3)];
    /// Other depths, tiles and load timings; (4, …) also runs m = 5..8 as two launches.
    pub const SPLIT_K_KERNELS: &[SplitKConfig] = &[
        (1, 2, 3, false, 2),
        (1, 2, 3, true, 2),
        (1, 1, 4, true, 2),
        (4, 2, 3, false, 2),
        (8, 2, 3, true, 2),
    ];
    /// `kiln_gemv_tensor_core_probe{1..=PROBES}` (see `CudaKernels::gemv_probe_async`).
    pub const PROBES: usize = 3;
}

/// Without the `bench` feature there are no experiments.
#[cfg(not(feature = "bench"))]
pub(super) mod experiments {
    use super::{CudaCoreConfig, SplitKConfig, TensorCoreConfig};

    pub const CUDA_CORE_KERNELS: &[CudaCoreConfig] = &[];
    pub const TENSOR_CORE_HILO_KERNELS: &[usize] = &[];
    pub const TENSOR_CORE_KERNELS: &[TensorCoreConfig] = &[];
    pub const SPLIT_K_KERNELS: &[SplitKConfig] = &[];
}

/// The production table, then (with `bench`) the experiments: what this build loads.
fn built<T: Copy>(production: &[T], experiments: &[T]) -> Vec<T> {
    production.iter().chain(experiments).copied().collect()
}

/// The CUDA function of a CUDA-core kernel.
pub fn cuda_core_name((m, r): CudaCoreConfig) -> String {
    format!("kiln_gemv_cuda_core_m{m}_r{r}")
}

/// The CUDA function of a hi/lo tensor-core kernel.
pub fn tensor_core_hilo_name(m: usize) -> String {
    format!("kiln_gemv_tensor_core_hilo_m{m}")
}

/// The CUDA function of a tensor-core kernel.
pub fn tensor_core_name((m, t, d): TensorCoreConfig) -> String {
    format!("kiln_gemv_tensor_core_m{m}_t{t}_d{d}")
}

/// The CUDA function of a split-K kernel.
pub fn split_k_name((m, t, d, l, b): SplitKConfig) -> String {
    format!(
        "kiln_gemv_tensor_core_split_k_m{m}_t{t}_d{d}_l{}_b{b}",
        l as u8
    )
}

/// The loaded GEMV kernels, each with its configuration.
pub(crate) struct GemvFunctions {
    pub(crate) cuda_core: Vec<(CudaCoreConfig, CudaFunction)>,
    pub(crate) tensor_core_hilo: Vec<(usize, CudaFunction)>,
    pub(crate) tensor_core: Vec<(TensorCoreConfig, CudaFunction)>,
    pub(crate) split_k: Vec<(SplitKConfig, CudaFunction)>,
    /// The decode step's fused GEMVs (`kiln_gemv_cc_m1_*`, see [`super::gemv_fused`]), or why
    /// they could not be loaded (kept apart so that a failure there leaves every other kernel,
    /// and the separate decode kernels, usable).
    pub(crate) fused: Result<FusedGemvFunctions, String>,
    /// `kiln_gemv_tensor_core_probe{1,2,3}`.
    #[cfg(feature = "bench")]
    pub(crate) probes: Vec<CudaFunction>,
}

impl GemvFunctions {
    /// Load every GEMV kernel this build has with `func(file, name)`, and let the tensor-core
    /// ones use up to `smem_optin` bytes of dynamic shared memory (the fused ones that less
    /// their static shared memory; their loading failing leaves the rest usable).
    pub(crate) fn load(
        func: &dyn Fn(&str, &str) -> Result<CudaFunction, KernelError>,
        smem_optin: usize,
    ) -> Result<Self, KernelError> {
        fn each<C: Copy>(
            configs: Vec<C>,
            load: impl Fn(C) -> Result<CudaFunction, KernelError>,
        ) -> Result<Vec<(C, CudaFunction)>, KernelError> {
            configs.into_iter().map(|c| Ok((c, load(c)?))).collect()
        }
        let f = GemvFunctions {
            cuda_core: each(
                built(CUDA_CORE_KERNELS, experiments::CUDA_CORE_KERNELS),
                |c| func("gemv_cuda_core.cu", &cuda_core_name(c)),
            )?,
            tensor_core_hilo: each(
                built(
                    TENSOR_CORE_HILO_KERNELS,
                    experiments::TENSOR_CORE_HILO_KERNELS,
                ),
                |m| func("gemv_tensor_core_hilo.cu", &tensor_core_hilo_name(m)),
            )?,
            tensor_core: each(
                built(TENSOR_CORE_KERNELS, experiments::TENSOR_CORE_KERNELS),
                |c| func("gemv_tensor_core.cu", &tensor_core_name(c)),
            )?,
            split_k: each(built(SPLIT_K_KERNELS, experiments::SPLIT_K_KERNELS), |c| {
                func("gemv_tensor_core_split_k.cu", &split_k_name(c))
            })?,
            fused: FusedGemvFunctions::load(func, smem_optin).map_err(|e| {
                tracing::warn!("the fused decode GEMVs did not load ({e}); decode steps run the separate kernels");
                e.to_string()
            }),
            #[cfg(feature = "bench")]
            probes: (1..=experiments::PROBES)
                .map(|p| {
                    func(
                        "gemv_tensor_core.cu",
                        &format!("kiln_gemv_tensor_core_probe{p}"),
                    )
                })
                .collect::<Result<_, _>>()?,
        };
        let dynamic_smem = f
            .tensor_core_hilo
            .iter()
            .map(|(_, func)| func)
            .chain(f.tensor_core.iter().map(|(_, func)| func))
            .chain(f.split_k.iter().map(|(_, func)| func));
        #[cfg(feature = "bench")]
        let dynamic_smem = dynamic_smem.chain(&f.probes);
        for func in dynamic_smem {
            func.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem_optin as i32,
            )
            .map_err(drv("raising the GEMV kernel's shared-memory limit"))?;
        }
        Ok(f)
    }

    /// The CUDA-core kernel `c`, if loaded.
    pub(crate) fn cuda_core(&self, c: CudaCoreConfig) -> Option<&CudaFunction> {
        find(&self.cuda_core, c)
    }

    /// The hi/lo tensor-core kernel for `m`, if loaded.
    pub(crate) fn tensor_core_hilo(&self, m: usize) -> Option<&CudaFunction> {
        find(&self.tensor_core_hilo, m)
    }

    /// The tensor-core kernel `c`, if loaded.
    pub(crate) fn tensor_core(&self, c: TensorCoreConfig) -> Option<&CudaFunction> {
        find(&self.tensor_core, c)
    }

    /// The split-K kernel `c`, if loaded.
    pub(crate) fn split_k(&self, c: SplitKConfig) -> Option<&CudaFunction> {
        find(&self.split_k, c)
    }
}

/// The decode step's fused GEMVs (`gemv_fused.cu`): RMSNorm folded into the x load; SwiGLU,
/// and the attention's combine, folded into the x load with the residual add in the store.
pub(crate) struct FusedGemvFunctions {
    /// Dynamic shared memory each may use (the device's opt-in limit less their largest
    /// static shared memory).
    pub(crate) x_bytes: usize,
    pub(crate) norm: CudaFunction,
    /// x as is, the residual add in the store (the o GEMV after a separate combine).
    pub(crate) residual: CudaFunction,
    pub(crate) swiglu_residual: CudaFunction,
    pub(crate) combine_residual: CudaFunction,
}

impl FusedGemvFunctions {
    /// Load the fused kernels and let them use the device's opt-in shared memory less their
    /// static shared memory (the driver refuses a dynamic limit that leaves no room for it).
    fn load(
        func: &dyn Fn(&str, &str) -> Result<CudaFunction, KernelError>,
        smem_optin: usize,
    ) -> Result<Self, KernelError> {
        let f = |name: &str| func("gemv_fused.cu", name);
        let mut fused = FusedGemvFunctions {
            x_bytes: 0,
            norm: f("kiln_gemv_cc_m1_norm")?,
            residual: f("kiln_gemv_cc_m1_residual")?,
            swiglu_residual: f("kiln_gemv_cc_m1_swiglu_residual")?,
            combine_residual: f("kiln_gemv_cc_m1_combine_residual")?,
        };
        let with_x = [&fused.norm, &fused.swiglu_residual, &fused.combine_residual];
        let mut static_bytes = 0;
        for func in with_x {
            static_bytes = static_bytes.max(static_smem(func)?);
        }
        let x_bytes = smem_optin.saturating_sub(static_bytes);
        for func in with_x {
            func.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                x_bytes as i32,
            )
            .map_err(drv("raising the fused GEMV kernel's shared-memory limit"))?;
        }
        fused.x_bytes = x_bytes;
        Ok(fused)
    }
}

/// Bytes of static shared memory `func` declares.
fn static_smem(func: &CudaFunction) -> Result<usize, KernelError> {
    let v = func
        .get_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
        )
        .map_err(drv("reading a GEMV kernel's static shared memory"))?;
    Ok(v.max(0) as usize)
}

fn find<C: PartialEq>(loaded: &[(C, CudaFunction)], c: C) -> Option<&CudaFunction> {
    loaded.iter().find(|(k, _)| *k == c).map(|(_, f)| f)
}

/// The split-K GEMV's scratch: partial sums (f32, `[slices][m][N]`) and one counter per row
/// range (zero between launches: the last block of a row range resets its own). Reserved
/// before any launch by `CudaKernels::reserve_gemv`, which only grows it (zeroed); a launch
/// only checks that it is large enough and never allocates, so GEMV launches can be captured
/// in a CUDA graph. Growing replaces the buffers: capture graphs after the last reserve.
#[derive(Default)]
pub struct GemvScratch {
    bufs: Option<(CudaSlice<f32>, CudaSlice<u32>)>,
}

impl GemvScratch {
    /// Grow (zeroed) to at least `partials` floats and `counters` counters, keeping at least
    /// what was reserved before; nothing happens when that much is there already.
    pub(crate) fn reserve(
        &mut self,
        stream: &Arc<CudaStream>,
        partials: usize,
        counters: usize,
    ) -> Result<(), KernelError> {
        let (have_p, have_c) = self.reserved();
        if self.bufs.is_some() && have_p >= partials && have_c >= counters {
            return Ok(());
        }
        let p = stream
            .alloc_zeros::<f32>(partials.max(have_p).max(1))
            .map_err(drv("allocating the GEMV partial sums"))?;
        let c = stream
            .alloc_zeros::<u32>(counters.max(have_c).max(1))
            .map_err(drv("allocating the GEMV counters"))?;
        self.bufs = Some((p, c));
        Ok(())
    }

    /// (partial-sum floats, counters) reserved.
    pub fn reserved(&self) -> (usize, usize) {
        self.bufs
            .as_ref()
            .map_or((0, 0), |(p, c)| (p.len(), c.len()))
    }

    /// The buffers, if at least `partials` floats and `counters` counters are reserved.
    pub(crate) fn buffers(
        &mut self,
        partials: usize,
        counters: usize,
    ) -> Option<(&mut CudaSlice<f32>, &mut CudaSlice<u32>)> {
        match &mut self.bufs {
            Some((p, c)) if p.len() >= partials && c.len() >= counters => Some((p, c)),
            _ => None,
        }
    }
}

/// The scratch a `CudaKernels` keeps for the split-K GEMV.
pub(crate) type ScratchCell = Mutex<GemvScratch>;
