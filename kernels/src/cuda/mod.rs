//! The CUDA path (cudarc, dynamic loading). Modules, each over the ones before it:
//!
//! - `compile` — NVRTC compilation of `kernels/cuda/` (headers pasted in) with the PTX cached on
//!   disk; `driver` — driver-error mapping and the chained (programmatic dependent) launch;
//!   [`gemv_kernels`] — which GEMV kernels this build loads (production tables; with the `bench`
//!   feature the benchmark's experiments), their handles and the split-K scratch.
//! - [`context`] — [`CudaKernels`]: device, stream, loaded kernels, cuBLAS handles.
//! - [`ops`] — device-resident NVFP4 ops (quantize, dequantize, conversions);
//!   [`gemv`] — the decode GEMV: default kernel per shape and the production launchers;
//!   [`gemv_fused`] — the decode step's GEMVs with RMSNorm, SwiGLU or the attention's
//!   combine folded into their x load (and the residual add into their store);
//!   `gemv_bench` (`bench` feature) — the benchmark's probe and two-launch GEMVs;
//!   [`decode`] — the GPU engine's other transformer kernels (norms, RoPE + KV append,
//!   attention, SwiGLU, the greedy pick); [`decode_persistent`] — a decode step's layers as
//!   one persistent kernel with grid barriers between its stages; [`train`] — the train step's kernels besides the
//!   GEMMs (forward and backward, cross-entropy, fake-quant, multi-tensor AdamW);
//!   [`train_attention`] — the train step's flash attention, forward and backward;
//!   [`adamw`] — the packed-weight optimizer step; [`blas`] — cuBLAS / cuBLASLt calls.
//! - [`host`] — host-slice conveniences checked against the CPU reference.
//!
//! Nothing here falls back to the CPU: when CUDA cannot be used, [`CudaKernels::new`] returns
//! [`crate::KernelError::CudaUnavailable`] naming the missing library.

pub mod adamw;
pub mod blas;
pub mod compile;
pub mod context;
pub mod decode;
pub mod decode_persistent;
pub(crate) mod driver;
pub mod gemv;
#[cfg(feature = "bench")]
pub mod gemv_bench;
pub mod gemv_fused;
pub mod gemv_kernels;
pub mod host;
pub mod ops;
pub mod train;
pub mod train_attention;

pub use context::{check_cuda_libraries, CudaKernels};
pub use gemv::{GemvKernel, GemvLaunch};
pub use ops::{DeviceInput, DeviceNvfp4, DeviceStatus};
