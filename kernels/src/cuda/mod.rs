//! The CUDA path (cudarc, dynamic loading): NVRTC-compiled kernels from `kernels/cuda/`
//! (`compile`), the device context and kernel handles (`context`), device-resident NVFP4 ops
//! (`ops`), host-slice conveniences checked against the CPU reference (`host`) and cuBLAS /
//! cuBLASLt calls (`blas`).
//!
//! Nothing here falls back to the CPU: when CUDA cannot be used, [`CudaKernels::new`] returns
//! [`crate::KernelError::CudaUnavailable`] naming the missing library.

pub mod blas;
pub mod compile;
pub mod context;
pub mod host;
pub mod ops;

pub use context::{check_cuda_libraries, CudaKernels};
pub use ops::{DeviceInput, DeviceNvfp4, DeviceStatus, GemvVariant};
