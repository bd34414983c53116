//! `Model`: the decoder-only transformer shared by Qwen2, Qwen3 and Llama — embedding, a stack
//! of pre-norm decoder layers (grouped-query attention with RoPE, SwiGLU MLP), final RMSNorm
//! and the LM head (tied to the embedding or separate). The forward runs with or without a
//! `KvCache` and, for training, with differentiable ops. The model is built by walking its
//! [`ModelLayout`], and lists its parameters in the layout's order.

use candle_core::{DType, Device, Tensor, D};

use super::config::ModelConfig;
use super::kv_cache::KvCache;
use super::layout::{LayerParam, ModelLayout, ParamKey, ParamSpec};
use super::linear::{rms_norm, tensor_bytes, Linear};
use super::rope::Rope;
use super::weights::WeightSource;
use crate::error::{EngineError, Result};

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every input position (training, A/B checks).
    All,
    /// Only the last input position (generation: saves the `[T, vocab]` head matmul).
    Last,
}

/// Which implementation of the ops the forward uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Fused inference kernels (no backward).
    Inference,
    /// Composite ops with a backward pass (training).
    Training,
}

/// One decoder layer's attention block.
#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// Qwen3 per-head RMSNorm weights for q and k (`[head_dim]`).
    qk_norm: Option<(Tensor, Tensor)>,
}

/// One decoder layer.
#[derive(Debug, Clone)]
struct DecoderLayer {
    input_norm: Tensor,
    attn: Attention,
    post_attn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// A loaded decoder-only language model.
#[derive(Debug, Clone)]
pub struct Model {
    cfg: ModelConfig,
    layout: ModelLayout,
    /// `[vocab, hidden]`.
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    /// `[hidden]`.
    norm: Tensor,
    /// `None` when the head is tied to `embed`.
    lm_head: Option<Linear>,
    rope: Rope,
    device: Device,
}

impl Model {
    /// Build a model of shape `cfg` from `src`, walking the config's [`ModelLayout`].
    pub fn build(cfg: &ModelConfig, src: &mut dyn WeightSource, device: &Device) -> Result<Self> {
        let layout = ModelLayout::new(cfg)?;
        let embed = src.tensor(layout.embed())?;
        let mut layers = Vec::with_capacity(layout.layers().len());
        for l in layout.layers() {
            let qk_norm = match (&l.q_norm, &l.k_norm) {
                (Some(q), Some(k)) => Some((src.tensor(q)?, src.tensor(k)?)),
                _ => None,
            };
            layers.push(DecoderLayer {
                input_norm: src.tensor(&l.input_norm)?,
                attn: Attention {
                    q: src.layer(&l.q_proj)?,
                    k: src.layer(&l.k_proj)?,
                    v: src.layer(&l.v_proj)?,
                    o: src.layer(&l.o_proj)?,
                    qk_norm,
                },
                post_attn_norm: src.tensor(&l.post_attention_norm)?,
                gate: src.layer(&l.gate_proj)?,
                up: src.layer(&l.up_proj)?,
                down: src.layer(&l.down_proj)?,
            });
        }
        let norm = src.tensor(layout.norm())?;
        let lm_head = layout.lm_head().map(|h| src.layer(h)).transpose()?;
        Ok(Model {
            cfg: cfg.clone(),
            layout,
            embed,
            layers,
            norm,
            lm_head,
            rope: Rope::new(cfg),
            device: device.clone(),
        })
    }

    /// The tensors of this model: names, shapes, roles.
    pub fn layout(&self) -> &ModelLayout {
        &self.layout
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The device tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty KV cache sized for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.num_hidden_layers)
    }

    /// Forward one sequence of `ids` after the positions already in `cache` (appending to
    /// it). Returns logits `[T, vocab]` (`Logits::All`) or `[1, vocab]` (`Logits::Last`).
    pub fn forward(&self, ids: &[u32], cache: &mut KvCache, logits: Logits) -> Result<Tensor> {
        let t = ids.len();
        let input = Tensor::from_vec(ids.to_vec(), (1, t), &self.device)?;
        let out = self.forward_batch(&input, Some(cache), logits, Pass::Inference)?;
        Ok(out.squeeze(0)?)
    }

    /// Forward a batch `ids` `[B, T]` (u32). With a cache, positions continue after the
    /// cached ones and the new keys/values are appended. Returns `[B, T or 1, vocab]`.
    pub fn forward_batch(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut KvCache>,
        logits: Logits,
        pass: Pass,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.len());
        if t == 0 {
            return Err(EngineError::InvalidArgument(
                "forward of zero tokens".into(),
            ));
        }
        if offset + t > self.cfg.max_position_embeddings {
            return Err(EngineError::PromptTooLong {
                tokens: offset + t,
                max_context: self.cfg.max_position_embeddings,
                reserve: 0,
            });
        }
        let vocab = self.cfg.vocab_size as u32;
        if let Some(bad) = ids
            .flatten_all()?
            .to_vec1::<u32>()?
            .into_iter()
            .find(|&i| i >= vocab)
        {
            return Err(EngineError::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((
            b,
            t,
            self.cfg.hidden_size,
        ))?;
        let (cos, sin) = self.rope.cos_sin(offset, t, &self.device)?;
        let mask = causal_mask(t, offset, &self.device)?;
        let diff = pass == Pass::Training;
        let eps = self.cfg.rms_norm_eps;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.input_norm, eps, diff)?;
            let a = self.attention(
                i,
                &layer.attn,
                &h,
                &cos,
                &sin,
                mask.as_ref(),
                &mut cache,
                pass,
            )?;
            x = (x + a)?;
            let h = rms_norm(&x, &layer.post_attn_norm, eps, diff)?;
            let g = candle_nn::ops::silu(&layer.gate.forward(&h)?)?;
            let m = layer.down.forward(&(g * layer.up.forward(&h)?)?)?;
            x = (x + m)?;
        }
        if let Some(c) = cache {
            c.commit(t);
        }
        let x = match logits {
            Logits::All => x,
            Logits::Last => x.narrow(1, t - 1, 1)?,
        };
        let x = rms_norm(&x, &self.norm, eps, diff)?;
        let out = match &self.lm_head {
            Some(head) => head.forward(&x)?,
            None => {
                let (b, r, h) = x.dims3()?;
                x.reshape((b * r, h))?.matmul(&self.embed.t()?)?.reshape((
                    b,
                    r,
                    self.cfg.vocab_size,
                ))?
            }
        };
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: usize,
        attn: &Attention,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut Option<&mut KvCache>,
        pass: Pass,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let (nh, kvh, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let diff = pass == Pass::Training;
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let mut q = heads(attn.q.forward(x)?, nh)?;
        let mut k = heads(attn.k.forward(x)?, kvh)?;
        let v = heads(attn.v.forward(x)?, kvh)?;
        if let Some((qn, kn)) = &attn.qk_norm {
            q = rms_norm(&q, qn, cfg.rms_norm_eps, diff)?;
            k = rms_norm(&k, kn, cfg.rms_norm_eps, diff)?;
        }
        let (q, k) = if diff {
            (
                candle_nn::rotary_emb::rope_slow(&q, cos, sin)?,
                candle_nn::rotary_emb::rope_slow(&k, cos, sin)?,
            )
        } else {
            (
                candle_nn::rotary_emb::rope(&q, cos, sin)?,
                candle_nn::rotary_emb::rope(&k, cos, sin)?,
            )
        };
        let (k, v) = match cache {
            Some(c) => c.append(layer, &k, &v)?,
            None => (k, v),
        };
        let s = k.dim(2)?;
        // GQA without copying K/V: the n_rep query heads that share a KV head are stacked
        // along the sequence axis: q [b, kvh, n_rep·t, hd] · kᵀ [b, kvh, hd, s].
        let n_rep = nh / kvh;
        let q = q.reshape((b, kvh, n_rep * t, hd))?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        let scores = match mask {
            Some(m) => scores
                .reshape((b, kvh, n_rep, t, s))?
                .broadcast_add(m)?
                .reshape((b, kvh, n_rep * t, s))?,
            None => scores,
        };
        let probs = if diff {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let out = probs.matmul(&v)?; // [b, kvh, n_rep·t, hd]
        let out = out
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        attn.o.forward(&out)
    }

    /// This model with the numerics of the GPU engine where they differ by design, as the
    /// CPU reference the GPU is checked against: the embedding rounded to bf16 (the GPU keeps
    /// it in bf16) and an NVFP4 vocabulary projection (the GPU's): quantized from the
    /// embedding when the head is tied, from a dense head otherwise. Other linears are
    /// unchanged (the same NVFP4 bytes).
    pub fn gpu_reference(&self) -> Result<Model> {
        use super::linear::LinearWeight;
        let quantized = |w: &Tensor| -> Result<Linear> {
            let (n, k) = w.dims2()?;
            let v = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let q = kiln_kernels::nvfp4::Nvfp4Tensor::quantize(&v, n, k)?;
            Linear::new(LinearWeight::Nvfp4(std::sync::Arc::new(q)), None)
        };
        let mut m = self.clone();
        m.lm_head = match &self.lm_head {
            None => Some(quantized(&self.embed)?),
            Some(h) => match h.weight() {
                LinearWeight::Nvfp4(_) => Some(h.clone()),
                LinearWeight::Dense(w) | LinearWeight::Ste(w) => Some(quantized(w)?),
            },
        };
        m.embed = self.embed.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
        Ok(m)
    }

    /// Every parameter with its place in the [`ModelLayout`], in the layout's order. Linear
    /// layers are listed by prefix (their weight is `{prefix}.weight`, their bias `.bias`).
    pub fn parameters(&self) -> Vec<(ParamSpec<'_>, ParamRef<'_>)> {
        self.layout
            .params()
            .into_iter()
            .map(|(key, spec)| (spec, self.param_ref(key)))
            .collect()
    }

    /// The parameter the layout calls `key` (it must be one the layout lists).
    pub fn param_ref(&self, key: ParamKey) -> ParamRef<'_> {
        use LayerParam as L;
        let qk = |i: usize| {
            self.layers[i]
                .attn
                .qk_norm
                .as_ref()
                .expect("the layout lists q/k norms only when the model has them")
        };
        match key {
            ParamKey::Embed => ParamRef::Tensor(&self.embed),
            ParamKey::Norm => ParamRef::Tensor(&self.norm),
            ParamKey::LmHead => ParamRef::Linear(
                self.lm_head
                    .as_ref()
                    .expect("the layout lists an LM head only when it is untied"),
            ),
            ParamKey::Layer(i, p) => {
                let l = &self.layers[i];
                match p {
                    L::QNorm => ParamRef::Tensor(&qk(i).0),
                    L::KNorm => ParamRef::Tensor(&qk(i).1),
                    L::InputNorm => ParamRef::Tensor(&l.input_norm),
                    L::QProj => ParamRef::Linear(&l.attn.q),
                    L::KProj => ParamRef::Linear(&l.attn.k),
                    L::VProj => ParamRef::Linear(&l.attn.v),
                    L::OProj => ParamRef::Linear(&l.attn.o),
                    L::PostAttentionNorm => ParamRef::Tensor(&l.post_attn_norm),
                    L::GateProj => ParamRef::Linear(&l.gate),
                    L::UpProj => ParamRef::Linear(&l.up),
                    L::DownProj => ParamRef::Linear(&l.down),
                }
            }
        }
    }

    /// Bytes held by the parameters, as (weights, scales): every parameter of the layout.
    pub fn weight_bytes(&self) -> (u64, u64) {
        let (mut w, mut s) = (0, 0);
        for (_, p) in self.parameters() {
            match p {
                ParamRef::Tensor(t) => w += tensor_bytes(t),
                ParamRef::Linear(l) => {
                    let (a, b) = l.bytes();
                    w += a;
                    s += b;
                }
            }
        }
        (w, s)
    }

    /// An estimate of the peak transient (activation) bytes of one forward of `t` new tokens
    /// attending to `s` positions, producing `logit_rows` rows of logits: the residual stream
    /// and normed copy, q/k/v, the attention scores and probabilities, the MLP's three
    /// intermediate tensors and the logits, in f32.
    pub fn activation_bytes(&self, t: usize, s: usize, logit_rows: usize) -> u64 {
        let c = &self.cfg;
        let f = DType::F32.size_in_bytes();
        let per_layer = t * (2 * c.hidden_size + c.q_size() + 2 * c.kv_size())
            + 2 * c.num_attention_heads * t * s
            + 3 * t * c.intermediate_size;
        ((per_layer + logit_rows * c.vocab_size) * f) as u64
    }
}

/// A parameter as [`Model::parameters`] lists it.
#[derive(Debug, Clone, Copy)]
pub enum ParamRef<'a> {
    /// A dense tensor (embedding, norm weight); the name ends in `.weight`.
    Tensor(&'a Tensor),
    /// A linear layer; the name is its prefix (`….q_proj`).
    Linear(&'a Linear),
}

/// The additive causal mask `[t, offset + t]` for `t > 1` new positions after `offset`
/// cached ones (`-inf` where key position > query position); `None` for a single token.
fn causal_mask(t: usize, offset: usize, device: &Device) -> Result<Option<Tensor>> {
    if t == 1 {
        return Ok(None);
    }
    let s = offset + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Some(Tensor::from_vec(mask, (t, s), device)?))
}
