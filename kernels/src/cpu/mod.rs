//! The CPU path — the reference every CUDA kernel is checked against, and the compute path
//! wherever no GPU is usable: NVFP4 matmul (`matmul`), straight-through fake quantization
//! (`ste`) and the chunked AdamW step on packed weights (`adamw`).

pub mod adamw;
pub mod matmul;
pub mod ste;

pub use adamw::{adamw_step_nvfp4, AdamWParams, AdamWScalars, AdamWStepStats};
pub use matmul::{matmul_f32_ref, matmul_nvfp4};
pub use ste::fake_quant_ste;
