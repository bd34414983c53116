//! `CudaKernels`: one CUDA device, its stream, the loaded kernel functions and the cuBLAS /
//! cuBLASLt handles. Creating it checks every CUDA library first (cudarc's loader panics on a
//! missing library; Kiln returns [`KernelError::CudaUnavailable`] instead), compiles (or loads
//! the cached PTX of) every kernel file and loads the production kernels — with the `bench`
//! feature also the benchmark's experiments. It runs no kernel: nothing is probed at start-up.

use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::cublaslt::CudaBlasLT;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};

use super::compile::{arch_for, compile_cached, OPTIONAL_SOURCES, SOURCES};
use super::decode::DecodeFunctions;
use super::decode_persistent::PersistentFunctions;
use super::driver::drv;
use super::gemv_kernels::{GemvFunctions, ScratchCell};
use super::train::TrainFunctions;
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
    pub adamw_amax: CudaFunction,
    pub adamw_apply: CudaFunction,
    /// The train step's packed AdamW (clipped; f32 or bf16 moments) and its scale commit.
    pub adamw_train: [(CudaFunction, CudaFunction); 2],
    pub adamw_commit_scale: CudaFunction,
    /// The GEMV kernels (`gemv_kernels`: production, and with `bench` the experiments).
    pub gemv: GemvFunctions,
    /// The GPU engine's transformer kernels besides the GEMVs (`decode.cu`).
    pub decode: DecodeFunctions,
    /// The train step's kernels besides the GEMMs (`train.cu`).
    pub train: TrainFunctions,
    /// The persistent decode kernel (`decode_persistent.cu`), or why it did not load.
    pub persistent: Result<PersistentFunctions, String>,
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
    pub(crate) gemv_scratch: ScratchCell,
    /// `KILN_GEMV_SLICES` as read once at start-up (a benchmark knob, see
    /// `CudaKernels::split_k_slices_for`).
    #[cfg(feature = "bench")]
    pub(crate) gemv_slices: Option<usize>,
    /// Whether the default GEMV may use the tensor-core kernels (see
    /// [`CudaKernels::tensor_core_gemv`]).
    pub(crate) tensor_core_gemv: bool,
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
        let started = std::time::Instant::now();
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
        let context_ms = started.elapsed().as_secs_f64() * 1e3;
        // (an optional file that fails to compile or load leaves its kernels unavailable, with
        // the reason; any other file failing fails the whole start)
        let mut modules: Vec<(&str, Result<Arc<CudaModule>, String>)> = Vec::new();
        let mut ptx_from_cache = 0;
        for src in SOURCES {
            let loaded = compile_cached(src, arch).and_then(|(ptx, cached)| {
                let module = ctx.load_module(ptx).map_err(|e| KernelError::Cuda {
                    context: format!("loading the PTX of {}", src.file),
                    message: e.to_string(),
                })?;
                Ok((module, cached))
            });
            match loaded {
                Ok((module, cached)) => {
                    ptx_from_cache += cached as usize;
                    modules.push((src.file, Ok(module)));
                }
                Err(e) if OPTIONAL_SOURCES.contains(&src.file) => {
                    tracing::warn!(file = src.file, "optional kernels unavailable: {e}");
                    modules.push((src.file, Err(e.to_string())));
                }
                Err(e) => return Err(e),
            }
        }
        let func = |file: &str, name: &str| -> Result<CudaFunction, KernelError> {
            let m = modules
                .iter()
                .find(|(f, _)| *f == file)
                .ok_or_else(|| KernelError::Cuda {
                    context: format!("loading kernel {name}"),
                    message: format!("{file} is not among the compiled kernel files"),
                })?
                .1
                .as_ref()
                .map_err(|e| KernelError::Cuda {
                    context: format!("loading kernel {name}"),
                    message: format!("{file} did not compile or load: {e}"),
                })?;
            m.load_function(name).map_err(|e| KernelError::Cuda {
                context: format!("loading kernel {name} from {file}"),
                message: e.to_string(),
            })
        };
        let smem_optin = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(drv("reading the shared-memory limit"))? as usize;
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
            adamw_amax: func("adamw_nvfp4.cu", "kiln_adamw_nvfp4_amax")?,
            adamw_apply: func("adamw_nvfp4.cu", "kiln_adamw_nvfp4_apply")?,
            adamw_train: [
                (
                    func("adamw_nvfp4.cu", "kiln_adamw_nvfp4_amax_f32m")?,
                    func("adamw_nvfp4.cu", "kiln_adamw_nvfp4_apply_f32m")?,
                ),
                (
                    func("adamw_nvfp4.cu", "kiln_adamw_nvfp4_amax_bf16m")?,
                    func("adamw_nvfp4.cu", "kiln_adamw_nvfp4_apply_bf16m")?,
                ),
            ],
            adamw_commit_scale: func("adamw_nvfp4.cu", "kiln_adamw_nvfp4_commit_scale")?,
            gemv: GemvFunctions::load(&func, smem_optin)?,
            decode: DecodeFunctions::load(&func)?,
            train: TrainFunctions::load(&func)?,
            persistent: PersistentFunctions::load(&func, smem_optin).map_err(|e| {
                tracing::warn!(
                    "the persistent decode kernel did not load ({e}); decode steps run the \
                     captured separate kernels"
                );
                e.to_string()
            }),
        };
        let modules_ms = started.elapsed().as_secs_f64() * 1e3 - context_ms;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| KernelError::Cuda {
            context: "creating the cuBLAS handle".into(),
            message: e.to_string(),
        })?;
        let blaslt = CudaBlasLT::new(stream.clone()).map_err(|e| KernelError::Cuda {
            context: "creating the cuBLASLt handle".into(),
            message: e.to_string(),
        })?;
        let total_ms = started.elapsed().as_secs_f64() * 1e3;
        // where a job's GPU start-up goes (a session turn on a small model is mostly this)
        tracing::info!(
            device = %name,
            ?compute_capability,
            sm_count,
            ptx_from_cache,
            context_ms = format!("{context_ms:.0}"),
            modules_ms = format!("{modules_ms:.0}"),
            blas_ms = format!("{:.0}", total_ms - context_ms - modules_ms),
            "CUDA kernels ready"
        );
        Ok(CudaKernels {
            ctx,
            stream,
            f,
            blas,
            blaslt,
            sm_count,
            smem_optin,
            gemv_scratch: Default::default(),
            #[cfg(feature = "bench")]
            gemv_slices: std::env::var("KILN_GEMV_SLICES")
                .ok()
                .and_then(|v| v.parse().ok()),
            // mma.sync bf16 needs compute capability 8.0; the tensor-core kernels' exactness
            // (E2M1 0.5 codes and subnormal scales through bf16) is checked by the GPU test
            // `tensor_core_gemv_is_exact_on_half_codes_and_subnormal_scales`, not at start-up
            tensor_core_gemv: compute_capability >= (8, 0),
            name,
            compute_capability,
            ptx_from_cache,
        })
    }

    /// Whether the default GEMV may use the tensor-core kernels: on compute capability 8.0+
    /// unless [`CudaKernels::set_tensor_core_gemv`] turned them off; otherwise every shape runs
    /// the CUDA-core kernel.
    pub fn tensor_core_gemv(&self) -> bool {
        self.tensor_core_gemv
    }

    /// Turn the tensor-core GEMV kernels off (every default is then the CUDA-core kernel, as
    /// on a device without them) or back on (where the device has them): the switch for a
    /// device whose tensor-core GEMV the GPU tests found wrong.
    pub fn set_tensor_core_gemv(&mut self, on: bool) {
        self.tensor_core_gemv = on && self.compute_capability >= (8, 0);
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
