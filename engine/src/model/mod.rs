//! The model core: a decoder-only Qwen2 / Qwen3 / Llama transformer on candle tensors, with
//! NVFP4 linear layers through `kiln_kernels`. It works on whatever candle device it is given
//! (the `engine` module chooses it) and depends on nothing in the crate but `error`: chat,
//! tokenizers, generation, the bundled tiny model and the device seam all sit above it.
//!
//! - `config` — [`ModelConfig`] from `config.json`, [`Architecture`].
//! - `layout` — [`ModelLayout`]: every tensor of a model of one config (name, shape, role,
//!   NVFP4 or not; NVFP4 tensor names from `kiln_kernels::checkpoint`), which the builder,
//!   the savers, the training parameter store and the byte accounting walk.
//! - `checkpoint` — [`Checkpoint`]: a model directory's tensors by name, read (one file or
//!   shards) through `kiln_kernels::checkpoint`, with typed errors.
//! - `files` — [`ModelFiles`]: tokenizer and template files carried into checkpoints and exports.
//! - `weights` — [`WeightSource`]: where tensors come from (checkpoint or seeded random),
//!   NVFP4 quantize-at-load or packed ModelOpt / compressed-tensors weights.
//! - `linear` — [`Linear`]: dense, NVFP4-packed or straight-through fake-quant linear layers.
//! - `rope` — rotary position embeddings.
//! - `kv_cache` — [`KvCache`], per-layer keys and values (the CPU engine's cache).
//! - `save` — write a model as a Hugging Face directory (f32/bf16, NVFP4 ModelOpt or
//!   compressed-tensors, sharded or not).
//! - `transformer` — [`Model`]: the forward pass (with or without a cache, inference or
//!   training ops).

pub mod checkpoint;
pub mod config;
pub mod files;
pub mod kv_cache;
pub mod layout;
pub mod linear;
pub mod rope;
pub mod save;
pub mod transformer;
pub mod weights;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Device;

pub use crate::error::{EngineError, ModelError, Result};
pub use checkpoint::Checkpoint;
pub use config::{Architecture, ModelConfig};
pub use files::ModelFiles;
pub use kv_cache::KvCache;
pub use layout::{
    LayerLayout, LayerParam, LinearSpec, ModelLayout, ParamKey, ParamSpec, TensorRole, TensorSpec,
};
pub use linear::{Linear, LinearWeight};
pub use save::{save_model_dir, DenseDtype, SaveFormat, SaveOptions};
pub use transformer::{Logits, Model, ParamRef, Pass};
pub use weights::{CheckpointWeights, GpuQuantizer, LinearFormat, RandomWeights, WeightSource};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Linear layer format in memory.
    pub format: LinearFormat,
    /// Where the tensors live.
    pub device: Device,
    /// Quantize float linears on this GPU instead of the CPU (same bytes).
    pub quantizer: Option<GpuQuantizer>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            format: LinearFormat::Nvfp4,
            device: Device::Cpu,
            quantizer: None,
        }
    }
}

impl Model {
    /// Load the weights of a Hugging Face model directory (`config.json` + safetensors).
    /// Loads only what inference needs; float linears are quantized one tensor at a time.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Model> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let ckpt = Checkpoint::open(dir)?;
        Model::from_checkpoint(&cfg, &ckpt, opts)
    }

    /// A model of shape `cfg` from the weights of an opened checkpoint.
    pub fn from_checkpoint(
        cfg: &ModelConfig,
        ckpt: &Checkpoint,
        opts: &LoadOptions,
    ) -> Result<Model> {
        let mut src = CheckpointWeights::new(ckpt, opts.format, opts.device.clone())
            .with_quantizer(opts.quantizer.clone());
        let model = Model::build(cfg, &mut src, &opts.device)?;
        tracing::debug!(dir = %ckpt.dir().display(), arch = ?cfg.architecture, "model loaded");
        Ok(model)
    }
}

/// Tensor bytes by category, as phase samples report them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TensorBytes {
    /// Parameters: packed codes, dense weights, embeddings, norms, biases.
    pub weights: u64,
    /// NVFP4 block and tensor scales.
    pub scales: u64,
    /// Cached keys and values.
    pub kv_cache: u64,
    /// Transient tensors of a forward (an estimate of the peak).
    pub activations: u64,
}

impl TensorBytes {
    /// The bytes of `model`'s parameters (kv_cache and activations 0).
    pub fn of_model(model: &Model) -> Self {
        let (weights, scales) = model.weight_bytes();
        TensorBytes {
            weights,
            scales,
            ..Default::default()
        }
    }

    /// As the `tensor_bytes` map of a phase report.
    pub fn to_map(&self) -> BTreeMap<String, u64> {
        [
            ("weights", self.weights),
            ("scales", self.scales),
            ("kv_cache", self.kv_cache),
            ("activations", self.activations),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}
