//! Hugging Face checkpoints: reading safetensors (one file, a directory, or shards listed in
//! `model.safetensors.index.json`), writing safetensors from any tensor map (`io`), the NVFP4
//! on-disk layouts — ModelOpt and compressed-tensors — and their config files (`layout`), and
//! the `kiln quantize` driver that turns a checkpoint into an NVFP4 one (`quantize`).

pub mod io;
pub mod layout;
pub mod quantize;

pub use io::{
    list_shards, read_safetensors_file, write_safetensors_file, CheckpointShards, TensorData,
};
pub use layout::{nvfp4_from_tensors, nvfp4_to_tensors, NvfpFormat};
pub use quantize::{
    quantize_checkpoint, QuantDevice, QuantizeOptions, QuantizeProgress, QuantizeSummary,
};
