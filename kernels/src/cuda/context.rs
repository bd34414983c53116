//! `CudaKernels`: one CUDA device, its stream, the loaded kernel functions and the cuBLAS /
//! cuBLASLt handles. Creating it checks every CUDA library first (cudarc's loader panics on a
//! missing library; Kiln returns [`KernelError::CudaUnavailable`] instead).

use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::cublaslt::CudaBlasLT;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DriverError};

use super::compile::{arch_for, compile_cached, SOURCES};
use crate::KernelError;

/// Checks that the CUDA driver, NVRTC, cuBLAS and cuBLASLt libraries can be loaded, without
/// calling into any of them. The error names the first missing one.
pub fn check_cuda_libraries() -> Result<(), KernelError> {
    type Probe = unsafe fn() -> bool;
    // SAFETY: each check only dlopens the library (libloading) and never calls into it.
    let checks: [(&str, Probe); 4] = [
        (
            "libcuda.so (the NVIDIA driver)",
            cudarc::driver::sys::is_culib_present,
        ),
        (
            "libnvrtc.so.13 (NVRTC, CUDA 13)",
            cudarc::nvrtc::sys::is_culib_present,
        ),
        (
            "libcublas.so.13 (cuBLAS, CUDA 13)",
            cudarc::cublas::sys::is_culib_present,
        ),
        (
            "libcublasLt.so.13 (cuBLASLt, CUDA 13)",
            cudarc::cublaslt::sys::is_culib_present,
        ),
    ];
    for (name, present) in checks {
        if !unsafe { present() } {
            return Err(KernelError::CudaUnavailable(name.to_string()));
        }
    }
    Ok(())
}

/// Turn a driver error into Kiln's error with what was being done.
pub(crate) fn drv(context: &str) -> impl FnOnce(DriverError) -> KernelError + '_ {
    move |e| KernelError::Cuda {
        context: context.to_string(),
        message: e.to_string(),
    }
}

/// The loaded kernel functions (names as in the `.cu` files).
pub(crate) struct Functions {
    pub amax_f32: CudaFunction,
    pub amax_bf16: CudaFunction,
    pub tensor_scale_from_amax: CudaFunction,
    /// `kiln_stream_read`: a pure read (the benchmark's read-bandwidth ceiling).
    pub stream_read: CudaFunction,
    pub quantize_f32: CudaFunction,
    pub quantize_bf16: CudaFunction,
    pub quantize_sr_f32: CudaFunction,
    pub quantize_sr_bf16: CudaFunction,
    pub dequantize_f32: CudaFunction,
    pub dequantize_bf16: CudaFunction,
    pub f32_to_bf16: CudaFunction,
    pub bf16_to_f32: CudaFunction,
    /// `kiln_gemv_cuda_core_m{M}_r4` for M = 1..=8.
    pub gemv: Vec<CudaFunction>,
    /// `kiln_gemv_cuda_core_m1_r8`: M = 1 with 8 rows per warp.
    pub gemv_m1_r8: CudaFunction,
    /// `kiln_gemv_tensor_core_hilo_m{M}` for M = 1..=8 (tensor cores).
    pub gemv_tc: Vec<CudaFunction>,
    /// `kiln_gemv_tensor_core_m{M}_t{T}_d{D}`, one per entry of `gemv::TC2_KERNELS`, same order.
    pub gemv_tc2: Vec<CudaFunction>,
    /// `kiln_gemv_tensor_core_probe{1,2,3}`: benchmark diagnostics (see `gemv_probe_async`).
    pub gemv_probe: Vec<CudaFunction>,
    /// `kiln_gemv_tensor_core_split_k_m{M}_t{T}_d{D}_l{L}_b{B}`, one per entry of `gemv_tc5::TC5_KERNELS`.
    pub gemv_tc5: Vec<CudaFunction>,
    pub adamw_amax: CudaFunction,
    pub adamw_apply: CudaFunction,
}

/// One CUDA device with Kiln's kernels loaded. All work goes to one stream, in order.
pub struct CudaKernels {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) f: Functions,
    pub(crate) blas: CudaBlas,
    pub(crate) blaslt: CudaBlasLT,
    pub(crate) sm_count: u32,
    pub(crate) smem_optin: usize,
    pub(crate) gemv_scratch: super::gemv_tc5::ScratchCell,
    /// `KILN_GEMV_SLICES` as read once at start-up (see `tc5_slices_for`).
    pub(crate) gemv_slices: Option<usize>,
    pub(crate) tc_gemv_ok: bool,
    name: String,
    compute_capability: (i32, i32),
    ptx_from_cache: usize,
}

impl CudaKernels {
    /// Open device `ordinal`, compile (or load cached) kernels and create the BLAS handles.
    /// Errors: a missing CUDA library ([`KernelError::CudaUnavailable`]), no such device or a
    /// driver failure ([`KernelError::Cuda`]), a kernel that does not compile
    /// ([`KernelError::Nvrtc`]).
    pub fn new(ordinal: usize) -> Result<Self, KernelError> {
        check_cuda_libraries()?;
        let ctx = CudaContext::new(ordinal).map_err(|e| KernelError::Cuda {
            context: format!("opening CUDA device {ordinal}"),
            message: format!("{e} (is a GPU visible? check nvidia-smi and CUDA_VISIBLE_DEVICES)"),
        })?;
        // One stream only: cudarc's per-buffer event tracking is for multi-stream use and
        // would add work to every launch.
        // SAFETY: this crate never uses a second stream on this context.
        unsafe { ctx.disable_event_tracking() };
        // a stream of our own (non-blocking), not the legacy default stream: chained GEMV
        // launches (programmatic dependent launch) overlap consecutive kernels on it
        let stream = ctx.new_stream().map_err(drv("creating the CUDA stream"))?;
        let name = ctx.name().map_err(drv("reading the device name"))?;
        let compute_capability = ctx
            .compute_capability()
            .map_err(drv("reading the compute capability"))?;
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(drv("reading the multiprocessor count"))? as u32;
        let arch = arch_for(compute_capability.0, compute_capability.1);
        let mut modules: Vec<(&str, Arc<CudaModule>)> = Vec::new();
        let mut ptx_from_cache = 0;
        for src in SOURCES {
            let (ptx, cached) = compile_cached(src, arch)?;
            ptx_from_cache += cached as usize;
            let module = ctx.load_module(ptx).map_err(|e| KernelError::Cuda {
                context: format!("loading the PTX of {}", src.file),
                message: e.to_string(),
            })?;
            modules.push((src.file, module));
        }
        let func = |file: &str, name: &str| -> Result<CudaFunction, KernelError> {
            let m = &modules
                .iter()
                .find(|(f, _)| *f == file)
                .ok_or_else(|| KernelError::Cuda {
                    context: format!("loading kernel {name}"),
                    message: format!("{file} is not among the compiled kernel files"),
                })?
                .1;
            m.load_function(name).map_err(|e| KernelError::Cuda {
                context: format!("loading kernel {name} from {file}"),
                message: e.to_string(),
            })
        };
        let f = Functions {
            amax_f32: func("amax.cu", "kiln_amax_f32")?,
            amax_bf16: func("amax.cu", "kiln_amax_bf16")?,
            tensor_scale_from_amax: func("amax.cu", "kiln_tensor_scale_from_amax")?,
            stream_read: func("amax.cu", "kiln_stream_read")?,
            quantize_f32: func("quantize_nvfp4.cu", "kiln_quantize_nvfp4_f32")?,
            quantize_bf16: func("quantize_nvfp4.cu", "kiln_quantize_nvfp4_bf16")?,
            quantize_sr_f32: func("quantize_nvfp4.cu", "kiln_quantize_nvfp4_sr_f32")?,
            quantize_sr_bf16: func("quantize_nvfp4.cu", "kiln_quantize_nvfp4_sr_bf16")?,
            dequantize_f32: func("dequantize_nvfp4.cu", "kiln_dequantize_nvfp4_f32")?,
            dequantize_bf16: func("dequantize_nvfp4.cu", "kiln_dequantize_nvfp4_bf16")?,
            f32_to_bf16: func("dequantize_nvfp4.cu", "kiln_f32_to_bf16")?,
            bf16_to_f32: func("dequantize_nvfp4.cu", "kiln_bf16_to_f32")?,
            gemv: (1..=8)
                .map(|m| func("gemv_cuda_core.cu", &format!("kiln_gemv_cuda_core_m{m}_r4")))
                .collect::<Result<_, _>>()?,
            gemv_m1_r8: func("gemv_cuda_core.cu", "kiln_gemv_cuda_core_m1_r8")?,
            gemv_tc: (1..=8)
                .map(|m| {
                    func(
                        "gemv_tensor_core_hilo.cu",
                        &format!("kiln_gemv_tensor_core_hilo_m{m}"),
                    )
                })
                .collect::<Result<_, _>>()?,
            gemv_tc2: super::gemv::TC2_KERNELS
                .iter()
                .map(|&(m, t, d)| {
                    func(
                        "gemv_tensor_core.cu",
                        &format!("kiln_gemv_tensor_core_m{m}_t{t}_d{d}"),
                    )
                })
                .collect::<Result<_, _>>()?,
            gemv_probe: (1..=3)
                .map(|p| {
                    func(
                        "gemv_tensor_core.cu",
                        &format!("kiln_gemv_tensor_core_probe{p}"),
                    )
                })
                .collect::<Result<_, _>>()?,
            gemv_tc5: super::gemv_tc5::TC5_KERNELS
                .iter()
                .map(|&(m, t, d, l, b)| {
                    func(
                        "gemv_tensor_core_split_k.cu",
                        &format!(
                            "kiln_gemv_tensor_core_split_k_m{m}_t{t}_d{d}_l{}_b{b}",
                            l as u8
                        ),
                    )
                })
                .collect::<Result<_, _>>()?,
            adamw_amax: func("adamw_nvfp4.cu", "kiln_adamw_nvfp4_amax")?,
            adamw_apply: func("adamw_nvfp4.cu", "kiln_adamw_nvfp4_apply")?,
        };
        let smem_optin = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(drv("reading the shared-memory limit"))? as usize;
        for func in f
            .gemv_tc
            .iter()
            .chain(&f.gemv_tc2)
            .chain(&f.gemv_tc5)
            .chain(&f.gemv_probe)
        {
            func.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem_optin as i32,
            )
            .map_err(drv("raising the GEMV kernel's shared-memory limit"))?;
        }
        let blas = CudaBlas::new(stream.clone()).map_err(|e| KernelError::Cuda {
            context: "creating the cuBLAS handle".into(),
            message: e.to_string(),
        })?;
        let blaslt = CudaBlasLT::new(stream.clone()).map_err(|e| KernelError::Cuda {
            context: "creating the cuBLASLt handle".into(),
            message: e.to_string(),
        })?;
        tracing::info!(device = %name, ?compute_capability, sm_count, ptx_from_cache, "CUDA kernels ready");
        let mut k = CudaKernels {
            ctx,
            stream,
            f,
            blas,
            blaslt,
            sm_count,
            smem_optin,
            gemv_scratch: Default::default(),
            gemv_slices: std::env::var("KILN_GEMV_SLICES")
                .ok()
                .and_then(|v| v.parse().ok()),
            name,
            compute_capability,
            ptx_from_cache,
            tc_gemv_ok: false,
        };
        k.tc_gemv_ok = k.probe_tc_gemv()?;
        Ok(k)
    }

    /// Run the tensor-core GEMV once on a small matrix that exercises every E2M1 code and
    /// subnormal block scales and compare it with the CPU; if it disagrees (a driver or chip
    /// that flushes bf16 subnormals would), the default GEMV stays on the CUDA-core kernel and
    /// a warning says so.
    fn probe_tc_gemv(&self) -> Result<bool, KernelError> {
        use super::gemv::GemvVariant;
        let (q, x) = probe_data()?;
        let want = crate::cpu::matmul_nvfp4_ref(&x, 1, &q);
        let den: f64 = want.iter().map(|a| (*a as f64).powi(2)).sum();
        let tc2 = super::gemv::tc2_variants(1);
        let tc5 = super::gemv_tc5::TC5_KERNELS
            .iter()
            .filter(|&&c| c.0 == 1 && self.gemv_tc5_fits(c, q.rows, q.cols))
            .map(|&c| GemvVariant::TensorCore5 {
                tiles: c.1 as u8,
                depth: c.2 as u8,
                late: c.3,
                per_sm: c.4 as u8,
            });
        for v in std::iter::once(GemvVariant::TensorCore)
            .chain(tc2)
            .chain(tc5)
        {
            let got = self.gemv_variant(&x, 1, &q, v)?;
            let num: f64 = want
                .iter()
                .zip(&got)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            if !(got.iter().all(|v| v.is_finite()) && (num / den).sqrt() <= 1e-4) {
                tracing::warn!(
                    variant = ?v,
                    rel_error = (num / den).sqrt(),
                    "tensor-core GEMV disagrees with the CPU on this device; using the CUDA-core GEMV"
                );
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether the tensor-core GEMV passed its start-up check on this device.
    pub fn tc_gemv_ok(&self) -> bool {
        self.tc_gemv_ok
    }

    /// The device's name (e.g. "NVIDIA H100 80GB HBM3").
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// Compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// Streaming multiprocessors on the device.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// How many kernel files were loaded from the PTX disk cache rather than compiled.
    pub fn ptx_from_cache(&self) -> usize {
        self.ptx_from_cache
    }

    /// The stream every operation is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The CUDA context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Wait for all queued work; surfaces asynchronous kernel errors.
    pub fn synchronize(&self) -> Result<(), KernelError> {
        self.stream
            .synchronize()
            .map_err(drv("synchronizing the stream"))
    }
}

/// The tensor-core GEMV probe's inputs: every E2M1 code, including 0.5 (a bf16 subnormal in
/// the decode), and subnormal E4M3 block scales.
pub(crate) fn probe_data() -> Result<(crate::Nvfp4Tensor, Vec<f32>), KernelError> {
    let (n, k) = (32usize, 256usize);
    let w: Vec<f32> = (0..n * k)
        .map(|i| {
            // every 4th row 1e-5 smaller: subnormal E4M3 block scales; quarter steps: the
            // 0.5 code (a bf16 subnormal in the decode) appears
            let row_scale = if (i / k) % 4 == 3 { 1e-5 } else { 1.0 };
            ((i * 7 % 25) as f32 - 12.0) * 0.25 * row_scale
        })
        .collect();
    let q = crate::Nvfp4Tensor::quantize(&w, n, k)?;
    let x: Vec<f32> = (0..k).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.37).collect();
    Ok((q, x))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_probe_covers_half_codes_and_subnormal_scales() {
        let (q, x) = super::probe_data().unwrap();
        assert_eq!(x.len(), q.cols);
        let codes: std::collections::BTreeSet<u8> = (0..q.rows * q.cols)
            .map(|i| q.code(i / q.cols, i % q.cols))
            .collect();
        assert!(codes.contains(&1) && codes.contains(&9), "{codes:?}");
        assert!(
            q.scales.iter().any(|&s| s > 0 && s < 0x08),
            "no subnormal scale"
        );
    }
}
