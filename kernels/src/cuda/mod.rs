//! The CUDA path (cudarc, dynamic loading): NVRTC-compiled kernels from `kernels/cuda/`
//! (`compile`), the device context and kernel handles (`context`), device-resident NVFP4 ops
//! (`ops`: quantize, dequantize, conversions; `gemv`: the decode GEMV kernels, `gemv_tc5` the
//! split-K one; `adamw`: the
//! packed-weight optimizer step), host-slice conveniences checked against the CPU reference
//! (`host`) and cuBLAS / cuBLASLt calls (`blas`).
//!
//! Nothing here falls back to the CPU: when CUDA cannot be used, [`CudaKernels::new`] returns
//! [`crate::KernelError::CudaUnavailable`] naming the missing library.

pub mod adamw;
pub mod blas;
pub mod compile;
pub mod context;
pub mod gemv;
pub mod gemv_tc5;
pub mod host;
pub mod ops;

pub use context::{check_cuda_libraries, CudaKernels};
pub use gemv::{tc2_variants, GemvLaunch, GemvVariant, TC2_KERNELS};
pub use gemv_tc5::{tc5_slices, Tc5Config, TC5_KERNELS};
pub use ops::{DeviceInput, DeviceNvfp4, DeviceStatus};
