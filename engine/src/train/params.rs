//! `ParamStore`: a model's trainable parameters and their AdamW moments, by Hugging Face name.
//!
//! A parameter is either dense — an f32 candle `Var` (embeddings, norms, biases, and in
//! `nvfp4-ste` / `none` mode every linear weight: the master weights) — or packed — an
//! [`Nvfp4Tensor`] and nothing else (`nvfp4-full` linear weights). The store is also the
//! [`WeightSource`] a [`Model`] is built from for each step: dense parameters are served as
//! their `Var`s (STE fake-quant linears in `nvfp4-ste` mode), packed ones are dequantized into
//! a fresh `Var` whose gradient (the gradient w.r.t. the dequantized weight) drives the
//! chunked packed AdamW step (`kiln_kernels::cpu::adamw_step_nvfp4`). The parameters are those
//! of the config's [`ModelLayout`], in its order.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use kiln_kernels::cpu::adamw::{MOMENT1_SR_SALT, MOMENT2_SR_SALT};
use kiln_kernels::cpu::{adamw_step_nvfp4, AdamWParams, AdamWScalars};
use kiln_kernels::nvfp4::Nvfp4Tensor;

use crate::error::{EngineError, Result};
use crate::model::linear::{Linear, LinearWeight};
use crate::model::{
    LinearSpec, Model, ModelConfig, ModelLayout, ParamSpec, TensorSpec, WeightSource,
};
use crate::spec::{MomentsSpec, QuantSpec};

use super::moments::MomentVec;

/// A parameter's value.
#[derive(Debug)]
pub enum ParamValue {
    /// f32 values in a `Var`.
    Dense(Var),
    /// NVFP4-packed weight `[rows, cols]` (nvfp4-full).
    Packed(Nvfp4Tensor),
}

/// One parameter with its optimizer state.
#[derive(Debug)]
pub struct Param {
    /// Hugging Face name (`….weight`, `….bias`).
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// The value.
    pub value: ParamValue,
    /// AdamW first moment (one per element, f32 or bf16).
    pub exp_avg: MomentVec,
    /// AdamW second moment.
    pub exp_avg_sq: MomentVec,
}

impl Param {
    fn new(name: String, shape: Vec<usize>, value: ParamValue) -> Self {
        let n: usize = shape.iter().product();
        Param {
            name,
            shape,
            value,
            exp_avg: MomentVec::zeros(n, MomentsSpec::F32),
            exp_avg_sq: MomentVec::zeros(n, MomentsSpec::F32),
        }
    }

    /// Elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepStats {
    /// Global gradient L2 norm before clipping.
    pub grad_norm: f32,
    /// Largest scratch buffer of a packed step, bytes (one chunk of f32 rows).
    pub peak_chunk_bytes: usize,
}

/// Tensor bytes by category (the phase samples' `tensor_bytes`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamBytes {
    /// Dense parameters (f32) and packed codes.
    pub weights: u64,
    /// NVFP4 block scales and tensor scales.
    pub scales: u64,
    /// AdamW moments.
    pub optimizer_state: u64,
}

/// All trainable parameters of one model.
pub struct ParamStore {
    cfg: ModelConfig,
    quant: QuantSpec,
    device: Device,
    params: Vec<Param>,
    index: HashMap<String, usize>,
    /// The `Var`s of the model built last, by parameter name (dense: the parameter's own Var;
    /// packed: the dequantized copy made for that build).
    live: HashMap<String, Var>,
}

impl std::fmt::Debug for ParamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParamStore")
            .field("quant", &self.quant)
            .field("params", &self.params.len())
            .finish()
    }
}

/// A dense parameter: `t` as an f32 `Var`.
fn dense_param(name: String, t: &Tensor) -> Result<Param> {
    let var = Var::from_tensor(&t.to_dtype(candle_core::DType::F32)?)?;
    Ok(Param::new(name, t.dims().to_vec(), ParamValue::Dense(var)))
}

/// Serves the store's parameters to a model build.
struct Server<'a> {
    store: &'a mut ParamStore,
}

impl Server<'_> {
    fn param(&self, name: &str) -> Result<&Param> {
        self.store
            .index
            .get(name)
            .map(|&i| &self.store.params[i])
            .ok_or_else(|| EngineError::MissingTensor {
                name: name.to_string(),
                dir: "<training parameters>".into(),
            })
    }

    fn dense(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let p = self.param(name)?;
        if p.shape != shape {
            return Err(EngineError::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                got: p.shape.clone(),
            });
        }
        let var = match &p.value {
            ParamValue::Dense(v) => v.clone(),
            ParamValue::Packed(q) => {
                Var::from_vec(q.dequantize(), (q.rows, q.cols), &self.store.device)?
            }
        };
        let t = var.as_tensor().clone();
        self.store.live.insert(name.to_string(), var);
        Ok(t)
    }
}

impl WeightSource for Server<'_> {
    fn tensor(&mut self, spec: &TensorSpec) -> Result<Tensor> {
        self.dense(&spec.name, &spec.shape)
    }

    fn linear(&mut self, spec: &LinearSpec) -> Result<Linear> {
        let w = spec.weight();
        let w = self.dense(&w.name, &w.shape)?;
        let weight = match self.store.quant {
            QuantSpec::Nvfp4Ste if spec.nvfp4 => LinearWeight::Ste(w),
            _ => LinearWeight::Dense(w),
        };
        let b = self.bias(spec)?;
        Linear::new(weight, b)
    }
}

impl ParamStore {
    /// Take the parameters of a model of shape `cfg` from `src`. `src` should produce dense
    /// linears for `nvfp4-ste` / `none` and NVFP4 linears for `nvfp4-full`.
    pub fn from_source(
        cfg: &ModelConfig,
        src: &mut dyn WeightSource,
        quant: QuantSpec,
        device: &Device,
    ) -> Result<Self> {
        let layout = ModelLayout::new(cfg)?;
        let mut params = Vec::new();
        for (_, spec) in layout.params() {
            match spec {
                ParamSpec::Tensor(t) => params.push(dense_param(t.name.clone(), &src.tensor(t)?)?),
                ParamSpec::Linear(l) => {
                    let (weight, bias) = src.layer(l)?.into_parts();
                    let w = l.weight();
                    match weight {
                        LinearWeight::Nvfp4(q) if quant == QuantSpec::Nvfp4Full => {
                            // The source's copy when it is the only one (no second copy of a
                            // large model's packed weights).
                            let q = std::sync::Arc::try_unwrap(q).unwrap_or_else(|a| (*a).clone());
                            params.push(Param::new(w.name, w.shape, ParamValue::Packed(q)))
                        }
                        other => params.push(dense_param(w.name, &other.dense(device)?)?),
                    }
                    if let (Some(b), Some(spec)) = (bias.as_ref(), l.bias_tensor()) {
                        params.push(dense_param(spec.name, b)?);
                    }
                }
            }
        }
        let index = params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), i))
            .collect();
        Ok(ParamStore {
            cfg: cfg.clone(),
            quant,
            device: device.clone(),
            params,
            index,
            live: HashMap::new(),
        })
    }

    /// The store with its moments reset to zeros of element type `kind`.
    pub fn with_moments(mut self, kind: MomentsSpec) -> Self {
        for p in &mut self.params {
            let n = p.numel();
            p.exp_avg = MomentVec::zeros(n, kind);
            p.exp_avg_sq = MomentVec::zeros(n, kind);
        }
        self
    }

    /// The moments' element type.
    pub fn moments(&self) -> MomentsSpec {
        self.params
            .first()
            .map_or(MomentsSpec::F32, |p| p.exp_avg.kind())
    }

    /// The parameters in build order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// A parameter by name.
    pub fn param(&self, name: &str) -> Option<&Param> {
        self.index.get(name).map(|&i| &self.params[i])
    }

    /// Mutable access to a parameter by name (for restoring optimizer state).
    pub fn param_mut(&mut self, name: &str) -> Option<&mut Param> {
        self.index.get(name).map(|&i| &mut self.params[i])
    }

    /// The training mode.
    pub fn quant(&self) -> QuantSpec {
        self.quant
    }

    /// A model over the current parameters whose forward is differentiable w.r.t. them
    /// (`Pass::Training`). Packed weights are dequantized into fresh `Var`s.
    pub fn model(&mut self) -> Result<Model> {
        self.live.clear();
        let cfg = self.cfg.clone();
        let device = self.device.clone();
        Model::build(&cfg, &mut Server { store: self }, &device)
    }

    /// A model for saving: packed weights as NVFP4 linears, dense weights as dense ones.
    pub fn export_model(&mut self) -> Result<Model> {
        let mut src = ExportSource { store: self };
        let cfg = src.store.cfg.clone();
        let device = src.store.device.clone();
        Model::build(&cfg, &mut src, &device)
    }

    /// Bytes by category.
    pub fn bytes(&self) -> ParamBytes {
        let mut b = ParamBytes::default();
        for p in &self.params {
            match &p.value {
                ParamValue::Dense(_) => b.weights += 4 * p.numel() as u64,
                ParamValue::Packed(q) => {
                    b.weights += q.packed.len() as u64;
                    b.scales += q.scales.len() as u64 + 4;
                }
            }
            b.optimizer_state += p.exp_avg.bytes() + p.exp_avg_sq.bytes();
        }
        b
    }

    /// Bytes of the dequantized f32 copies of packed weights a training build makes (transient:
    /// they live for one forward/backward).
    pub fn dequantized_bytes(&self) -> u64 {
        self.params
            .iter()
            .filter(|p| matches!(p.value, ParamValue::Packed(_)))
            .map(|p| 4 * p.numel() as u64)
            .sum()
    }

    /// The gradients of the last built model's parameters (zeros for a parameter the loss does
    /// not reach), in parameter order.
    pub fn gradients(&self, grads: &GradStore) -> Result<Vec<Vec<f32>>> {
        self.params
            .iter()
            .map(|p| {
                let g = self
                    .live
                    .get(&p.name)
                    .and_then(|v| grads.get(v.as_tensor()));
                Ok(match g {
                    Some(g) => g.flatten_all()?.to_vec1::<f32>()?,
                    None => vec![0.0; p.numel()],
                })
            })
            .collect()
    }

    /// One AdamW step with gradients `grads` (from [`ParamStore::gradients`]), clipped to a
    /// global L2 norm of `max_grad_norm` (0 = no clipping). `step` is 1-based. Dense parameters
    /// are updated element by element with the same arithmetic as the packed kernel
    /// ([`AdamWScalars::update`]); packed ones by the chunked packed step, `chunk_rows` rows at
    /// a time, with stochastic rounding seeded by `seed` and the parameter's name.
    ///
    /// With `lr == 0` the update `w·(1 − 0·wd) − 0·m̂/(√v̂+ε)` is the identity, so the weights
    /// stay bit-identical: dense values are rewritten unchanged, and packed weights are not
    /// requantized (requantizing unchanged values would still move codes, because the tensor
    /// scale is recomputed from the dequantized amax); the moments are updated either way.
    pub fn adamw_step(
        &mut self,
        mut grads: Vec<Vec<f32>>,
        hp: AdamWParams,
        step: u64,
        chunk_rows: usize,
        seed: u64,
        max_grad_norm: f32,
    ) -> Result<StepStats> {
        let norm = grads
            .iter()
            .flatten()
            .map(|&g| (g as f64) * (g as f64))
            .sum::<f64>()
            .sqrt() as f32;
        if !norm.is_finite() {
            return Err(EngineError::InvalidArgument(format!(
                "the gradient norm is {norm} at step {step}; training diverged — lower the learning rate"
            )));
        }
        if max_grad_norm > 0.0 && norm > max_grad_norm {
            let s = max_grad_norm / norm;
            grads.iter_mut().flatten().for_each(|g| *g *= s);
        }
        let sc = AdamWScalars::new(hp, step, seed);
        let mut stats = StepStats {
            grad_norm: norm,
            ..Default::default()
        };
        for (p, g) in self.params.iter_mut().zip(grads) {
            // bf16 moments' stochastic rounding: per step, parameter and moment.
            let name_seed = sc.sr_seed ^ crate::model::weights::fnv1a(&p.name);
            let (ms, vs) = (name_seed ^ MOMENT1_SR_SALT, name_seed ^ MOMENT2_SR_SALT);
            match &mut p.value {
                ParamValue::Dense(var) => {
                    let mut w = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                    p.exp_avg.update_f32(ms, |m| {
                        p.exp_avg_sq.update_f32(vs, |v| {
                            for (i, wv) in w.iter_mut().enumerate() {
                                (*wv, m[i], v[i]) = sc.update(*wv, g[i], m[i], v[i]);
                            }
                        })
                    });
                    var.set(&Tensor::from_vec(w, p.shape.as_slice(), var.device())?)?;
                }
                ParamValue::Packed(_) if hp.lr == 0.0 => {
                    p.exp_avg.update_f32(ms, |m| {
                        p.exp_avg_sq.update_f32(vs, |v| {
                            for (i, &gv) in g.iter().enumerate() {
                                (_, m[i], v[i]) = sc.update(0.0, gv, m[i], v[i]);
                            }
                        })
                    });
                }
                ParamValue::Packed(q) => {
                    let pseed = seed ^ crate::model::weights::fnv1a(&p.name);
                    let st = p.exp_avg.update_f32(ms, |m| {
                        p.exp_avg_sq.update_f32(vs, |v| {
                            adamw_step_nvfp4(q, &g, m, v, hp, step, chunk_rows, pseed)
                        })
                    })?;
                    stats.peak_chunk_bytes = stats.peak_chunk_bytes.max(st.peak_temp_bytes);
                }
            }
        }
        Ok(stats)
    }
}

/// Serves the store for saving: packed parameters as NVFP4 linears.
struct ExportSource<'a> {
    store: &'a mut ParamStore,
}

impl WeightSource for ExportSource<'_> {
    fn is_packed(&self, spec: &LinearSpec) -> bool {
        self.store
            .index
            .get(&spec.weight().name)
            .is_some_and(|&i| matches!(self.store.params[i].value, ParamValue::Packed(_)))
    }

    fn tensor(&mut self, spec: &TensorSpec) -> Result<Tensor> {
        Server { store: self.store }.tensor(spec)
    }

    fn linear(&mut self, spec: &LinearSpec) -> Result<Linear> {
        let w = spec.weight();
        let weight = match self
            .store
            .index
            .get(&w.name)
            .map(|&i| &self.store.params[i].value)
        {
            Some(ParamValue::Packed(q)) => LinearWeight::Nvfp4(std::sync::Arc::new(q.clone())),
            _ => LinearWeight::Dense(Server { store: self.store }.dense(&w.name, &w.shape)?),
        };
        let b = Server { store: self.store }.bias(spec)?;
        Linear::new(weight, b)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Tensor;

    use super::*;
    use crate::engine::Engine;
    use crate::model::{LinearFormat, Logits, Pass};

    #[test]
    fn ste_training_forward_equals_the_nvfp4_inference_model() {
        let cfg = crate::tiny::config().unwrap();
        let engine = Engine::cpu();
        let mut base = engine.random_weights(crate::tiny::TINY_SEED, LinearFormat::Dense);
        let mut store =
            ParamStore::from_source(&cfg, &mut base, QuantSpec::Nvfp4Ste, engine.device()).unwrap();
        let m = store.model().unwrap();
        let infer = crate::tiny::model(LinearFormat::Nvfp4, engine.device()).unwrap();
        let ids: Vec<u32> = (3..40).collect();
        let t = Tensor::from_vec(ids.clone(), (1, ids.len()), engine.device()).unwrap();
        let a = m
            .forward_batch(&t, None, Logits::All, Pass::Training)
            .unwrap();
        let b = infer
            .forward(&ids, &mut infer.new_cache(), Logits::All)
            .unwrap();
        let d = (a.squeeze(0).unwrap() - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-4);
        // 4 layers × (4 attention + 3 MLP weights + 3 biases + 2 norms) + embed + norm.
        assert_eq!(store.params().len(), 4 * 12 + 2);
    }
}
