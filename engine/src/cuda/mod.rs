//! The GPU engine: NVFP4 models resident on one GPU, decoded one token per CUDA-graph replay.
//!
//! - `weights` — [`CudaModel`]: the weights on the GPU, laid out for the decode step (q/k/v and
//!   gate/up concatenated, NVFP4 vocabulary projection, bf16 embedding), from a host model or
//!   seeded random codes; [`GpuWeightBytes`].
//! - `bench` — the GPU engine benchmark (`kiln bench engine --device cuda`).
//! - `load_bench` — loading a model directory with float linears quantized by the host's cores
//!   or by the GPU's kernel (`kiln bench engine --device cuda --load-model DIR`).
//! - `plan` — [`GpuPlan`]: the bytes a generation will hold, checked against the job's budget
//!   before anything is allocated; the sizing rules of the sequence.
//! - `sequence` — [`CudaSequence`]: a sequence's bf16 KV cache, buffers, device scalars and
//!   captured decode step; prefill.
//! - `forward` — the kernels one forward queues (activations, layers — separate or fused,
//!   [`DecodeFusion`] —, attention, linears, the pick).
//! - `train` — [`train::CudaTrainer`]: a train step (`none` / `nvfp4-ste`) with the model's
//!   parameters, gradients and moments resident on the GPU.
//!
//! Every launch goes to the one stream of [`kiln_kernels::cuda::CudaKernels`]; nothing here
//! falls back to the CPU.

pub mod bench;
pub mod forward;
pub mod load_bench;
pub mod plan;
pub mod sequence;
pub mod slabs;
pub mod train;
pub mod weights;

pub use plan::GpuPlan;

use crate::error::EngineError;

/// A driver error as the engine's error, with what was being done.
fn cuda(what: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> EngineError {
    move |e| {
        EngineError::Kernel(kiln_kernels::KernelError::Cuda {
            context: what.into(),
            message: e.to_string(),
        })
    }
}
pub use forward::{DecodeFusion, DECODE_FUSION};
pub use sequence::CudaSequence;
pub use weights::{CudaModel, GpuWeightBytes};
