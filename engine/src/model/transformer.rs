//! `Model`: the decoder-only transformer shared by Qwen2, Qwen3 and Llama — embedding, a stack
//! of pre-norm decoder layers (grouped-query attention with RoPE, SwiGLU MLP), final RMSNorm
//! and the LM head (tied to the embedding or separate). The forward runs with or without a
//! `KvCache` and, for training, with differentiable ops.

use candle_core::{DType, Device, Tensor, D};

use super::config::ModelConfig;
use super::kv_cache::KvCache;
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
    /// Build a model of shape `cfg` from `src` (Hugging Face tensor names).
    pub fn build(cfg: &ModelConfig, src: &mut dyn WeightSource, device: &Device) -> Result<Self> {
        cfg.validate().map_err(EngineError::InvalidArgument)?;
        let h = cfg.hidden_size;
        let embed = src.tensor("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let qk_norm = if cfg.qk_norm() {
                Some((
                    src.tensor(&format!("{p}.self_attn.q_norm.weight"), &[cfg.head_dim])?,
                    src.tensor(&format!("{p}.self_attn.k_norm.weight"), &[cfg.head_dim])?,
                ))
            } else {
                None
            };
            let b = cfg.attention_bias;
            layers.push(DecoderLayer {
                input_norm: src.tensor(&format!("{p}.input_layernorm.weight"), &[h])?,
                attn: Attention {
                    q: src.linear(&format!("{p}.self_attn.q_proj"), cfg.q_size(), h, b)?,
                    k: src.linear(&format!("{p}.self_attn.k_proj"), cfg.kv_size(), h, b)?,
                    v: src.linear(&format!("{p}.self_attn.v_proj"), cfg.kv_size(), h, b)?,
                    o: src.linear(&format!("{p}.self_attn.o_proj"), h, cfg.q_size(), false)?,
                    qk_norm,
                },
                post_attn_norm: src
                    .tensor(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate: src.linear(
                    &format!("{p}.mlp.gate_proj"),
                    cfg.intermediate_size,
                    h,
                    false,
                )?,
                up: src.linear(&format!("{p}.mlp.up_proj"), cfg.intermediate_size, h, false)?,
                down: src.linear(
                    &format!("{p}.mlp.down_proj"),
                    h,
                    cfg.intermediate_size,
                    false,
                )?,
            });
        }
        let norm = src.tensor("model.norm.weight", &[h])?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            // The head stays dense (as ModelOpt leaves it) unless the checkpoint packed it.
            if src.is_packed("lm_head") {
                Some(src.linear("lm_head", cfg.vocab_size, h, false)?)
            } else {
                let w = src.tensor("lm_head.weight", &[cfg.vocab_size, h])?;
                Some(Linear::new(super::linear::LinearWeight::Dense(w), None)?)
            }
        };
        Ok(Model {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            rope: Rope::new(cfg),
            device: device.clone(),
        })
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

    /// Every parameter with its Hugging Face name, in a stable order (embedding, layers,
    /// final norm, untied head). Linear layers appear as `{prefix}.weight` (and `.bias`).
    pub fn parameters(&self) -> Vec<(String, ParamRef<'_>)> {
        let mut out: Vec<(String, ParamRef<'_>)> = vec![(
            "model.embed_tokens.weight".into(),
            ParamRef::Tensor(&self.embed),
        )];
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                ParamRef::Tensor(&layer.input_norm),
            ));
            for (n, l) in [
                ("q_proj", &layer.attn.q),
                ("k_proj", &layer.attn.k),
                ("v_proj", &layer.attn.v),
                ("o_proj", &layer.attn.o),
            ] {
                out.push((format!("{p}.self_attn.{n}"), ParamRef::Linear(l)));
            }
            if let Some((qn, kn)) = &layer.attn.qk_norm {
                out.push((format!("{p}.self_attn.q_norm.weight"), ParamRef::Tensor(qn)));
                out.push((format!("{p}.self_attn.k_norm.weight"), ParamRef::Tensor(kn)));
            }
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                ParamRef::Tensor(&layer.post_attn_norm),
            ));
            for (n, l) in [
                ("gate_proj", &layer.gate),
                ("up_proj", &layer.up),
                ("down_proj", &layer.down),
            ] {
                out.push((format!("{p}.mlp.{n}"), ParamRef::Linear(l)));
            }
        }
        out.push(("model.norm.weight".into(), ParamRef::Tensor(&self.norm)));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head".into(), ParamRef::Linear(h)));
        }
        out
    }

    /// Bytes held by the parameters, as (weights, scales).
    pub fn weight_bytes(&self) -> (u64, u64) {
        let mut w = tensor_bytes(&self.embed) + tensor_bytes(&self.norm);
        let mut s = 0;
        let mut add = |l: &Linear| {
            let (a, b) = l.bytes();
            w += a;
            s += b;
        };
        for layer in &self.layers {
            for l in [&layer.attn.q, &layer.attn.k, &layer.attn.v, &layer.attn.o] {
                add(l);
            }
            for l in [&layer.gate, &layer.up, &layer.down] {
                add(l);
            }
        }
        if let Some(h) = &self.lm_head {
            add(h);
        }
        for layer in &self.layers {
            w += tensor_bytes(&layer.input_norm) + tensor_bytes(&layer.post_attn_norm);
            if let Some((a, b)) = &layer.attn.qk_norm {
                w += tensor_bytes(a) + tensor_bytes(b);
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
