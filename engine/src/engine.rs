//! The device seam. [`Engine`] is where a job's models live and run, chosen once per job from
//! its device ([`Engine::for_job`]); [`EngineCache`] is a sequence's keys and values, held
//! where its engine runs; [`LoadedModel`] is a model together with its engine — what
//! generation, sessions and chat use. Generation (`generate`, `session`, `session_store`) and
//! training (`train`) reach the model only through these; the candle device is written here
//! and nowhere else on those paths.
//!
//! This build has one engine, [`CpuEngine`]: candle tensors in host memory, the NVFP4 linears
//! through `kiln_kernels::cpu`. A GPU engine is another variant of [`Engine`] and of
//! [`EngineCache`]; a job asking for `cuda` is refused until there is one (no silent
//! fallback).

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::{EngineError, Result};
use crate::model::{
    Checkpoint, CheckpointWeights, KvCache, LinearFormat, LoadOptions, Logits, Model, ModelConfig,
    Pass, RandomWeights, WeightSource,
};
use crate::spec::DeviceSpec;

/// What a job uses its engine for (named in messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Generation (the generate job, sessions).
    Generation,
    /// Training (the train job).
    Training,
}

impl Workload {
    fn noun(self) -> &'static str {
        match self {
            Workload::Generation => "generation",
            Workload::Training => "training",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Workload::Generation => "generating",
            Workload::Training => "training",
        }
    }
}

/// Where models live and run.
#[derive(Debug, Clone)]
pub enum Engine {
    /// Host memory and CPU kernels.
    Cpu(CpuEngine),
}

/// The CPU engine: candle tensors on the host; NVFP4 linears through `kiln_kernels::cpu`.
#[derive(Debug, Clone)]
pub struct CpuEngine {
    device: Device,
}

impl CpuEngine {
    fn new() -> Self {
        CpuEngine {
            device: Device::Cpu,
        }
    }
}

/// One sequence's keys and values, held where its engine runs.
#[derive(Debug, Clone)]
pub enum EngineCache {
    /// Per-layer candle tensors on the host.
    Cpu(KvCache),
}

/// One layer's keys or values on the host: f32 values of shape `[1, kv_heads, len, head_dim]`
/// (how the session store writes them).
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// The shape.
    pub shape: Vec<usize>,
    /// The values, row-major.
    pub data: Vec<f32>,
}

impl Engine {
    /// The CPU engine.
    pub fn cpu() -> Self {
        Engine::Cpu(CpuEngine::new())
    }

    /// The engine for a job that asked for `requested` (`cpu`, `cuda` or `""`: whatever the
    /// agent gives) and that the agent placed on `assigned`. Asking for `cuda` fails: this
    /// build runs models on the CPU only. Placed on a GPU without asking, the job runs on the
    /// CPU and says so in the log.
    pub fn for_job(workload: Workload, requested: &str, assigned: DeviceSpec) -> Result<Self> {
        if requested == "cuda" {
            return Err(EngineError::InvalidArgument(format!(
                "the {} path runs on the CPU in this build; submit with --device cpu (or leave it empty)",
                workload.noun()
            )));
        }
        if let DeviceSpec::Cuda(i) = assigned {
            tracing::info!(
                gpu = i,
                "the engine's model path is CPU-only in this build; {} on the CPU",
                workload.verb()
            );
        }
        Ok(Engine::cpu())
    }

    /// The engine whose tensors live on the candle `device` (what [`LoadOptions`] names).
    pub fn for_device(device: &Device) -> Result<Self> {
        if device.is_cpu() {
            Ok(Engine::cpu())
        } else {
            Err(EngineError::InvalidArgument(format!(
                "no engine runs models on {device:?} in this build; use the CPU"
            )))
        }
    }

    /// The candle device the engine's tensors are made on.
    pub fn device(&self) -> &Device {
        match self {
            Engine::Cpu(e) => &e.device,
        }
    }

    /// Options to load a model for this engine with linears in `format`.
    pub fn load_options(&self, format: LinearFormat) -> LoadOptions {
        LoadOptions {
            format,
            device: self.device().clone(),
        }
    }

    /// Load a Hugging Face model directory for this engine.
    pub fn load_model(&self, dir: &Path, format: LinearFormat) -> Result<Model> {
        Model::load(dir, &self.load_options(format))
    }

    /// Build a model of shape `cfg` from `src` for this engine.
    pub fn build_model(&self, cfg: &ModelConfig, src: &mut dyn WeightSource) -> Result<Model> {
        Model::build(cfg, src, self.device())
    }

    /// Seeded random weights (linears in `format`) for this engine.
    pub fn random_weights(&self, seed: u64, format: LinearFormat) -> RandomWeights {
        RandomWeights::new(seed, format, self.device().clone())
    }

    /// Weights read from `ckpt` (linears in `format`) for this engine.
    pub fn checkpoint_weights<'a>(
        &self,
        ckpt: &'a Checkpoint,
        format: LinearFormat,
    ) -> CheckpointWeights<'a> {
        CheckpointWeights::new(ckpt, format, self.device().clone())
    }

    /// An empty cache for a model of `num_layers` layers.
    pub fn empty_cache(&self, num_layers: usize) -> EngineCache {
        match self {
            Engine::Cpu(_) => EngineCache::Cpu(KvCache::new(num_layers)),
        }
    }

    /// An empty cache sized for `model`.
    pub fn new_cache(&self, model: &Model) -> EngineCache {
        self.empty_cache(model.config().num_hidden_layers)
    }

    /// A cache holding saved keys and values (one `(keys, values)` pair per layer).
    pub fn cache_from_host(&self, layers: Vec<(HostTensor, HostTensor)>) -> Result<EngineCache> {
        match self {
            Engine::Cpu(e) => {
                let tensor = |t: HostTensor| Tensor::from_vec(t.data, t.shape, &e.device);
                let layers = layers
                    .into_iter()
                    .map(|(k, v)| Ok((tensor(k)?, tensor(v)?)))
                    .collect::<Result<Vec<_>>>()?;
                Ok(EngineCache::Cpu(KvCache::from_layers(layers)?))
            }
        }
    }

    /// Bytes of keys and values one position of `cfg`'s model takes in this engine's cache.
    pub fn kv_bytes_per_token(&self, cfg: &ModelConfig) -> u64 {
        match self {
            // f32 keys and values of every layer.
            Engine::Cpu(_) => (2 * cfg.num_hidden_layers * cfg.kv_size() * 4) as u64,
        }
    }

    /// Forward one sequence of `ids` after the positions already in `cache` (appending to
    /// it). Returns logits `[T, vocab]` (`Logits::All`) or `[1, vocab]` (`Logits::Last`).
    pub fn forward(
        &self,
        model: &Model,
        ids: &[u32],
        cache: &mut EngineCache,
        logits: Logits,
    ) -> Result<Tensor> {
        match (self, cache) {
            (Engine::Cpu(_), EngineCache::Cpu(c)) => model.forward(ids, c, logits),
        }
    }

    /// The last position's logits after forwarding `ids` into `cache` (a generation step).
    pub fn forward_last(
        &self,
        model: &Model,
        ids: &[u32],
        cache: &mut EngineCache,
    ) -> Result<Vec<f32>> {
        let l = self.forward(model, ids, cache, Logits::Last)?;
        Ok(l.squeeze(0)?.to_vec1::<f32>()?)
    }

    /// The training forward of a batch `ids` `[B, T]` (u32, on [`Engine::device`]): every
    /// position's logits `[B, T, vocab]` through differentiable ops, no cache.
    pub fn forward_train(&self, model: &Model, ids: &Tensor) -> Result<Tensor> {
        match self {
            Engine::Cpu(_) => model.forward_batch(ids, None, Logits::All, Pass::Training),
        }
    }
}

impl EngineCache {
    /// Positions held (the next token's position).
    pub fn len(&self) -> usize {
        match self {
            EngineCache::Cpu(c) => c.len(),
        }
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        match self {
            EngineCache::Cpu(c) => c.num_layers(),
        }
    }

    /// Bytes of cached keys and values.
    pub fn bytes(&self) -> u64 {
        match self {
            EngineCache::Cpu(c) => c.bytes(),
        }
    }

    /// Layer `i`'s keys and values `[1, kv_heads, len, head_dim]` as candle tensors, if
    /// any are cached.
    pub fn layer(&self, i: usize) -> Option<(Tensor, Tensor)> {
        match self {
            EngineCache::Cpu(c) => c.layer(i).cloned(),
        }
    }

    /// Every layer's keys and values on the host (none when nothing is cached).
    pub fn to_host(&self) -> Result<Vec<(HostTensor, HostTensor)>> {
        if self.is_empty() {
            return Ok(Vec::new());
        }
        let host = |t: &Tensor| -> Result<HostTensor> {
            Ok(HostTensor {
                shape: t.dims().to_vec(),
                data: t.flatten_all()?.to_vec1::<f32>()?,
            })
        };
        (0..self.num_layers())
            .map(|i| {
                let (k, v) = self.layer(i).expect("a non-empty cache has every layer");
                Ok((host(&k)?, host(&v)?))
            })
            .collect()
    }
}

/// A model on the engine it runs on.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    engine: Engine,
    model: Model,
}

impl LoadedModel {
    /// `model` (built for `engine`) on `engine`.
    pub fn new(engine: Engine, model: Model) -> Self {
        debug_assert!(engine.device().same_device(model.device()));
        LoadedModel { engine, model }
    }

    /// `model` on the CPU engine.
    pub fn cpu(model: Model) -> Self {
        Self::new(Engine::cpu(), model)
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The model's weights as loaded (what exports and byte accounting read).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// Bytes held by the parameters, as (weights, scales).
    pub fn weight_bytes(&self) -> (u64, u64) {
        self.model.weight_bytes()
    }

    /// KV-cache bytes per position.
    pub fn kv_bytes_per_token(&self) -> u64 {
        self.engine.kv_bytes_per_token(self.model.config())
    }

    /// An empty cache for this model.
    pub fn new_cache(&self) -> EngineCache {
        self.engine.new_cache(&self.model)
    }

    /// See [`Engine::forward`].
    pub fn forward(&self, ids: &[u32], cache: &mut EngineCache, logits: Logits) -> Result<Tensor> {
        self.engine.forward(&self.model, ids, cache, logits)
    }

    /// See [`Engine::forward_last`].
    pub fn forward_last(&self, ids: &[u32], cache: &mut EngineCache) -> Result<Vec<f32>> {
        self.engine.forward_last(&self.model, ids, cache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asking_for_cuda_is_refused_and_a_gpu_placement_runs_on_the_cpu() {
        let e = Engine::for_job(Workload::Training, "cuda", DeviceSpec::Cpu).unwrap_err();
        assert!(
            e.to_string()
                .contains("the training path runs on the CPU in this build"),
            "{e}"
        );
        let e = Engine::for_job(Workload::Generation, "cuda", DeviceSpec::Cuda(0)).unwrap_err();
        assert!(e.to_string().contains("--device cpu"), "{e}");
        let e = Engine::for_job(Workload::Generation, "", DeviceSpec::Cuda(1)).unwrap();
        assert!(e.device().is_cpu());
    }
}
