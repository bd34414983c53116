//! `kiln-kernels`: the NVFP4 format and the compute kernels (docs/ARCHITECTURE.md, "NVFP4"
//! and "Compute paths"). Map:
//!
//! - [`error`] — [`KernelError`], every failure of this crate with a message naming the fix.
//! - [`nvfp4`] — the format: E2M1/E4M3 codecs (`nvfp4::codec`: `f32_to_e2m1`, `e2m1_to_f32`,
//!   `f32_to_e4m3`, `e4m3_to_f32`, `f32_to_e2m1_stochastic`, `sr_uniform`) and
//!   [`nvfp4::Nvfp4Tensor`] (`quantize` — ModelOpt bit-exact, `quantize_stochastic`,
//!   `dequantize`, `dequantize_rows`, `dequantize_rows_into`, `byte_size`, `from_parts`).
//! - [`cpu`] — the CPU path: `cpu::matmul_nvfp4` (`y = x·Wᵀ`; the fused decode-and-dot kernel
//!   `cpu::matmul_fused` for M ≤ 8 — AVX2 or portable, `cpu::FusedImpl` — and chunked
//!   dequantize + f32 GEMM above), `cpu::matmul_nvfp4_ref` (the plain reference every fast path
//!   and GPU kernel is checked against), `cpu::fake_quant_ste` (straight-through forward value),
//!   `cpu::adamw_step_nvfp4` (chunked AdamW on packed weights, scratch bounded by the chunk;
//!   `AdamWParams`, `AdamWScalars`, `AdamWStepStats`).
//! - [`cuda`] — the CUDA path (cudarc, dynamic loading, kernels in `kernels/cuda/*.cu` compiled
//!   by NVRTC with the PTX cached on disk): `cuda::CudaKernels::new(ordinal)` checks the
//!   libraries first (`KernelError::CudaUnavailable`) and loads the production kernels (no
//!   start-up probing), then offers host-slice twins of the CPU API (`quantize`,
//!   `quantize_bf16`, `quantize_stochastic`, `dequantize`, `matmul_nvfp4`, `adamw_step_nvfp4`)
//!   and device-resident ops on `cuda::DeviceNvfp4` (`quantize_async`, `gemv_async` — the
//!   default kernel per shape is `default_gemv_kernel`, see `cuda::gemv` —,
//!   `matmul_nvfp4_large_async`, `adamw_step_async`, …).
//! - Feature `bench` (off in production): the benchmark's experimental GEMV kernels and probe
//!   kernels (`cuda::gemv_kernels::experiments`, `cuda::gemv_bench`) and the benchmark rows
//!   that time them.
//! - [`checkpoint`] — safetensors read/write (`read_safetensors_file`, `write_safetensors_file`,
//!   `list_shards`), the ModelOpt / compressed-tensors NVFP4 layouts (`nvfp4_to_tensors`,
//!   `nvfp4_from_tensors`) and `quantize_checkpoint` behind `kiln quantize`.
//! - [`bench`](mod@bench) — the validate-then-time kernel benchmark behind `kiln bench kernels`
//!   (`bench::run`, GPU) and its CPU section (`bench::run_cpu`: NVFP4 matmul vs f32 dense, no
//!   GPU needed; `kiln-kernel-bench --cpu`).
#![deny(missing_docs)]

pub mod bench;
pub mod checkpoint;
pub mod cpu;
pub mod cuda;
pub mod error;
pub mod nvfp4;

pub use error::KernelError;
pub use nvfp4::Nvfp4Tensor;
