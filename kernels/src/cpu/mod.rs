//! The CPU path — the reference every CUDA kernel is checked against, and the compute path
//! wherever no GPU is usable: NVFP4 matmul (`matmul`: the default entry point and the plain
//! reference; `fused`: the fast small-M decode-and-dot kernel), straight-through fake
//! quantization (`ste`) and the chunked AdamW step on packed weights (`adamw`).

pub mod adamw;
pub mod fused;
pub mod matmul;
pub mod ste;

pub use adamw::{adamw_step_nvfp4, AdamWParams, AdamWScalars, AdamWStepStats};
pub use fused::{matmul_fused, FusedImpl, FUSED_MAX_M};
pub use matmul::{matmul_f32_ref, matmul_nvfp4, matmul_nvfp4_chunked_gemm, matmul_nvfp4_ref};
pub use ste::fake_quant_ste;
