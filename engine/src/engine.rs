//! The device seam. [`Engine`] is where a job's models live and run, chosen once per job from
//! its device ([`Engine::for_job`]); [`EngineCache`] is a sequence's keys and values, held
//! where its engine runs; [`LoadedModel`] is a model together with its engine — what
//! generation, sessions and chat use. Generation (`generate`, `session`, `session_store`) and
//! training (`train`) reach the model only through these; the candle device is written here
//! and nowhere else on those paths.
//!
//! Two engines: [`CpuEngine`] — candle tensors in host memory, the NVFP4 linears through
//! `kiln_kernels::cpu` (the reference, and the path of boxes without a GPU) — and
//! [`CudaEngine`] — the model resident on one GPU (`crate::cuda`), decoded by a captured CUDA
//! graph. Models are built on the host first (the same bytes either way) and uploaded by
//! [`LoadedModel::new`]. Generation runs on the GPU a job is placed on; training still runs on
//! the CPU. A job that asks for `cuda` where CUDA cannot be used fails, naming why: there is
//! no silent fallback.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use kiln_kernels::cuda::CudaKernels;

use crate::cuda::{CudaModel, CudaSequence};

use crate::error::{EngineError, Result};
use crate::model::{
    Checkpoint, CheckpointWeights, GpuQuantizer, KvCache, LinearFormat, LoadOptions, Logits, Model,
    ModelConfig, Pass, RandomWeights, WeightSource,
};
use crate::spec::DeviceSpec;

/// Where models live and run.
#[derive(Debug, Clone)]
pub enum Engine {
    /// Host memory and CPU kernels.
    Cpu(CpuEngine),
    /// One GPU.
    Cuda(CudaEngine),
}

/// The GPU engine: one device's kernels; models are built on the host, then uploaded.
#[derive(Clone)]
pub struct CudaEngine {
    kernels: Arc<CudaKernels>,
    ordinal: usize,
    /// Where models are staged before the upload (the host).
    host: Device,
}

impl std::fmt::Debug for CudaEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaEngine")
            .field("ordinal", &self.ordinal)
            .field("device", &self.kernels.device_name())
            .finish()
    }
}

impl CudaEngine {
    /// The kernels (device, stream).
    pub fn kernels(&self) -> &Arc<CudaKernels> {
        &self.kernels
    }

    /// The GPU's index.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
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
#[derive(Debug)]
pub enum EngineCache {
    /// Per-layer candle tensors on the host.
    Cpu(KvCache),
    /// On the GPU (allocated at the first forward, when the model's shape is known).
    Cuda(CudaCache),
}

/// A GPU sequence, or what it will start from before its first forward.
#[derive(Debug)]
pub enum CudaCache {
    /// Not on the GPU yet: saved keys and values (`len` positions; none for a new sequence)
    /// and the capacity to allocate.
    Pending {
        /// Saved per-layer keys and values.
        layers: Vec<(HostTensor, HostTensor)>,
        /// Positions saved.
        len: usize,
        /// Positions to allocate for.
        capacity: usize,
    },
    /// On the GPU.
    Live(Box<CudaSequence>),
}

impl Clone for EngineCache {
    /// A GPU cache is copied through the host (its clone is a new sequence).
    fn clone(&self) -> Self {
        match self {
            EngineCache::Cpu(c) => EngineCache::Cpu(c.clone()),
            EngineCache::Cuda(c) => EngineCache::Cuda(CudaCache::Pending {
                layers: self.to_host().expect("copying a GPU cache to the host"),
                len: self.len(),
                capacity: match c {
                    CudaCache::Pending { capacity, .. } => *capacity,
                    CudaCache::Live(s) => s.capacity(),
                },
            }),
        }
    }
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

    /// The GPU engine on device `ordinal`: fails with [`EngineError::GpuUnavailable`] naming
    /// the missing library, the missing device or the driver error.
    pub fn cuda(ordinal: usize) -> Result<Self> {
        let kernels = CudaKernels::new(ordinal).map_err(|e| {
            EngineError::GpuUnavailable(format!(
                "cannot use CUDA device {ordinal}: {e}; run on a machine with a working NVIDIA \
                 driver and CUDA 13, or submit with --device cpu"
            ))
        })?;
        Ok(Engine::Cuda(CudaEngine {
            kernels: Arc::new(kernels),
            ordinal,
            host: Device::Cpu,
        }))
    }

    /// The engine for a job that asked for `requested` (`cpu`, `cuda` or `""`: whatever the
    /// agent gives) and that the agent placed on `assigned`. A job placed on a GPU runs on that
    /// GPU, asked or not, and fails if that GPU cannot be used (never a silent CPU run); `cpu`
    /// keeps it on the CPU; `cuda` on a CPU placement fails. (A train job whose model or mode
    /// the GPU trainer does not take yet moves to the CPU later, saying why in its log.)
    pub fn for_job(requested: &str, assigned: DeviceSpec) -> Result<Self> {
        match (requested, assigned) {
            ("cpu", _) => Ok(Engine::cpu()),
            (_, DeviceSpec::Cuda(i)) => Engine::cuda(i as usize),
            ("cuda", DeviceSpec::Cpu) => Err(EngineError::GpuUnavailable(
                "the job asked for --device cuda but was placed on the CPU (submitted with \
                 --gpus 0, or run locally without a GPU); submit with --gpus 1 to an agent with a \
                 GPU, or with --device cpu"
                    .into(),
            )),
            _ => Ok(Engine::cpu()),
        }
    }

    /// Whether models of this engine run on a GPU.
    pub fn is_cuda(&self) -> bool {
        matches!(self, Engine::Cuda(_))
    }

    /// What the engine runs on, for logs and reports (`cpu`, `cuda:0 (NVIDIA H200)`).
    pub fn describe(&self) -> String {
        match self {
            Engine::Cpu(_) => "cpu".into(),
            Engine::Cuda(e) => format!("cuda:{} ({})", e.ordinal, e.kernels.device_name()),
        }
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

    /// The candle device models are built on (the host for both engines: the GPU engine
    /// uploads a host model, see [`LoadedModel::new`]).
    pub fn device(&self) -> &Device {
        match self {
            Engine::Cpu(e) => &e.device,
            Engine::Cuda(e) => &e.host,
        }
    }

    /// Options to load a model for this engine with linears in `format`.
    pub fn load_options(&self, format: LinearFormat) -> LoadOptions {
        LoadOptions {
            format,
            device: self.device().clone(),
            quantizer: self.quantizer(),
        }
    }

    /// On the GPU engine, its GPU as the quantizer of float linears loaded as NVFP4.
    pub fn quantizer(&self) -> Option<GpuQuantizer> {
        match self {
            Engine::Cpu(_) => None,
            Engine::Cuda(e) => Some(GpuQuantizer(e.kernels.clone())),
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
        CheckpointWeights::new(ckpt, format, self.device().clone()).with_quantizer(self.quantizer())
    }

    /// An empty cache for a model of `num_layers` layers.
    pub fn empty_cache(&self, num_layers: usize) -> EngineCache {
        match self {
            Engine::Cpu(_) => EngineCache::Cpu(KvCache::new(num_layers)),
            Engine::Cuda(_) => EngineCache::Cuda(CudaCache::Pending {
                layers: Vec::new(),
                len: 0,
                capacity: 0,
            }),
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
            Engine::Cuda(_) => {
                let len = layers.first().map_or(0, |(k, _)| k.shape[2]);
                Ok(EngineCache::Cuda(CudaCache::Pending {
                    layers,
                    len,
                    capacity: len,
                }))
            }
        }
    }

    /// Bytes of keys and values one position of `cfg`'s model takes in this engine's cache.
    pub fn kv_bytes_per_token(&self, cfg: &ModelConfig) -> u64 {
        match self {
            // f32 keys and values of every layer.
            Engine::Cpu(_) => (2 * cfg.num_hidden_layers * cfg.kv_size() * 4) as u64,
            // bf16
            Engine::Cuda(_) => crate::cuda::plan::kv_bytes(cfg, 1),
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
            _ => Err(EngineError::InvalidArgument(
                "a GPU model runs through its LoadedModel (Engine::forward is the CPU path)".into(),
            )),
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
            Engine::Cuda(_) => Err(EngineError::InvalidArgument(
                "training runs on the CPU in this build".into(),
            )),
        }
    }
}

impl EngineCache {
    /// Positions held (the next token's position).
    pub fn len(&self) -> usize {
        match self {
            EngineCache::Cpu(c) => c.len(),
            EngineCache::Cuda(CudaCache::Pending { len, .. }) => *len,
            EngineCache::Cuda(CudaCache::Live(s)) => s.len(),
        }
    }

    /// Make room for `positions` positions (the GPU cache is preallocated; the CPU cache
    /// grows as it goes).
    pub fn reserve(&mut self, positions: usize) -> Result<()> {
        match self {
            EngineCache::Cpu(_) => Ok(()),
            EngineCache::Cuda(CudaCache::Pending { capacity, .. }) => {
                *capacity = (*capacity).max(positions);
                Ok(())
            }
            EngineCache::Cuda(CudaCache::Live(s)) => s.reserve(positions),
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
            EngineCache::Cuda(CudaCache::Pending { layers, .. }) => layers.len(),
            EngineCache::Cuda(CudaCache::Live(s)) => s.num_layers(),
        }
    }

    /// Bytes of cached keys and values (for the GPU: the positions held, bf16).
    pub fn bytes(&self) -> u64 {
        match self {
            EngineCache::Cpu(c) => c.bytes(),
            EngineCache::Cuda(CudaCache::Pending { layers, .. }) => layers
                .iter()
                .map(|(k, v)| 2 * (k.data.len() + v.data.len()) as u64)
                .sum(),
            EngineCache::Cuda(CudaCache::Live(s)) => s.used_kv_bytes(),
        }
    }

    /// Layer `i`'s keys and values `[1, kv_heads, len, head_dim]` as candle tensors (on the
    /// host), if any are cached.
    pub fn layer(&self, i: usize) -> Option<(Tensor, Tensor)> {
        match self {
            EngineCache::Cpu(c) => c.layer(i).cloned(),
            EngineCache::Cuda(_) => {
                let (k, v) = self.to_host().ok()?.into_iter().nth(i)?;
                let t = |h: HostTensor| Tensor::from_vec(h.data, h.shape, &Device::Cpu).ok();
                Some((t(k)?, t(v)?))
            }
        }
    }

    /// Every layer's keys and values on the host (none when nothing is cached).
    pub fn to_host(&self) -> Result<Vec<(HostTensor, HostTensor)>> {
        if self.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            EngineCache::Cuda(CudaCache::Pending { layers, .. }) => return Ok(layers.clone()),
            EngineCache::Cuda(CudaCache::Live(s)) => return s.to_host(),
            EngineCache::Cpu(_) => {}
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

/// A model on the engine it runs on. On the GPU engine the host model is kept beside the
/// uploaded one (exports and byte accounting read it).
#[derive(Debug, Clone)]
pub struct LoadedModel {
    engine: Engine,
    model: Model,
    gpu: Option<Arc<CudaModel>>,
}

impl LoadedModel {
    /// `model` (built for `engine`, on the host) on `engine`: the GPU engine uploads it.
    pub fn new(engine: Engine, model: Model) -> Result<Self> {
        debug_assert!(engine.device().same_device(model.device()));
        let gpu = match &engine {
            Engine::Cpu(_) => None,
            Engine::Cuda(e) => Some(Arc::new(CudaModel::from_model(e.kernels.clone(), &model)?)),
        };
        Ok(LoadedModel { engine, model, gpu })
    }

    /// `model` on the CPU engine.
    pub fn cpu(model: Model) -> Self {
        LoadedModel {
            engine: Engine::cpu(),
            model,
            gpu: None,
        }
    }

    /// The model on the GPU, on the GPU engine.
    pub fn gpu(&self) -> Option<&Arc<CudaModel>> {
        self.gpu.as_ref()
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

    /// An empty cache for this model (on the GPU, allocated at its first forward; reserve
    /// the positions a generation needs first).
    pub fn new_cache(&self) -> EngineCache {
        self.engine.new_cache(&self.model)
    }

    /// Forward one sequence of `ids` after the positions already in `cache` (appending to
    /// it). Returns logits `[T, vocab]` (`Logits::All`) or `[1, vocab]` (`Logits::Last`), on
    /// the host. On the GPU, `Logits::All` forwards one token at a time (teacher forcing).
    pub fn forward(&self, ids: &[u32], cache: &mut EngineCache, logits: Logits) -> Result<Tensor> {
        let Some(gpu) = &self.gpu else {
            return self.engine.forward(&self.model, ids, cache, logits);
        };
        let seq = live_sequence(gpu, cache, ids.len())?;
        let vocab = gpu.config().vocab_size;
        match logits {
            Logits::Last => {
                seq.forward(gpu, ids, false)?;
                Ok(Tensor::from_vec(seq.logits()?, (1, vocab), &Device::Cpu)?)
            }
            Logits::All => {
                let mut all = Vec::with_capacity(ids.len() * vocab);
                for &id in ids {
                    seq.forward(gpu, &[id], false)?;
                    all.extend(seq.logits()?);
                }
                Ok(Tensor::from_vec(all, (ids.len(), vocab), &Device::Cpu)?)
            }
        }
    }

    /// Pick tokens of `cache` on the GPU by sampling with `params` (`None`: greedily). On
    /// the CPU engine nothing changes: the host sampler picks from the logits.
    pub fn set_gpu_sampling(
        &self,
        cache: &mut EngineCache,
        params: Option<&crate::generate::SamplingParams>,
    ) -> Result<()> {
        if let Some(gpu) = &self.gpu {
            let seq = live_sequence(gpu, cache, 0)?;
            seq.set_sampling(params.map(|p| kiln_kernels::cuda::decode::DeviceSampling {
                temperature: p.temperature,
                top_k: p.top_k,
                top_p: p.top_p,
                seed: p.seed,
            }));
        }
        Ok(())
    }

    /// Make `cache` ready for `positions` positions now (on the GPU: allocate it and upload
    /// saved keys and values, which otherwise happens at its first forward). Returns the
    /// bytes of keys and values it holds.
    pub fn prepare_cache(&self, cache: &mut EngineCache, positions: usize) -> Result<u64> {
        cache.reserve(positions)?;
        if let Some(gpu) = &self.gpu {
            live_sequence(gpu, cache, 0)?;
            gpu.kernels().synchronize()?;
        }
        Ok(cache.bytes())
    }

    /// The last position's logits after forwarding `ids` into `cache` (a generation step).
    pub fn forward_last(&self, ids: &[u32], cache: &mut EngineCache) -> Result<Vec<f32>> {
        match &self.gpu {
            None => self.engine.forward_last(&self.model, ids, cache),
            Some(gpu) => {
                let seq = live_sequence(gpu, cache, ids.len())?;
                seq.forward(gpu, ids, false)?;
                seq.logits()
            }
        }
    }

    /// Forward `ids` into `cache` and pick: the first index of the largest logit of the last
    /// position (on the GPU: sampled there instead, after [`LoadedModel::set_gpu_sampling`]),
    /// and, with `want_logits`, the logits. On the GPU only the token id crosses to the host
    /// unless the logits are wanted.
    pub fn forward_pick(
        &self,
        ids: &[u32],
        cache: &mut EngineCache,
        want_logits: bool,
    ) -> Result<(u32, Option<Vec<f32>>)> {
        match &self.gpu {
            None => {
                let l = self.engine.forward_last(&self.model, ids, cache)?;
                Ok((crate::generate::argmax(&l), want_logits.then_some(l)))
            }
            Some(gpu) => {
                let seq = live_sequence(gpu, cache, ids.len())?;
                let tok = seq.forward(gpu, ids, true)?.expect("read_token");
                let logits = if want_logits {
                    Some(seq.logits()?)
                } else {
                    None
                };
                Ok((tok, logits))
            }
        }
    }
}

/// The GPU sequence of `cache`, allocated (and loaded with saved keys and values) at its
/// first forward, with room for `adding` more positions.
fn live_sequence<'c>(
    gpu: &CudaModel,
    cache: &'c mut EngineCache,
    adding: usize,
) -> Result<&'c mut CudaSequence> {
    let EngineCache::Cuda(c) = cache else {
        return Err(EngineError::InvalidArgument(
            "a CPU cache was given to a GPU model; make caches with LoadedModel::new_cache".into(),
        ));
    };
    if let CudaCache::Pending {
        layers,
        len,
        capacity,
    } = c
    {
        let cap = (*capacity).max(*len + adding).max(1);
        let mut seq = CudaSequence::new(gpu.kernels().clone(), gpu.config(), cap)?;
        seq.load_host(std::mem::take(layers), *len)?;
        *c = CudaCache::Live(Box::new(seq));
    }
    let CudaCache::Live(seq) = c else {
        unreachable!("made live above")
    };
    Ok(seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_follows_request_and_placement() {
        for asked in ["cuda", ""] {
            // placed on a GPU: that GPU, or (where CUDA cannot be used) an error naming why —
            // never a silent CPU run
            match Engine::for_job(asked, DeviceSpec::Cuda(0)) {
                Ok(e) => assert!(e.is_cuda()),
                Err(e) => {
                    let m = e.to_string();
                    assert!(
                        m.contains("cannot use CUDA device 0") && m.contains("--device cpu"),
                        "{m}"
                    );
                }
            }
        }
        let e = Engine::for_job("cuda", DeviceSpec::Cpu).unwrap_err();
        assert!(e.to_string().contains("--gpus 1"), "{e}");
        assert!(!Engine::for_job("cpu", DeviceSpec::Cuda(0))
            .unwrap()
            .is_cuda());
        assert!(!Engine::for_job("", DeviceSpec::Cpu).unwrap().is_cuda());
    }
}
